#include "core/dtype.h"

#include <bit>
#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace reasonalloc {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "?";
}

std::optional<DType> ParseDType(absl::string_view name) {
  if (name == "float32" || name == "fp32" || name == "f32") return DType::kFloat32;
  if (name == "float16" || name == "fp16" || name == "f16") return DType::kFloat16;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  return std::nullopt;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: normalise the mantissa into a normal float.
    uint32_t e = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

uint16_t FloatToHalf(float value) {
  const uint32_t f = std::bit_cast<uint32_t>(value);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t abs = f & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow to Inf
  if (abs < 0x38800000u) {
    // Result is subnormal or zero: scale into the subnormal range with the FPU's rounding (nearest
    // even).
    const float scaled = std::bit_cast<float>(abs) * 16777216.0f;  // 2^24 = 1 / smallest subnormal
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
  rounded -= 112u << 23;
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

float BFloat16ToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint16_t FloatToBFloat16(float value) {
  const uint32_t f = std::bit_cast<uint32_t>(value);
  if ((f & 0x7fffffffu) > 0x7f800000u)
    return static_cast<uint16_t>((f >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounded = f + 0x7fffu + ((f >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

namespace {

#if defined(__x86_64__)
// fp16 -> fp32 with the F16C instruction (exact, subnormals included), eight at a time; chosen at
// run time so that the build still runs on CPUs without it.
__attribute__((target("avx,f16c"))) void HalfToFloatF16c(const unsigned char* src, int64_t count,
                                                         float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = HalfToFloat(h);
  }
}

bool HasF16c() {
  // F16C from CPUID leaf 1 (clang's __builtin_cpu_supports does not know "f16c").
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(1, &a, &b, &c, &d) == 0) return false;
    return __builtin_cpu_supports("avx") && (c & bit_F16C) != 0;
  }();
  return has;
}
#endif

}  // namespace

int64_t ConvertToFloat32(DType dtype, const void* src, int64_t count, float* dst) {
  const auto* bytes = static_cast<const unsigned char*>(src);
  int64_t first_bad = -1;
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, bytes, static_cast<size_t>(count) * 4);
      for (int64_t i = 0; i < count; ++i) {
        if (!std::isfinite(dst[i])) {
          first_bad = i;
          break;
        }
      }
      break;
    case DType::kFloat16:
#if defined(__x86_64__)
      if (HasF16c()) {
        for (int64_t i = 0; i < count; ++i) {
          uint16_t h;
          std::memcpy(&h, bytes + 2 * i, 2);
          if ((h & 0x7c00u) == 0x7c00u) {
            first_bad = i;
            break;
          }
        }
        HalfToFloatF16c(bytes, count, dst);
        break;
      }
#endif
      for (int64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        if (first_bad < 0 && (h & 0x7c00u) == 0x7c00u) first_bad = i;
        dst[i] = HalfToFloat(h);
      }
      break;
    case DType::kBFloat16:
      for (int64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        if (first_bad < 0 && (h & 0x7f80u) == 0x7f80u) first_bad = i;
        dst[i] = BFloat16ToFloat(h);
      }
      break;
  }
  return first_bad;
}

}  // namespace reasonalloc
