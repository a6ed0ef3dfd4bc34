// The GGUF reader on small hand-written files: metadata of every scalar type, strings and arrays;
// dequantisation of F32, F16, Q8_0, Q4_0, Q4_1 and Q5_0 blocks against values computed by hand, and
// of Q4_K, Q5_K and Q6_K super-blocks packed here from chosen scales and quants; and the errors for
// an unsupported type (naming tensor and type), a truncated file, a tensor past the end and a bad
// magic. (tests/worker/test_architectures.py compares every type against the gguf package.)
#include "worker/gguf.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "gtest/gtest.h"

namespace reasonalloc::worker {
namespace {

class Writer {
 public:
  template <typename T>
  void Put(T v) {
    bytes_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void Str(const std::string& s) {
    Put<uint64_t>(s.size());
    bytes_ += s;
  }
  void Raw(const std::string& s) { bytes_ += s; }
  void Align(size_t a) {
    while (bytes_.size() % a != 0) bytes_ += '\0';
  }
  std::string& bytes() { return bytes_; }

 private:
  std::string bytes_;
};

struct TensorSpec {
  std::string name;
  uint32_t type;
  std::vector<uint64_t> dims;
  std::string data;
};

std::string Half(float f) {
  const uint16_t h = FloatToHalf(f);
  return std::string(reinterpret_cast<const char*>(&h), 2);
}

std::string MakeFile(const std::vector<TensorSpec>& tensors) {
  Writer w;
  w.Put<uint32_t>(0x46554747);
  w.Put<uint32_t>(3);
  w.Put<uint64_t>(tensors.size());
  w.Put<uint64_t>(4);
  w.Str("general.architecture");
  w.Put<uint32_t>(8);
  w.Str("llama");
  w.Str("llama.block_count");
  w.Put<uint32_t>(4);
  w.Put<uint32_t>(30);
  w.Str("llama.rope.freq_base");
  w.Put<uint32_t>(6);
  w.Put<float>(100000.0f);
  w.Str("tokenizer.ggml.tokens");
  w.Put<uint32_t>(9);
  w.Put<uint32_t>(8);
  w.Put<uint64_t>(2);
  w.Str("a");
  w.Str("bc");
  uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    w.Str(t.name);
    w.Put<uint32_t>(static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) w.Put<uint64_t>(d);
    w.Put<uint32_t>(t.type);
    w.Put<uint64_t>(offset);
    offset += (t.data.size() + 31) / 32 * 32;
  }
  w.Align(32);
  for (const TensorSpec& t : tensors) {
    w.Raw(t.data);
    w.Align(32);
  }
  return w.bytes();
}

std::string WriteTemp(const std::string& bytes) {
  char path[] = "/tmp/reasonalloc-gguf-XXXXXX";
  const int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  close(fd);
  return path;
}

TEST(Gguf, ReadsMetadataAndDequantisesEveryBlockType) {
  std::string f32(8, '\0');
  const float two[2] = {1.5f, -2.25f};
  std::memcpy(f32.data(), two, 8);
  std::string q8 = Half(0.5f);
  for (int j = 0; j < 32; ++j) q8 += static_cast<char>(static_cast<int8_t>(j - 16));
  std::string q4_0 = Half(2.0f);
  for (int j = 0; j < 16; ++j) q4_0 += static_cast<char>((j & 0xF) | ((15 - j) << 4));
  std::string q4_1 = Half(0.25f) + Half(-1.0f);
  for (int j = 0; j < 16; ++j) q4_1 += static_cast<char>(j | (j << 4));
  const std::string path = WriteTemp(MakeFile({{"f32", 0, {2}, f32},
                                               {"f16", 1, {2}, Half(3.0f) + Half(-0.5f)},
                                               {"q8", 8, {32}, q8},
                                               {"q4_0", 2, {32}, q4_0},
                                               {"q4_1", 3, {32, 1}, q4_1}}));
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(*(*file)->GetString("general.architecture"), "llama");
  EXPECT_EQ(*(*file)->GetInt("llama.block_count"), 30);
  EXPECT_FLOAT_EQ(static_cast<float>(*(*file)->GetFloat("llama.rope.freq_base")), 100000.0f);
  EXPECT_EQ(**(*file)->GetStrings("tokenizer.ggml.tokens"), (std::vector<std::string>{"a", "bc"}));
  EXPECT_EQ((*file)->GetInt("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*file)->GetInt("general.architecture").status().code(),
            absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(*(*file)->Dequantize("f32"), (std::vector<float>{1.5f, -2.25f}));
  EXPECT_EQ(*(*file)->Dequantize("f16"), (std::vector<float>{3.0f, -0.5f}));
  auto v8 = *(*file)->Dequantize("q8");
  auto v40 = *(*file)->Dequantize("q4_0");
  auto v41 = *(*file)->Dequantize("q4_1", {32, 1});
  for (int j = 0; j < 32; ++j) EXPECT_FLOAT_EQ(v8[j], 0.5f * (j - 16)) << j;
  for (int j = 0; j < 16; ++j) {
    EXPECT_FLOAT_EQ(v40[j], 2.0f * (j - 8)) << j;
    EXPECT_FLOAT_EQ(v40[j + 16], 2.0f * (15 - j - 8)) << j;
    EXPECT_FLOAT_EQ(v41[j], 0.25f * j - 1.0f) << j;
    EXPECT_FLOAT_EQ(v41[j + 16], 0.25f * j - 1.0f) << j;
  }
  auto shape = (*file)->Dequantize("q4_1", {32, 2});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(shape.status().message().find("q4_1"), std::string::npos);
}

// Packs one k-quant super-block from its logical contents, following ggml's block layouts, and
// returns the values the block stands for (computed from those contents, not from the bytes).
struct KBlock {
  std::string bytes;
  std::vector<float> values;
};

KBlock PackQ45K(bool five, unsigned seed) {
  const float d = 0.125f, dmin = 0.5f;
  int sc[8], mn[8], q[256];
  for (int j = 0; j < 8; ++j) {
    sc[j] = static_cast<int>((seed * 7 + 13 * j) % 64);
    mn[j] = static_cast<int>((seed * 3 + 29 * j + 5) % 64);
  }
  for (int v = 0; v < 256; ++v) q[v] = static_cast<int>((seed + 11 * v + v / 7) % (five ? 32 : 16));
  unsigned char scales[12] = {};
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      scales[j] |= static_cast<unsigned char>(sc[j]);
      scales[j + 4] |= static_cast<unsigned char>(mn[j]);
    } else {
      scales[j + 4] = static_cast<unsigned char>((sc[j] & 0xF) | ((mn[j] & 0xF) << 4));
      scales[j - 4] |= static_cast<unsigned char>((sc[j] >> 4) << 6);
      scales[j] |= static_cast<unsigned char>((mn[j] >> 4) << 6);
    }
  }
  KBlock b;
  b.bytes = Half(d) + Half(dmin) + std::string(reinterpret_cast<char*>(scales), 12);
  if (five) {
    std::string qh(32, '\0');
    for (int v = 0; v < 256; ++v)
      qh[v % 32] = static_cast<char>(qh[v % 32] | ((q[v] >> 4) << (v / 32)));
    b.bytes += qh;
  }
  for (int i = 0; i < 4; ++i) {
    for (int l = 0; l < 32; ++l) {
      b.bytes += static_cast<char>((q[64 * i + l] & 0xF) | ((q[64 * i + 32 + l] & 0xF) << 4));
    }
  }
  for (int v = 0; v < 256; ++v) b.values.push_back(d * sc[v / 32] * q[v] - dmin * mn[v / 32]);
  return b;
}

KBlock PackQ6K(unsigned seed) {
  const float d = 0.0625f;
  int sc[16], q[256];
  for (int j = 0; j < 16; ++j) sc[j] = static_cast<int>((seed * 5 + 37 * j) % 256) - 128;
  for (int v = 0; v < 256; ++v) q[v] = static_cast<int>((seed + 23 * v + v / 5) % 64);
  std::string ql(128, '\0'), qh(64, '\0');
  for (int v = 0; v < 256; ++v) {
    const int h = v / 128, k = (v % 128) / 32, l = v % 32;
    const int lo_byte = 64 * h + l + 32 * (k & 1);
    ql[lo_byte] = static_cast<char>(ql[lo_byte] | ((q[v] & 0xF) << (k < 2 ? 0 : 4)));
    qh[32 * h + l] = static_cast<char>(qh[32 * h + l] | ((q[v] >> 4) << (2 * k)));
  }
  KBlock b;
  b.bytes = ql + qh;
  for (int j = 0; j < 16; ++j) b.bytes += static_cast<char>(static_cast<int8_t>(sc[j]));
  b.bytes += Half(d);
  for (int v = 0; v < 256; ++v) b.values.push_back(d * sc[v / 16] * (q[v] - 32));
  return b;
}

TEST(Gguf, DequantisesKQuantSuperBlocks) {
  const KBlock q4[2] = {PackQ45K(false, 1), PackQ45K(false, 2)};
  const KBlock q5[2] = {PackQ45K(true, 3), PackQ45K(true, 4)};
  const KBlock q6[2] = {PackQ6K(5), PackQ6K(6)};
  ASSERT_EQ(q4[0].bytes.size(), 144u);
  ASSERT_EQ(q5[0].bytes.size(), 176u);
  ASSERT_EQ(q6[0].bytes.size(), 210u);
  // Q5_0: value j of a block is d·(q − 16) with q's fifth bit in bit j of qh.
  std::string q5_0 = Half(0.5f);
  uint32_t qh = 0;
  std::string nibbles;
  for (int j = 0; j < 32; ++j) qh |= static_cast<uint32_t>(((j * 7) >> 4) & 1) << j;
  q5_0.append(reinterpret_cast<const char*>(&qh), 4);
  for (int j = 0; j < 16; ++j) {
    nibbles += static_cast<char>(((j * 7) & 0xF) | ((((j + 16) * 7) & 0xF) << 4));
  }
  q5_0 += nibbles;
  const std::string path = WriteTemp(MakeFile({{"q4_k", 12, {256, 2}, q4[0].bytes + q4[1].bytes},
                                               {"q5_k", 13, {256, 2}, q5[0].bytes + q5[1].bytes},
                                               {"q6_k", 14, {512}, q6[0].bytes + q6[1].bytes},
                                               {"q5_0", 6, {32}, q5_0}}));
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_TRUE(file.ok()) << file.status();
  for (const auto& [name, blocks] : {std::pair{"q4_k", q4}, {"q5_k", q5}, {"q6_k", q6}}) {
    auto v = (*file)->Dequantize(name);
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_EQ(v->size(), 512u);
    for (int i = 0; i < 512; ++i) {
      EXPECT_FLOAT_EQ((*v)[i], blocks[i / 256].values[i % 256]) << name << " " << i;
    }
  }
  auto v50 = *(*file)->Dequantize("q5_0");
  for (int j = 0; j < 32; ++j) EXPECT_FLOAT_EQ(v50[j], 0.5f * (((j * 7) & 31) - 16)) << j;
}

TEST(Gguf, KQuantRowsAreWholeSuperBlocksInsideTheFile) {
  // A row of 128 is not a whole super-block of 256.
  std::string path = WriteTemp(MakeFile({{"w", 14, {128, 2}, std::string(210, '\0')}}));
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("whole blocks"), std::string::npos) << file.status();
  // Two Q4_K super-blocks declared, one present.
  std::string bytes = MakeFile({{"w", 12, {512}, std::string(144, '\0')}});
  path = WriteTemp(bytes);
  file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("past the end"), std::string::npos) << file.status();
}

TEST(Gguf, UnsupportedTypeNamesTensorAndType) {
  const std::string path =
      WriteTemp(MakeFile({{"blk.0.ffn_up.weight", 10, {256}, std::string(84, '\0')}}));
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_TRUE(file.ok()) << file.status();
  auto v = (*file)->Dequantize("blk.0.ffn_up.weight");
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("blk.0.ffn_up.weight"), std::string::npos) << v.status();
  EXPECT_NE(v.status().message().find("Q2_K"), std::string::npos) << v.status();
}

// Found by fuzz_gguf: a float metadata value beyond int64's range (or NaN) was cast to int64,
// which is undefined; its integer view is now 0 and GetFloat still returns the value.
TEST(Gguf, HugeAndNanFloatMetadataAreRead) {
  Writer w;
  w.Put<uint32_t>(0x46554747);
  w.Put<uint32_t>(3);
  w.Put<uint64_t>(0);
  w.Put<uint64_t>(3);
  w.Str("huge");
  w.Put<uint32_t>(12);  // float64
  w.Put<double>(3.9e180);
  w.Str("nan");
  w.Put<uint32_t>(6);  // float32
  w.Put<float>(std::numeric_limits<float>::quiet_NaN());
  w.Str("list");
  w.Put<uint32_t>(9);  // array of float64
  w.Put<uint32_t>(12);
  w.Put<uint64_t>(2);
  w.Put<double>(-1e300);
  w.Put<double>(2.5);
  const std::string path = WriteTemp(w.bytes());
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->GetFloat("huge").value(), 3.9e180);
  EXPECT_TRUE(std::isnan((*file)->GetFloat("nan").value()));
  EXPECT_FALSE((*file)->GetInt("huge").ok());
}

// Found by fuzz_gguf: a tensor of a type the reader does not know, with dims whose product
// overflows int64, made elements() overflow; every tensor is now bounded when the file is read.
TEST(Gguf, HugeTensorsOfUnknownTypesAreRefused) {
  const std::string path =
      WriteTemp(MakeFile({{"huge", 99, {uint64_t{1} << 32, uint64_t{1} << 32}, ""}}));
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("huge: too large"), std::string::npos) << file.status();
}

TEST(Gguf, CorruptFilesAreErrorsNotCrashes) {
  const std::string good = MakeFile({{"q8", 8, {32}, std::string(34, '\1')}});
  // Every truncation of the header and directory is an error.
  for (size_t cut = 0; cut + 34 < good.size(); cut += 7) {
    const std::string path = WriteTemp(good.substr(0, cut));
    auto file = GgufFile::Open(path);
    unlink(path.c_str());
    EXPECT_FALSE(file.ok()) << "cut at " << cut;
  }
  // A tensor whose data lies past the end.
  std::string short_data = good.substr(0, good.size() - 40);
  std::string path = WriteTemp(short_data);
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("past the end"), std::string::npos) << file.status();
  std::string bad = good;
  bad[0] = 'X';
  path = WriteTemp(bad);
  file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find("magic"), std::string::npos);
}

}  // namespace
}  // namespace reasonalloc::worker
