#include "server/metrics.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <future>

#include "absl/strings/str_cat.h"
#include "core/build_info.h"

namespace reasonalloc {
namespace {

// 1 µs to 10 s: one event of a tiny model takes microseconds, a batched event of a large one
// seconds.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {1e-6, 2.5e-6, 5e-6,   1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
          5e-3, 1e-2,   2.5e-2, 5e-2, 0.1,    0.25, 0.5,  1.0,    2.5,  5.0,  10.0};
}

const char* CodeName(int code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  if (code < 0 || code > 16) return "UNKNOWN";
  return kNames[code];
}

}  // namespace

Metrics::Metrics(absl::string_view backend, absl::string_view device, absl::string_view driver)
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("reasonalloc_requests_total")
                    .Help("gRPC requests handled, by method and status code")
                    .Register(*registry_)),
      compress_seconds_(prometheus::BuildHistogram()
                            .Name("reasonalloc_compress_duration_seconds")
                            .Help("Time spent in each stage of a compression event")
                            .Register(*registry_)),
      evicted_(prometheus::BuildCounter()
                   .Name("reasonalloc_tokens_evicted_total")
                   .Help("KV tokens evicted, by scorer and allocator")
                   .Register(*registry_)),
      kept_(prometheus::BuildCounter()
                .Name("reasonalloc_tokens_kept_total")
                .Help("KV tokens kept at compression events, by scorer, allocator and model")
                .Register(*registry_)),
      spread_(prometheus::BuildHistogram()
                  .Name("reasonalloc_head_budget_spread_ratio")
                  .Help("Max over min head budget of one event (1 = uniform), by allocator")
                  .Register(*registry_)),
      layer_share_(prometheus::BuildGauge()
                       .Name("reasonalloc_layer_budget_share")
                       .Help("Each layer's share of the session budget at the model's latest event "
                             "(1/L = uniform)")
                       .Register(*registry_)),
      watch_dropped_(prometheus::BuildCounter()
                         .Name("reasonalloc_watch_events_dropped_total")
                         .Help("WatchMetrics events dropped because a watcher's queue was full")
                         .Register(*registry_)
                         .Add({})),
      watchers_(prometheus::BuildGauge()
                    .Name("reasonalloc_watchers")
                    .Help("Open WatchMetrics streams")
                    .Register(*registry_)
                    .Add({})),
      ipc_failures_(prometheus::BuildCounter()
                        .Name("reasonalloc_ipc_import_failures_total")
                        .Help("Worker buffers that could not be imported, by reason")
                        .Register(*registry_)),
      session_ends_(prometheus::BuildCounter()
                        .Name("reasonalloc_sessions_ended_total")
                        .Help("Sessions that left the server, by reason (closed, expired)")
                        .Register(*registry_)),
      device_batch_events_(
          prometheus::BuildHistogram()
              .Name("reasonalloc_device_batch_events")
              .Help("Compression events decided together in one CUDA launch set (sessions "
                    "sharing an engine, from one CompressStream message)")
              .Register(*registry_)
              .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128})),
      sessions_(prometheus::BuildGauge()
                    .Name("reasonalloc_sessions")
                    .Help("Live sessions")
                    .Register(*registry_)
                    .Add({})),
      arena_(prometheus::BuildGauge()
                 .Name("reasonalloc_arena_bytes")
                 .Help("Arena pool bytes by state (capacity, reserved, free)")
                 .Register(*registry_)),
      arena_capacity_(arena_.Add({{"state", "capacity"}})),
      arena_reserved_(arena_.Add({{"state", "reserved"}})),
      arena_free_(arena_.Add({{"state", "free"}})),
      kv_tokens_(prometheus::BuildGauge()
                     .Name("reasonalloc_kv_tokens")
                     .Help("KV tokens of all live sessions: kept after their latest event, and "
                           "capacity L*Hkv*(B+buffer)")
                     .Register(*registry_)),
      kv_tokens_kept_(kv_tokens_.Add({{"state", "kept"}})),
      kv_tokens_capacity_(kv_tokens_.Add({{"state", "capacity"}})) {
  static constexpr const char* kStages[] = {"score", "allocate", "select", "compact", "total"};
  for (int i = 0; i < 5; ++i) {
    stage_[i] = &compress_seconds_.Add({{"stage", kStages[i]}}, LatencyBuckets());
  }
  for (const char* reason : {"bad_handle", "wrong_device", "open_failed", "unsupported"}) {
    ipc_failures_.Add({{"reason", reason}});
  }
  prometheus::BuildGauge()
      .Name("reasonalloc_build_info")
      .Help("Build facts as labels; the value is always 1")
      .Register(*registry_)
      .Add({{"version", kVersion},
            {"revision", kGitRevision},
            {"backend", std::string(backend)},
            {"device", std::string(device)},
            {"driver", std::string(driver)}})
      .Set(1);
}

absl::StatusOr<std::string> Metrics::Serve(const std::string& address) {
  try {
    // Several threads and a short request timeout: an idle or slow connection (a port scanner, a
    // stuck client) holds one thread for at most the timeout, and the others keep answering
    // scrapes. No keep-alive, so a scraper's connection never parks on a thread between scrapes.
    exposer_ = std::make_unique<prometheus::Exposer>(
        std::vector<std::string>{"listening_ports", address, "num_threads", "8",
                                 "request_timeout_ms", "2000", "enable_keep_alive", "no"});
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_address \"", address, "\" cannot be served: ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  const auto ports = exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::InternalError(absl::StrCat("metrics_address \"", address, "\": no port bound"));
  }
  const std::string host = address.substr(0, address.rfind(':'));
  serving_host_ = host;
  serving_port_ = ports.front();
  return absl::StrCat(host, ":", ports.front());
}

namespace {

// Opens and closes one TCP connection to host:port (best effort, never blocks for long).
void Poke(const std::string& host, int port) {
  std::string h = host;
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  if (h.empty() || h == "0.0.0.0" || h == "*") h = "127.0.0.1";
  if (h == "::") h = "::1";
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(h.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    (void)::connect(fd, a->ai_addr, a->ai_addrlen);  // every address: one of them is bound
    ::close(fd);
  }
  ::freeaddrinfo(found);
}

}  // namespace

void Metrics::StopServing() {
  if (exposer_ == nullptr) return;
  // civetweb's accept loop polls its sockets in 2 s quanta and checks for a stop only between
  // them; a connection ends the wait, so the endpoint stops in milliseconds instead of seconds.
  auto stopping = std::async(std::launch::async,
                             [exposer = std::move(exposer_)]() mutable { exposer.reset(); });
  while (stopping.wait_for(std::chrono::milliseconds(20)) != std::future_status::ready) {
    Poke(serving_host_, serving_port_);
  }
}

void Metrics::CountRequest(absl::string_view method, int grpc_code) {
  requests_.Add({{"method", std::string(method)}, {"code", CodeName(grpc_code)}}).Increment();
}

void Metrics::ObserveCompress(const StageSeconds& s) {
  stage_[0]->Observe(s.score);
  stage_[1]->Observe(s.allocate);
  stage_[2]->Observe(s.select);
  stage_[3]->Observe(s.compact);
  stage_[4]->Observe(s.total);
}

std::string Metrics::ModelLabel(absl::string_view model) {
  MutexLock lock(&models_mu_);
  const std::string name(model);
  if (models_.count(name) > 0) return name;
  if (static_cast<int>(models_.size()) < kMaxModelLabels) {
    models_.insert(name);
    return name;
  }
  return "other";
}

void Metrics::ObserveEvent(absl::string_view scorer, absl::string_view allocator,
                           absl::string_view model, const Decision& decision) {
  const std::string model_label = ModelLabel(model);
  int64_t kept = 0;
  for (int32_t k : decision.kept_lengths) kept += k;
  int64_t total = 0;
  for (int32_t b : decision.budgets) total += b;
  const int layers = std::min(decision.num_layers, kMaxLayerLabels);
  PolicyChildren policy;
  std::vector<prometheus::Gauge*> layer_gauges;
  {
    MutexLock lock(&children_mu_);
    const std::string key = absl::StrCat(scorer, "\x1f", allocator, "\x1f", model_label);
    auto it = policy_children_.find(key);
    if (it == policy_children_.end()) {
      const prometheus::Labels labels = {{"scorer", std::string(scorer)},
                                         {"allocator", std::string(allocator)},
                                         {"model", model_label}};
      it = policy_children_
               .emplace(key, PolicyChildren{&evicted_.Add(labels), &kept_.Add(labels),
                                            &spread_.Add({{"allocator", std::string(allocator)}},
                                                         prometheus::Histogram::BucketBoundaries{
                                                             1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0,
                                                             10.0, 100.0})})
               .first;
    }
    policy = it->second;
    auto& gauges = layer_children_[model_label];
    while (static_cast<int>(gauges.size()) < layers) {
      gauges.push_back(
          &layer_share_.Add({{"model", model_label}, {"layer", std::to_string(gauges.size())}}));
    }
    // A copy: another model with more layers may grow the vector once the lock is released.
    layer_gauges.assign(gauges.begin(), gauges.begin() + layers);
  }
  policy.evicted->Increment(static_cast<double>(decision.evicted_tokens));
  policy.kept->Increment(static_cast<double>(kept));
  if (decision.budgets.empty() || total <= 0) return;
  const auto [lo, hi] = std::minmax_element(decision.budgets.begin(), decision.budgets.end());
  policy.spread->Observe(*lo > 0 ? static_cast<double>(*hi) / *lo : 100.0);
  for (int l = 0; l < layers; ++l) {
    int64_t layer = 0;
    for (int h = 0; h < decision.num_kv_heads; ++h) {
      layer += decision.budgets[static_cast<size_t>(l * decision.num_kv_heads + h)];
    }
    layer_gauges[static_cast<size_t>(l)]->Set(static_cast<double>(layer) /
                                              static_cast<double>(total));
  }
}

void Metrics::CountWatchDropped(int64_t events) {
  watch_dropped_.Increment(static_cast<double>(events));
}

void Metrics::SetWatchers(int watchers) { watchers_.Set(watchers); }

void Metrics::CountIpcImportFailure(absl::string_view reason) {
  ipc_failures_.Add({{"reason", std::string(reason)}}).Increment();
}

void Metrics::AddKeptTokens(int64_t delta) {
  kv_tokens_kept_.Increment(static_cast<double>(delta));
}

void Metrics::SetPool(int sessions, uint64_t capacity, uint64_t reserved, int64_t capacity_tokens) {
  kv_tokens_capacity_.Set(static_cast<double>(capacity_tokens));
  sessions_.Set(sessions);
  arena_capacity_.Set(static_cast<double>(capacity));
  arena_reserved_.Set(static_cast<double>(reserved));
  arena_free_.Set(static_cast<double>(capacity - reserved));
}

void Metrics::CountSessionEnd(absl::string_view why) {
  session_ends_.Add({{"reason", std::string(why)}}).Increment();
}

void Metrics::ObserveDeviceBatch(int events) {
  device_batch_events_.Observe(static_cast<double>(events));
}

}  // namespace reasonalloc
