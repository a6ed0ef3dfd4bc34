// Command lines of the project's programs accept both spellings of a flag, --max-arena-bytes and
// --max_arena_bytes: Abseil flags are declared with underscores, users and Kubernetes manifests
// tend to write dashes.
#ifndef REASONALLOC_CORE_CLI_ARGS_H_
#define REASONALLOC_CORE_CLI_ARGS_H_

#include <cstring>
#include <string>
#include <vector>

namespace reasonalloc {

// Rewrites dashes in flag names (not in values) to underscores, in place of argv's strings. The
// returned storage must outlive argv's use.
inline std::vector<std::string> NormalizeFlagSpelling(int argc, char** argv) {
  std::vector<std::string> storage(static_cast<size_t>(argc));
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") break;
    if (arg.size() > 2 && arg[0] == '-' && arg[1] == '-') {
      const size_t end = arg.find('=') == std::string::npos ? arg.size() : arg.find('=');
      for (size_t j = 2; j < end; ++j) {
        if (arg[j] == '-') arg[j] = '_';
      }
      storage[static_cast<size_t>(i)] = arg;
      argv[i] = storage[static_cast<size_t>(i)].data();
    }
  }
  return storage;
}

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_CLI_ARGS_H_
