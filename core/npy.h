// Reading and writing NumPy .npy files (format versions 1.0-3.0, C order, little-endian), so that
// the CLI and offline tools exchange tensors with Python without a converter.
//
// Invariants: an NpyArray's data holds exactly prod(shape) * ItemSize(dtype) bytes in C order.
// Loading never trusts the header: a truncated file, a Fortran-order array, a big-endian or
// unsupported dtype, or a shape whose byte size overflows is an InvalidArgument naming the file and
// the problem.
#ifndef REASONALLOC_CORE_NPY_H_
#define REASONALLOC_CORE_NPY_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace reasonalloc {

enum class NpyDType {
  kFloat32,  // '<f4'
  kFloat16,  // '<f2'
  kFloat64,  // '<f8'
  kInt32,    // '<i4'
  kInt64,    // '<i8'
  kUInt8,    // '|u1'
  kUInt16,   // '<u2' (how bfloat16 data travels through NumPy)
  kUInt64,   // '<u8'
  kBool,     // '|b1'
};

size_t NpyItemSize(NpyDType dtype);
std::string_view NpyDescr(NpyDType dtype);  // e.g. "<f4"

struct NpyArray {
  NpyDType dtype = NpyDType::kFloat32;
  std::vector<int64_t> shape;
  std::string data;  // raw bytes, C order, little-endian

  int64_t NumElements() const;  // product of shape (1 for a 0-d array)
};

// Parses the bytes of a .npy file.
absl::StatusOr<NpyArray> ParseNpy(std::string_view bytes, std::string_view what = "npy");
// Serialises to the bytes of a version 1.0 .npy file (2.0 if the header needs it).
std::string SerializeNpy(const NpyArray& array);

absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path);

// Values of an int32 or int64 array as int64 (flattened). InvalidArgument naming `what` for other
// dtypes.
absl::StatusOr<std::vector<int64_t>> NpyToInt64(const NpyArray& array, absl::string_view what);
absl::Status WriteNpyFile(const std::string& path, const NpyArray& array);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_NPY_H_
