// Long-range recall tasks (bench/recall/tasks.py writes them): a fact near the start of the
// prompt, filler, and a question whose answer is the fact. Read by the recall benchmark and by the
// worker's sensitivity calibration (its recall side).
#ifndef REASONALLOC_WORKER_RECALL_TASKS_H_
#define REASONALLOC_WORKER_RECALL_TASKS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace reasonalloc::worker {

struct RecallTask {
  std::string id, kind, answer, head, tail;  // the prompt is head + tail
};

// One task per line, tab-separated: id, kind, answer, head, tail (a backslash and n stand for a
// newline); empty lines and lines starting with '#' are skipped. `flag` names the file in errors.
absl::StatusOr<std::vector<RecallTask>> ReadRecallTasks(const std::string& path,
                                                        const std::string& flag);

// The answer as a whole word of the text, case-insensitive (tasks.py's answer_matches).
bool AnswerMatches(const std::string& answer, const std::string& text);

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_RECALL_TASKS_H_
