// Two processes on one GPU: the real server started with --device cuda:0 owns a managed
// MEMORY_KIND_CUDA_IPC session's arenas; this test process is the worker. It imports the arenas
// with cudaIpcOpenMemHandle (CudaSessionView), writes each decode step's K, V and query there,
// calls Compress every Δ steps, and checks against an inline session on the same server fed the
// same history (the CPU engine): the same budgets and kept sets, the keep bitmask, and the
// compacted rows in the arena. The worker closes its mappings before the session is closed.
// Runs on a GPU machine; elsewhere it says why and skips.
#include <gtest/gtest.h>

#include <algorithm>
#include <deque>
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

}  // namespace
}  // namespace reasonalloc
