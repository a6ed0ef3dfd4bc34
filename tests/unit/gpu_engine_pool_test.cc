// Which CUDA sessions share an engine (server/gpu_engine_pool.h): exactly those with the same
// device, configuration and layer profile. Runs everywhere; without a GPU, Get says why.
#include "server/gpu_engine_pool.h"

#include <gtest/gtest.h>

#include "gpu/device_probe.h"

namespace reasonalloc {
namespace {

SessionConfig Config() {
  SessionConfig c;
  c.model = {"m", 2, 4, 2, 16, DType::kFloat16, 4096};
  c.budget.budget = 32;
  c.budget.buffer = 16;
  c.budget.window = 4;
  c.scorer.kind = ScorerKind::kRkv;
  c.allocator.kind = AllocatorKind::kReasonAlloc;
  return c;
}

TEST(GpuEnginePool, SessionsShareAnEngineExactlyWhenEverythingItComputesWithIsEqual) {
  const SessionConfig c = Config();
  const std::vector<double> demand = {1.0, 2.0};
  const std::string key = GpuEnginePool::Key(0, c, demand);
  EXPECT_EQ(GpuEnginePool::Key(0, Config(), std::vector<double>{1.0, 2.0}), key);
  EXPECT_NE(GpuEnginePool::Key(1, c, demand), key);
  EXPECT_NE(GpuEnginePool::Key(0, c, std::vector<double>{1.0, 2.5}), key);
  EXPECT_NE(GpuEnginePool::Key(0, c, {}), key);
  // The head demand (static mode) is part of it, and where the layers end is too.
  const ProfileDemand heads(demand, {1.0, 1.0, 2.0, 0.0});
  EXPECT_NE(GpuEnginePool::Key(0, c, heads), key);
  EXPECT_NE(GpuEnginePool::Key(0, c, ProfileDemand(demand, {1.0, 1.0, 2.0, 0.5})),
            GpuEnginePool::Key(0, c, heads));
  EXPECT_NE(GpuEnginePool::Key(0, c, ProfileDemand({1.0}, {2.0})),
            GpuEnginePool::Key(0, c, ProfileDemand({1.0, 2.0}, {})));
  SessionConfig other = c;
  other.budget.budget = 64;
  EXPECT_NE(GpuEnginePool::Key(0, other, demand), key);
  other = c;
  other.scorer.lambda = 0.07;
  EXPECT_NE(GpuEnginePool::Key(0, other, demand), key);
  other = c;
  other.allocator.reasonalloc_mode = ReasonAllocMode::kLayer;
  EXPECT_NE(GpuEnginePool::Key(0, other, demand), key);
  other = c;
  other.model.head_dim = 32;
  EXPECT_NE(GpuEnginePool::Key(0, other, demand), key);
}

TEST(GpuEnginePool, OneEnginePerKeyWhileASessionHoldsIt) {
  GpuEnginePool pool;
  auto a = pool.Get(0, Config(), {});
  if (!gpu::CudaBuilt() || gpu::ProbeDevices().devices.empty()) {
    EXPECT_FALSE(a.ok());  // no GPU: the reason, never a crash
    EXPECT_EQ(pool.size(), 0);
    GTEST_SKIP() << "no GPU: " << a.status();
  }
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = pool.Get(0, Config(), {});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->get(), b->get());
  SessionConfig other = Config();
  other.budget.budget = 64;
  auto c = pool.Get(0, other, {});
  ASSERT_TRUE(c.ok());
  EXPECT_NE(a->get(), c->get());
  EXPECT_EQ(pool.size(), 2);
  a->reset();
  b->reset();
  EXPECT_EQ(pool.size(), 1);
}

}  // namespace
}  // namespace reasonalloc
