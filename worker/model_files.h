// Where the model file and prompt lists come from.
#ifndef REASONALLOC_WORKER_MODEL_FILES_H_
#define REASONALLOC_WORKER_MODEL_FILES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace reasonalloc::worker {

// The model file: `flag` when set, else $REASONALLOC_MODEL, else the file scripts/setup fetches
// ($XDG_CACHE_HOME or ~/.cache, then reasonalloc/models/SmolLM2-135M-Instruct.Q4_1.gguf).
absl::StatusOr<std::string> ResolveModelPath(const std::string& flag);

// One prompt per non-empty line; the two characters \n stand for a newline. Lines starting with #
// are comments.
absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path);

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_MODEL_FILES_H_
