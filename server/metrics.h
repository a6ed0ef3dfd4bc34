// The server's Prometheus metrics (DESIGN.md §6) and their HTTP endpoint.
//
// Labels are bounded: method, gRPC code, stage, scorer, allocator, state. Never a session id.
#ifndef REASONALLOC_SERVER_METRICS_H_
#define REASONALLOC_SERVER_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/engine.h"

namespace reasonalloc {

class Metrics {
 public:
  explicit Metrics(absl::string_view backend);

  // Starts the HTTP endpoint on host:port (port 0 picks a free port). Returns the bound host:port.
  absl::StatusOr<std::string> Serve(const std::string& address);
  void StopServing();

  void CountRequest(absl::string_view method, int grpc_code);
  void ObserveCompress(const StageSeconds& seconds);
  void CountEvicted(absl::string_view scorer, absl::string_view allocator, int64_t tokens);
  void AddKeptTokens(int64_t delta);
  // capacity_tokens: Σ over sessions of L·Hkv·(B + Δ), the tokens their arenas can hold.
  void SetPool(int sessions, uint64_t capacity, uint64_t reserved, int64_t capacity_tokens);
  void CountSessionEnd(absl::string_view why);  // "closed" | "expired"

  prometheus::Registry& registry() { return *registry_; }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& compress_seconds_;
  prometheus::Family<prometheus::Counter>& evicted_;
  prometheus::Family<prometheus::Counter>& session_ends_;
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
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_METRICS_H_
