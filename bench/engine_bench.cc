// CPU engine cost of one compression event (score + allocate + select), Google Benchmark.
// Geometry: the Llama-3-8B shape (L=32, Hq=32, Hkv=8, d=128), window 8, N = 640 tokens per head, B
// = 512.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "core/engine.h"

namespace reasonalloc {
namespace {

void BM_Compress(benchmark::State& state, const char* scorer, int layers) {
  SessionConfig c;
  c.model = {"llama-8b", layers, 32, 8, 128, DType::kFloat16, 131072};
  c.budget.budget = 512;
  c.scorer.name = scorer;
  auto engine = Engine::Create(c);
  if (!engine.ok()) {
    state.SkipWithError(engine.status().ToString().c_str());
    return;
  }
  const int64_t n = 640;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> q(static_cast<size_t>(layers) * 32 * 8 * 128);
  std::vector<float> k(static_cast<size_t>(layers) * 8 * n * 128);
  for (float& x : q) x = normal(rng);
  for (float& x : k) x = normal(rng);
  std::vector<int32_t> lengths(static_cast<size_t>(layers) * 8, static_cast<int32_t>(n));
  for (auto _ : state) {
    auto d = (*engine)->Compress({q.data(), k.data(), n, lengths, {}});
    benchmark::DoNotOptimize(d);
  }
  state.counters["heads"] = layers * 8;
}

BENCHMARK_CAPTURE(BM_Compress, snapkv_1layer, "snapkv", 1)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Compress, snapkv_32layers, "snapkv", 32)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Compress, streaming_32layers, "streaming", 32)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace reasonalloc

BENCHMARK_MAIN();
