// The server's Prometheus metrics (README "Metrics") and their HTTP endpoint.
//
// Labels are bounded: method, gRPC code, stage, scorer, allocator, state, reason, layer (< 256) and
// model (the first 32 model names, then "other"). Never a session id. tests/unit/metrics_test.cc
// pins every name and label set.
#ifndef REASONALLOC_SERVER_METRICS_H_
#define REASONALLOC_SERVER_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/engine.h"
#include "core/sync.h"

namespace reasonalloc {

class Metrics {
 public:
  // `device` and `driver` label reasonalloc_build_info (the CPU model, or the GPU and its driver).
  explicit Metrics(absl::string_view backend, absl::string_view device = "",
                   absl::string_view driver = "");

  // Starts the HTTP endpoint on host:port (port 0 picks a free port). Returns the bound host:port.
  absl::StatusOr<std::string> Serve(const std::string& address);
  void StopServing();

  void CountRequest(absl::string_view method, int grpc_code);
  void ObserveCompress(const StageSeconds& seconds);
  // One finished event: tokens kept and evicted by scorer, allocator and model, the spread of its
  // head budgets, and each layer's share of the budget (the model's latest event).
  void ObserveEvent(absl::string_view scorer, absl::string_view allocator, absl::string_view model,
                    const Decision& decision);
  void CountWatchDropped(int64_t events);
  void SetWatchers(int watchers);
  void CountIpcImportFailure(absl::string_view reason);
  // The model label: a model's own name for the first kMaxModelLabels models seen, "other" after,
  // so that clients cannot grow the label set without bound.
  std::string ModelLabel(absl::string_view model);
  static constexpr int kMaxModelLabels = 32;
  static constexpr int kMaxLayerLabels = 256;
  void AddKeptTokens(int64_t delta);
  // capacity_tokens: Σ over sessions of L·Hkv·(B + Δ), the tokens their arenas can hold.
  void SetPool(int sessions, uint64_t capacity, uint64_t reserved, int64_t capacity_tokens);
  void CountSessionEnd(absl::string_view why);  // "closed" | "expired"
  // One launch set of the CUDA backend: how many sessions' events it decided together.
  void ObserveDeviceBatch(int events);

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& compress_seconds_;
  prometheus::Family<prometheus::Counter>& evicted_;
  prometheus::Family<prometheus::Counter>& kept_;
  prometheus::Family<prometheus::Histogram>& spread_;
  prometheus::Family<prometheus::Gauge>& layer_share_;
  prometheus::Counter& watch_dropped_;
  prometheus::Gauge& watchers_;
  prometheus::Family<prometheus::Counter>& ipc_failures_;
  Mutex models_mu_;
  std::set<std::string> models_ ABSL_GUARDED_BY(models_mu_);
  // Children looked up once per label set (prometheus-cpp's Add hashes the labels each time).
  struct PolicyChildren {
    prometheus::Counter* evicted;
    prometheus::Counter* kept;
    prometheus::Histogram* spread;
  };
  Mutex children_mu_;
  std::map<std::string, PolicyChildren> policy_children_ ABSL_GUARDED_BY(children_mu_);
  std::map<std::string, std::vector<prometheus::Gauge*>> layer_children_
      ABSL_GUARDED_BY(children_mu_);
  prometheus::Family<prometheus::Counter>& session_ends_;
  prometheus::Histogram& device_batch_events_;
  prometheus::Gauge& sessions_;
  prometheus::Family<prometheus::Gauge>& arena_;
  prometheus::Gauge& arena_capacity_;
  prometheus::Gauge& arena_reserved_;
  prometheus::Gauge& arena_free_;
  prometheus::Family<prometheus::Gauge>& kv_tokens_;
  prometheus::Gauge& kv_tokens_kept_;
  prometheus::Gauge& kv_tokens_capacity_;
  prometheus::Histogram* stage_[5];
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string serving_host_;
  int serving_port_ = 0;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_METRICS_H_
