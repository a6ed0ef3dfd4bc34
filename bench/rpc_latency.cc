// Round-trip latency of unary calls over the server's socket: GetServerInfo (the floor of the
// service's own overhead) and a tiny inline Compress. Prints p50/p90/p99 per repetition and the
// median over repetitions, so that a noisy machine shows up as spread instead of as a wrong number.
//
//   rpc_latency --target unix:///tmp/reasonalloc.sock [--calls 10000] [--repetitions 5]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "client/client.h"
#include "core/dtype.h"

ABSL_FLAG(std::string, target, reasonalloc::kDefaultTarget, "server address");
ABSL_FLAG(int, calls, 10000, "timed calls per repetition and method");
ABSL_FLAG(int, warmup, 500, "untimed calls before each repetition");
ABSL_FLAG(int, repetitions, 5, "repetitions (the summary is their median)");

namespace reasonalloc {
namespace {

struct Percentiles {
  double p50, p90, p99, mean;
};

Percentiles Summarise(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  auto at = [&](double q) {
    return us[static_cast<size_t>(q * static_cast<double>(us.size() - 1))];
  };
  double sum = 0;
  for (double u : us) sum += u;
  return {at(0.50), at(0.90), at(0.99), sum / static_cast<double>(us.size())};
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename Call>
std::vector<Percentiles> Measure(const char* name, Call call) {
  std::vector<Percentiles> reps;
  for (int r = 0; r < absl::GetFlag(FLAGS_repetitions); ++r) {
    for (int i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) call();
    std::vector<double> us;
    us.reserve(static_cast<size_t>(absl::GetFlag(FLAGS_calls)));
    for (int i = 0; i < absl::GetFlag(FLAGS_calls); ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      call();
      us.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
    reps.push_back(Summarise(std::move(us)));
    std::printf("%-14s rep %d: p50 %7.1f us  p90 %7.1f us  p99 %7.1f us  mean %7.1f us\n", name, r,
                reps.back().p50, reps.back().p90, reps.back().p99, reps.back().mean);
  }
  return reps;
}

void PrintSummary(const char* name, const std::vector<Percentiles>& reps) {
  std::vector<double> p50, p99;
  for (const auto& p : reps) {
    p50.push_back(p.p50);
    p99.push_back(p.p99);
  }
  std::printf("%-14s median of %zu reps: p50 %.1f us, p99 %.1f us\n", name, reps.size(),
              Median(p50), Median(p99));
}

int Run() {
  Client::Options o;
  o.target = absl::GetFlag(FLAGS_target);
  auto client = Client::Connect(o);
  if (!client.ok()) return 2;
  Client& c = **client;
  auto info = c.GetServerInfo();
  if (!info.ok()) {
    std::fprintf(stderr, "rpc_latency: %s\n", info.status().ToString().c_str());
    return 1;
  }
  std::printf("server %s (%s), backend %s, target %s\n", info->version().c_str(),
              info->build().c_str(), info->backend().c_str(), o.target.c_str());

  // Tiny inline request: L=2, Hq=4, Hkv=2, d=16, window 8, N=32 fp16 keys and values, snapkv B=16.
  constexpr int L = 2, Hq = 4, Hkv = 2, d = 16, w = 8, n = 32;
  v1::CreateSessionRequest create;
  auto* m = create.mutable_model();
  m->set_name("bench-tiny");
  m->set_num_layers(L);
  m->set_num_q_heads(Hq);
  m->set_num_kv_heads(Hkv);
  m->set_head_dim(d);
  m->set_dtype(v1::DTYPE_FLOAT16);
  m->set_max_context(4096);
  create.mutable_budget()->set_budget(16);
  create.mutable_budget()->set_window(w);
  create.set_lease_seconds(600);
  auto session = c.CreateSession(create);
  if (!session.ok()) {
    std::fprintf(stderr, "rpc_latency: %s\n", session.status().ToString().c_str());
    return 1;
  }
  v1::CompressRequest request;
  request.set_session_id(session->session().session_id());
  auto fill = [](v1::Tensor* t, std::vector<int64_t> shape) {
    t->set_dtype(v1::DTYPE_FLOAT16);
    size_t count = 1;
    for (int64_t s : shape) {
      t->add_shape(s);
      count *= static_cast<size_t>(s);
    }
    std::vector<uint16_t> v(count);
    for (size_t i = 0; i < count; ++i)
      v[i] = FloatToHalf(static_cast<float>((i * 7919) % 97) / 97.0f);
    t->set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 2));
  };
  fill(request.mutable_inline_tensors()->mutable_query_window(), {L, Hq, w, d});
  fill(request.mutable_inline_tensors()->mutable_keys(), {L, Hkv, n, d});
  fill(request.mutable_inline_tensors()->mutable_values(), {L, Hkv, n, d});
  std::printf("inline Compress request: %zu bytes\n", request.ByteSizeLong());

  int64_t step = 0;
  int failures = 0;
  // grpc.health.v1 Check does no work of the sidecar's: the floor of gRPC itself on this socket.
  const auto health_reps = Measure("Health.Check", [&] { failures += !c.CheckHealth().ok(); });
  const auto info_reps = Measure("GetServerInfo", [&] { failures += !c.GetServerInfo().ok(); });
  const auto compress_reps = Measure("Compress", [&] {
    request.set_step(step++);
    failures += !c.Compress(request).ok();
  });
  // The same Compress with one WatchMetrics stream consuming every event (the watcher's cost on
  // the decode path), then without again, so that drift of the machine shows.
  grpc::ClientContext watch_ctx;
  v1::WatchMetricsRequest watch_request;
  auto watch = c.stub().WatchMetrics(&watch_ctx, watch_request);
  std::atomic<int64_t> watched{0};
  std::thread watcher([&] {
    v1::MetricsEvent e;
    while (watch->Read(&e)) watched.fetch_add(1);
  });
  const auto watched_reps = Measure("Compress+watch", [&] {
    request.set_step(step++);
    failures += !c.Compress(request).ok();
  });
  watch_ctx.TryCancel();
  watcher.join();
  (void)watch->Finish();
  const auto again_reps = Measure("Compress again", [&] {
    request.set_step(step++);
    failures += !c.Compress(request).ok();
  });
  (void)c.CloseSession(session->session().session_id());
  PrintSummary("Health.Check", health_reps);
  PrintSummary("GetServerInfo", info_reps);
  PrintSummary("Compress", compress_reps);
  PrintSummary("Compress+watch", watched_reps);
  PrintSummary("Compress again", again_reps);
  std::printf("watcher received %lld events\n", static_cast<long long>(watched.load()));
  if (failures > 0) {
    std::fprintf(stderr, "rpc_latency: %d calls failed\n", failures);
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace reasonalloc

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return reasonalloc::Run();
}
