// CPU cost of one compression event (score + allocate + select), Google Benchmark, for the
// geometries of two reference models (the paper's and the reference worker's):
//   llama8b  DeepSeek-R1-Distill-Llama-8B  L=32 Hq=32 Hkv=8 d=128, B=512, N=640
//   smollm   SmolLM2-135M                  L=30 Hq=9  Hkv=3 d=64,  B=128, N=256
//   build/bench/engine_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>
#include <string>
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
  c.scorer.kind = ParseScorer(scorer).value();
  c.allocator.kind = ParseAllocator(allocator).value();
  // reasonalloc gets a wave-shaped layer profile so that both of its levels run.
  std::vector<double> demand;
  if (std::string(allocator) == "reasonalloc") {
    for (int l = 0; l < g.layers; ++l) demand.push_back(1.0 + 0.5 * std::sin(0.7 * l));
  }
  auto engine = Engine::Create(c, demand);
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
  StageSeconds stages;
  for (auto _ : state) {
    auto d = (*engine)->Compress({q.data(), k.data(), g.n, lengths, {}});
    if (!d.ok()) {
      state.SkipWithError(d.status().ToString().c_str());
      return;
    }
    stages.score += d->seconds.score;
    stages.allocate += d->seconds.allocate;
    stages.select += d->seconds.select;
    benchmark::DoNotOptimize(d);
  }
  // Per-event stage times (the allocation share of an event is allocate_ms / real time).
  const double events = static_cast<double>(state.iterations());
  state.counters["score_ms"] = stages.score * 1e3 / events;
  state.counters["allocate_ms"] = stages.allocate * 1e3 / events;
  state.counters["select_ms"] = stages.select * 1e3 / events;
  state.SetLabel(BlasBackend());
}

#define EVENT(geometry, scorer, allocator)                                                         \
  BENCHMARK_CAPTURE(BM_Event, geometry##_##scorer##_##allocator, k##geometry, #scorer, #allocator) \
      ->Unit(benchmark::kMillisecond)                                                              \
      ->UseRealTime()

EVENT(Llama8b, snapkv, uniform);
EVENT(Llama8b, streaming, uniform);
EVENT(Llama8b, h2o, uniform);
EVENT(Llama8b, rkv, uniform);
EVENT(Llama8b, rkv, pyramid);
EVENT(Llama8b, rkv, adakv);
EVENT(Llama8b, rkv, reasonalloc);
EVENT(SmolLm, snapkv, uniform);
EVENT(SmolLm, streaming, uniform);
EVENT(SmolLm, h2o, uniform);
EVENT(SmolLm, rkv, uniform);
EVENT(SmolLm, rkv, pyramid);
EVENT(SmolLm, rkv, adakv);
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
