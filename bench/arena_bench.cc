// One compression event through the host shared-memory arenas versus the same event through the
// inline path (tensors inside the request), against a running server: bytes on the gRPC path,
// round trip, and its split into engine time (score + allocate + select), in-place compaction and
// the rest (transport, validation, conversion). Three paths: managed (the server's kv arena,
// compacted in place), advisory (the worker's own shared-memory keys and query window, registered
// with RegisterBuffers; keep masks back in the result arena) and inline. Geometries of
// SmolLM2-135M and R1-Distill-Llama-8B at B 128 and 512, fp16, snapkv, Δ 128.
//   bench/arena_bench.sh [build dir]
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "client/client.h"
#include "client/mapped_arena.h"
#include "core/build_info.h"
#include "core/dtype.h"

ABSL_FLAG(std::string, target, reasonalloc::kDefaultTarget, "server address");
ABSL_FLAG(int, events, 30, "timed events per geometry and path (after 3 warm-up events)");
ABSL_FLAG(double, concurrent_seconds, 10, "length of the 64-session throughput run (0 = skip)");

namespace reasonalloc {
namespace {

struct Geometry {
  const char* name;
  int layers, hq, hkv, d, budget;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

v1::CreateSessionRequest Request(const Geometry& g, v1::MemoryKind memory,
                                 v1::SessionMode mode = v1::SESSION_MODE_MANAGED) {
  v1::CreateSessionRequest r;
  auto* m = r.mutable_model();
  m->set_name(g.name);
  m->set_num_layers(g.layers);
  m->set_num_q_heads(g.hq);
  m->set_num_kv_heads(g.hkv);
  m->set_head_dim(g.d);
  m->set_dtype(v1::DTYPE_FLOAT16);
  m->set_max_context(131072);
  r.mutable_budget()->set_budget(g.budget);
  r.mutable_budget()->set_buffer(128);
  r.mutable_budget()->set_window(8);
  r.mutable_scorer()->set_name("snapkv");
  r.set_memory(memory);
  r.set_mode(mode);
  r.set_lease_seconds(600);
  return r;
}

// A worker-owned shared-memory object holding one contiguous fp16 array, registered as `kind`.
struct WorkerBuffer {
  WorkerBuffer(const std::string& tag, std::vector<int64_t> shape) : shape(std::move(shape)) {
    name = "/arena-bench-" + std::to_string(::getpid()) + "-" + tag;
    count = 1;
    for (int64_t x : this->shape) count *= x;
    ::shm_unlink(name.c_str());
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(count * 2)) != 0) std::abort();
    void* p =
        ::mmap(nullptr, static_cast<size_t>(count * 2), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) std::abort();
    data = static_cast<uint16_t*>(p);
  }
  ~WorkerBuffer() {
    ::munmap(data, static_cast<size_t>(count * 2));
    ::shm_unlink(name.c_str());
  }
  v1::ArenaDescriptor Describe(const std::string& kind, const std::string& array) const {
    v1::ArenaDescriptor d;
    d.set_kind(kind);
    d.set_memory(v1::MEMORY_KIND_HOST_SHM);
    d.set_shm_name(name);
    d.set_byte_length(static_cast<uint64_t>(count * 2));
    d.set_layout_version(1);
    auto* a = d.add_arrays();
    a->set_name(array);
    a->set_dtype(v1::DTYPE_FLOAT16);
    int64_t stride = 1;
    std::vector<int64_t> strides(shape.size());
    for (size_t i = shape.size(); i-- > 0;) {
      strides[i] = stride;
      stride *= shape[i];
    }
    for (size_t i = 0; i < shape.size(); ++i) {
      a->add_shape(shape[i]);
      a->add_strides(strides[i]);
    }
    a->set_byte_length(static_cast<uint64_t>(count * 2));
    return d;
  }
  std::string name;
  std::vector<int64_t> shape;
  int64_t count = 0;
  uint16_t* data = nullptr;
};

struct Sample {
  double round_trip_us, engine_us, compact_us;
  size_t bytes;
};

void Report(const char* label, const std::vector<Sample>& s) {
  std::vector<double> rt, en, co;
  for (const auto& x : s) {
    rt.push_back(x.round_trip_us);
    en.push_back(x.engine_us);
    co.push_back(x.compact_us);
  }
  const double r = Median(rt), e = Median(en), c = Median(co);
  std::printf(
      "  %-8s round trip %9.0f us  engine %9.0f us  compact %7.0f us  rest %8.0f us  "
      "gRPC bytes %zu\n",
      label, r, e, c, r - e - c, s.front().bytes);
}

// 64 SmolLM2-135M sessions (B 128) driven by 8 threads, 8 sessions each, through the arenas: every
// event sees B + Δ rows per head. Events per second and latency percentiles over all of them.
int Concurrent(Client& c) {
  const double seconds = absl::GetFlag(FLAGS_concurrent_seconds);
  if (seconds <= 0) return 0;
  const Geometry g{"smollm2-135m", 30, 9, 3, 64, 128};
  struct Worker {
    std::vector<std::string> ids;
    std::vector<std::unique_ptr<MappedArena>> results;
    std::vector<double> latencies_us;
  };
  std::vector<Worker> workers(8);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (auto& w : workers) {
    for (int s = 0; s < 8; ++s) {
      auto created = c.CreateSession(Request(g, v1::MEMORY_KIND_HOST_SHM));
      if (!created.ok()) {
        std::fprintf(stderr, "arena_bench: %s\n", created.status().ToString().c_str());
        return 1;
      }
      for (const auto& d : created->session().arenas()) {
        auto m = MappedArena::Map(d);
        if (!m.ok()) return 1;
        if (d.kind() == "kv") {
          for (const char* name : {"k", "v"}) {
            uint16_t* a = (*m)->As<uint16_t>(name);
            const int64_t count = int64_t{g.layers} * g.hkv * (g.budget + 128) * g.d;
            for (int64_t i = 0; i < count; ++i) a[i] = FloatToHalf(normal(rng));
          }
        }
        if (d.kind() == "result") w.results.push_back(std::move(m).value());
      }
      w.ids.push_back(created->session().session_id());
    }
  }
  const auto t_end = std::chrono::steady_clock::now() +
                     std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                         std::chrono::duration<double>(seconds));
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& w : workers) {
    threads.emplace_back([&] {
      for (int64_t step = 0; std::chrono::steady_clock::now() < t_end; ++step) {
        for (size_t s = 0; s < w.ids.size(); ++s) {
          int32_t* len = w.results[s]->As<int32_t>("len");
          const int32_t* cap = w.results[s]->As<int32_t>("capacity");
          for (int64_t i = 0; i < int64_t{g.layers} * g.hkv; ++i) len[i] = cap[i];
          v1::CompressRequest r;
          r.set_session_id(w.ids[s]);
          r.set_step(step);
          const auto ts = std::chrono::steady_clock::now();
          if (!c.Compress(r).ok()) failures.fetch_add(1);
          w.latencies_us.push_back(
              std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - ts)
                  .count());
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<double> all;
  for (auto& w : workers) all.insert(all.end(), w.latencies_us.begin(), w.latencies_us.end());
  std::sort(all.begin(), all.end());
  auto at = [&](double q) {
    return all[static_cast<size_t>(q * static_cast<double>(all.size() - 1))];
  };
  std::printf(
      "64 concurrent sessions (8 threads x 8, %s geometry, B %d, shared memory), %.1f s:\n"
      "  %zu events, %.0f events/s, latency p50 %.1f ms, p99 %.1f ms, failures %d\n",
      g.name, g.budget, wall, all.size(), static_cast<double>(all.size()) / wall, at(0.5) / 1e3,
      at(0.99) / 1e3, failures.load());
  for (auto& w : workers) {
    for (const auto& id : w.ids) (void)c.CloseSession(id);
  }
  return failures.load() == 0 ? 0 : 1;
}

int Run() {
  Client::Options o;
  o.target = absl::GetFlag(FLAGS_target);
  o.max_message_bytes = uint64_t{256} << 20;  // the inline Llama-8B event carries ~84 MB
  o.timeout = absl::Seconds(120);
  auto client = Client::Connect(o);
  if (!client.ok()) return 2;
  Client& c = **client;
  const int events = absl::GetFlag(FLAGS_events);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (const Geometry& g :
       {Geometry{"smollm2-135m", 30, 9, 3, 64, 128}, Geometry{"smollm2-135m", 30, 9, 3, 64, 512},
        Geometry{"r1-distill-llama-8b", 32, 32, 8, 128, 128},
        Geometry{"r1-distill-llama-8b", 32, 32, 8, 128, 512}}) {
    const int n = g.budget + 128;  // every event sees B + Δ rows per head and evicts Δ
    auto shm = c.CreateSession(Request(g, v1::MEMORY_KIND_HOST_SHM));
    auto adv = c.CreateSession(Request(g, v1::MEMORY_KIND_HOST_SHM, v1::SESSION_MODE_ADVISORY));
    auto inl = c.CreateSession(Request(g, v1::MEMORY_KIND_INLINE));
    if (!shm.ok() || !adv.ok() || !inl.ok()) {
      std::fprintf(stderr, "arena_bench: %s %s %s\n", shm.status().ToString().c_str(),
                   adv.status().ToString().c_str(), inl.status().ToString().c_str());
      return 1;
    }
    // The advisory worker's own keys and query window, registered once.
    WorkerBuffer adv_keys("keys", {g.layers, g.hkv, n, g.d});
    WorkerBuffer adv_queries("q", {g.layers, g.hq, 8, g.d});
    for (WorkerBuffer* b : {&adv_keys, &adv_queries}) {
      for (int64_t i = 0; i < b->count; ++i) b->data[i] = FloatToHalf(normal(rng));
    }
    {
      v1::RegisterBuffersRequest reg;
      reg.set_session_id(adv->session().session_id());
      *reg.add_buffers() = adv_keys.Describe("keys", "k");
      *reg.add_buffers() = adv_queries.Describe("query_window", "q");
      grpc::ClientContext ctx;
      v1::RegisterBuffersResponse out;
      if (const grpc::Status st = c.stub().RegisterBuffers(&ctx, reg, &out); !st.ok()) {
        std::fprintf(stderr, "arena_bench: RegisterBuffers: %s\n", st.error_message().c_str());
        return 1;
      }
    }
    auto adv_result = MappedArena::Map(adv->session().arenas(0));
    if (!adv_result.ok()) return 1;
    int32_t* adv_len = (*adv_result)->As<int32_t>("len");
    const int32_t* adv_capacity = (*adv_result)->As<int32_t>("capacity");
    std::unique_ptr<MappedArena> kv, ring, result;
    for (const auto& d : shm->session().arenas()) {
      auto m = MappedArena::Map(d);
      if (!m.ok()) return 1;
      if (d.kind() == "kv") kv = std::move(m).value();
      if (d.kind() == "query_ring") ring = std::move(m).value();
      if (d.kind() == "result") result = std::move(m).value();
    }
    const int64_t heads = int64_t{g.layers} * g.hkv;
    const int64_t rows = heads * (g.budget + 128);
    for (auto [arr, count] :
         {std::pair{kv->As<uint16_t>("k"), rows * g.d},
          std::pair{kv->As<uint16_t>("v"), rows * g.d},
          std::pair{ring->As<uint16_t>("q"), int64_t{g.layers} * g.hq * 8 * g.d}}) {
      for (int64_t i = 0; i < count; ++i) arr[i] = FloatToHalf(normal(rng));
    }
    int32_t* len = result->As<int32_t>("len");
    const int32_t* capacity = result->As<int32_t>("capacity");

    v1::CompressRequest inline_request;
    inline_request.set_session_id(inl->session().session_id());
    auto fill = [&](v1::Tensor* t, std::vector<int64_t> shape) {
      t->set_dtype(v1::DTYPE_FLOAT16);
      int64_t count = 1;
      for (int64_t s : shape) {
        t->add_shape(s);
        count *= s;
      }
      std::vector<uint16_t> v(static_cast<size_t>(count));
      for (auto& x : v) x = FloatToHalf(normal(rng));
      t->set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 2));
    };
    fill(inline_request.mutable_inline_tensors()->mutable_query_window(), {g.layers, g.hq, 8, g.d});
    fill(inline_request.mutable_inline_tensors()->mutable_keys(), {g.layers, g.hkv, n, g.d});
    fill(inline_request.mutable_inline_tensors()->mutable_values(), {g.layers, g.hkv, n, g.d});
    inline_request.set_omit_keep_mask(true);

    std::vector<Sample> managed, advisory, inline_path;
    for (int e = 0; e < events + 3; ++e) {
      {
        for (int64_t i = 0; i < heads; ++i) adv_len[i] = adv_capacity[i];
        v1::CompressRequest r;
        r.set_session_id(adv->session().session_id());
        r.set_step(e);
        const auto t0 = std::chrono::steady_clock::now();
        auto got = c.Compress(r);
        const double us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                .count();
        if (!got.ok()) {
          std::fprintf(stderr, "arena_bench: advisory: %s\n", got.status().ToString().c_str());
          return 1;
        }
        const auto& tm = got->timings();
        if (e >= 3) {
          advisory.push_back(
              {us, (tm.score_seconds() + tm.allocate_seconds() + tm.select_seconds()) * 1e6,
               tm.compact_seconds() * 1e6, r.ByteSizeLong() + got->ByteSizeLong()});
        }
      }
      // Managed: every head is full again (the worker appended Δ tokens since the last event).
      for (int64_t i = 0; i < heads; ++i) len[i] = capacity[i];
      v1::CompressRequest r;
      r.set_session_id(shm->session().session_id());
      r.set_step(e);
      auto t0 = std::chrono::steady_clock::now();
      auto got = c.Compress(r);
      double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (!got.ok()) {
        std::fprintf(stderr, "arena_bench: %s\n", got.status().ToString().c_str());
        return 1;
      }
      const auto& tm = got->timings();
      if (e >= 3) {
        managed.push_back({us,
                           (tm.score_seconds() + tm.allocate_seconds() + tm.select_seconds()) * 1e6,
                           tm.compact_seconds() * 1e6, r.ByteSizeLong() + got->ByteSizeLong()});
      }
      inline_request.set_step(e);
      t0 = std::chrono::steady_clock::now();
      auto want = c.Compress(inline_request);
      us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (!want.ok()) {
        std::fprintf(stderr, "arena_bench: %s\n", want.status().ToString().c_str());
        return 1;
      }
      const auto& ti = want->timings();
      if (e >= 3) {
        inline_path.push_back(
            {us, (ti.score_seconds() + ti.allocate_seconds() + ti.select_seconds()) * 1e6,
             ti.compact_seconds() * 1e6, inline_request.ByteSizeLong() + want->ByteSizeLong()});
      }
    }
    std::printf("%s (L %d, Hq %d, Hkv %d, d %d, B %d, N %d, fp16, snapkv), medians of %d events:\n",
                g.name, g.layers, g.hq, g.hkv, g.d, g.budget, n, events);
    Report("managed", managed);
    Report("advisory", advisory);
    Report("inline", inline_path);
    std::vector<double> m, a, i;
    for (const auto& x : managed) m.push_back(x.round_trip_us);
    for (const auto& x : advisory) a.push_back(x.round_trip_us);
    for (const auto& x : inline_path) i.push_back(x.round_trip_us);
    std::printf("  inline / managed round trip: %.2fx, inline / advisory: %.2fx\n",
                Median(i) / Median(m), Median(i) / Median(a));
    (void)c.CloseSession(shm->session().session_id());
    (void)c.CloseSession(adv->session().session_id());
    (void)c.CloseSession(inl->session().session_id());
  }
  return Concurrent(c);
}

}  // namespace
}  // namespace reasonalloc

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return reasonalloc::Run();
}
