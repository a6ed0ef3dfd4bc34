#include "worker/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"

namespace reasonalloc::worker {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kMaxString = uint64_t{1} << 24;
constexpr uint64_t kMaxArray = uint64_t{1} << 26;
constexpr uint32_t kMaxDims = 4;

// Value types of GGUF metadata.
enum : uint32_t {
  kU8 = 0,
  kI8,
  kU16,
  kI16,
  kU32,
  kI32,
  kF32v,
  kBool,
  kString,
  kArray,
  kU64,
  kI64,
  kF64v
};

size_t ScalarSize(uint32_t type) {
  switch (type) {
    case kU8:
    case kI8:
    case kBool:
      return 1;
    case kU16:
    case kI16:
      return 2;
    case kU32:
    case kI32:
    case kF32v:
      return 4;
    case kU64:
    case kI64:
    case kF64v:
      return 8;
    default:
      return 0;
  }
}

// Bytes per block and elements per block of a tensor type; {0, 0} when unsupported.
std::pair<uint64_t, int64_t> BlockSize(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      return {4, 1};
    case GgmlType::kF16:
      return {2, 1};
    case GgmlType::kBF16:
      return {2, 1};
    case GgmlType::kQ8_0:
      return {34, 32};
    case GgmlType::kQ4_0:
      return {18, 32};
    case GgmlType::kQ4_1:
      return {20, 32};
    case GgmlType::kQ5_0:
      return {22, 32};
    case GgmlType::kQ4_K:
      return {144, 256};
    case GgmlType::kQ5_K:
      return {176, 256};
    case GgmlType::kQ6_K:
      return {210, 256};
  }
  return {0, 0};
}

// A float metadata value's integer view (GetInt refuses floats; arrays keep both views): the
// truncated value where it fits in int64, else 0 (a cast of NaN, Inf or 1e300 is undefined).
int64_t TruncatedOrZero(double v) {
  return std::isfinite(v) && std::fabs(v) < 9.2e18 ? static_cast<int64_t>(v) : 0;
}

class Cursor {
 public:
  Cursor(const unsigned char* base, uint64_t size) : base_(base), size_(size) {}
  uint64_t pos() const { return pos_; }
  absl::Status Need(uint64_t n, const std::string& what) const {
    if (n > size_ - pos_) {
      return absl::InvalidArgumentError(absl::StrCat("truncated GGUF file: ", what, " needs ", n,
                                                     " bytes at offset ", pos_, " of ", size_));
    }
    return absl::OkStatus();
  }
  template <typename T>
  absl::StatusOr<T> Read(const std::string& what) {
    if (auto s = Need(sizeof(T), what); !s.ok()) return s;
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  absl::StatusOr<std::string> String(const std::string& what) {
    auto n = Read<uint64_t>(what);
    if (!n.ok()) return n.status();
    if (*n > kMaxString) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": string of ", *n, " bytes"));
    }
    if (auto s = Need(*n, what); !s.ok()) return s;
    std::string out(reinterpret_cast<const char*>(base_ + pos_), *n);
    pos_ += *n;
    return out;
  }
  // A scalar of `type` as int64 and double.
  absl::Status Scalar(uint32_t type, const std::string& what, int64_t* i, double* f) {
    const size_t n = ScalarSize(type);
    if (auto s = Need(n, what); !s.ok()) return s;
    const unsigned char* p = base_ + pos_;
    pos_ += n;
    auto get = [&](auto v) {
      std::memcpy(&v, p, sizeof(v));
      return v;
    };
    switch (type) {
      case kU8:
        *i = get(uint8_t{});
        break;
      case kI8:
        *i = get(int8_t{});
        break;
      case kBool:
        *i = get(uint8_t{}) != 0;
        break;
      case kU16:
        *i = get(uint16_t{});
        break;
      case kI16:
        *i = get(int16_t{});
        break;
      case kU32:
        *i = get(uint32_t{});
        break;
      case kI32:
        *i = get(int32_t{});
        break;
      case kU64:
        *i = static_cast<int64_t>(get(uint64_t{}));
        break;
      case kI64:
        *i = get(int64_t{});
        break;
      case kF32v:
        *f = get(float{});
        *i = TruncatedOrZero(*f);
        return absl::OkStatus();
      case kF64v:
        *f = get(double{});
        *i = TruncatedOrZero(*f);
        return absl::OkStatus();
      default:
        return absl::InvalidArgumentError(absl::StrCat(what, ": unknown value type ", type));
    }
    *f = static_cast<double>(*i);
    return absl::OkStatus();
  }
  void Seek(uint64_t pos) { pos_ = pos; }

 private:
  const unsigned char* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

template <typename Block>
Block LoadBlock(const unsigned char* p) {
  Block b;
  std::memcpy(&b, p, sizeof(Block));
  return b;
}

// The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of a Q4_K/Q5_K
// super-block: bytes 0-3 hold the low 6 bits of scales 0-3, bytes 4-7 those of mins 0-3, and
// bytes 8-11 the low 4 bits of scales/mins 4-7, whose top 2 bits sit in the top of bytes 0-7.
void ScaleMinK4(int j, const unsigned char* q, int* scale, int* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K (144 bytes per 256): fp16 d, fp16 dmin, 12 bytes of scales, 128 bytes of nibbles. Each
// 64 values use 32 bytes: the low nibbles are sub-block 2i, the high nibbles sub-block 2i + 1;
// x = d·scale·q − dmin·min. Q5_K (176 bytes) adds 32 bytes of fifth bits before the nibbles: bit
// 2i of qh[l] is the high bit of sub-block 2i's value l, bit 2i + 1 of sub-block 2i + 1's.
void DequantizeQ45K(bool five, const unsigned char* src, float* y) {
  uint16_t dh, mh;
  std::memcpy(&dh, src, 2);
  std::memcpy(&mh, src + 2, 2);
  const float d = HalfToFloat(dh), dmin = HalfToFloat(mh);
  const unsigned char* scales = src + 4;
  const unsigned char* qh = src + 16;
  const unsigned char* ql = src + (five ? 48 : 16);
  for (int i = 0; i < 4; ++i, ql += 32) {
    int sc, m;
    ScaleMinK4(2 * i, scales, &sc, &m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    ScaleMinK4(2 * i + 1, scales, &sc, &m);
    const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(m);
    for (int l = 0; l < 32; ++l) {
      const int hi1 = five ? ((qh[l] >> (2 * i)) & 1) << 4 : 0;
      const int hi2 = five ? ((qh[l] >> (2 * i + 1)) & 1) << 4 : 0;
      y[64 * i + l] = d1 * static_cast<float>((ql[l] & 0x0F) | hi1) - m1;
      y[64 * i + 32 + l] = d2 * static_cast<float>((ql[l] >> 4) | hi2) - m2;
    }
  }
}

// Q6_K (210 bytes per 256): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8
// scales (one per 16 values), fp16 d; x = d·scale·(q − 32). Each half of 128 values uses 64
// low-nibble bytes and 32 high bytes: value l + 32·k (k = 0..3) takes the low (k even) or high
// nibble of ql[l + 32·(k & 1)] and bits 2k, 2k + 1 of qh[l].
void DequantizeQ6K(const unsigned char* src, float* y) {
  uint16_t dh;
  std::memcpy(&dh, src + 208, 2);
  const float d = HalfToFloat(dh);
  const unsigned char* ql = src;
  const unsigned char* qh = src + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(src + 192);
  for (int half = 0; half < 2; ++half, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

void DequantizeRow(uint32_t type, const unsigned char* src, int64_t n, float* dst) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case GgmlType::kF16:
    case GgmlType::kBF16:
      for (int64_t j = 0; j < n; ++j) {
        uint16_t h;
        std::memcpy(&h, src + 2 * j, 2);
        dst[j] =
            type == static_cast<uint32_t>(GgmlType::kF16) ? HalfToFloat(h) : BFloat16ToFloat(h);
      }
      return;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 34) {
        uint16_t dh;
        std::memcpy(&dh, src, 2);
        const float d = HalfToFloat(dh);
        for (int j = 0; j < 32; ++j) dst[b * 32 + j] = d * static_cast<int8_t>(src[2 + j]);
      }
      return;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < n / 32; ++b, src += 18) {
        uint16_t dh;
        std::memcpy(&dh, src, 2);
        const float d = HalfToFloat(dh);
        for (int j = 0; j < 16; ++j) {
          dst[b * 32 + j] = d * static_cast<float>((src[2 + j] & 0x0F) - 8);
          dst[b * 32 + j + 16] = d * static_cast<float>((src[2 + j] >> 4) - 8);
        }
      }
      return;
    case GgmlType::kQ4_1:
      for (int64_t b = 0; b < n / 32; ++b, src += 20) {
        uint16_t dh, mh;
        std::memcpy(&dh, src, 2);
        std::memcpy(&mh, src + 2, 2);
        const float d = HalfToFloat(dh), m = HalfToFloat(mh);
        for (int j = 0; j < 16; ++j) {
          dst[b * 32 + j] = d * static_cast<float>(src[4 + j] & 0x0F) + m;
          dst[b * 32 + j + 16] = d * static_cast<float>(src[4 + j] >> 4) + m;
        }
      }
      return;
    case GgmlType::kQ5_0:
      // fp16 d, 32 fifth bits (bit j of value j), 16 bytes of nibbles; x = d·(q − 16).
      for (int64_t b = 0; b < n / 32; ++b, src += 22) {
        uint16_t dh;
        uint32_t qh;
        std::memcpy(&dh, src, 2);
        std::memcpy(&qh, src + 2, 4);
        const float d = HalfToFloat(dh);
        for (int j = 0; j < 16; ++j) {
          const int lo = (src[6 + j] & 0x0F) | static_cast<int>(((qh >> j) << 4) & 0x10);
          const int hi = (src[6 + j] >> 4) | static_cast<int>((qh >> (j + 12)) & 0x10);
          dst[b * 32 + j] = d * static_cast<float>(lo - 16);
          dst[b * 32 + j + 16] = d * static_cast<float>(hi - 16);
        }
      }
      return;
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K: {
      const bool five = type == static_cast<uint32_t>(GgmlType::kQ5_K);
      const int64_t bytes = five ? 176 : 144;
      for (int64_t b = 0; b < n / 256; ++b) DequantizeQ45K(five, src + b * bytes, dst + b * 256);
      return;
    }
    case GgmlType::kQ6_K:
      for (int64_t b = 0; b < n / 256; ++b) DequantizeQ6K(src + b * 210, dst + b * 256);
      return;
  }
}

}  // namespace

std::string GgmlTypeName(uint32_t type) {
  switch (type) {
    case 0:
      return "F32";
    case 1:
      return "F16";
    case 2:
      return "Q4_0";
    case 3:
      return "Q4_1";
    case 6:
      return "Q5_0";
    case 7:
      return "Q5_1";
    case 8:
      return "Q8_0";
    case 9:
      return "Q8_1";
    case 10:
      return "Q2_K";
    case 11:
      return "Q3_K";
    case 12:
      return "Q4_K";
    case 13:
      return "Q5_K";
    case 14:
      return "Q6_K";
    case 15:
      return "Q8_K";
    case 30:
      return "BF16";
    default:
      return absl::StrCat("type ", type);
  }
}

int64_t GgufTensor::elements() const {
  int64_t n = 1;
  for (int64_t d : dims) {
    // A tensor the reader accepted has at most 2^40; a hand-built one saturates.
    if (__builtin_mul_overflow(n, d, &n)) return std::numeric_limits<int64_t>::max();
  }
  return n;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(
        absl::StrCat("cannot open model file ", path, ": ", std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ > 0) {
    void* p = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("mmap ", path, ": ", std::strerror(e)));
    }
    file->base_ = static_cast<const unsigned char*>(p);
  }
  ::close(fd);
  if (auto s = file->Parse(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
  }
  return file;
}

GgufFile::~GgufFile() {
  if (base_ != nullptr) ::munmap(const_cast<unsigned char*>(base_), size_);
}

absl::Status GgufFile::Parse() {
  Cursor c(base_, size_);
  auto magic = c.Read<uint32_t>("magic");
  if (!magic.ok()) return magic.status();
  if (*magic != kMagic) return absl::InvalidArgumentError("not a GGUF file (bad magic)");
  auto version = c.Read<uint32_t>("version");
  if (!version.ok()) return version.status();
  if (*version != 2 && *version != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF version ", *version, " is not supported (2 and 3 are)"));
  }
  version_ = *version;
  auto n_tensors = c.Read<uint64_t>("tensor_count");
  auto n_kv = c.Read<uint64_t>("kv_count");
  if (!n_tensors.ok()) return n_tensors.status();
  if (!n_kv.ok()) return n_kv.status();
  if (*n_tensors > (uint64_t{1} << 20) || *n_kv > (uint64_t{1} << 20)) {
    return absl::InvalidArgumentError("implausible tensor or metadata count");
  }
  for (uint64_t k = 0; k < *n_kv; ++k) {
    auto key = c.String(absl::StrCat("metadata key ", k));
    if (!key.ok()) return key.status();
    auto type = c.Read<uint32_t>(*key);
    if (!type.ok()) return type.status();
    GgufValue v;
    v.type = *type;
    if (*type == kString) {
      auto s = c.String(*key);
      if (!s.ok()) return s.status();
      v.s = std::move(*s);
    } else if (*type == kArray) {
      auto at = c.Read<uint32_t>(*key);
      auto n = c.Read<uint64_t>(*key);
      if (!at.ok()) return at.status();
      if (!n.ok()) return n.status();
      if (*n > kMaxArray) return absl::InvalidArgumentError(absl::StrCat(*key, ": huge array"));
      v.array_type = *at;
      for (uint64_t j = 0; j < *n; ++j) {
        if (*at == kString) {
          auto s = c.String(*key);
          if (!s.ok()) return s.status();
          v.strings.push_back(std::move(*s));
        } else {
          int64_t i = 0;
          double f = 0;
          if (auto s = c.Scalar(*at, *key, &i, &f); !s.ok()) return s;
          v.ints.push_back(i);
          v.floats.push_back(f);
        }
      }
    } else {
      if (auto s = c.Scalar(*type, *key, &v.i, &v.f); !s.ok()) return s;
    }
    kv_[*key] = std::move(v);
  }
  uint64_t alignment = 32;
  if (auto a = GetInt("general.alignment"); a.ok()) {
    if (*a <= 0 || (*a & (*a - 1)) != 0) {
      return absl::InvalidArgumentError("general.alignment is not a power of two");
    }
    alignment = static_cast<uint64_t>(*a);
  }
  std::vector<uint64_t> offsets;
  for (uint64_t t = 0; t < *n_tensors; ++t) {
    GgufTensor tensor;
    auto name = c.String(absl::StrCat("tensor ", t, " name"));
    if (!name.ok()) return name.status();
    tensor.name = std::move(*name);
    auto nd = c.Read<uint32_t>(tensor.name);
    if (!nd.ok()) return nd.status();
    if (*nd == 0 || *nd > kMaxDims) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", tensor.name, ": ", *nd, " dims"));
    }
    for (uint32_t d = 0; d < *nd; ++d) {
      auto dim = c.Read<uint64_t>(tensor.name);
      if (!dim.ok()) return dim.status();
      if (*dim == 0 || *dim > (uint64_t{1} << 32)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor ", tensor.name, ": dim ", *dim));
      }
      tensor.dims.push_back(static_cast<int64_t>(*dim));
    }
    auto type = c.Read<uint32_t>(tensor.name);
    auto off = c.Read<uint64_t>(tensor.name);
    if (!type.ok()) return type.status();
    if (!off.ok()) return off.status();
    tensor.type = *type;
    offsets.push_back(*off);
    tensors_.push_back(std::move(tensor));
  }
  const uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  for (size_t t = 0; t < tensors_.size(); ++t) {
    GgufTensor& tensor = tensors_[t];
    // Up to 4 dims of ≤ 2^32 each could overflow: every tensor, of a known type or not, has at
    // most 2^40 elements.
    int64_t elements = 1;
    for (int64_t d : tensor.dims) {
      if (__builtin_mul_overflow(elements, d, &elements) || elements > (int64_t{1} << 40)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor ", tensor.name, ": too large"));
      }
    }
    const auto [block_bytes, block_elems] = BlockSize(tensor.type);
    if (block_bytes != 0) {
      if (tensor.row_length() % block_elems != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor ", tensor.name, ": row of ", tensor.row_length(), " is not whole blocks"));
      }
      tensor.bytes = static_cast<uint64_t>(tensor.elements() / block_elems) * block_bytes;
      if (offsets[t] > size_ || data_start > size_ - offsets[t] ||
          tensor.bytes > size_ - data_start - offsets[t]) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor ", tensor.name, " (", tensor.bytes, " bytes at data offset ",
                         offsets[t], ") lies past the end of the file (", size_, " bytes)"));
      }
      tensor.data = base_ + data_start + offsets[t];
    }
    by_name_[tensor.name] = t;
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  auto it = kv_.find(key);
  if (it == kv_.end()) return absl::NotFoundError(absl::StrCat("metadata ", key, " is missing"));
  if (ScalarSize(it->second.type) == 0 || it->second.type == kF32v || it->second.type == kF64v) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", key, " is not an integer"));
  }
  return it->second.i;
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  auto it = kv_.find(key);
  if (it == kv_.end()) return absl::NotFoundError(absl::StrCat("metadata ", key, " is missing"));
  if (ScalarSize(it->second.type) == 0) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", key, " is not a number"));
  }
  return it->second.f;
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  auto it = kv_.find(key);
  if (it == kv_.end()) return absl::NotFoundError(absl::StrCat("metadata ", key, " is missing"));
  if (it->second.type != kString) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", key, " is not a string"));
  }
  return it->second.s;
}

absl::StatusOr<const std::vector<std::string>*> GgufFile::GetStrings(const std::string& key) const {
  auto it = kv_.find(key);
  if (it == kv_.end()) return absl::NotFoundError(absl::StrCat("metadata ", key, " is missing"));
  if (it->second.type != kArray || it->second.array_type != kString) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", key, " is not a string array"));
  }
  return &it->second.strings;
}

absl::StatusOr<const std::vector<int64_t>*> GgufFile::GetInts(const std::string& key) const {
  auto it = kv_.find(key);
  if (it == kv_.end()) return absl::NotFoundError(absl::StrCat("metadata ", key, " is missing"));
  if (it->second.type != kArray || it->second.array_type == kString ||
      it->second.array_type == kArray) {
    return absl::InvalidArgumentError(absl::StrCat("metadata ", key, " is not a number array"));
  }
  return &it->second.ints;
}

absl::StatusOr<const GgufTensor*> GgufFile::Tensor(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it == by_name_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", name, " is missing from ", path_));
  }
  return &tensors_[it->second];
}

absl::StatusOr<std::vector<float>> GgufFile::Dequantize(
    const std::string& name, const std::vector<int64_t>& expected) const {
  auto t = Tensor(name);
  if (!t.ok()) return t.status();
  const GgufTensor& tensor = **t;
  if (tensor.data == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat("tensor ", name, " has type ", GgmlTypeName(tensor.type),
                     ", which this reader does not support (F32, F16, "
                     "BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K and Q6_K "
                     "are)"));
  }
  if (!expected.empty() && expected != tensor.dims) {
    std::string want, got;
    for (int64_t d : expected) absl::StrAppend(&want, want.empty() ? "" : ",", d);
    for (int64_t d : tensor.dims) absl::StrAppend(&got, got.empty() ? "" : ",", d);
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", name, " has shape [", got, "], expected [", want, "]"));
  }
  std::vector<float> out(static_cast<size_t>(tensor.elements()));
  const int64_t row = tensor.row_length();
  const uint64_t row_bytes = tensor.bytes / static_cast<uint64_t>(tensor.rows());
  for (int64_t r = 0; r < tensor.rows(); ++r) {
    DequantizeRow(tensor.type, tensor.data + static_cast<uint64_t>(r) * row_bytes, row,
                  out.data() + r * row);
  }
  return out;
}

}  // namespace reasonalloc::worker
