#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/server_builder.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "core/sync.h"
#include "gpu/device_probe.h"
#include "server/host_arena.h"
#include "server/peer.h"
#include "spdlog/spdlog.h"

namespace reasonalloc {
namespace {

// True when something accepts connections on the socket at `path`.
bool SocketInUse(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const bool in_use = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return in_use;
}

std::string CpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "model name")) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) {
        return std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
      }
    }
  }
  return "host CPU";
}

}  // namespace

uint64_t DefaultMaxEventBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  uint64_t memory =
      pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
  // In a container the cgroup's limit, not the host's memory, is what the process may use.
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream in(path);
    std::string text;
    uint64_t limit = 0;
    if (in >> text && absl::SimpleAtoi(text, &limit) && limit > 0) {
      memory = memory == 0 ? limit : std::min(memory, limit);
    }
  }
  return std::max<uint64_t>(memory / 8, uint64_t{256} << 20);
}

absl::StatusOr<std::string> UnixSocketPath(const std::string& target, absl::string_view field) {
  std::string path;
  if (absl::StartsWith(target, "unix://")) {
    path = target.substr(7);
  } else if (absl::StartsWith(target, "unix:")) {
    path = target.substr(5);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " \"", target, "\" is not a unix: address (unix:///path/to/socket)"));
  }
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " has an empty path"));
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat(field, " path \"", path, "\" is longer than ",
                                                   sizeof(sockaddr_un::sun_path) - 1, " bytes"));
  }
  return path;
}

Server::Server(const ServerOptions& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  std::unique_ptr<Server> server(new Server(options));
  Server& s = *server;

  Sidecar::Options ao;         // the application layer's
  SidecarService::Options so;  // the gRPC adapter's
  so.max_message_bytes = options.max_message_bytes;
  ao.max_watchers = options.max_watchers;
  ao.watch_queue = static_cast<size_t>(std::max(1, options.watch_queue));
  ao.testing_compress_delay = options.testing_compress_delay;
  ao.max_event_bytes =
      options.max_event_bytes == 0 ? DefaultMaxEventBytes() : options.max_event_bytes;
  if (options.device == "cpu") {
    ao.backend = "cpu";
    so.device_name = CpuModelName();
  } else if (absl::StartsWith(options.device, "cuda:")) {
    int index = -1;
    if (!absl::SimpleAtoi(options.device.substr(5), &index) || index < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("device \"", options.device, "\" is not cpu or cuda:N"));
    }
    const gpu::ProbeResult probe = gpu::ProbeDevices();
    if (index >= static_cast<int>(probe.devices.size())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "device \"", options.device, "\": ", probe.devices.size(), " CUDA device(s) visible",
          probe.reason.empty() ? "" : absl::StrCat(" (", probe.reason, ")")));
    }
    const gpu::DeviceInfo& dev = probe.devices[static_cast<size_t>(index)];
    if (dev.compute_major < 8) {
      return absl::FailedPreconditionError(
          absl::StrCat("device \"", options.device, "\" (", dev.name, ") has compute capability ",
                       dev.compute_major, ".", dev.compute_minor,
                       "; the CUDA backend is built for 8.0 and 9.0"));
    }
    ao.backend = "cuda";
    so.device_name = dev.name;
    so.device_uuid = dev.uuid;
    so.driver_version = gpu::FormatDriverVersion(probe.driver_version);
    ao.cuda_device = index;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("device \"", options.device, "\" is not cpu or cuda:N"));
  }
  if (options.max_profiles < 1 || options.max_profiles > 1000000) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_profiles = ", options.max_profiles, " is out of range [1, 1000000]"));
  }
  if (options.max_connections_per_uid < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_connections_per_uid = ", options.max_connections_per_uid, " must be at least 1"));
  }
  if (options.max_connection_idle < absl::Milliseconds(100)) {
    return absl::InvalidArgumentError("max_connection_idle_seconds must be at least 0.1");
  }
  // host:port, [v6]:port or dns:/ipv4:/ipv6: forms only: anything naming a Unix socket (unix:,
  // unix-abstract:) would be served without the peer credentials --listen checks.
  const std::string& tcp = options.tcp_listen;
  const size_t last_colon = tcp.rfind(':');
  const bool port_ok = last_colon != std::string::npos && last_colon + 1 < tcp.size() &&
                       tcp.find_first_not_of("0123456789", last_colon + 1) == std::string::npos;
  if (!tcp.empty() && (absl::StartsWith(tcp, "unix") || !port_ok)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tcp_listen \"", options.tcp_listen,
        "\" is not host:port; Unix sockets are served by --listen (whose peers' credentials the "
        "server checks)"));
  }
  ProfileStore::Limits limits;
  limits.max_profiles = options.max_profiles;
  auto profiles = ProfileStore::Open(options.profile_dir, limits);
  if (!profiles.ok()) return profiles.status();
  s.profiles_ = *std::move(profiles);
  if (!options.profile_dir.empty()) {
    spdlog::info("{} layer profile(s) loaded from {}", s.profiles_->List().size(),
                 options.profile_dir);
  }
  if (options.max_message_bytes < 1024 || options.max_message_bytes > 0x7fffffffu) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes = ", options.max_message_bytes, " is out of range [1024, 2147483647]"));
  }
  if (options.max_threads < 2 || options.max_threads > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_threads = ", options.max_threads, " is out of range [2, 4096]"));
  }
  if (options.max_watchers < 0 || options.max_watchers > options.max_threads / 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_watchers = ", options.max_watchers,
                     " is out of range [0, max_threads / 2 = ", options.max_threads / 2, "]"));
  }
  if (options.watch_queue < 1 || options.watch_queue > 1000000) {
    return absl::InvalidArgumentError(
        absl::StrCat("watch_queue = ", options.watch_queue, " is out of range [1, 1000000]"));
  }
  if (options.sessions.max_sessions < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_sessions = ", options.sessions.max_sessions, " must be at least 1"));
  }
  if (options.socket_mode > 0777) {
    return absl::InvalidArgumentError(absl::StrCat(
        "socket_mode = 0", absl::StrFormat("%o", options.socket_mode), " has bits outside 0777"));
  }

  if (const int stale = HostArena::RemoveStale(); stale > 0) {
    spdlog::warn("removed {} shared-memory arena(s) left by a server that is no longer running",
                 stale);
  }
  s.metrics_ = std::make_unique<Metrics>(ao.backend, so.device_name, so.driver_version);
  s.registry_ =
      std::make_unique<SessionRegistry>(options.sessions, [&s](Session& session, const char* why) {
        // Sessions exist only once the service does; the registry is destroyed before it.
        if (s.app_) s.app_->OnSessionReleased(session, why);
      });
  s.peers_ = std::make_unique<PeerTable>();
  so.peers = s.peers_.get();
  ao.allow_uids = options.allow_uids;
  s.app_ = std::make_unique<Sidecar>(ao, s.registry_.get(), s.metrics_.get(), s.profiles_.get());
  s.service_ = std::make_unique<SidecarService>(so, s.app_.get(), s.metrics_.get());
  s.health_ = std::make_unique<HealthService>(
      std::initializer_list<std::string>{"", "reasonalloc.v1.KvSidecar"});

  if (!options.metrics_address.empty()) {
    auto bound = s.metrics_->Serve(options.metrics_address);
    if (!bound.ok()) return bound.status();
    s.metrics_address_ = *bound;
    spdlog::info("metrics on http://{}/metrics", s.metrics_address_);
  }

  auto path = UnixSocketPath(options.listen, "listen");
  if (!path.ok()) return path.status();
  s.socket_path_ = *path;
  if (SocketInUse(s.socket_path_)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "listen \"", options.listen, "\": another server is accepting connections on it"));
  }
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(s.socket_path_).parent_path(), ec);
  struct stat existing {};
  if (::lstat(s.socket_path_.c_str(), &existing) == 0) {
    if (!S_ISSOCK(existing.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat("listen \"", options.listen,
                       "\": the path exists and is not a socket; not replacing it"));
    }
    ::unlink(s.socket_path_.c_str());  // a stale socket file of a dead server
  }

  // The Unix socket is accepted by the server itself so that every connection's peer
  // credentials are known (server/peer.h); the socket never exists with looser bits than asked.
  auto listener = UnixListener::Bind(s.socket_path_, options.socket_mode);
  if (!listener.ok()) return listener.status();
  s.unix_listener_ = *std::move(listener);

  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // Bounds the threads serving calls, and with them the memory of concurrent inline requests.
  grpc::ResourceQuota quota("reasonalloc");
  quota.SetMaxThreads(options.max_threads);
  builder.SetResourceQuota(quota);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  // Connections with no call in flight are closed after this long (Unix socket and TCP alike), so
  // idle connections cannot pile up until the process runs out of descriptors.
  // The serving threads wait on their completion queues at most this long before they notice a
  // shutdown (gRPC's default is 10 s, which a drain would add to its deadline).
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::CQ_TIMEOUT_MSEC, 200);
  // Peers that stop answering (a stopped or vanished process) are found by keepalive pings and
  // their connections closed, TCP included, whose descriptors the server does not hold itself.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 60 * 1000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20 * 1000);
  builder.AddChannelArgument(
      GRPC_ARG_MAX_CONNECTION_IDLE_MS,
      static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(options.max_connection_idle),
                                         int64_t{1} << 30)));
  int tcp_port = 0;
  if (!options.tcp_listen.empty()) {
    builder.AddListeningPort(options.tcp_listen, grpc::InsecureServerCredentials(), &tcp_port);
  }
  builder.RegisterService(s.service_.get());
  builder.RegisterService(s.health_.get());
  s.server_ = builder.BuildAndStart();
  if (s.server_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("could not listen on \"", options.tcp_listen, "\""));
  }
  UnixListener::Admission admission;
  admission.allow_uids = options.allow_uids;
  admission.max_per_uid = options.max_connections_per_uid;
  s.unix_listener_->Start(s.server_.get(), s.peers_.get(), admission);
  s.listen_addresses_.push_back(absl::StrCat("unix://", s.socket_path_));
  if (!options.tcp_listen.empty()) {
    if (tcp_port == 0) {
      return absl::UnavailableError(
          absl::StrCat("tcp_listen \"", options.tcp_listen, "\" could not be bound"));
    }
    const std::string host = options.tcp_listen.substr(0, options.tcp_listen.rfind(':'));
    s.listen_addresses_.push_back(absl::StrCat(host, ":", tcp_port));
  }
  s.service_->SetAddresses(s.listen_addresses_, s.metrics_address_);
  for (const auto& a : s.listen_addresses_) spdlog::info("listening on {}", a);
  return server;
}

Server::~Server() {
  // A server whose Create failed half-way never started listening: nothing to drain, and the socket
  // path may belong to another server.
  if (server_ != nullptr) {
    Drain();
    Wait();
  }
  // The registry's reaper calls into the service: stop it while the service still exists.
  registry_.reset();
}

void Server::Start() {
  health_->SetAll(grpc::health::v1::HealthCheckResponse::SERVING);
  spdlog::info("serving (backend {}, arena pool {} bytes)", options_.device,
               options_.sessions.capacity_bytes);
}

void Server::Drain() {
  {
    MutexLock lock(&drain_mu_);
    if (drained_) return;
    drained_ = true;
  }
  spdlog::info("draining: refusing new calls, waiting up to {} for in-flight calls",
               absl::FormatDuration(options_.drain_timeout));
  app_->SetDraining();
  health_->Shutdown();
  unix_listener_->Stop();
  // The metrics endpoint stops while calls drain.
  std::thread stop_metrics([this] { metrics_->StopServing(); });
  const absl::Time deadline = absl::Now() + options_.drain_timeout;
  Notification shut_down;
  std::thread shutdown([&] {
    server_->Shutdown(absl::ToChronoTime(deadline));
    shut_down.Notify();
  });
  // gRPC cancels the calls still running at the deadline, but a connection whose peer stopped
  // reading (a SIGSTOPped watcher) keeps its pending writes, and with them the shutdown, forever:
  // shortly after the deadline such connections are cut.
  if (!shut_down.WaitForNotificationWithDeadline(deadline + absl::Milliseconds(50))) {
    const int cut = unix_listener_->AbortConnections();
    spdlog::warn("drain deadline passed with calls still held by their connections: cut {}", cut);
    forced_.store(true);
    // What is still held a second later sits on connections the server cannot cut (a TCP peer that
    // stopped reading): the process ends without them, its arenas and socket removed first.
    if (!shut_down.WaitForNotificationWithDeadline(deadline + absl::Seconds(1))) {
      const int removed = HostArena::RemoveOwn();
      ::unlink(socket_path_.c_str());
      spdlog::error(
          "drain: calls still held 1 s after the deadline; exiting without them ({} arenas "
          "unlinked)",
          removed);
      spdlog::default_logger()->flush();
      ::_exit(0);
    }
  }
  shutdown.join();
  stop_metrics.join();
  ::unlink(socket_path_.c_str());
  spdlog::info("drained");
}

void Server::Wait() { server_->Wait(); }

void Server::ReleaseSessions() { registry_.reset(); }

}  // namespace reasonalloc
