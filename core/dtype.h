// Element types of KV caches and query windows, and their conversion to the fp32 the engine
// computes in.
//
// Conversions are exact for fp16 and bf16 -> fp32 (every value is representable). Non-finite
// detection works on the raw bits so that fp16/bf16 NaN and Inf are caught before conversion.
#ifndef REASONALLOC_CORE_DTYPE_H_
#define REASONALLOC_CORE_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <optional>

#include "absl/strings/string_view.h"

namespace reasonalloc {

enum class DType { kFloat32, kFloat16, kBFloat16 };

size_t DTypeSize(DType dtype);
absl::string_view DTypeName(DType dtype);  // "float32", "float16", "bfloat16"
std::optional<DType> ParseDType(absl::string_view name);

float HalfToFloat(uint16_t bits);
uint16_t FloatToHalf(float value);  // round to nearest even
float BFloat16ToFloat(uint16_t bits);
uint16_t FloatToBFloat16(float value);  // round to nearest even

// Converts `count` elements at `src` (little-endian, possibly unaligned) to fp32. Returns the index
// of the first NaN or Inf element, or -1 when every element is finite; `dst` is filled either way.
int64_t ConvertToFloat32(DType dtype, const void* src, int64_t count, float* dst);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_DTYPE_H_
