// Early returns on error for absl::Status and absl::StatusOr.
//
//   RETURN_IF_ERROR(Check(x));                 // returns the status when it is not OK
//   ASSIGN_OR_RETURN(auto value, Compute(x));  // returns the status, else moves the value out
#ifndef REASONALLOC_CORE_STATUS_MACROS_H_
#define REASONALLOC_CORE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

#define REASONALLOC_STATUS_CONCAT_INNER(a, b) a##b
#define REASONALLOC_STATUS_CONCAT(a, b) REASONALLOC_STATUS_CONCAT_INNER(a, b)

namespace reasonalloc {

// "where: message", with the code and payloads kept: how the layer that knows a value's wire path
// (events[3], arenas, buffers[1]) names an error that a lower layer reported by its own parameter
// names. OK stays OK.
inline absl::Status WithContext(const absl::Status& status, absl::string_view where) {
  if (status.ok() || where.empty()) return status;
  absl::Status out(status.code(), absl::StrCat(where, ": ", status.message()));
  status.ForEachPayload(
      [&out](absl::string_view url, const absl::Cord& payload) { out.SetPayload(url, payload); });
  return out;
}

}  // namespace reasonalloc

#define RETURN_IF_ERROR(expr)                                                         \
  do {                                                                                \
    if (const ::absl::Status reasonalloc_status_ = (expr); !reasonalloc_status_.ok()) \
      return reasonalloc_status_;                                                     \
  } while (false)

#define ASSIGN_OR_RETURN(lhs, rexpr)                                                            \
  REASONALLOC_ASSIGN_OR_RETURN_IMPL(REASONALLOC_STATUS_CONCAT(reasonalloc_statusor_, __LINE__), \
                                    lhs, rexpr)

#define REASONALLOC_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                      \
  if (!statusor.ok()) return std::move(statusor).status();      \
  lhs = std::move(statusor).value()

#endif  // REASONALLOC_CORE_STATUS_MACROS_H_
