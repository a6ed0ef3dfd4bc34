// CPU cost of one compression event (score + allocate + select), Google Benchmark, for the
// geometries of ALGORITHMS.md's reference models:
//   llama8b  DeepSeek-R1-Distill-Llama-8B  L=32 Hq=32 Hkv=8 d=128, B=512, N=640
//   smollm   SmolLM2-135M                  L=30 Hq=9  Hkv=3 d=64,  B=128, N=256
//   build/bench/engine_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "core/blas.h"
#include "core/engine.h"

namespace reasonalloc {
namespace {

struct Geometry {
  int layers, hq, hkv, d, budget, n;
};
constexpr Geometry kLlama8b{32, 32, 8, 128, 512, 640};
constexpr Geometry kSmolLm{30, 9, 3, 64, 128, 256};

void BM_Event(benchmark::State& state, Geometry g, const char* scorer, const char* allocator) {
  SessionConfig c;
  c.model = {"bench", g.layers, g.hq, g.hkv, g.d, DType::kFloat16, 131072};
  c.budget.budget = g.budget;
  c.scorer.name = scorer;
  c.allocator.name = allocator;
  auto engine = Engine::Create(c);
  if (!engine.ok()) {
    state.SkipWithError(engine.status().ToString().c_str());
    return;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> q(static_cast<size_t>(g.layers) * g.hq * 8 * g.d);
  std::vector<float> k(static_cast<size_t>(g.layers) * g.hkv * g.n * g.d);
  for (float& x : q) x = normal(rng);
  for (float& x : k) x = normal(rng);
  std::vector<int32_t> lengths(static_cast<size_t>(g.layers) * g.hkv, g.n);
  for (auto _ : state) {
    auto d = (*engine)->Compress({q.data(), k.data(), g.n, lengths, {}});
    benchmark::DoNotOptimize(d);
  }
  state.SetLabel(BlasBackend());
}

#define EVENT(geometry, scorer, allocator)                                                         \
  BENCHMARK_CAPTURE(BM_Event, geometry##_##scorer##_##allocator, k##geometry, #scorer, #allocator) \
      ->Unit(benchmark::kMillisecond)                                                              \
      ->UseRealTime()

EVENT(Llama8b, snapkv, uniform);
EVENT(Llama8b, streaming, uniform);
EVENT(Llama8b, rkv, uniform);
EVENT(Llama8b, rkv, pyramid);
EVENT(Llama8b, rkv, adakv);
EVENT(Llama8b, rkv, reasonalloc);
EVENT(SmolLm, snapkv, uniform);
EVENT(SmolLm, rkv, uniform);
EVENT(SmolLm, rkv, reasonalloc);

// Growth with N (tokens per head) and with Hkv: 4 layers of the Llama-8B head shape, B = 128.
void BM_Growth(benchmark::State& state, const char* scorer) {
  const Geometry g{4,   4 * static_cast<int>(state.range(1)), static_cast<int>(state.range(1)), 128,
                   128, static_cast<int>(state.range(0))};
  BM_Event(state, g, scorer, "reasonalloc");
}
BENCHMARK_CAPTURE(BM_Growth, snapkv, "snapkv")
    ->ArgsProduct({{256, 512, 1024, 2048, 4096}, {8}})
    ->ArgsProduct({{1024}, {2, 4, 16}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Growth, rkv, "rkv")
    ->ArgsProduct({{256, 512, 1024, 2048, 4096}, {8}})
    ->ArgsProduct({{1024}, {2, 4, 16}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace reasonalloc

BENCHMARK_MAIN();
