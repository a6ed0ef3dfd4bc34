// The GGUF reader on small hand-written files: metadata of every scalar type, strings and arrays;
// dequantisation of F32, F16, Q8_0, Q4_0 and Q4_1 blocks against values computed by hand; and the
// errors for an unsupported type (naming tensor and type), a truncated file, a tensor past the end
// and a bad magic.
#include "worker/gguf.h"

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
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

TEST(Gguf, UnsupportedTypeNamesTensorAndType) {
  const std::string path =
      WriteTemp(MakeFile({{"blk.0.ffn_up.weight", 13, {256}, std::string(176, '\0')}}));
  auto file = GgufFile::Open(path);
  unlink(path.c_str());
  ASSERT_TRUE(file.ok()) << file.status();
  auto v = (*file)->Dequantize("blk.0.ffn_up.weight");
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("blk.0.ffn_up.weight"), std::string::npos) << v.status();
  EXPECT_NE(v.status().message().find("Q5_K"), std::string::npos) << v.status();
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
