// Requests that used to take the server down or wedge it, each against the real binary: memory per
// event, racing calls on one session, drains with a stopped or blocked peer, pool accounting
// against /dev/shm, the metrics endpoint under idle connections, connection limits and profiles.
// Under the asan preset the same tests run against the sanitized server.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/mapped_arena.h"
#include "core/sync.h"
#include "tests/integration/server_process.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;
using testing::ServerProcess;

std::unique_ptr<ServerProcess> MustStart(std::vector<std::string> args = {}) {
  auto p = ServerProcess::Start(std::move(args));
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(p).value() : nullptr;
}

v1::CreateSessionRequest Session(int layers, int hq, int hkv, int d, int budget, int window,
                                 const std::string& scorer = "snapkv", int max_context = 4096,
                                 int buffer = 16) {
  v1::CreateSessionRequest r;
  auto* m = r.mutable_model();
  m->set_name("robustness");
  m->set_num_layers(layers);
  m->set_num_q_heads(hq);
  m->set_num_kv_heads(hkv);
  m->set_head_dim(d);
  m->set_dtype(v1::DTYPE_FLOAT16);
  m->set_max_context(max_context);
  r.mutable_budget()->set_budget(budget);
  r.mutable_budget()->set_window(window);
  r.mutable_budget()->set_buffer(buffer);
  r.mutable_scorer()->set_name(scorer);
  r.set_mode(v1::SESSION_MODE_ADVISORY);  // decisions only: events need no values
  return r;
}

// fp16 tensor [shape] whose values follow a fixed pattern (the bits of small numbers).
v1::Tensor F16(std::vector<int64_t> shape, float scale) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FLOAT16);
  int64_t n = 1;
  for (int64_t s : shape) {
    t.add_shape(s);
    n *= s;
  }
  std::string bytes(static_cast<size_t>(n) * 2, '\0');
  for (int64_t i = 0; i < n; ++i) {
    // fp16 of scale·sin(i): built from float through the nearest half, by hand.
    const float f = scale * std::sin(0.37f * static_cast<float>(i) + 0.1f);
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
    const int exp = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
    uint16_t h = sign;
    if (exp > 0 && exp < 31) {
      h = static_cast<uint16_t>(sign | (exp << 10) | ((x >> 13) & 0x3ff));
    }
    std::memcpy(&bytes[static_cast<size_t>(i) * 2], &h, 2);
  }
  t.set_data(std::move(bytes));
  return t;
}

v1::CompressRequest Event(const std::string& id, int64_t step, int layers, int hq, int hkv, int d,
                          int window, int n) {
  v1::CompressRequest r;
  r.set_session_id(id);
  r.set_step(step);
  r.set_omit_keep_mask(true);
  auto* in = r.mutable_inline_tensors();
  *in->mutable_query_window() = F16({layers, hq, window, d}, 1.0f);
  *in->mutable_keys() = F16({layers, hkv, n, d}, 2.0f);
  return r;
}

int64_t RssKiB(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "VmRSS:")) {
      int64_t kib = 0;
      std::string value = line.substr(6);
      value = value.substr(0, value.find("kB"));
      (void)absl::SimpleAtoi(absl::StripAsciiWhitespace(value), &kib);
      return kib;
    }
  }
  return -1;
}

// Bytes the server's arenas occupy in /dev/shm (whole pages, as tmpfs charges them).
uint64_t ServerShmBytes(pid_t pid, int* files = nullptr) {
  uint64_t bytes = 0;
  int count = 0;
  const std::string prefix = absl::StrCat("reasonalloc-", pid, "-");
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
    if (!absl::StartsWith(e.path().filename().string(), prefix)) continue;
    struct stat st {};
    if (::stat(e.path().c_str(), &st) == 0) {
      bytes += static_cast<uint64_t>(st.st_blocks) * 512;
      ++count;
    }
  }
  if (files != nullptr) *files = count;
  return bytes;
}

// The race AddressSanitizer caught: UpdateBudget replaced a session's engine while a Compress
// on the same session still read its config through a reference to the freed engine. Compress,
// UpdateBudget and CloseSession (with a new session created in its place) race here.
TEST(Robustness, RacingCompressUpdateBudgetAndCloseOnOneSession) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  Mutex mu;
  std::string id;
  auto create = [&] {
    auto created = c.CreateSession(Session(1, 2, 2, 8, 16, 4));
    EXPECT_TRUE(created.ok()) << created.status();
    MutexLock lock(&mu);
    id = created.ok() ? created->session().session_id() : "";
  };
  auto current = [&] {
    MutexLock lock(&mu);
    return id;
  };
  create();
  std::atomic<int64_t> step{0};
  std::atomic<int> compressed{0};
  std::atomic<bool> stop{false};
  std::vector<std::string> unexpected;
  auto note = [&](const absl::Status& s, const char* what) {
    if (s.ok() || s.code() == absl::StatusCode::kFailedPrecondition ||
        s.code() == absl::StatusCode::kNotFound) {
      return;
    }
    MutexLock lock(&mu);
    unexpected.push_back(absl::StrCat(what, ": ", s.ToString()));
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        const absl::Status s = c.Compress(Event(current(), ++step, 1, 2, 2, 8, 4, 40)).status();
        compressed += s.ok() ? 1 : 0;
        note(s, "Compress");
      }
    });
    threads.emplace_back([&, t] {
      for (int i = 0; !stop.load(); ++i) {
        note(c.UpdateBudget(current(), 16 + (i + t) % 2).status(), "UpdateBudget");
      }
    });
  }
  threads.emplace_back([&] {
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      note(c.CloseSession(current()).status(), "CloseSession");
      create();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(2000));
  stop.store(true);
  for (auto& t : threads) t.join();
  EXPECT_TRUE(unexpected.empty()) << unexpected.front();
  EXPECT_TRUE(server->Running());
  EXPECT_TRUE(c.GetServerInfo().ok());
  EXPECT_GT(compressed.load(), 10);
}

// One rkv event at N 12,000 used to take an N × N similarity matrix (576 MB) that stayed in the
// process; now it is scored in row tiles and the scratch goes back after the event.
TEST(Robustness, LargeRkvEventIsTiledAndItsMemoryComesBack) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  constexpr int kN = 12000;
  auto created = c.CreateSession(Session(1, 2, 2, 4, 16, 4, "rkv", 1 << 20));
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string id = created->session().session_id();
  const int64_t before = RssKiB(server->pid());
  auto done = c.Compress(Event(id, 1, 1, 2, 2, 4, 4, kN));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->decision().evicted_tokens(), 2 * (kN - 16));
  const int64_t after = RssKiB(server->pid());
  // Two heads' tiles at most while scoring (16 MiB each); afterwards only what is retained.
  EXPECT_LT(after - before, 96 * 1024) << "RSS " << before << " KiB -> " << after << " KiB";
  EXPECT_TRUE(c.GetServerInfo().ok());
}

// The memory of an event is bounded before anything is allocated, and the refusal names the
// dimension. This is the 2 MB rkv request that killed the server with bad_alloc (N 260,000).
TEST(Robustness, EventScratchAboveTheLimitIsRefusedNamingTheDimension) {
  auto server = MustStart({"--max_event_bytes=8388608"});
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  auto created = c.CreateSession(Session(1, 2, 2, 1, 16, 4, "rkv", 1 << 20));
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string id = created->session().session_id();
  auto refused = c.Compress(Event(id, 1, 1, 2, 2, 1, 4, 260000));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("inline_tensors.keys"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("N = 260000"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("--max_event_bytes 8388608"));
  // A smaller event on the same session still runs.
  EXPECT_TRUE(c.Compress(Event(id, 2, 1, 2, 2, 1, 4, 600)).ok());
  // The 2.4 MB snapkv request whose logits block (68 GB per head) killed the server: a 1024-query
  // group, window 1024, N 32,768, d 1. Tiled it needs ~17 MB per scoring thread.
  auto wide = c.CreateSession(Session(1, 1024, 2, 1, 1100, 1024, "snapkv", 1 << 20));
  ASSERT_TRUE(wide.ok()) << wide.status();
  auto logits = c.Compress(Event(wide->session().session_id(), 1, 1, 1024, 2, 1, 1024, 32768));
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kResourceExhausted) << logits.status();
  EXPECT_THAT(std::string(logits.status().message()),
              HasSubstr("N = 32768 tokens, query window 1024 × group 512"));
  EXPECT_TRUE(server->Running());
}

// A WatchMetrics reader that stops reading: first an in-process stream never read (the client's
// transport still drains the socket into its flow-control window), then a real process stopped
// with SIGSTOP (nothing reads the socket; the server's writes stay pending in the kernel). SIGTERM
// must end the server by the drain deadline plus at most a second in both cases.
double DrainSecondsWithAStoppedWatcher(bool stop_a_process) {
  auto server = MustStart({"--drain_timeout_seconds=1"});
  if (server == nullptr) return -1;
  Client& c = server->client();
  grpc::ClientContext watch_context;
  v1::WatchMetricsRequest watch;
  auto reader = c.stub().WatchMetrics(&watch_context, watch);  // never read
  pid_t watcher = -1;
  if (stop_a_process) {
    const std::string target = "--target=" + server->target();
    std::vector<char*> argv = {const_cast<char*>(REASONALLOC_CLI_BINARY),
                               const_cast<char*>("watch"), const_cast<char*>("--plain"),
                               const_cast<char*>(target.c_str()), nullptr};
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    EXPECT_EQ(posix_spawn(&watcher, argv[0], &actions, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    for (int i = 0; i < 100; ++i) {  // until its stream is open
      auto info = c.GetServerInfo();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      auto body = testing::HttpGet(info->metrics_address(), "/metrics");
      if (body.ok() && absl::StrContains(*body, "reasonalloc_watchers 2")) break;
    }
    ::kill(watcher, SIGSTOP);
  }
  auto created = c.CreateSession(Session(1, 2, 2, 8, 16, 4));
  EXPECT_TRUE(created.ok()) << created.status();
  const std::string id = created.ok() ? created->session().session_id() : "";
  // Enough events to fill the window many times over (each event is ~100 bytes to the watcher).
  for (int step = 1; step <= 4000; ++step) {
    EXPECT_TRUE(c.Compress(Event(id, step, 1, 2, 2, 8, 4, 24)).ok());
  }
  const auto t0 = std::chrono::steady_clock::now();
  const int code = server->Stop(SIGTERM, absl::Seconds(20));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(code, 0) << server->Log();
  watch_context.TryCancel();
  if (watcher > 0) {
    ::kill(watcher, SIGKILL);
    ::waitpid(watcher, nullptr, 0);
  }
  if (seconds > 2.0) ADD_FAILURE() << server->Log();
  return seconds;
}

TEST(Robustness, StoppedWatcherDoesNotHoldTheDrain) {
  const double unread = DrainSecondsWithAStoppedWatcher(false);
  EXPECT_LE(unread, 2.0) << "drain with an unread watcher stream took " << unread << " s";
  const double stopped = DrainSecondsWithAStoppedWatcher(true);
  EXPECT_LE(stopped, 2.0) << "drain with a SIGSTOPped watcher process took " << stopped << " s";
}

// A calibrating event does the k_rho measurement on the handler thread; it must stop at the drain
// deadline like any other event.
TEST(Robustness, CalibrationEventStopsAtTheDrainDeadline) {
  auto server = MustStart({"--drain_timeout_seconds=1"});
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  // One head, a group of 1024 query heads: ~8.6e9 multiply-adds of measurement in 16 MB of keys.
  constexpr int kN = 1 << 20;
  auto created = c.CreateSession(Session(1, 1024, 1, 8, 16, 1, "snapkv", 1 << 21));
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string id = created->session().session_id();
  {
    grpc::ClientContext ctx;
    c.AttachSessionTokens(&ctx, {id});
    v1::StartCalibrationRequest start;
    start.set_session_id(id);
    start.set_stride(1);
    v1::CalibrationStatus status;
    ASSERT_TRUE(c.stub().StartCalibration(&ctx, start, &status).ok());
  }
  std::thread event([&] { (void)c.Compress(Event(id, 1, 1, 1024, 1, 8, 1, kN)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // the measurement is running
  const auto t0 = std::chrono::steady_clock::now();
  const int code = server->Stop(SIGTERM, absl::Seconds(30));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  event.join();
  EXPECT_EQ(code, 0) << server->Log();
  EXPECT_LE(seconds, 2.0) << "drain during a calibration event took " << seconds << " s\n"
                          << server->Log();
}

// The bytes reserved against --max_arena_bytes are the bytes the arenas occupy in /dev/shm.
TEST(Robustness, PoolAccountingMatchesDevShm) {
  auto server = MustStart({"--max_arena_bytes=8388608"});
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  struct Geometry {
    int layers, hq, hkv, d, budget, window;
    const char* scorer;
    const char* allocator;
    bool advisory;
  };
  const std::vector<Geometry> geometries = {
      {2, 4, 2, 8, 12, 4, "snapkv", "uniform", false},
      {3, 6, 3, 64, 40, 8, "h2o", "uniform", false},
      {1, 8, 1, 128, 100, 8, "rkv", "adakv", false},
      {4, 32, 8, 16, 24, 8, "streaming", "pyramid", false},
      {2, 4, 2, 8, 12, 4, "snapkv", "uniform", true},
      {5, 10, 5, 24, 33, 7, "rkv", "reasonalloc", false},
  };
  std::vector<std::string> ids;
  for (const Geometry& g : geometries) {
    v1::CreateSessionRequest r = Session(g.layers, g.hq, g.hkv, g.d, g.budget, g.window, g.scorer);
    r.mutable_allocator()->set_name(g.allocator);
    r.set_memory(v1::MEMORY_KIND_HOST_SHM);
    r.set_mode(g.advisory ? v1::SESSION_MODE_ADVISORY : v1::SESSION_MODE_MANAGED);
    auto created = c.CreateSession(r);
    ASSERT_TRUE(created.ok()) << g.scorer << ": " << created.status();
    ids.push_back(created->session().session_id());
    auto info = c.GetServerInfo();
    ASSERT_TRUE(info.ok());
    const uint64_t reserved = info->arena_capacity_bytes() - info->arena_free_bytes();
    EXPECT_EQ(ServerShmBytes(server->pid()), reserved)
        << "after a " << g.scorer << " session of " << created->session().reserved_bytes()
        << " bytes";
  }
  // Filled until refused, /dev/shm never holds more than the pool.
  int admitted = 0;
  for (;; ++admitted) {
    v1::CreateSessionRequest r = Session(3, 6, 3, 64, 40, 8, "h2o");
    r.set_memory(v1::MEMORY_KIND_HOST_SHM);
    r.set_mode(v1::SESSION_MODE_MANAGED);
    auto created = c.CreateSession(r);
    if (!created.ok()) {
      EXPECT_EQ(created.status().code(), absl::StatusCode::kResourceExhausted);
      break;
    }
    ASSERT_LT(admitted, 1000);
  }
  EXPECT_GT(admitted, 0);
  EXPECT_LE(ServerShmBytes(server->pid()), 8388608u);
  for (const auto& id : ids) ASSERT_TRUE(c.CloseSession(id).ok());
}

TEST(Robustness, ArenaSessionsMustFitBudgetAndBufferInTheContext) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  v1::CreateSessionRequest r = Session(1, 2, 2, 8, 40, 4, "snapkv", 48, 16);
  r.set_memory(v1::MEMORY_KIND_HOST_SHM);
  auto refused = server->client().CreateSession(r);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("budget.budget + budget.buffer = 40 + 16 exceeds model.max_context = 48"));
  r.set_memory(v1::MEMORY_KIND_INLINE);  // no arena: nothing to fit
  EXPECT_TRUE(server->client().CreateSession(r).ok());
}

int ConnectTcp(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port)) {
    return -1;
  }
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &a.sin_addr);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

int ConnectUnix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// True when the server closed `fd` within `timeout` (a read sees end of file or a reset).
bool ClosedByPeer(int fd, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  char buf[4096];
  while (absl::Now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) > 0) {
      const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) return true;
    }
  }
  return false;
}

TEST(Robustness, IdleMetricsConnectionsDoNotStallScrapes) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  auto info = server->client().GetServerInfo();
  ASSERT_TRUE(info.ok());
  const std::string metrics = info->metrics_address();
  std::vector<int> idle;
  for (int i = 0; i < 4; ++i) {
    const int fd = ConnectTcp(metrics);
    ASSERT_GE(fd, 0);
    idle.push_back(fd);
  }
  for (int scrape = 0; scrape < 3; ++scrape) {
    const auto t0 = std::chrono::steady_clock::now();
    auto body = testing::HttpGet(metrics, "/metrics");
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_TRUE(body.ok()) << body.status();
    EXPECT_THAT(*body, HasSubstr("reasonalloc_build_info"));
    EXPECT_LT(seconds, 1.0) << "scrape " << scrape << " with 4 idle connections open";
  }
  // The idle ones are closed by the endpoint's request timeout.
  for (int fd : idle) {
    EXPECT_TRUE(ClosedByPeer(fd, absl::Seconds(5)));
    ::close(fd);
  }
}

TEST(Robustness, IdleAndExcessUnixConnectionsAreClosed) {
  auto server = MustStart({"--max_connections_per_uid=4", "--max_connection_idle_seconds=1"});
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(server->client().GetServerInfo().ok());  // the test's own connection: 1 of 4
  std::vector<int> held;
  for (int i = 0; i < 3; ++i) {
    const int fd = ConnectUnix(server->socket_path());
    ASSERT_GE(fd, 0);
    held.push_back(fd);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const int excess = ConnectUnix(server->socket_path());
  ASSERT_GE(excess, 0);
  EXPECT_TRUE(ClosedByPeer(excess, absl::Seconds(2))) << "the fifth connection of one uid";
  ::close(excess);
  // Connections with no call in flight are closed after --max_connection_idle_seconds.
  for (int fd : held) {
    EXPECT_TRUE(ClosedByPeer(fd, absl::Seconds(10)));
    ::close(fd);
  }
  // Their slots are free again: a new client gets in (the old channel reconnects too).
  auto fresh = Client::Connect(Client::Options{.target = server->target()});
  ASSERT_TRUE(fresh.ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  absl::Status last;
  while (absl::Now() < deadline && !(last = (*fresh)->GetServerInfo().status()).ok()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(last.ok()) << last;
}

TEST(Robustness, TcpListenMustBeHostPort) {
  for (const std::string bad :
       {"unix:///tmp/not-a-tcp-listener.sock", "unix-abstract:ra-test", "127.0.0.1"}) {
    testing::ServerProcess::Options o;
    o.args = {"--tcp_listen=" + bad};
    o.wait_ready = false;
    auto server = ServerProcess::Start(o);
    ASSERT_TRUE(server.ok()) << server.status();
    auto code = (*server)->WaitExit(absl::Seconds(20));
    ASSERT_TRUE(code.ok()) << code.status();
    EXPECT_NE(*code, 0) << bad;
    EXPECT_THAT((*server)->Log(), HasSubstr("tcp_listen \"" + bad + "\" is not host:port"));
  }
}

// The fp32 copy of a shared-memory session's live keys is bounded like the rest of an event,
// from "len" before it is allocated.
TEST(Robustness, ArenaKeyCopyIsBoundedByTheEventLimit) {
  auto server = MustStart({"--max_event_bytes=1048576"});
  ASSERT_NE(server, nullptr);
  v1::CreateSessionRequest r = Session(2, 4, 2, 64, 1000, 8, "snapkv", 4096, 128);
  r.set_memory(v1::MEMORY_KIND_HOST_SHM);
  r.set_mode(v1::SESSION_MODE_MANAGED);
  auto created = server->client().CreateSession(r);
  ASSERT_TRUE(created.ok()) << created.status();
  const v1::SessionInfo& info = created->session();
  const v1::ArenaDescriptor* result = nullptr;
  for (const auto& a : info.arenas()) result = a.kind() == "result" ? &a : result;
  ASSERT_NE(result, nullptr);
  auto mapped = MappedArena::Map(*result);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  int32_t* len = (*mapped)->As<int32_t>("len");
  for (int i = 0; i < 4; ++i) len[i] = 1100;  // 4 heads × 1100 rows × 64 × 4 bytes = 1.1 MB
  v1::CompressRequest event;
  event.set_session_id(info.session_id());
  event.set_step(1);
  auto refused = server->client().Compress(event);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("result arena \"len\""));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("--max_event_bytes 1048576"));
  EXPECT_TRUE(server->Running());
}

absl::Status PutProfile(Client& c, v1::LayerProfile p, bool overwrite = false) {
  grpc::ClientContext ctx;
  v1::PutProfileRequest r;
  *r.mutable_profile() = std::move(p);
  r.set_overwrite(overwrite);
  v1::PutProfileResponse out;
  const grpc::Status s = c.stub().PutProfile(&ctx, r, &out);
  return s.ok() ? absl::OkStatus()
                : absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

v1::LayerProfile Profile(const std::string& name, std::vector<double> demand) {
  v1::LayerProfile p;
  p.set_name(name);
  p.mutable_model()->set_num_layers(static_cast<int>(demand.size()));
  p.mutable_model()->set_num_q_heads(2);
  p.mutable_model()->set_num_kv_heads(2);
  p.mutable_model()->set_head_dim(8);
  p.set_rho(0.9);
  p.mutable_demand()->Assign(demand.begin(), demand.end());
  return p;
}

TEST(Robustness, ProfilesAreBoundedAndTheirNumbersStayFinite) {
  auto server = MustStart({"--max_profiles=3"});
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  // Extreme but finite demands normalise to a finite wave (mean 1) instead of inf or 0.
  ASSERT_TRUE(PutProfile(c, Profile("tiny", {5e-324, 5e-324})).ok());
  ASSERT_TRUE(PutProfile(c, Profile("huge", {1e308, 1e308})).ok());
  v1::ListProfilesResponse all;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(c.stub().ListProfiles(&ctx, v1::ListProfilesRequest(), &all).ok());
  }
  ASSERT_EQ(all.profiles_size(), 2);
  for (const auto& p : all.profiles()) {
    ASSERT_EQ(p.demand_size(), 2);
    EXPECT_EQ(p.demand(0), 1.0) << p.name();
    EXPECT_EQ(p.demand(1), 1.0) << p.name();
    EXPECT_EQ(p.owner(), "server") << p.name();  // put by the server's own uid
  }
  ASSERT_TRUE(PutProfile(c, Profile("third", {1, 2})).ok());
  const absl::Status full = PutProfile(c, Profile("fourth", {1, 2}));
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.message()), HasSubstr("--max_profiles"));
  EXPECT_TRUE(PutProfile(c, Profile("third", {2, 1}), /*overwrite=*/true).ok());
  v1::LayerProfile long_provenance = Profile("fifth", {1, 1});
  long_provenance.set_provenance(std::string(5000, 'x'));
  EXPECT_EQ(PutProfile(c, long_provenance, true).code(), absl::StatusCode::kInvalidArgument);

  // An over-long profile name in a session is a bad argument, not a missing profile.
  v1::CreateSessionRequest r = Session(2, 2, 2, 8, 16, 4);
  r.mutable_allocator()->set_name("reasonalloc");
  r.mutable_allocator()->set_profile(std::string(200, 'p'));
  auto bad = c.CreateSession(r);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("allocator.profile"));
}

// A session copies its profile's wave when it is created: replacing the profile later changes
// new sessions only.
TEST(Robustness, SessionsKeepTheProfileTheyWereCreatedWith) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  ASSERT_TRUE(PutProfile(c, Profile("wave", {1, 3})).ok());
  v1::CreateSessionRequest r = Session(2, 2, 2, 8, 64, 4);
  r.mutable_allocator()->set_name("reasonalloc");
  r.mutable_allocator()->set_reasonalloc_mode(v1::AllocatorConfig::REASONALLOC_MODE_LAYER);
  r.mutable_allocator()->set_profile("wave");
  auto first = c.CreateSession(r);
  ASSERT_TRUE(first.ok()) << first.status();
  const auto before = first->session().layer_budgets();
  ASSERT_EQ(before.size(), 2);
  EXPECT_LT(before[0], before[1]);  // the wave gives layer 1 more
  ASSERT_TRUE(PutProfile(c, Profile("wave", {3, 1}), /*overwrite=*/true).ok());
  auto again = c.GetSession(first->session().session_id());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->layer_budgets(0), before[0]);
  EXPECT_EQ(again->layer_budgets(1), before[1]);
  auto second = c.CreateSession(r);
  ASSERT_TRUE(second.ok());
  EXPECT_GT(second->session().layer_budgets(0), second->session().layer_budgets(1));
}

// The static mode splits each layer among its heads by the profile's head demand; a profile
// without one, or no profile, is refused naming what is missing.
TEST(Robustness, StaticHeadSplitFollowsTheProfilesHeadDemand) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  ASSERT_TRUE(PutProfile(c, Profile("layers-only", {1, 1})).ok());
  v1::LayerProfile heads = Profile("heads", {1, 1});
  for (double d : {3.0, 1.0, 1.0, 3.0}) heads.add_head_demand(d);
  ASSERT_TRUE(PutProfile(c, heads).ok());
  v1::LayerProfile bad_heads = Profile("bad-heads", {1, 1});
  for (double d : {3.0, 1.0, 1.0}) bad_heads.add_head_demand(d);
  const absl::Status refused_put = PutProfile(c, bad_heads);
  EXPECT_EQ(refused_put.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused_put.message()), HasSubstr("profile.head_demand has 3 entries"));

  v1::CreateSessionRequest r = Session(2, 2, 2, 8, 20, 4);
  r.mutable_allocator()->set_name("reasonalloc");
  r.mutable_allocator()->set_reasonalloc_mode(v1::AllocatorConfig::REASONALLOC_MODE_STATIC);
  auto no_profile = c.CreateSession(r);  // no profile is named after model "robustness"
  EXPECT_EQ(no_profile.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(no_profile.status().message()),
              HasSubstr("allocator.reasonalloc_mode static needs a layer profile"));
  r.mutable_allocator()->set_profile("layers-only");
  auto no_heads = c.CreateSession(r);
  EXPECT_EQ(no_heads.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(no_heads.status().message()), HasSubstr("head_demand"));
  EXPECT_THAT(std::string(no_heads.status().message()), HasSubstr("\"layers-only\""));

  r.mutable_allocator()->set_profile("heads");
  auto session = c.CreateSession(r);
  ASSERT_TRUE(session.ok()) << session.status();
  const std::string id = session->session().session_id();
  auto done = c.Compress(Event(id, 1, 2, 2, 2, 8, 4, 100));
  ASSERT_TRUE(done.ok()) << done.status();
  auto st = c.GetSession(id);
  ASSERT_TRUE(st.ok());
  // Each layer's 2 · 16 selectable tokens split by √3 : 1 (β 0.5): 20 and 12, window 4 added.
  EXPECT_THAT(st->budgets(), ::testing::ElementsAre(24, 16, 16, 24));
  // A new budget keeps the split: 2 · 26 selectable tokens, 32.97 and 19.03 to 33 and 19.
  ASSERT_TRUE(c.UpdateBudget(id, 30).ok());
  ASSERT_TRUE(c.Compress(Event(id, 2, 2, 2, 2, 8, 4, 100)).ok());
  st = c.GetSession(id);
  ASSERT_TRUE(st.ok());
  EXPECT_THAT(st->budgets(), ::testing::ElementsAre(37, 23, 23, 37));
}

TEST(Robustness, RefusedFinishCalibrationKeepsTheMeasurement) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  auto created = c.CreateSession(Session(2, 2, 2, 8, 16, 4));
  ASSERT_TRUE(created.ok());
  const std::string id = created->session().session_id();
  auto call = [&](auto method, const auto& request, auto* response) {
    grpc::ClientContext ctx;
    c.AttachSessionTokens(&ctx, {id});
    return (c.stub().*method)(&ctx, request, response);
  };
  v1::StartCalibrationRequest start;
  start.set_session_id(id);
  start.set_stride(1);
  v1::CalibrationStatus status;
  ASSERT_TRUE(call(&v1::KvSidecar::Stub::StartCalibration, start, &status).ok());
  ASSERT_TRUE(c.Compress(Event(id, 1, 2, 2, 2, 8, 4, 40)).ok());
  v1::FinishCalibrationRequest finish;
  finish.set_session_id(id);
  finish.set_profile_name("../escape");
  v1::LayerProfile profile;
  const grpc::Status refused = call(&v1::KvSidecar::Stub::FinishCalibration, finish, &profile);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(refused.error_message(), HasSubstr("profile_name"));
  finish.set_profile_name("retried");
  const grpc::Status retried = call(&v1::KvSidecar::Stub::FinishCalibration, finish, &profile);
  ASSERT_TRUE(retried.ok()) << retried.error_message();
  EXPECT_EQ(profile.name(), "retried");
  EXPECT_EQ(profile.samples_size(), 2);
  EXPECT_EQ(profile.samples(0), 2);  // the event before the refusal still counts
}

}  // namespace
}  // namespace reasonalloc
