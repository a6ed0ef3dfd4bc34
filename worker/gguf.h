// A read-only GGUF (v2/v3) file: metadata, tensor directory and dequantisation to fp32.
//
// The file is mapped read-only; every offset, count and length read from it is checked against the
// file's size before use, so a truncated or corrupt file is an error naming what is wrong, never a
// read outside the mapping. Tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and the k-quants
// Q4_K, Q5_K and Q6_K (ggml's 256-value super-blocks) are dequantised; any other type is an error
// naming the tensor and the type.
#ifndef REASONALLOC_WORKER_GGUF_H_
#define REASONALLOC_WORKER_GGUF_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace reasonalloc::worker {

// ggml tensor type ids (the ones this reader knows by name).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
};
std::string GgmlTypeName(uint32_t type);

struct GgufTensor {
  std::string name;
  uint32_t type = 0;
  std::vector<int64_t> dims;  // ne[0] first: the length of one row
  const unsigned char* data = nullptr;
  uint64_t bytes = 0;
  int64_t elements() const;
  int64_t row_length() const { return dims.empty() ? 1 : dims[0]; }
  int64_t rows() const { return row_length() == 0 ? 0 : elements() / row_length(); }
};

// One metadata value; arrays keep their elements (numbers as double/int64, strings as strings).
struct GgufValue {
  uint32_t type = 0;  // the GGUF value type (8 = string, 9 = array, ...)
  uint32_t array_type = 0;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;
};

class GgufFile {
 public:
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  const std::map<std::string, GgufValue>& metadata() const { return kv_; }
  bool Has(const std::string& key) const { return kv_.count(key) != 0; }
  // Typed lookups: NOT_FOUND naming the key when absent, INVALID_ARGUMENT when of another type.
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;
  absl::StatusOr<double> GetFloat(const std::string& key) const;
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  absl::StatusOr<const std::vector<std::string>*> GetStrings(const std::string& key) const;
  absl::StatusOr<const std::vector<int64_t>*> GetInts(const std::string& key) const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  absl::StatusOr<const GgufTensor*> Tensor(const std::string& name) const;
  // The whole tensor as fp32, row-major with ne[0] innermost; `expected` (ne[0] first) is checked
  // when not empty.
  absl::StatusOr<std::vector<float>> Dequantize(const std::string& name,
                                                const std::vector<int64_t>& expected = {}) const;

 private:
  GgufFile() = default;
  absl::Status Parse();

  std::string path_;
  const unsigned char* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  std::map<std::string, GgufValue> kv_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> by_name_;
};

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_GGUF_H_
