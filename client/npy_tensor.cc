#include "client/npy_tensor.h"

#include "absl/strings/str_cat.h"

namespace reasonalloc {

absl::StatusOr<v1::Tensor> TensorFromNpy(const NpyArray& array, absl::string_view what) {
  v1::Tensor t;
  switch (array.dtype) {
    case NpyDType::kFloat32:
      t.set_dtype(v1::DTYPE_FLOAT32);
      break;
    case NpyDType::kFloat16:
      t.set_dtype(v1::DTYPE_FLOAT16);
      break;
    case NpyDType::kUInt16:
      t.set_dtype(v1::DTYPE_BFLOAT16);
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has dtype ", std::string(NpyDescr(array.dtype)),
                       "; expected float32 (<f4), float16 (<f2) or bfloat16 bits as uint16 (<u2)"));
  }
  for (int64_t d : array.shape) t.add_shape(d);
  t.set_data(array.data);
  return t;
}

absl::StatusOr<NpyArray> NpyFromTensor(const v1::Tensor& tensor, absl::string_view what) {
  NpyArray a;
  switch (tensor.dtype()) {
    case v1::DTYPE_FLOAT32:
      a.dtype = NpyDType::kFloat32;
      break;
    case v1::DTYPE_FLOAT16:
      a.dtype = NpyDType::kFloat16;
      break;
    case v1::DTYPE_BFLOAT16:
      a.dtype = NpyDType::kUInt16;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, " has unknown dtype ", static_cast<int>(tensor.dtype())));
  }
  a.shape.assign(tensor.shape().begin(), tensor.shape().end());
  a.data = tensor.data();
  if (static_cast<size_t>(a.NumElements()) * NpyItemSize(a.dtype) != a.data.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " holds ", a.data.size(), " bytes, which does not match its shape"));
  }
  return a;
}

}  // namespace reasonalloc
