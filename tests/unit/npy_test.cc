#include "core/npy.h"

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace reasonalloc {
namespace {

constexpr NpyDType kAllDTypes[] = {
    NpyDType::kFloat32, NpyDType::kFloat16, NpyDType::kFloat64, NpyDType::kInt32, NpyDType::kInt64,
    NpyDType::kUInt8,   NpyDType::kUInt16,  NpyDType::kUInt64,  NpyDType::kBool,
};

// The magic and version bytes, spelled out so that the expectations below do
// not lean on the code under test.
std::string Prefix(int major) {
  return std::string("\x93NUMPY", 6) + static_cast<char>(major) + std::string(1, '\0');
}

// A file with an arbitrary (unaligned) header around `dict`, for the parser
// cases where NumPy's exact padding is beside the point.
std::string MakeNpy(absl::string_view dict, absl::string_view data, int major = 1) {
  const std::string header = absl::StrCat(dict, "\n");
  std::string out = Prefix(major);
  const size_t width = major == 1 ? 2 : 4;
  for (size_t i = 0; i < width; ++i)
    out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  return absl::StrCat(out, header, data);
}

// Bytes whose values differ from byte to byte, so that a swapped or shifted
// copy cannot go unnoticed.
std::string Pattern(size_t size) {
  std::string data(size, '\0');
  for (size_t i = 0; i < size; ++i) data[i] = static_cast<char>(i * 37 + 11);
  return data;
}

NpyArray MakeArray(NpyDType dtype, std::vector<int64_t> shape) {
  NpyArray array;
  array.dtype = dtype;
  array.shape = std::move(shape);
  array.data = Pattern(static_cast<size_t>(array.NumElements()) * NpyItemSize(dtype));
  return array;
}

void ExpectSameArray(const NpyArray& actual, const NpyArray& expected) {
  EXPECT_EQ(actual.dtype, expected.dtype);
  EXPECT_EQ(actual.shape, expected.shape);
  EXPECT_EQ(actual.data, expected.data);
}

void ExpectInvalid(std::string_view bytes, std::initializer_list<absl::string_view> words) {
  const absl::StatusOr<NpyArray> result = ParseNpy(bytes, "test.npy");
  ASSERT_FALSE(result.ok());
  const absl::Status& status = result.status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(absl::StartsWith(status.message(), "test.npy: ")) << status;
  for (absl::string_view word : words) {
    EXPECT_TRUE(absl::StrContains(status.message(), word)) << status << " lacks '" << word << "'";
  }
}

// A fresh directory per test, so that tests do not see each other's files.
std::string MakeTempDir(absl::string_view name) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                                    absl::StrCat("npy_test_", ::getpid(), "_", name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

// The float32 values 0..5 in little-endian order.
const std::string kFloat32ZeroToFive(
    "\x00\x00\x00\x00"
    "\x00\x00\x80\x3f"
    "\x00\x00\x00\x40"
    "\x00\x00\x40\x40"
    "\x00\x00\x80\x40"
    "\x00\x00\xa0\x40",
    24);

TEST(Npy, ItemSizesAndDescrs) {
  EXPECT_EQ(NpyItemSize(NpyDType::kFloat32), 4u);
  EXPECT_EQ(NpyItemSize(NpyDType::kFloat16), 2u);
  EXPECT_EQ(NpyItemSize(NpyDType::kFloat64), 8u);
  EXPECT_EQ(NpyItemSize(NpyDType::kInt32), 4u);
  EXPECT_EQ(NpyItemSize(NpyDType::kInt64), 8u);
  EXPECT_EQ(NpyItemSize(NpyDType::kUInt8), 1u);
  EXPECT_EQ(NpyItemSize(NpyDType::kUInt16), 2u);
  EXPECT_EQ(NpyItemSize(NpyDType::kUInt64), 8u);
  EXPECT_EQ(NpyItemSize(NpyDType::kBool), 1u);
  EXPECT_EQ(NpyDescr(NpyDType::kFloat32), "<f4");
  EXPECT_EQ(NpyDescr(NpyDType::kFloat16), "<f2");
  EXPECT_EQ(NpyDescr(NpyDType::kFloat64), "<f8");
  EXPECT_EQ(NpyDescr(NpyDType::kInt32), "<i4");
  EXPECT_EQ(NpyDescr(NpyDType::kInt64), "<i8");
  EXPECT_EQ(NpyDescr(NpyDType::kUInt8), "|u1");
  EXPECT_EQ(NpyDescr(NpyDType::kUInt16), "<u2");
  EXPECT_EQ(NpyDescr(NpyDType::kUInt64), "<u8");
  EXPECT_EQ(NpyDescr(NpyDType::kBool), "|b1");
}

TEST(Npy, NumElements) {
  EXPECT_EQ(MakeArray(NpyDType::kFloat32, {}).NumElements(), 1);
  EXPECT_EQ(MakeArray(NpyDType::kFloat32, {5}).NumElements(), 5);
  EXPECT_EQ(MakeArray(NpyDType::kFloat32, {2, 3}).NumElements(), 6);
  EXPECT_EQ(MakeArray(NpyDType::kFloat32, {2, 0, 3}).NumElements(), 0);
}

// np.save(f, np.arange(6, dtype='<f4').reshape(2, 3)) writes these bytes: the
// dict, 21 - len('2') = 20 spaces NumPy reserves for the first axis to grow,
// then padding so that 10 + 59 + 58 + 1 = 128, a multiple of 64.
TEST(Npy, SerializeMatchesNumPyFloat32Bytes) {
  const std::string expected = std::string("\x93NUMPY\x01\x00\x76\x00", 10) +
                               "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }" +
                               std::string(58, ' ') + "\n" + kFloat32ZeroToFive;
  ASSERT_EQ(expected.size(), 128u + 24u);

  NpyArray array;
  array.dtype = NpyDType::kFloat32;
  array.shape = {2, 3};
  array.data = kFloat32ZeroToFive;
  EXPECT_EQ(SerializeNpy(array), expected);

  absl::StatusOr<NpyArray> parsed = ParseNpy(expected);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ExpectSameArray(*parsed, array);
  float values[6];
  std::memcpy(values, parsed->data.data(), sizeof(values));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(values[i], static_cast<float>(i));
}

TEST(Npy, SerializeFormatsShapeTupleLikeNumPy) {
  EXPECT_TRUE(absl::StrContains(SerializeNpy(MakeArray(NpyDType::kFloat64, {})),
                                "{'descr': '<f8', 'fortran_order': False, 'shape': (), }"));
  EXPECT_TRUE(absl::StrContains(SerializeNpy(MakeArray(NpyDType::kInt32, {5})),
                                "{'descr': '<i4', 'fortran_order': False, 'shape': (5,), }"));
  EXPECT_TRUE(absl::StrContains(SerializeNpy(MakeArray(NpyDType::kBool, {2, 3})),
                                "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 3), }"));
  EXPECT_TRUE(absl::StrContains(SerializeNpy(MakeArray(NpyDType::kUInt8, {1, 0, 7})),
                                "'shape': (1, 0, 7), }"));
}

TEST(Npy, SerializeAlignsDataTo64Bytes) {
  const std::vector<std::vector<int64_t>> shapes = {
      {},
      {1},
      {0},
      {3, 4, 5},
      {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
      {1000000000000000000, 0},
      {0, 1000000000000000000, 1000000000000000000 / 8}};
  for (const std::vector<int64_t>& shape : shapes) {
    NpyArray array;
    array.dtype = NpyDType::kFloat64;
    array.shape = shape;
    const std::string bytes = SerializeNpy(array);
    ASSERT_GE(bytes.size(), 10u);
    EXPECT_EQ(bytes[6], '\x01');
    const size_t header_size =
        static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    EXPECT_EQ((10 + header_size) % 64, 0u) << bytes;
    EXPECT_EQ(bytes[10 + header_size - 1], '\n');
    EXPECT_EQ(bytes.size(), 10 + header_size);  // data was left empty
  }
}

TEST(Npy, SerializeUsesVersion2ForHugeHeaders) {
  // 30000 axes of length 1 need "1, " each: about 90000 header bytes.
  const NpyArray array = MakeArray(NpyDType::kInt32, std::vector<int64_t>(30000, 1));
  const std::string bytes = SerializeNpy(array);
  ASSERT_GE(bytes.size(), 12u);
  EXPECT_EQ(bytes[6], '\x02');
  EXPECT_EQ(bytes[7], '\x00');
  uint32_t header_size = 0;
  for (int i = 0; i < 4; ++i)
    header_size |= uint32_t{static_cast<unsigned char>(bytes[8 + i])} << (8 * i);
  EXPECT_GT(header_size, 65535u);
  EXPECT_EQ((12 + header_size) % 64, 0u);
  EXPECT_EQ(bytes.size(), 12 + header_size + 4);

  absl::StatusOr<NpyArray> parsed = ParseNpy(bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ExpectSameArray(*parsed, array);
}

TEST(Npy, RoundTripsEveryDType) {
  for (NpyDType dtype : kAllDTypes) {
    SCOPED_TRACE(NpyDescr(dtype));
    for (const std::vector<int64_t>& shape :
         std::vector<std::vector<int64_t>>{{7}, {2, 3}, {2, 1, 4}, {12345}}) {
      const NpyArray array = MakeArray(dtype, shape);
      absl::StatusOr<NpyArray> parsed = ParseNpy(SerializeNpy(array));
      ASSERT_TRUE(parsed.ok()) << parsed.status();
      ExpectSameArray(*parsed, array);
    }
  }
}

TEST(Npy, RoundTripsZeroDimensionalArrays) {
  for (NpyDType dtype : kAllDTypes) {
    SCOPED_TRACE(NpyDescr(dtype));
    const NpyArray array = MakeArray(dtype, {});
    ASSERT_EQ(array.data.size(), NpyItemSize(dtype));
    absl::StatusOr<NpyArray> parsed = ParseNpy(SerializeNpy(array));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    ExpectSameArray(*parsed, array);
    EXPECT_TRUE(parsed->shape.empty());
  }
}

TEST(Npy, RoundTripsEmptyArrays) {
  for (NpyDType dtype : kAllDTypes) {
    SCOPED_TRACE(NpyDescr(dtype));
    for (const std::vector<int64_t>& shape :
         std::vector<std::vector<int64_t>>{{0}, {3, 0}, {0, 5, 2}}) {
      const NpyArray array = MakeArray(dtype, shape);
      ASSERT_TRUE(array.data.empty());
      absl::StatusOr<NpyArray> parsed = ParseNpy(SerializeNpy(array));
      ASSERT_TRUE(parsed.ok()) << parsed.status();
      ExpectSameArray(*parsed, array);
    }
  }
}

// Found by fuzz_npy: an empty int64 array reached memcpy with a null source.
TEST(Npy, EmptyIntegerArraysConvertToInt64) {
  for (NpyDType dtype : {NpyDType::kInt64, NpyDType::kInt32}) {
    const NpyArray array = MakeArray(dtype, {0});
    auto values = NpyToInt64(array, "lengths");
    ASSERT_TRUE(values.ok()) << values.status();
    EXPECT_TRUE(values->empty());
  }
}

// Files as NumPy 1.26 np.save writes them, captured once and written out here
// so the test needs no Python.
TEST(Npy, ParsesNumPyWrittenFiles) {
  const std::string v1_prefix("\x93NUMPY\x01\x00\x76\x00", 10);
  struct Case {
    std::string bytes;
    NpyDType dtype;
    std::vector<int64_t> shape;
    std::string data;
  };
  const std::vector<Case> cases = {
      // np.array(1.5)
      {v1_prefix + "{'descr': '<f8', 'fortran_order': False, 'shape': (), }" +
           std::string(62, ' ') + "\n" + std::string("\x00\x00\x00\x00\x00\x00\xf8\x3f", 8),
       NpyDType::kFloat64,
       {},
       std::string("\x00\x00\x00\x00\x00\x00\xf8\x3f", 8)},
      // np.array([True, False, True])
      {v1_prefix + "{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }" +
           std::string(60, ' ') + "\n" + std::string("\x01\x00\x01", 3),
       NpyDType::kBool,
       {3},
       std::string("\x01\x00\x01", 3)},
      // np.zeros((0, 4), np.uint16)
      {v1_prefix + "{'descr': '<u2', 'fortran_order': False, 'shape': (0, 4), }" +
           std::string(58, ' ') + "\n",
       NpyDType::kUInt16,
       {0, 4},
       ""},
      // np.arange(3, dtype='<i8')
      {v1_prefix + "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }" +
           std::string(60, ' ') + "\n" +
           std::string("\x00\x00\x00\x00\x00\x00\x00\x00"
                       "\x01\x00\x00\x00\x00\x00\x00\x00"
                       "\x02\x00\x00\x00\x00\x00\x00\x00",
                       24),
       NpyDType::kInt64,
       {3},
       std::string("\x00\x00\x00\x00\x00\x00\x00\x00"
                   "\x01\x00\x00\x00\x00\x00\x00\x00"
                   "\x02\x00\x00\x00\x00\x00\x00\x00",
                   24)},
      // np.array([1, 2, 3], dtype=np.uint8)
      {v1_prefix + "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }" +
           std::string(60, ' ') + "\n\x01\x02\x03",
       NpyDType::kUInt8,
       {3},
       "\x01\x02\x03"},
      // np.arange(4, dtype='<f2')
      {v1_prefix + "{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }" +
           std::string(60, ' ') + "\n" + std::string("\x00\x00\x00\x3c\x00\x40\x00\x42", 8),
       NpyDType::kFloat16,
       {4},
       std::string("\x00\x00\x00\x3c\x00\x40\x00\x42", 8)},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.bytes);
    ASSERT_EQ(c.bytes.size() % 64, c.data.size());
    absl::StatusOr<NpyArray> parsed = ParseNpy(c.bytes);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->dtype, c.dtype);
    EXPECT_EQ(parsed->shape, c.shape);
    EXPECT_EQ(parsed->data, c.data);
    // Our writer must reproduce NumPy byte for byte.
    EXPECT_EQ(SerializeNpy(*parsed), c.bytes);
  }
}

// np.lib.format.write_array(f, np.array([7, -1], dtype='<i4'), version=(2, 0))
// and version=(3, 0): only the version byte differs.
TEST(Npy, ParsesVersion2And3Files) {
  const std::string data("\x07\x00\x00\x00\xff\xff\xff\xff", 8);
  for (char major : {'\x02', '\x03'}) {
    const std::string bytes = std::string("\x93NUMPY", 6) + major +
                              std::string("\x00\x74\x00\x00\x00", 5) +
                              "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }" +
                              std::string(58, ' ') + "\n" + data;
    ASSERT_EQ(bytes.size(), 128u + 8u);
    absl::StatusOr<NpyArray> parsed = ParseNpy(bytes);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->dtype, NpyDType::kInt32);
    EXPECT_EQ(parsed->shape, std::vector<int64_t>{2});
    EXPECT_EQ(parsed->data, data);
  }
}

TEST(Npy, ParsesHeaderVariations) {
  struct Case {
    std::string dict;
    NpyDType dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<Case> cases = {
      {"{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}", NpyDType::kFloat32, {2, 3}},
      {"{ 'fortran_order' :False ,'descr':'<i8','shape':( 4 , ) , }", NpyDType::kInt64, {4}},
      {"{\"descr\": \"<u8\", \"fortran_order\": False, \"shape\": (1, 2,)}",
       NpyDType::kUInt64,
       {1, 2}},
      {"{'descr': '<f2',\n\t'fortran_order': False,\r\n 'shape': ()}   ", NpyDType::kFloat16, {}},
      {"{'descr': '=u1', 'fortran_order': False, 'shape': (3,)}", NpyDType::kUInt8, {3}},
      {"{'descr': '=b1', 'fortran_order': False, 'shape': (3,)}", NpyDType::kBool, {3}},
      // Python 2 NumPy wrote longs.
      {"{'descr': '<i4', 'fortran_order': False, 'shape': (3L,), }", NpyDType::kInt32, {3}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.dict);
    int64_t elements = 1;
    for (int64_t dim : c.shape) elements *= dim;
    const std::string data = Pattern(static_cast<size_t>(elements) * NpyItemSize(c.dtype));
    absl::StatusOr<NpyArray> parsed = ParseNpy(MakeNpy(c.dict, data));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->dtype, c.dtype);
    EXPECT_EQ(parsed->shape, c.shape);
    EXPECT_EQ(parsed->data, data);
  }
}

TEST(Npy, RejectsBadMagic) {
  ExpectInvalid("", {"magic"});
  ExpectInvalid("\x93NUMP", {"magic"});
  ExpectInvalid(std::string("\x93NUMPZ\x01\x00\x00\x00", 10), {"magic"});
  ExpectInvalid("PK\x03\x04 this is a zip file", {"magic"});
}

TEST(Npy, RejectsUnsupportedVersion) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (), }";
  std::string bytes = MakeNpy(dict, Pattern(4));
  bytes[6] = '\x04';
  ExpectInvalid(bytes, {"version", "4.0"});
  bytes[6] = '\x01';
  bytes[7] = '\x01';
  ExpectInvalid(bytes, {"version", "1.1"});
}

TEST(Npy, RejectsTruncatedHeader) {
  const std::string bytes =
      MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", Pattern(4));
  ExpectInvalid(bytes.substr(0, 9), {"truncated", "header"});
  ExpectInvalid(bytes.substr(0, 40), {"truncated", "header"});
  ExpectInvalid(
      MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", "", 2).substr(0, 11),
      {"truncated", "header"});
}

TEST(Npy, RejectsBigEndian) {
  ExpectInvalid(MakeNpy("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", Pattern(4)),
                {"big-endian", "descr", "'>f4'"});
  ExpectInvalid(MakeNpy("{'descr': '>i8', 'fortran_order': False, 'shape': (1,), }", Pattern(8)),
                {"big-endian", "descr", "'>i8'"});
}

TEST(Npy, RejectsFortranOrder) {
  ExpectInvalid(MakeNpy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", Pattern(24)),
                {"fortran_order", "True"});
  ExpectInvalid(MakeNpy("{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3), }", Pattern(24)),
                {"fortran_order", "'0'"});
}

TEST(Npy, RejectsUnknownDescr) {
  for (absl::string_view descr :
       {"<c8", "<u1", "|i1", "=f4", "|f4", "<f16", "f4", "", "<U3", "|O"}) {
    SCOPED_TRACE(descr);
    ExpectInvalid(
        MakeNpy(absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (1,), }"),
                Pattern(4)),
        {"descr", absl::StrCat("'", descr, "'")});
  }
  // A structured dtype's descr is a list.
  ExpectInvalid(
      MakeNpy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", Pattern(4)),
      {"descr", "structured"});
}

TEST(Npy, RejectsNegativeDimension) {
  ExpectInvalid(MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", ""),
                {"shape", "negative", "-3"});
  ExpectInvalid(MakeNpy("{'descr': '|u1', 'fortran_order': False, 'shape': (-1,), }", ""),
                {"shape", "negative", "-1"});
}

TEST(Npy, RejectsByteSizeOverflow) {
  // 2**31 * 2**31 elements fit in int64 but not once multiplied by 4 bytes.
  ExpectInvalid(MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (2147483648, "
                        "2147483648), }",
                        ""),
                {"shape", "overflow", "(2147483648, 2147483648)", "'<f4'"});
  ExpectInvalid(MakeNpy("{'descr': '|u1', 'fortran_order': False, 'shape': (4294967296, "
                        "4294967296, 0), }",
                        ""),
                {"shape", "overflow"});
  ExpectInvalid(MakeNpy("{'descr': '|u1', 'fortran_order': False, 'shape': "
                        "(99999999999999999999,), }",
                        ""),
                {"shape", "99999999999999999999", "64 bits"});
}

TEST(Npy, RejectsTruncatedData) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  ExpectInvalid(MakeNpy(dict, Pattern(20)), {"truncated", "data", "(2, 3)", "24", "20"});
  ExpectInvalid(MakeNpy(dict, ""), {"truncated", "data", "24", "0"});
  ExpectInvalid(MakeNpy("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", Pattern(7)),
                {"truncated", "data", "()", "8", "7"});
}

TEST(Npy, RejectsTrailingBytes) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  ExpectInvalid(MakeNpy(dict, Pattern(28)), {"4 trailing bytes", "(2, 3)"});
  ExpectInvalid(MakeNpy("{'descr': '|u1', 'fortran_order': False, 'shape': (0,), }", "x"),
                {"1 trailing bytes", "(0,)"});
}

TEST(Npy, RejectsMalformedHeaders) {
  struct Case {
    std::string dict;
    std::string word;
  };
  const std::vector<Case> cases = {
      {"{'descr': '<f4', 'fortran_order': False}", "missing key 'shape'"},
      {"{'shape': (), 'fortran_order': False}", "missing key 'descr'"},
      {"{'descr': '<f4', 'shape': ()}", "missing key 'fortran_order'"},
      {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': ()}",
       "duplicate header key 'descr'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (), 'extra': 1}",
       "unexpected header key 'extra'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': [1]}", "shape is not a tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1)}", "(1) is not a tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1.5,)}", "shape"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (,)}", "shape"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (1 2)}", "shape"},
      {"{'descr': '<f4' 'fortran_order': False, 'shape': ()}", "expected ','"},
      {"{'descr' '<f4', 'fortran_order': False, 'shape': ()}", "expected ':'"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': ()}", "header"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': ()} junk", "after the header dict"},
      {"'descr': '<f4', 'fortran_order': False, 'shape': ()", "expected '{'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': ()", "expected ',' or '}'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.dict);
    ExpectInvalid(MakeNpy(c.dict, Pattern(4)), {c.word});
  }
}

TEST(Npy, WritesAndReadsFiles) {
  const std::string dir = MakeTempDir("round_trip");
  for (NpyDType dtype : kAllDTypes) {
    for (const std::vector<int64_t>& shape : std::vector<std::vector<int64_t>>{{}, {0}, {3, 5}}) {
      const NpyArray array = MakeArray(dtype, shape);
      const std::string path = absl::StrCat(dir, "/a.npy");
      ASSERT_TRUE(WriteNpyFile(path, array).ok());
      absl::StatusOr<NpyArray> read = ReadNpyFile(path);
      ASSERT_TRUE(read.ok()) << read.status();
      ExpectSameArray(*read, array);
    }
  }
  // Each write replaced the last one and left no temporary file beside it.
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"a.npy"});
  std::filesystem::remove_all(dir);
}

TEST(Npy, WrittenFileMatchesSerializeNpy) {
  const std::string dir = MakeTempDir("bytes");
  const std::string path = absl::StrCat(dir, "/f.npy");
  const NpyArray array = MakeArray(NpyDType::kFloat32, {2, 3});
  ASSERT_TRUE(WriteNpyFile(path, array).ok());
  std::ifstream in(path, std::ios::binary);
  const std::string contents((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  EXPECT_EQ(contents, SerializeNpy(array));
  std::filesystem::remove_all(dir);
}

TEST(Npy, ReadMissingFileIsNotFound) {
  const std::string dir = MakeTempDir("missing");
  const std::string path = absl::StrCat(dir, "/absent.npy");
  const absl::StatusOr<NpyArray> read = ReadNpyFile(path);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound) << read.status();
  EXPECT_TRUE(absl::StrContains(read.status().message(), path)) << read.status();
  std::filesystem::remove_all(dir);
}

TEST(Npy, ReadReportsParseErrorsWithPath) {
  const std::string dir = MakeTempDir("garbage");
  const std::string path = absl::StrCat(dir, "/garbage.npy");
  {
    std::ofstream out(path, std::ios::binary);
    out << MakeNpy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", Pattern(9));
  }
  const absl::StatusOr<NpyArray> read = ReadNpyFile(path);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument) << read.status();
  EXPECT_TRUE(absl::StartsWith(read.status().message(), absl::StrCat(path, ": "))) << read.status();
  EXPECT_TRUE(absl::StrContains(read.status().message(), "trailing")) << read.status();
  std::filesystem::remove_all(dir);
}

TEST(Npy, ReadDirectoryFailsNamingPath) {
  const std::string dir = MakeTempDir("directory");
  const absl::StatusOr<NpyArray> read = ReadNpyFile(dir);
  ASSERT_FALSE(read.ok());
  EXPECT_TRUE(absl::StrContains(read.status().message(), dir)) << read.status();
  std::filesystem::remove_all(dir);
}

TEST(Npy, WriteRejectsInconsistentArray) {
  const std::string dir = MakeTempDir("inconsistent");
  const std::string path = absl::StrCat(dir, "/bad.npy");
  NpyArray array = MakeArray(NpyDType::kInt32, {2, 2});
  array.data.pop_back();
  absl::Status status = WriteNpyFile(path, array);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(absl::StartsWith(status.message(), path)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "15")) << status;

  array.shape = {2, -2};
  status = WriteNpyFile(path, array);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "negative")) << status;
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_TRUE(std::filesystem::is_empty(dir));
  std::filesystem::remove_all(dir);
}

TEST(Npy, WriteIntoMissingDirectoryFailsNamingPath) {
  const std::string dir = MakeTempDir("no_parent");
  const std::string path = absl::StrCat(dir, "/does/not/exist.npy");
  const absl::Status status = WriteNpyFile(path, MakeArray(NpyDType::kUInt8, {3}));
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace reasonalloc

namespace reasonalloc {
namespace {

TEST(Npy, ToInt64WidensInt32AndRejectsFloats) {
  NpyArray a;
  a.dtype = NpyDType::kInt32;
  a.shape = {3};
  const int32_t v[] = {-1, 7, 2147483647};
  a.data.assign(reinterpret_cast<const char*>(v), sizeof(v));
  auto w = NpyToInt64(a, "x");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(*w, (std::vector<int64_t>{-1, 7, 2147483647}));
  a.dtype = NpyDType::kFloat32;
  EXPECT_EQ(NpyToInt64(a, "--lengths").status().message(), "--lengths must hold int32 or int64");
}

}  // namespace
}  // namespace reasonalloc
