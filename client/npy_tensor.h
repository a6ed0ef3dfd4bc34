// Conversions between .npy arrays and v1 tensors. NumPy has no bfloat16: bf16 data travels as
// '<u2'.
#ifndef REASONALLOC_CLIENT_NPY_TENSOR_H_
#define REASONALLOC_CLIENT_NPY_TENSOR_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/npy.h"
#include "reasonalloc/v1/types.pb.h"

namespace reasonalloc {

// float32 -> DTYPE_FLOAT32, float16 -> DTYPE_FLOAT16, uint16 -> DTYPE_BFLOAT16; others are
// InvalidArgument naming `what`.
absl::StatusOr<v1::Tensor> TensorFromNpy(const NpyArray& array, absl::string_view what);
absl::StatusOr<NpyArray> NpyFromTensor(const v1::Tensor& tensor, absl::string_view what);

}  // namespace reasonalloc

#endif  // REASONALLOC_CLIENT_NPY_TENSOR_H_
