// reasonalloc-server: the KV-cache sidecar process.
//
// Every flag can also come from the environment as REASONALLOC_<FLAG IN UPPER CASE> (e.g.
// REASONALLOC_LISTEN); a flag on the command line wins over the environment.
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/build_info.h"
#include "core/cli_args.h"
#include "core/cli_help.h"
#include "core/sync.h"
#include "server/server.h"
#include "spdlog/cfg/env.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

// Every default below is the default-constructed ServerOptions' (server/server.h).
namespace {
const reasonalloc::ServerOptions& Defaults() {
  static const auto* defaults = new reasonalloc::ServerOptions();
  return *defaults;
}
}  // namespace

ABSL_FLAG(std::string, listen, Defaults().listen, "Unix socket to serve on: unix:///path");
ABSL_FLAG(std::string, socket_mode, absl::StrFormat("%04o", Defaults().socket_mode),
          "Permission bits of the socket file (octal)");
ABSL_FLAG(std::string, allow_uid, "",
          "Comma-separated uids whose Unix-socket connections may call KvSidecar methods, besides "
          "the server's own uid (empty = any peer that can open the socket)");
ABSL_FLAG(std::string, tcp_listen, Defaults().tcp_listen,
          "Optional TCP address host:port (port 0 = any free port)");
ABSL_FLAG(std::string, metrics_address, Defaults().metrics_address,
          "Prometheus endpoint host:port (port 0 = any free port; empty = off)");
ABSL_FLAG(std::string, device, Defaults().device, "Compute backend: cpu | cuda:N");
ABSL_FLAG(uint64_t, max_arena_bytes, Defaults().sessions.capacity_bytes,
          "Arena pool: total bytes all sessions may reserve");
ABSL_FLAG(int32_t, max_sessions, Defaults().sessions.max_sessions, "Most live sessions");
ABSL_FLAG(int32_t, max_threads, Defaults().max_threads, "Most threads serving calls at once");
ABSL_FLAG(int32_t, max_watchers, Defaults().max_watchers,
          "Most WatchMetrics streams at once (each holds a serving thread; below max_threads)");
ABSL_FLAG(int32_t, watch_queue, Defaults().watch_queue,
          "Events buffered per WatchMetrics stream; a slower watcher loses the excess (counted)");
ABSL_FLAG(std::string, profile_dir, Defaults().profile_dir, "Directory of layer profiles (JSON)");
ABSL_FLAG(uint64_t, max_message_bytes, Defaults().max_message_bytes,
          "Largest gRPC message received or sent, bytes");
ABSL_FLAG(double, default_lease_seconds, absl::ToDoubleSeconds(Defaults().sessions.default_lease),
          "Lease of a session that asks for none");
ABSL_FLAG(double, max_lease_seconds, absl::ToDoubleSeconds(Defaults().sessions.max_lease),
          "Longest lease a session may ask for");
ABSL_FLAG(double, drain_timeout_seconds, absl::ToDoubleSeconds(Defaults().drain_timeout),
          "On SIGTERM/SIGINT: how long in-flight calls may finish before they are cancelled");
ABSL_FLAG(std::string, log_level, "",
          "trace|debug|info|warn|error|critical|off (default: SPDLOG_LEVEL, else info)");
ABSL_FLAG(uint64_t, max_event_bytes, Defaults().max_event_bytes,
          "Most scratch bytes one compression event may allocate (scores, logits and similarity "
          "tiles, selection); a bigger event is RESOURCE_EXHAUSTED naming the dimension. 0 = an "
          "eighth of physical memory or of the cgroup's memory limit, whichever is smaller, at "
          "least 256 MiB");
ABSL_FLAG(int32_t, max_profiles, Defaults().max_profiles,
          "Most layer profiles held (loaded and put)");
ABSL_FLAG(int32_t, max_connections_per_uid, Defaults().max_connections_per_uid,
          "Unix-socket connections one uid may hold open at once; more are closed at accept");
ABSL_FLAG(double, max_connection_idle_seconds,
          absl::ToDoubleSeconds(Defaults().max_connection_idle),
          "Close a connection (Unix socket or TCP) that has had no call in flight for this long");
ABSL_FLAG(double, testing_compress_delay_ms, 0,
          "For tests only: sleep this long inside every Compress");

namespace {

// Applies REASONALLOC_<NAME> environment variables to flags before the command line is parsed.
bool ApplyEnvironment(const std::vector<std::string>& names) {
  bool ok = true;
  for (const std::string& name : names) {
    const std::string env = absl::StrCat("REASONALLOC_", absl::AsciiStrToUpper(name));
    const char* value = std::getenv(env.c_str());
    if (value == nullptr) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string error;
    if (flag == nullptr || !flag->ParseFrom(value, &error)) {
      std::cerr << "reasonalloc-server: environment " << env << "=\"" << value
                << "\" is invalid: " << error << "\n";
      ok = false;
    }
  }
  return ok;
}

int g_signal_pipe[2] = {-1, -1};

void OnDrainSignal(int sig) {
  const unsigned char byte = static_cast<unsigned char>(sig);
  (void)!write(g_signal_pipe[1], &byte, 1);  // async-signal-safe
}

}  // namespace

int main(int argc, char** argv) {
  const reasonalloc::ProgramHelp help{
      .program = "reasonalloc-server",
      .summary =
          "the ReasonAlloc KV-cache sidecar. Serves the reasonalloc.v1.KvSidecar gRPC API "
          "(with grpc.health.v1 and reflection) on a Unix socket, and optionally on TCP; "
          "exports Prometheus metrics on --metrics_address.",
      .synopses = {"reasonalloc-server [--listen unix:///PATH] [--tcp_listen HOST:PORT] "
                   "[--device cpu|cuda:N] [--profile_dir DIR] [flags]",
                   "reasonalloc-server --version"},
      .commands = {},
      .sources = {"server/main.cc"},
      .footer =
          "Every flag may also be set as REASONALLOC_<FLAG> in the environment "
          "(REASONALLOC_MAX_ARENA_BYTES=...); the command line wins.\nSIGTERM or SIGINT "
          "drains: new calls are refused, calls in flight get --drain_timeout_seconds, "
          "then the sessions' arenas are released and the process exits 0.\nExit "
          "status: 0 after a drain; 1 when serving fails or a flag is unknown or malformed on the "
          "command line; 2 for a bad value in the environment or a stray argument."};
  if (const int rc = reasonalloc::MaybePrintHelp(argc, argv, help, std::cout, std::cerr); rc >= 0) {
    return rc;
  }
  // SIGTERM/SIGINT go through a handler and a self-pipe: a thread a library started before main
  // keeps them unblocked (the mask below covers only threads started after it), and the handler
  // works whichever thread receives them.
  if (pipe2(g_signal_pipe, O_CLOEXEC) != 0) {
    std::cerr << "reasonalloc-server: pipe2 failed\n";
    return 1;
  }
  struct sigaction action {};
  action.sa_handler = OnDrainSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // The threads started from here on (gRPC's, the thread pool's) inherit a mask without SIGTERM
  // and SIGINT; only the signal thread below unblocks them. The handler then runs on a thread of
  // this program or of a library started before main, never on a gRPC thread asleep in a raw
  // futex (ThreadSanitizer defers a signal delivered there until that thread wakes, which may be
  // never).
  sigset_t drain_signals;
  sigemptyset(&drain_signals);
  sigaddset(&drain_signals, SIGTERM);
  sigaddset(&drain_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &drain_signals, nullptr);
  // Blocks of 1 MiB and more are mapped and unmapped on their own, so that the scratch of a large
  // event goes back to the kernel when it is freed (glibc's adaptive threshold would otherwise
  // keep it in a heap the process never shrinks).
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  // Every connection is a descriptor: take the hard limit, not the shell's soft default.
  if (rlimit nofile{};
      getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
  }

  if (!ApplyEnvironment({"listen",
                         "socket_mode",
                         "allow_uid",
                         "tcp_listen",
                         "metrics_address",
                         "device",
                         "max_arena_bytes",
                         "max_sessions",
                         "max_threads",
                         "max_watchers",
                         "watch_queue",
                         "profile_dir",
                         "max_message_bytes",
                         "default_lease_seconds",
                         "max_lease_seconds",
                         "drain_timeout_seconds",
                         "log_level",
                         "max_event_bytes",
                         "max_profiles",
                         "max_connections_per_uid",
                         "max_connection_idle_seconds"})) {
    return 2;
  }
  // Debian's Abseil checks every absl::Mutex acquisition (gRPC's own; the project's locks are
  // reasonalloc::Mutex, checked by TSan's lock-order detector) against a lock graph: the
  // production binary does not pay for it on each call.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  const auto spelled = reasonalloc::NormalizeFlagSpelling(argc, argv);
  if (const std::vector<char*> rest = absl::ParseCommandLine(argc, argv); rest.size() > 1) {
    std::cerr << "reasonalloc-server: unexpected argument \"" << rest[1]
              << "\": the server takes flags only (reasonalloc-server --help)\n";
    return 2;
  }

  auto logger = spdlog::stderr_color_mt("reasonalloc");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%L%$ %v");
  spdlog::cfg::load_env_levels();
  if (const std::string level = absl::GetFlag(FLAGS_log_level); !level.empty()) {
    const auto parsed = spdlog::level::from_str(level);
    if (parsed == spdlog::level::off && level != "off") {
      std::cerr << "reasonalloc-server: --log_level \"" << level << "\" is not a level\n";
      return 2;
    }
    spdlog::set_level(parsed);
  }

  reasonalloc::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  unsigned mode = 0;
  const std::string mode_text = absl::GetFlag(FLAGS_socket_mode);
  if (!absl::numbers_internal::safe_strtou32_base(mode_text, &mode, 8) || mode > 0777) {
    std::cerr << "reasonalloc-server: --socket_mode \"" << mode_text << "\" is not octal 0-0777\n";
    return 2;
  }
  options.socket_mode = mode;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_allow_uid), ',', absl::SkipWhitespace())) {
    uint32_t uid = 0;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &uid)) {
      std::cerr << "reasonalloc-server: --allow_uid \"" << absl::GetFlag(FLAGS_allow_uid)
                << "\": \"" << part << "\" is not a uid\n";
      return 2;
    }
    options.allow_uids.push_back(uid);
  }
  options.tcp_listen = absl::GetFlag(FLAGS_tcp_listen);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  options.device = absl::GetFlag(FLAGS_device);
  options.sessions.capacity_bytes = absl::GetFlag(FLAGS_max_arena_bytes);
  options.sessions.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  options.max_threads = absl::GetFlag(FLAGS_max_threads);
  options.max_watchers = absl::GetFlag(FLAGS_max_watchers);
  options.watch_queue = absl::GetFlag(FLAGS_watch_queue);
  options.profile_dir = absl::GetFlag(FLAGS_profile_dir);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  for (auto [flag, value, out] :
       {std::tuple{"default_lease_seconds", absl::GetFlag(FLAGS_default_lease_seconds),
                   &options.sessions.default_lease},
        std::tuple{"max_lease_seconds", absl::GetFlag(FLAGS_max_lease_seconds),
                   &options.sessions.max_lease},
        std::tuple{"drain_timeout_seconds", absl::GetFlag(FLAGS_drain_timeout_seconds),
                   &options.drain_timeout},
        std::tuple{"max_connection_idle_seconds", absl::GetFlag(FLAGS_max_connection_idle_seconds),
                   &options.max_connection_idle}}) {
    if (!(value > 0) || value > 1e7) {
      std::cerr << "reasonalloc-server: --" << flag << " = " << value << " must be in (0, 1e7]\n";
      return 2;
    }
    *out = absl::Seconds(value);
  }
  options.max_event_bytes = absl::GetFlag(FLAGS_max_event_bytes);
  options.max_profiles = absl::GetFlag(FLAGS_max_profiles);
  options.max_connections_per_uid = absl::GetFlag(FLAGS_max_connections_per_uid);
  options.testing_compress_delay =
      absl::Milliseconds(absl::GetFlag(FLAGS_testing_compress_delay_ms));

  spdlog::info("reasonalloc-server {} ({} {})", reasonalloc::kVersion, reasonalloc::kGitRevision,
               reasonalloc::kBuildType);
  auto server = reasonalloc::Server::Create(options);
  if (!server.ok()) {
    spdlog::critical("cannot start: {}", server.status().ToString());
    return 1;
  }
  // First SIGTERM/SIGINT drains; a second one while draining exits at once (status 1).
  std::atomic<bool> exiting{false};
  std::thread drainer;
  std::thread signal_thread([&, s = server->get()] {
    pthread_sigmask(SIG_UNBLOCK, &drain_signals, nullptr);
    for (int received = 0;; ++received) {
      unsigned char sig = 0;
      // Polls with a timeout instead of blocking in read: under ThreadSanitizer a signal that
      // arrives while this thread sits in read() is handled only when read returns.
      pollfd pending{g_signal_pipe[0], POLLIN, 0};
      while (poll(&pending, 1, 250) <= 0 && !exiting.load()) {
      }
      if (exiting.load() || read(g_signal_pipe[0], &sig, 1) != 1 || sig == 0) return;
      const char* name = sig == SIGTERM ? "SIGTERM" : "SIGINT";
      if (received > 0) {
        spdlog::warn("received {} while draining: exiting without waiting", name);
        spdlog::default_logger()->flush();
        _exit(1);
      }
      spdlog::info("received {}", name);
      drainer = std::thread([s, &drain_signals] {
        // The drain's own threads (and gRPC's during Shutdown) inherit this mask, so a second
        // signal reaches the signal thread, never a thread asleep in gRPC.
        pthread_sigmask(SIG_BLOCK, &drain_signals, nullptr);
        s->Drain();
      });
    }
  });
  (*server)->Start();
  (*server)->Wait();
  exiting.store(true);
  const unsigned char wake = 0;
  (void)!write(g_signal_pipe[1], &wake, 1);
  signal_thread.join();
  if (drainer.joinable()) drainer.join();
  if ((*server)->forced()) {
    (*server)->ReleaseSessions();
    spdlog::info("exit (connections cut at the drain deadline; gRPC teardown skipped)");
    spdlog::default_logger()->flush();
    _exit(0);
  }
  server->reset();
  spdlog::info("exit");
  return 0;
}
