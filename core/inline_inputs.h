// Validation and fp32 conversion of the tensors a Compress request carries inline (and that offline
// tools read from .npy files). Every error names the tensor ("inline_tensors.keys") and what is
// wrong: dtype, rank, which dimension, byte length, or the flat index of the first NaN/Inf.
#ifndef REASONALLOC_CORE_INLINE_INPUTS_H_
#define REASONALLOC_CORE_INLINE_INPUTS_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/dtype.h"
#include "core/engine.h"
#include "core/session_config.h"

namespace reasonalloc {

// A tensor as it arrives: dtype, shape and bytes that are not owned.
struct RawTensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  absl::string_view data;
  bool present = false;
};

struct PreparedInputs {
  std::vector<float> query_window;  // [L, Hq, window, d]
  std::vector<float> keys;          // [L, Hkv, n_max, d]
  std::vector<int32_t> lengths;     // [L * Hkv]
  int64_t n_max = 0;

  CompressInputs view() const { return {query_window.data(), keys.data(), n_max, lengths, {}}; }
};

// Checks shapes against the session (query_window [L, Hq, window, d]; keys and values
// [L, Hkv, N, d], 1 <= N <= max_context), byte lengths, the keys' and values' dtype (the
// session's), lengths (empty or L * Hkv entries in [0, N]) and finiteness of the live rows, then
// converts queries and keys to fp32. Values are required in managed mode and refused in advisory
// mode; either mismatch is FailedPrecondition (a call for the other kind of session).
absl::StatusOr<PreparedInputs> PrepareInlineInputs(const SessionConfig& config,
                                                   const RawTensor& query_window,
                                                   const RawTensor& keys, const RawTensor& values,
                                                   std::span<const int32_t> lengths);

// Byte length check shared by every tensor: prod(shape) * item size must equal data.size().
absl::Status CheckTensorBytes(absl::string_view field, const RawTensor& t);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_INLINE_INPUTS_H_
