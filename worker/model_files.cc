#include "worker/model_files.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace reasonalloc::worker {

absl::StatusOr<std::string> ResolveModelPath(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* env = std::getenv("REASONALLOC_MODEL"); env != nullptr && *env != '\0')
    return std::string(env);
  std::string cache;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    cache = xdg;
  } else if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    cache = absl::StrCat(home, "/.cache");
  } else {
    return absl::NotFoundError("no --model, $REASONALLOC_MODEL, $XDG_CACHE_HOME or $HOME");
  }
  std::string path = absl::StrCat(cache, "/reasonalloc/models/SmolLM2-135M-Instruct.Q4_1.gguf");
  if (::access(path.c_str(), R_OK) != 0) {
    return absl::NotFoundError(
        absl::StrCat("model file ", path, " not found: run scripts/setup, or pass --model"));
  }
  return path;
}

absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot read --prompts file ", path));
  std::vector<std::string> out;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    out.push_back(absl::StrReplaceAll(line, {{"\\n", "\n"}}));
  }
  if (out.empty())
    return absl::InvalidArgumentError(absl::StrCat("--prompts file ", path, " has no prompts"));
  return out;
}

}  // namespace reasonalloc::worker
