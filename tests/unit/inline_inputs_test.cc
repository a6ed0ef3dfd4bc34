#include "core/inline_inputs.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;

// L=2, Hq=4, Hkv=2, d=3, window 2, N=5, fp32.
struct Fixture {
  SessionConfig config;
  std::vector<float> q, k, v;
  RawTensor qt, kt, vt;

  explicit Fixture(bool managed = true) {
    config.model = {"m", 2, 4, 2, 3, DType::kFloat32, 64};
    config.budget.budget = 4;
    config.budget.window = 2;
    config.managed = managed;
    q.assign(2 * 4 * 2 * 3, 0.5f);
    k.assign(2 * 2 * 5 * 3, 0.25f);
    v.assign(2 * 2 * 5 * 3, 1.0f);
    qt = Raw(q, {2, 4, 2, 3});
    kt = Raw(k, {2, 2, 5, 3});
    if (managed) vt = Raw(v, {2, 2, 5, 3});
  }
  static RawTensor Raw(const std::vector<float>& data, std::vector<int64_t> shape) {
    RawTensor t;
    t.dtype = DType::kFloat32;
    t.shape = std::move(shape);
    t.data = absl::string_view(reinterpret_cast<const char*>(data.data()), data.size() * 4);
    t.present = true;
    return t;
  }
  absl::StatusOr<PreparedInputs> Prepare(std::vector<int32_t> lengths = {}) {
    return PrepareInlineInputs(config, qt, kt, vt, lengths);
  }
};

void ExpectError(const absl::StatusOr<PreparedInputs>& r, const char* what,
                 absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), code);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(what));
}

TEST(InlineInputs, AcceptsWellFormedTensors) {
  Fixture f;
  auto r = f.Prepare();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->n_max, 5);
  EXPECT_EQ(r->lengths, std::vector<int32_t>(4, 5));
  EXPECT_EQ(r->keys[0], 0.25f);
}

TEST(InlineInputs, ShapeErrorsNameTensorAndDimension) {
  Fixture f;
  f.qt.shape = {2, 4, 3, 3};  // window 3 instead of 2
  ExpectError(f.Prepare(), "inline_tensors.query_window");
  ExpectError(f.Prepare(), "window");
  Fixture g;
  g.kt.shape = {2, 2, 5};
  ExpectError(g.Prepare(), "inline_tensors.keys");
  Fixture h;
  h.vt.shape = {2, 2, 4, 3};
  ExpectError(h.Prepare(), "inline_tensors.values");
}

TEST(InlineInputs, ByteLengthMustMatchShape) {
  Fixture f;
  f.kt.data.remove_suffix(4);
  ExpectError(f.Prepare(), "inline_tensors.keys holds 236 bytes");
}

TEST(InlineInputs, NonFiniteValuesNameTheTensor) {
  {
    Fixture f;
    f.q[7] = std::nanf("");
    ExpectError(f.Prepare(), "inline_tensors.query_window holds a NaN or Inf at flat index 7");
  }
  {
    Fixture f;
    f.k[3 * 5 + 4] = INFINITY;  // layer 0, kv head 1, token 1, element 1
    ExpectError(f.Prepare(), "inline_tensors.keys holds a NaN or Inf at flat index 19");
  }
  {
    Fixture f;
    f.v[0] = -INFINITY;
    ExpectError(f.Prepare(), "inline_tensors.values");
  }
  {
    // NaN in padding past a head's length is not an error.
    Fixture f;
    f.k[4 * 3] = std::nanf("");  // head 0, token 4
    EXPECT_TRUE(f.Prepare({4, 5, 5, 5}).ok());
  }
}

TEST(InlineInputs, ModeDecidesWhetherValuesArePresent) {
  Fixture managed;
  managed.vt.present = false;
  ExpectError(managed.Prepare(), "inline_tensors.values is required",
              absl::StatusCode::kFailedPrecondition);
  Fixture advisory(false);
  advisory.vt = Fixture::Raw(advisory.v, {2, 2, 5, 3});
  ExpectError(advisory.Prepare(), "must be empty", absl::StatusCode::kFailedPrecondition);
  Fixture f;
  f.vt.dtype = DType::kFloat16;
  f.vt.data.remove_suffix(f.vt.data.size() / 2);
  ExpectError(f.Prepare(), "model.dtype");
}

TEST(InlineInputs, KeysMustHaveTheSessionDtype) {
  Fixture f;
  f.config.model.dtype = DType::kBFloat16;
  ExpectError(f.Prepare(), "inline_tensors.keys has dtype float32");
}

TEST(InlineInputs, LengthsAreChecked) {
  Fixture f;
  ExpectError(f.Prepare({1, 2, 3}), "inline_tensors.lengths has 3 entries");
  ExpectError(f.Prepare({1, 2, 6, 0}), "inline_tensors.lengths[2] = 6");
  ExpectError(f.Prepare({1, -1, 3, 0}), "inline_tensors.lengths[1]");
}

TEST(InlineInputs, MissingTensors) {
  Fixture f;
  f.qt.present = false;
  ExpectError(f.Prepare(), "inline_tensors.query_window is required");
  Fixture g;
  g.kt.present = false;
  ExpectError(g.Prepare(), "inline_tensors.keys is required");
}

TEST(InlineInputs, TokensBeyondMaxContext) {
  Fixture f;
  f.config.model.max_context = 4;
  ExpectError(f.Prepare(), "model.max_context");
}

}  // namespace
}  // namespace reasonalloc
