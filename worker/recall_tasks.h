// Long-range recall tasks (bench/recall/tasks.py writes them): a fact near the start of the
// prompt, filler, and a question whose answer is the fact. Read by the recall benchmark and by the
// worker's sensitivity calibration (its recall side).
#ifndef REASONALLOC_WORKER_RECALL_TASKS_H_
#define REASONALLOC_WORKER_RECALL_TASKS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace reasonalloc::worker {

struct RecallTask {
  std::string id, kind, answer, head, tail;  // the prompt is head + tail
};

// One task per line, tab-separated: id, kind, answer, head, tail (a backslash and n stand for a
// newline); empty lines and lines starting with '#' are skipped. `flag` names the file in errors.
// With `seed`: the seed tasks.py names in its header line ("... (seed N, ..."), else -1.
absl::StatusOr<std::vector<RecallTask>> ReadRecallTasks(const std::string& path,
                                                        const std::string& flag,
                                                        int* seed = nullptr);

// The answer as a whole word of the text, case-insensitive (tasks.py's answer_matches).
bool AnswerMatches(const std::string& answer, const std::string& text);

// How many leading tokens of `generated` carry its answer: 0 when the whole text does not hold the
// answer as a whole word; else the fewest tokens whose text holds it followed by a character that
// ends the word (so a passkey's last digit and the token after it are both counted, and a word
// that only starts with the answer is not taken for it), or every token when the answer ends the
// text.
int AnswerTokenCount(const std::string& answer, const std::vector<int32_t>& generated,
                     const std::function<std::string(const std::vector<int32_t>&)>& decode);

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_RECALL_TASKS_H_
