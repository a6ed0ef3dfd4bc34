// The `reasonalloc` CLI against a real server: every subcommand, its outputs and its exit codes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>

#include "absl/strings/str_cat.h"
#include "core/npy.h"
#include "tests/integration/server_process.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;
using testing::RunCommand;
using testing::ServerProcess;

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    auto p = ServerProcess::Start();
    ASSERT_TRUE(p.ok()) << p.status();
    server_ = std::move(p).value();
    dir_ = server_->dir();
  }
  std::string Run(const std::string& args, int expected_code) {
    auto r = RunCommand(
        absl::StrCat(REASONALLOC_CLI_BINARY, " ", args, " --target=", server_->target()));
    EXPECT_EQ(r.exit_code, expected_code) << args << "\n" << r.output;
    return r.output;
  }
  void WriteF32(const std::string& name, std::vector<int64_t> shape, float scale) {
    NpyArray a;
    a.dtype = NpyDType::kFloat32;
    a.shape = std::move(shape);
    std::vector<float> v(static_cast<size_t>(a.NumElements()));
    for (size_t i = 0; i < v.size(); ++i) v[i] = scale * std::cos(0.3f * static_cast<float>(i));
    a.data.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
    ASSERT_TRUE(WriteNpyFile(dir_ + "/" + name, a).ok());
  }
  bool WaitForWatchers(int n) {
    for (int i = 0; i < 500; ++i) {
      auto body =
          testing::HttpGet(server_->client().GetServerInfo()->metrics_address(), "/metrics");
      if (body.ok() &&
          body->find(absl::StrCat("reasonalloc_watchers ", n, "\n")) != std::string::npos) {
        return true;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  }
  std::unique_ptr<ServerProcess> server_;
  std::string dir_;
};

TEST_F(Cli, WatchPrintsEventsAndPoolGauges) {
  WriteF32("q.npy", {2, 4, 3, 5}, 1.0f);
  WriteF32("k.npy", {2, 2, 20, 5}, 1.0f);
  // The watcher runs while three temporary sessions compress; it exits after three events.
  auto watch = std::async(std::launch::async, [&] {
    return RunCommand(
        absl::StrCat(REASONALLOC_CLI_BINARY,
                     " watch --plain --count 3 --pool_interval 0.05 --target=", server_->target()));
  });
  ASSERT_TRUE(WaitForWatchers(1));
  for (int i = 0; i < 3; ++i) {
    Run(absl::StrCat("compress --queries ", dir_, "/q.npy --keys ", dir_,
                     "/k.npy --budget 8 --scorer streaming --out ", dir_, "/out"),
        0);
  }
  auto r = watch.get();
  EXPECT_EQ(r.exit_code, 0) << r.output;
  // Tokens per KV head (budget 8), not the layer's sum over its 2 heads.
  EXPECT_THAT(r.output, HasSubstr("layer_budgets=[8,8]"));
  EXPECT_THAT(r.output, HasSubstr("evicted=48"));
  EXPECT_THAT(r.output, HasSubstr("pool unix_ms="));
  // A bad filter is the server's INVALID_ARGUMENT, exit 1.
  EXPECT_THAT(Run("watch --pool_interval 0.001", 1), HasSubstr("pool_interval_seconds"));
}

TEST_F(Cli, InfoHealthSessions) {
  EXPECT_THAT(Run("info", 0), HasSubstr("backend        cpu"));
  EXPECT_THAT(Run("info --json", 0), HasSubstr("\"backend\": \"cpu\""));
  EXPECT_THAT(Run("health", 0), HasSubstr("SERVING"));
  EXPECT_THAT(Run("sessions", 0), HasSubstr("SESSION"));
  v1::CreateSessionRequest r;
  r.mutable_model()->set_name("cli-model");
  r.mutable_model()->set_num_layers(1);
  r.mutable_model()->set_num_q_heads(2);
  r.mutable_model()->set_num_kv_heads(1);
  r.mutable_model()->set_head_dim(4);
  r.mutable_model()->set_dtype(v1::DTYPE_BFLOAT16);
  r.mutable_model()->set_max_context(1024);
  r.mutable_budget()->set_budget(64);
  auto created = server_->client().CreateSession(r);
  ASSERT_TRUE(created.ok());
  const std::string id = created->session().session_id();
  EXPECT_THAT(Run("sessions", 0), HasSubstr(id));
  EXPECT_THAT(Run("sessions --json", 0), HasSubstr("\"cli-model\""));
  EXPECT_THAT(Run("close " + id, 0), HasSubstr(id + " closed"));
  EXPECT_THAT(Run("close " + id, 0), HasSubstr("was not open"));
  EXPECT_THAT(Run("sessions", 0), ::testing::Not(HasSubstr(id)));
}

TEST_F(Cli, CompressWritesDecisionsAsNpy) {
  // L=2, Hq=4, Hkv=2, window 3, d=5, N=20; streaming with budget 8 and 2 sinks keeps 0,1
  // and 15..19.
  WriteF32("q.npy", {2, 4, 3, 5}, 1.0f);
  WriteF32("k.npy", {2, 2, 20, 5}, 1.0f);
  WriteF32("v.npy", {2, 2, 20, 5}, 2.0f);
  const std::string out = dir_ + "/out";
  const std::string text =
      Run(absl::StrCat("compress --queries ", dir_, "/q.npy --keys ", dir_, "/k.npy --values ",
                       dir_, "/v.npy --budget 8 --sinks 2 --scorer streaming --out ", out),
          0);
  EXPECT_THAT(text, HasSubstr("kept 32 of 80 tokens (48 evicted)"));
  auto idx = ReadNpyFile(out + "/kept_indices.npy");
  ASSERT_TRUE(idx.ok()) << idx.status();
  EXPECT_EQ(idx->shape, (std::vector<int64_t>{2, 2, 8}));
  std::vector<int32_t> kept(8);
  std::memcpy(kept.data(), idx->data.data() + 3 * 8 * 4, 8 * 4);  // last head
  EXPECT_EQ(kept, (std::vector<int32_t>{0, 1, 14, 15, 16, 17, 18, 19}));
  auto mask = ReadNpyFile(out + "/keep_mask.npy");
  ASSERT_TRUE(mask.ok());
  EXPECT_EQ(mask->dtype, NpyDType::kBool);
  EXPECT_EQ(mask->shape, (std::vector<int64_t>{2, 2, 20}));
  EXPECT_EQ(mask->data.substr(0, 20), std::string("\1\1\0\0\0\0\0\0\0\0\0\0\0\0\1\1\1\1\1\1", 20));
  auto cv = ReadNpyFile(out + "/compacted_values.npy");
  ASSERT_TRUE(cv.ok());
  EXPECT_EQ(cv->shape, (std::vector<int64_t>{2, 2, 8, 5}));
  auto budgets = ReadNpyFile(out + "/budgets.npy");
  ASSERT_TRUE(budgets.ok());
  EXPECT_EQ(budgets->shape, (std::vector<int64_t>{2, 2}));
  // The temporary session is gone afterwards.
  EXPECT_EQ(server_->client().GetServerInfo()->sessions(), 0);
}

TEST_F(Cli, CompressAdvisoryWithLengths) {
  WriteF32("q.npy", {1, 2, 2, 4}, 1.0f);
  WriteF32("k.npy", {1, 2, 30, 4}, 1.0f);
  NpyArray lengths;
  lengths.dtype = NpyDType::kInt64;
  lengths.shape = {1, 2};
  const int64_t len[] = {30, 6};
  lengths.data.assign(reinterpret_cast<const char*>(len), sizeof(len));
  ASSERT_TRUE(WriteNpyFile(dir_ + "/len.npy", lengths).ok());
  const std::string out = dir_ + "/adv";
  EXPECT_THAT(Run(absl::StrCat("compress --queries ", dir_, "/q.npy --keys ", dir_,
                               "/k.npy --lengths ", dir_, "/len.npy --budget 10 --out ", out),
                  0),
              HasSubstr("kept 16 of 36 tokens"));
  EXPECT_FALSE(std::filesystem::exists(out + "/compacted_keys.npy"));
}

TEST_F(Cli, ErrorsAndExitCodes) {
  EXPECT_THAT(Run("frobnicate", 2), HasSubstr("unknown command"));
  EXPECT_THAT(Run("compress --out /tmp/x", 2), HasSubstr("--queries is required"));
  EXPECT_THAT(Run("close", 2), HasSubstr("SESSION_ID"));
  WriteF32("q.npy", {1, 2, 2, 4}, 1.0f);
  WriteF32("k.npy", {1, 2, 30, 4}, 1.0f);
  // The server's message is shown unchanged.
  EXPECT_THAT(Run(absl::StrCat("compress --queries ", dir_, "/q.npy --keys ", dir_,
                               "/k.npy --budget 2 --out ", dir_, "/o"),
                  1),
              HasSubstr("budget.budget = 2"));
  auto r = RunCommand(absl::StrCat(
      REASONALLOC_CLI_BINARY, " info --timeout_seconds=2 --target=unix:///nonexistent/x.sock"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("UNAVAILABLE"));
}

}  // namespace
}  // namespace reasonalloc

namespace reasonalloc {
namespace {

TEST_F(Cli, ReplayComparesPoliciesOnATrace) {
  // L=2, Hq=4, Hkv=2, window 3, d=5, N=20, T=4 later queries.
  WriteF32("queries.npy", {2, 4, 3, 5}, 1.0f);
  WriteF32("keys.npy", {2, 2, 20, 5}, 1.0f);
  WriteF32("values.npy", {2, 2, 20, 5}, 2.0f);
  WriteF32("later_queries.npy", {2, 4, 4, 5}, 0.5f);
  const std::string csv = dir_ + "/replay.csv";
  auto r =
      RunCommand(absl::StrCat(REASONALLOC_CLI_BINARY, " replay --trace ", dir_,
                              " --scorers snapkv,h2o,rkv --allocators uniform,reasonalloc:head",
                              " --budgets 8,20 --csv ", csv));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("out_err"));
  std::ifstream in(csv);
  std::string line;
  std::vector<std::string> rows;
  while (std::getline(in, line)) rows.push_back(line);
  ASSERT_EQ(rows.size(), 1u + 3 * 2 * 2);
  EXPECT_THAT(rows[0], HasSubstr("scorer,allocator,budget,kept_fraction,output_error,recall"));
  // Budget 20 = N keeps everything: no error, full recall.
  for (const auto& row : rows) {
    if (row.find(",20,") != std::string::npos) {
      EXPECT_THAT(row, HasSubstr(",20,1.000000,0.000000,1.000000,1.000000,")) << row;
    }
  }
  // A trace with a missing file is a usage error naming it.
  auto bad = RunCommand(absl::StrCat(REASONALLOC_CLI_BINARY, " replay --trace /nonexistent"));
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.output, HasSubstr("queries.npy"));
}

}  // namespace
}  // namespace reasonalloc
