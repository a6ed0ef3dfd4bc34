// In-process cost of what the server records per Compress: the Prometheus updates (request count,
// stage histograms, tokens, spread, per-layer share) and, with a watcher subscribed, building and
// queueing one WatchMetrics event. Llama-8B geometry (32 layers x 8 KV heads).
//   build/bench/metrics_bench --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include "server/event_hub.h"
#include "server/metrics.h"

namespace reasonalloc {
namespace {

Decision LlamaDecision() {
  Decision d;
  d.num_layers = 32;
  d.num_kv_heads = 8;
  for (int i = 0; i < 32 * 8; ++i) {
    d.budgets.push_back(400 + (i * 37) % 200);
    d.kept_lengths.push_back(d.budgets.back());
  }
  d.evicted_tokens = 12345;
  return d;
}

void BM_RecordMetrics(benchmark::State& state) {
  Metrics m("cpu");
  const Decision d = LlamaDecision();
  StageSeconds s{1e-3, 1e-4, 1e-4, 0, 1.2e-3};
  for (auto _ : state) {
    m.CountRequest("Compress", 0);
    m.ObserveCompress(s);
    m.ObserveEvent("rkv", "reasonalloc", "llama-8b", d);
  }
}
BENCHMARK(BM_RecordMetrics);

void BM_PublishToOneWatcher(benchmark::State& state) {
  EventHub hub(8, 1024, nullptr);
  auto w = hub.Subscribe({}, "");
  const Decision d = LlamaDecision();
  v1::CompressEvent e;
  uint64_t dropped = 0;
  for (auto _ : state) {
    // What a committed event publishes (CompressEventToProto): one record with the per-layer
    // budgets, queued; the consumer side is
    // drained outside the timed region's critical path by popping right away.
    v1::CompressEvent ev;
    ev.set_session_id("0123456789abcdef0123456789abcdef");
    ev.set_model_name("llama-8b");
    for (int l = 0; l < d.num_layers; ++l) {
      int32_t layer = 0;
      for (int h = 0; h < d.num_kv_heads; ++h) layer += d.budgets[static_cast<size_t>(l * 8 + h)];
      ev.add_layer_budgets(layer / d.num_kv_heads);  // tokens per KV head, as the server sends
    }
    hub.Publish(ev);
    (*w)->Next(absl::InfinitePast(), &e, &dropped);
  }
}
BENCHMARK(BM_PublishToOneWatcher);

}  // namespace
}  // namespace reasonalloc

BENCHMARK_MAIN();
