#include "core/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace reasonalloc {
namespace {

TEST(DType, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kFloat32), 4u);
  EXPECT_EQ(DTypeSize(DType::kFloat16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBFloat16), 2u);
  EXPECT_EQ(ParseDType("bf16"), DType::kBFloat16);
  EXPECT_EQ(ParseDType("float16"), DType::kFloat16);
  EXPECT_FALSE(ParseDType("int8").has_value());
}

TEST(DType, HalfKnownBitPatterns) {
  // Values worked out from the IEEE binary16 layout: sign | 5-bit exponent (bias 15) | 10-bit
  // mantissa.
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x0200), std::ldexp(1.0f, -15));  // a subnormal
  EXPECT_TRUE(std::isinf(HalfToFloat(0x7c00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7e00)));
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(1e6f), 0x7c00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);
  // 1 + 2^-11 is halfway between 1 and the next half: ties to even gives 1.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
}

TEST(DType, HalfRoundTripsEveryFiniteValue) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto h = static_cast<uint16_t>(bits);
    if ((h & 0x7c00) == 0x7c00) continue;
    ASSERT_EQ(FloatToHalf(HalfToFloat(h)), h) << "bits " << bits;
  }
}

TEST(DType, BFloat16) {
  EXPECT_EQ(BFloat16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(BFloat16ToFloat(0xc040), -3.0f);
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even gives 1.
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_TRUE(std::isnan(BFloat16ToFloat(FloatToBFloat16(std::nanf("")))));
}

TEST(DType, ConvertReportsFirstNonFinite) {
  std::vector<float> f = {1, 2, std::numeric_limits<float>::infinity(), std::nanf("")};
  std::vector<float> out(4);
  EXPECT_EQ(ConvertToFloat32(DType::kFloat32, f.data(), 4, out.data()), 2);
  EXPECT_EQ(ConvertToFloat32(DType::kFloat32, f.data(), 2, out.data()), -1);
  const uint16_t h[] = {0x3c00, 0x7e00, 0x3c00};
  EXPECT_EQ(ConvertToFloat32(DType::kFloat16, h, 3, out.data()), 1);
  EXPECT_EQ(out[0], 1.0f);
  const uint16_t b[] = {0x3f80, 0x3f80, 0xff80};  // -Inf last
  EXPECT_EQ(ConvertToFloat32(DType::kBFloat16, b, 3, out.data()), 2);
}

}  // namespace
}  // namespace reasonalloc
