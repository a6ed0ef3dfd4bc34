#include "server/profile_store.h"

#include <gmock/gmock.h>
#include <google/protobuf/unknown_field_set.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;

constexpr char kGood[] = R"({"name": "tiny", "model": {"num_layers": 2, "num_q_heads": 4,
  "num_kv_heads": 2, "head_dim": 8}, "rho": 0.93, "demand": [1, 3], "samples": [10, 10],
  "provenance": "hand-written"})";

class ProfileStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/profiles-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& file, const std::string& text) {
    std::ofstream(dir_ + "/" + file) << text;
  }
  std::string dir_;
};

TEST_F(ProfileStoreTest, LoadsAndNormalises) {
  Write("tiny.json", kGood);
  Write("README.txt", "not a profile");
  auto store = ProfileStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto p = (*store)->Get("tiny");
  ASSERT_TRUE(p.ok());
  EXPECT_DOUBLE_EQ(p->demand(0), 0.5);
  EXPECT_DOUBLE_EQ(p->demand(1), 1.5);
  EXPECT_EQ((*store)->List().size(), 1u);
  EXPECT_EQ((*store)->Get("other").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ProfileStoreTest, HeadDemandIsNormalisedWithinEachLayer) {
  Write("heads.json", R"({"name": "heads", "model": {"num_layers": 2, "num_q_heads": 6,
    "num_kv_heads": 3, "head_dim": 8}, "rho": 1, "demand": [1, 1],
    "head_demand": [2, 1, 0, 0, 0, 0]})");
  auto store = ProfileStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto p = (*store)->Get("heads");
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(p->head_demand_size(), 6);
  // Layer 0: [2, 1, 0] to mean 1; layer 1 (nothing measured) to equal shares.
  EXPECT_DOUBLE_EQ(p->head_demand(0), 2.0);
  EXPECT_DOUBLE_EQ(p->head_demand(1), 1.0);
  EXPECT_DOUBLE_EQ(p->head_demand(2), 0.0);
  for (int i = 3; i < 6; ++i) EXPECT_DOUBLE_EQ(p->head_demand(i), 1.0);
  // A profile without head demand stays without.
  Write("tiny.json", kGood);
  auto again = ProfileStore::Open(dir_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->Get("tiny")->head_demand_size(), 0);
}

TEST_F(ProfileStoreTest, CorruptFilesStopTheLoadNamingFileAndField) {
  const std::pair<const char*, const char*> cases[] = {
      {"{not json", "not a LayerProfile JSON"},
      {R"({"name": "x", "model": {"num_layers": 2, "num_q_heads": 1, "num_kv_heads": 1,
          "head_dim": 4}, "rho": 0.9, "demand": [1]})",
       "demand has 1 entries"},
      {R"({"name": "x", "model": {"num_layers": 2, "num_q_heads": 1, "num_kv_heads": 1,
          "head_dim": 4}, "rho": 0.9, "demand": [1, "NaN"]})",
       "demand[1]"},
      {R"({"name": "x", "model": {"num_layers": 1, "num_q_heads": 1, "num_kv_heads": 1,
          "head_dim": 4}, "rho": 1.5, "demand": [1]})",
       "rho"},
      {R"({"name": "../evil", "model": {"num_layers": 1, "num_q_heads": 1, "num_kv_heads": 1,
          "head_dim": 4}, "rho": 0.9, "demand": [1]})",
       "name"},
      {R"({"name": "x", "model": {"num_layers": 2, "num_q_heads": 2, "num_kv_heads": 2,
          "head_dim": 4}, "rho": 0.9, "demand": [1, 1], "head_demand": [1, 2, 3]})",
       "head_demand has 3 entries; model.num_layers * model.num_kv_heads is 4"},
      {R"({"name": "x", "model": {"num_layers": 2, "num_q_heads": 2, "num_kv_heads": 2,
          "head_dim": 4}, "rho": 0.9, "demand": [1, 1], "head_demand": [1, 2, -3, 1]})",
       "head_demand[2]"},
      {R"({"name": "x", "model": {"num_layers": 1, "num_q_heads": 2, "num_kv_heads": 2,
          "head_dim": 4}, "rho": 0.9, "demand": [1], "head_demand": [1, "NaN"]})",
       "head_demand[1]"},
      {R"({"name": "x", "model": {"num_layers": 1, "num_q_heads": 2, "num_kv_heads": 2,
          "head_dim": 4}, "rho": 0.9, "demand": [1], "head_demand": ["Infinity", 1]})",
       "head_demand[0]"},
      {R"({"name": "x", "model": {"num_layers": 1, "num_q_heads": 2, "num_kv_heads": 2000,
          "head_dim": 4}, "rho": 0.9, "demand": [1]})",
       "num_kv_heads at most 1024"},
  };
  for (const auto& [text, needle] : cases) {
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    Write("bad.json", text);
    auto store = ProfileStore::Open(dir_);
    ASSERT_FALSE(store.ok()) << text;
    EXPECT_EQ(store.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(store.status().message()), HasSubstr("bad.json")) << text;
    EXPECT_THAT(std::string(store.status().message()), HasSubstr(needle)) << text;
  }
}

TEST_F(ProfileStoreTest, PutOverwriteAndSave) {
  auto store = ProfileStore::Open(dir_);
  ASSERT_TRUE(store.ok());
  auto p = ProfileStore::ParseJson(kGood, "test");
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE((*store)->Put(*p, false, true).ok());
  EXPECT_EQ((*store)->Put(*p, false, false).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE((*store)->Put(*p, true, false).ok());
  // What was saved loads back identically.
  auto again = ProfileStore::Open(dir_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->Get("tiny")->DebugString(), (*store)->Get("tiny")->DebugString());
  auto memory_only = ProfileStore::Open("");
  EXPECT_EQ((*memory_only)->Put(*p, false, true).code(), absl::StatusCode::kFailedPrecondition);
}

// Owners: the server (and --profile_dir), a Unix-socket uid, or TCP peers; only the owner, the
// server's uid and root replace a profile, and only the server's side saves.
TEST_F(ProfileStoreTest, OwnersDecideWhoReplacesAndSaves) {
  Write("tiny.json", kGood);
  auto store = ProfileStore::Open(dir_, ProfileLimits{.max_profiles = 3});
  ASSERT_TRUE(store.ok());
  EXPECT_EQ((*store)->Get("tiny")->owner(), "server");
  auto p = ProfileStore::ParseJson(kGood, "test");
  ASSERT_TRUE(p.ok());
  const uint32_t other = ::geteuid() == 4242 ? 4343 : 4242;
  const PeerIdentity neighbour{true, other, other, 1};
  const PeerIdentity tcp{};
  const PeerIdentity root{true, 0, 0, 1};
  const absl::Status denied = (*store)->Put(*p, true, false, &neighbour);
  EXPECT_EQ(denied.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(denied.message()), HasSubstr("belongs to server"));
  EXPECT_EQ((*store)->Put(*p, true, false, &tcp).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE((*store)->Put(*p, true, false, &root).ok());

  v1::LayerProfile mine = *p;
  mine.set_name("mine");
  ASSERT_TRUE((*store)->Put(mine, false, false, &neighbour).ok());
  EXPECT_EQ((*store)->Get("mine")->owner(), absl::StrCat("uid ", other));
  EXPECT_TRUE((*store)->Put(mine, true, false, &neighbour).ok());  // its own
  EXPECT_EQ((*store)->Put(mine, true, false, &tcp).code(), absl::StatusCode::kPermissionDenied);
  // Saving makes a profile the server's at the next start: the server's side only.
  v1::LayerProfile saved = *p;
  saved.set_name("saved");
  EXPECT_EQ((*store)->Put(saved, false, true, &neighbour).code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ((*store)->Put(saved, false, true, &tcp).code(), absl::StatusCode::kPermissionDenied);
  // An owner string sent by the client is ignored, and unknown fields are not stored.
  v1::LayerProfile forged = *p;
  forged.set_name("forged");
  forged.set_owner("server");
  forged.GetReflection()->MutableUnknownFields(&forged)->AddLengthDelimited(999, "padding");
  ASSERT_TRUE((*store)->Put(forged, false, false, &tcp).ok());
  EXPECT_EQ((*store)->Get("forged")->owner(), "tcp");
  EXPECT_EQ((*store)
                ->Get("forged")
                ->GetReflection()
                ->GetUnknownFields(*(*store)->Get("forged"))
                .field_count(),
            0);
  v1::LayerProfile fifth = *p;
  fifth.set_name("fifth");
  EXPECT_EQ((*store)->Put(fifth, false, false).code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(ProfileStoreTest, GeometryMustMatchTheSession) {
  auto p = ProfileStore::ParseJson(kGood, "test");
  ASSERT_TRUE(p.ok());
  ModelGeometry m{"tiny", 2, 4, 2, 8, DType::kFloat16, 1024};
  EXPECT_TRUE(ProfileStore::CheckGeometry(*p, m).ok());
  m.num_kv_heads = 1;
  m.num_q_heads = 4;
  const absl::Status s = ProfileStore::CheckGeometry(*p, m);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.num_kv_heads"));
}

}  // namespace
}  // namespace reasonalloc
