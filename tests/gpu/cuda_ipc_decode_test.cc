// Two processes on one GPU: the real server started with --device cuda:0 owns a managed
// MEMORY_KIND_CUDA_IPC session's arenas; this test process is the worker. It imports the arenas
// with cudaIpcOpenMemHandle (CudaSessionView), writes each decode step's K, V and query there,
// calls Compress every Δ steps, and checks against an inline session on the same server fed the
// same history (the CPU engine): the same budgets and kept sets, the keep bitmask, and the
// compacted rows in the arena. The worker closes its mappings before the session is closed.
// Runs on a GPU machine; elsewhere it says why and skips.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "client/cuda_session_view.h"
#include "core/dtype.h"
#include "gpu/cuda_arena.h"
#include "gpu/device_probe.h"
#include "tests/integration/server_process.h"
#include "tests/integration/shm_test_common.h"

namespace reasonalloc {
namespace {

using shm_test::kB;
using shm_test::kD;
using shm_test::kDelta;
using shm_test::kHeads;
using shm_test::kHkv;
using shm_test::kHq;
using shm_test::kL;
using shm_test::kWindow;
using testing::ServerProcess;

bool HaveGpu(std::string* why) {
  const gpu::ProbeResult probe = gpu::ProbeDevices();
  if (!gpu::CudaBuilt()) *why = "built without the CUDA backend";
  if (probe.devices.empty()) *why = "no GPU: " + probe.reason;
  return gpu::CudaBuilt() && !probe.devices.empty();
}

void DecodeLoop(const std::string& scorer, const std::string& allocator) {
  SCOPED_TRACE(scorer + "/" + allocator);
  auto server = ServerProcess::Start({"--device=cuda:0"});
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  auto cuda = c.CreateSession(shm_test::ShmTestRequest(
      "cuda-test", scorer, allocator, v1::MEMORY_KIND_CUDA_IPC, v1::SESSION_MODE_MANAGED));
  ASSERT_TRUE(cuda.ok()) << cuda.status();
  auto inl = c.CreateSession(shm_test::ShmTestRequest(
      "cuda-test", scorer, allocator, v1::MEMORY_KIND_INLINE, v1::SESSION_MODE_MANAGED));
  ASSERT_TRUE(inl.ok()) << inl.status();
  ASSERT_EQ(cuda->session().memory(), v1::MEMORY_KIND_CUDA_IPC);
  ASSERT_EQ(cuda->session().arenas_size(), 3);
  for (const auto& d : cuda->session().arenas()) {
    EXPECT_EQ(d.cuda_ipc_handle().size(), 64u);
    EXPECT_EQ(d.device_uuid().rfind("GPU-", 0), 0u);
  }
  {
    auto view_or = CudaSessionView::Map(cuda->session());
    ASSERT_TRUE(view_or.ok()) << view_or.status();
    CudaSessionView& s = **view_or;
    std::vector<std::vector<uint16_t>> k(kHeads), v(kHeads);  // the worker's own copy
    std::deque<std::vector<uint16_t>> history;
    std::mt19937 rng(11);
    std::normal_distribution<float> normal;
    const int steps = 6 * kDelta + 3;
    int events = 0;
    for (int step = 0; step < steps; ++step) {
      std::vector<uint16_t> ks(kHeads * kD), vs(kHeads * kD), q(size_t{kL} * kHq * kD);
      for (int i = 0; i < kHeads; ++i) {
        for (int t = 0; t < kD; ++t) {
          ks[static_cast<size_t>(i * kD + t)] = FloatToHalf(normal(rng));
          vs[static_cast<size_t>(i * kD + t)] = FloatToHalf(normal(rng));
        }
        if (step % 5 == 4 && k[static_cast<size_t>(i)].size() >= kD) {
          std::copy_n(k[static_cast<size_t>(i)].begin(), kD, ks.begin() + i * kD);
        }
        k[static_cast<size_t>(i)].insert(k[static_cast<size_t>(i)].end(), ks.begin() + i * kD,
                                         ks.begin() + (i + 1) * kD);
        v[static_cast<size_t>(i)].insert(v[static_cast<size_t>(i)].end(), vs.begin() + i * kD,
                                         vs.begin() + (i + 1) * kD);
      }
      for (auto& x : q) x = FloatToHalf(normal(rng));
      ASSERT_TRUE(s.Append(step, ks.data(), vs.data(), q.data()).ok());
      history.push_back(q);
      if (history.size() > kWindow) history.pop_front();
      if (step % kDelta != 2 || step < kDelta) continue;

      v1::CompressRequest request;
      request.set_session_id(cuda->session().session_id());
      request.set_step(step);
      auto got = c.Compress(request);
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_TRUE(s.Refresh().ok());
      ASSERT_EQ(s.epoch(), got->epoch());

      auto want =
          c.Compress(shm_test::InlineEvent(inl->session().session_id(), step, k, v, history));
      ASSERT_TRUE(want.ok()) << want.status();
      const v1::Decision& dw = want->decision();
      EXPECT_EQ(got->decision().evicted_tokens(), dw.evicted_tokens());
      int64_t at = 0;
      for (int i = 0; i < kHeads; ++i) {
        const int l = i / kHkv, h = i % kHkv;
        ASSERT_EQ(s.budget(l, h), dw.budgets(i)) << "step " << step << " head " << i;
        ASSERT_EQ(s.length(l, h), dw.kept_lengths(i)) << "step " << step << " head " << i;
        std::vector<uint16_t> kk, vk;
        for (int r = 0; r < dw.kept_lengths(i); ++r) {
          const int j = dw.kept_indices(static_cast<int>(at + r));
          ASSERT_TRUE(s.kept(l, h, j)) << "step " << step << " head " << i << " position " << j;
          kk.insert(kk.end(), k[static_cast<size_t>(i)].begin() + j * kD,
                    k[static_cast<size_t>(i)].begin() + (j + 1) * kD);
          vk.insert(vk.end(), v[static_cast<size_t>(i)].begin() + j * kD,
                    v[static_cast<size_t>(i)].begin() + (j + 1) * kD);
        }
        at += dw.kept_lengths(i);
        // The arena's compacted rows are the kept rows, in order.
        std::vector<uint16_t> row(kD);
        for (int r = 0; r < dw.kept_lengths(i); ++r) {
          ASSERT_TRUE(s.ReadKeyRow(l, h, r, row.data()).ok());
          ASSERT_TRUE(std::equal(row.begin(), row.end(), kk.begin() + r * kD)) << "head " << i;
          ASSERT_TRUE(s.ReadValueRow(l, h, r, row.data()).ok());
          ASSERT_TRUE(std::equal(row.begin(), row.end(), vk.begin() + r * kD)) << "head " << i;
        }
        k[static_cast<size_t>(i)] = kk;
        v[static_cast<size_t>(i)] = vk;
      }
      ++events;
    }
    EXPECT_EQ(events, (steps + kDelta - 3) / kDelta - 1);
  }  // the worker's mappings close here, before the session (and its memory) goes
  ASSERT_TRUE(c.CloseSession(cuda->session().session_id()).ok());
  auto info = c.GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend(), "cuda");
  EXPECT_FALSE(info->device_name().empty());
  EXPECT_FALSE(info->driver_version().empty());
  EXPECT_NE(
      std::find(info->memory_kinds().begin(), info->memory_kinds().end(), v1::MEMORY_KIND_CUDA_IPC),
      info->memory_kinds().end());
}

TEST(CudaIpcDecodeLoop, SnapKvUniformMatchesInline) {
  std::string why;
  if (!HaveGpu(&why)) GTEST_SKIP() << why;
  DecodeLoop("snapkv", "uniform");
}

TEST(CudaIpcDecodeLoop, RkvAdaKvMatchesInlineWithMovingHeadRegions) {
  std::string why;
  if (!HaveGpu(&why)) GTEST_SKIP() << why;
  DecodeLoop("rkv", "adakv");
}

TEST(CudaIpcDecodeLoop, RkvReasonAllocHeadRoutingMatchesInline) {
  std::string why;
  if (!HaveGpu(&why)) GTEST_SKIP() << why;
  DecodeLoop("rkv", "reasonalloc");
}

TEST(CudaIpcDecodeLoop, BadUseIsRefusedNamingTheField) {
  std::string why;
  if (!HaveGpu(&why)) GTEST_SKIP() << why;
  auto server = ServerProcess::Start({"--device=cuda:0"});
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  auto req = shm_test::ShmTestRequest("cuda-test", "h2o", "uniform", v1::MEMORY_KIND_CUDA_IPC,
                                      v1::SESSION_MODE_MANAGED);
  auto h2o = c.CreateSession(req);
  EXPECT_EQ(h2o.status().code(), absl::StatusCode::kUnimplemented) << h2o.status();
  req = shm_test::ShmTestRequest("cuda-test", "snapkv", "uniform", v1::MEMORY_KIND_CUDA_IPC,
                                 v1::SESSION_MODE_MANAGED);
  auto s = c.CreateSession(req);
  ASSERT_TRUE(s.ok()) << s.status();
  v1::CompressRequest r;
  r.set_session_id(s->session().session_id());
  r.set_step(0);
  r.set_cuda_event_handle("short");
  auto bad = c.Compress(r);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("cuda_event_handle"), std::string::npos) << bad.status();
  // The view refuses to overfill a head.
  {
    auto view = CudaSessionView::Map(s->session());
    ASSERT_TRUE(view.ok()) << view.status();
    std::vector<uint16_t> zeros(size_t{kL} * kHq * kD, 0);
    for (int t = 0; t < kB + kDelta; ++t) {
      ASSERT_TRUE((*view)->Append(t, zeros.data(), zeros.data(), zeros.data()).ok());
    }
    EXPECT_EQ((*view)->Append(kB + kDelta, zeros.data(), zeros.data(), zeros.data()).code(),
              absl::StatusCode::kFailedPrecondition);
  }
  // A misbehaving worker writes "len" beyond a head's capacity straight into the result arena: the
  // server refuses the event, naming the array and the head, and touches nothing.
  for (const auto& d : s->session().arenas()) {
    if (d.kind() != "result") continue;
    auto raw = gpu::CudaArenaMapping::Open(d.cuda_ipc_handle(), d.cuda_byte_offset(),
                                           d.device_uuid(), d.byte_length());
    ASSERT_TRUE(raw.ok()) << raw.status();
    uint64_t len_at = 0;
    for (const auto& a : d.arrays()) {
      if (a.name() == "len") len_at = a.byte_offset();
    }
    const int32_t too_many = kB + kDelta + 1;
    ASSERT_TRUE((*raw)->CopyFromHost(len_at + sizeof(int32_t), &too_many, sizeof(too_many)).ok());
  }
  r.set_cuda_event_handle("");
  r.set_step(kB + kDelta - 1);
  auto refused = c.Compress(r);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  EXPECT_NE(refused.status().message().find("\"len\"[1]"), std::string::npos) << refused.status();
}

// A metric's value from the /metrics text (0 when absent).
double MetricValue(const std::string& text, const std::string& name) {
  const size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return 0;
  return std::stod(text.substr(at + name.size() + 2));
}

// CUDA sessions of one configuration share an engine: the events of one CompressStream message
// for several of them run as one launch set (reasonalloc_device_batch_events observes it), each
// session gets its own decision, and a session whose keys hold NaN fails alone.
TEST(CudaIpcDecodeLoop, CompressStreamOfSeveralSessionsIsOneLaunchSet) {
  std::string why;
  if (!HaveGpu(&why)) GTEST_SKIP() << why;
  auto server = ServerProcess::Start({"--device=cuda:0"});
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  const std::vector<std::string> scorers = {"snapkv", "snapkv", "snapkv", "rkv"};
  std::vector<std::string> ids;
  std::vector<std::unique_ptr<CudaSessionView>> views;
  for (const std::string& scorer : scorers) {
    auto created = c.CreateSession(shm_test::ShmTestRequest(
        "cuda-test", scorer, "uniform", v1::MEMORY_KIND_CUDA_IPC, v1::SESSION_MODE_MANAGED));
    ASSERT_TRUE(created.ok()) << created.status();
    ids.push_back(created->session().session_id());
    auto view = CudaSessionView::Map(created->session());
    ASSERT_TRUE(view.ok()) << view.status();
    views.push_back(std::move(view).value());
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  const int step = kDelta + 2;
  auto fill = [&](CudaSessionView& s, bool nan_keys) {
    for (int t = 0; t <= step; ++t) {
      std::vector<uint16_t> ks(kHeads * kD), vs(kHeads * kD), q(size_t{kL} * kHq * kD);
      for (auto& x : ks) x = FloatToHalf(nan_keys && t == 3 ? NAN : normal(rng));
      for (auto& x : vs) x = FloatToHalf(normal(rng));
      for (auto& x : q) x = FloatToHalf(normal(rng));
      ASSERT_TRUE(s.Append(t, ks.data(), vs.data(), q.data()).ok());
    }
  };
  for (auto& v : views) fill(*v, false);
  auto metrics = [&] {
    auto body = testing::HttpGet(c.GetServerInfo()->metrics_address(), "/metrics");
    EXPECT_TRUE(body.ok()) << body.status();
    return body.ok() ? *body : std::string();
  };
  auto send = [&](const std::vector<std::string>& sessions, int at) {
    grpc::ClientContext ctx;
    auto stream = c.stub().CompressStream(&ctx);
    v1::CompressBatch batch;
    for (const std::string& id : sessions) {
      v1::CompressRequest* r = batch.add_requests();
      r->set_session_id(id);
      r->set_step(at);
    }
    EXPECT_TRUE(stream->Write(batch));
    v1::CompressBatchResult result;
    EXPECT_TRUE(stream->Read(&result));
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
    return result;
  };
  const std::string before = metrics();
  const v1::CompressBatchResult result = send(ids, step);
  ASSERT_EQ(result.results_size(), 4);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(result.results(i).has_response()) << result.results(i).error().message();
    EXPECT_EQ(result.results(i).response().epoch(), 1u);
    ASSERT_TRUE(views[static_cast<size_t>(i)]->Refresh().ok());
    EXPECT_EQ(views[static_cast<size_t>(i)]->epoch(), 1u);
  }
  const std::string after = metrics();
  // Two launch sets: the three snapkv sessions together, the rkv one (another engine) alone.
  EXPECT_EQ(MetricValue(after, "reasonalloc_device_batch_events_count") -
                MetricValue(before, "reasonalloc_device_batch_events_count"),
            2);
  EXPECT_EQ(MetricValue(after, "reasonalloc_device_batch_events_sum") -
                MetricValue(before, "reasonalloc_device_batch_events_sum"),
            4);

  // Three more sessions of the shared configuration, one with NaN keys: it fails alone, naming
  // its arenas; the others are decided.
  std::vector<std::string> more;
  std::vector<std::unique_ptr<CudaSessionView>> more_views;
  for (int i = 0; i < 3; ++i) {
    auto created = c.CreateSession(shm_test::ShmTestRequest(
        "cuda-test", "snapkv", "uniform", v1::MEMORY_KIND_CUDA_IPC, v1::SESSION_MODE_MANAGED));
    ASSERT_TRUE(created.ok()) << created.status();
    more.push_back(created->session().session_id());
    auto view = CudaSessionView::Map(created->session());
    ASSERT_TRUE(view.ok()) << view.status();
    fill(**view, i == 1);
    more_views.push_back(std::move(view).value());
  }
  const v1::CompressBatchResult mixed = send(more, step);
  ASSERT_EQ(mixed.results_size(), 3);
  EXPECT_TRUE(mixed.results(0).has_response());
  ASSERT_TRUE(mixed.results(1).has_error());
  EXPECT_EQ(mixed.results(1).error().code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(mixed.results(1).error().message().rfind("arenas: keys or query_window hold NaN", 0),
            0u)
      << mixed.results(1).error().message();
  EXPECT_TRUE(mixed.results(2).has_response());
  views.clear();
  more_views.clear();
  for (const std::string& id : ids) EXPECT_TRUE(c.CloseSession(id).ok());
  for (const std::string& id : more) EXPECT_TRUE(c.CloseSession(id).ok());
}

}  // namespace
}  // namespace reasonalloc
