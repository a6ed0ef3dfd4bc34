// Where models and prompt lists come from. Every program and script of the project finds a model
// file through ResolveModelPath (the worker's `locate` subcommand prints its answer for scripts and
// tests), so that one rule holds everywhere:
//   1. --model: a path (it contains a '/'), or a file name looked up in the model folder;
//   2. $REASONALLOC_MODEL, the same way;
//   3. the reference model, SmolLM2-135M-Instruct.Q4_1.gguf, in the model folder.
// The model folder is $REASONALLOC_MODEL_DIR, else $XDG_CACHE_HOME/reasonalloc/models, else
// ~/.cache/reasonalloc/models: where scripts/setup and scripts/fetch-model put models.
#ifndef REASONALLOC_WORKER_MODEL_FILES_H_
#define REASONALLOC_WORKER_MODEL_FILES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace reasonalloc::worker {

inline constexpr char kReferenceModelFile[] = "SmolLM2-135M-Instruct.Q4_1.gguf";

// The model folder; an error when neither $REASONALLOC_MODEL_DIR, $XDG_CACHE_HOME nor $HOME is set.
absl::StatusOr<std::string> ModelDirectory();

// The model file to load (see above). NOT_FOUND names every place it looked.
absl::StatusOr<std::string> ResolveModelPath(const std::string& flag);

// The name a model file goes by with the sidecar (the session's model name, which selects the
// layer profile of that name): the file's name without ".gguf" and without a trailing
// quantisation tag (".Q4_1", "-Q4_K_M", "-q8_0", ".f16", ...), sanitised as below:
// "SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct". Empty when nothing is left.
std::string ModelNameFromPath(const std::string& path);

// `general.name` made a model name: "Qwen2.5 Coder 1.5B Instruct" -> "qwen2.5-coder-1.5b-instruct".
std::string ModelNameFromGeneralName(const std::string& general_name);

// The model name a session goes by: `flag` when set, else ModelNameFromPath(path), else
// `general_name` (the file's general.name, "" when it has none) sanitised, else "model".
std::string ChooseModelName(const std::string& flag, const std::string& path,
                            const std::string& general_name);

// A valid model and profile name from any text: lower-cased, runs of anything but letters,
// digits, '.' and '_' replaced by one '-', no leading '.' or '-', at most 128 characters (the
// sidecar's rule for profile names). Empty when nothing is left.
std::string SanitiseModelName(const std::string& text);

// The sidecar's rule for profile names: 1-128 of [A-Za-z0-9._-], not starting with '.'.
bool IsValidModelName(const std::string& name);

// One prompt per non-empty line; the two characters \n stand for a newline. Lines starting with #
// are comments.
absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path);

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_MODEL_FILES_H_
