// Internal invariants: REASONALLOC_DCHECK(condition) aborts with the file, line and condition in
// builds without NDEBUG (Debug, the sanitizer presets, the fuzzers) and compiles to nothing, the
// condition unevaluated, in release builds. For what the code itself guarantees, never for input:
// bad input is an absl::Status naming the field.
#ifndef REASONALLOC_CORE_CHECK_H_
#define REASONALLOC_CORE_CHECK_H_

#include <cstdio>
#include <cstdlib>

#ifdef NDEBUG
#define REASONALLOC_DCHECK(condition) \
  do {                                \
    if (false && (condition)) {       \
    }                                 \
  } while (false)
#else
#define REASONALLOC_DCHECK(condition)                                                             \
  do {                                                                                            \
    if (!(condition)) {                                                                           \
      std::fprintf(stderr, "%s:%d: internal check failed: %s\n", __FILE__, __LINE__, #condition); \
      std::abort();                                                                               \
    }                                                                                             \
  } while (false)
#endif

#endif  // REASONALLOC_CORE_CHECK_H_
