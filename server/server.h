// The sidecar process minus flag parsing: listeners, services, metrics endpoint, lifecycle.
//
// Lifecycle: Create() binds everything (health NOT_SERVING) -> Start() (SERVING) -> Drain()
// (NOT_SERVING, new calls refused, in-flight calls get until the drain deadline, then cancelled) ->
// Wait() returns.
#ifndef REASONALLOC_SERVER_SERVER_H_
#define REASONALLOC_SERVER_SERVER_H_

#include <grpcpp/server.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/api_defaults.h"
#include "core/build_info.h"
#include "server/health_service.h"
#include "server/metrics.h"
#include "server/peer.h"
#include "server/profile_store.h"
#include "server/session_registry.h"
#include "server/sidecar_service.h"

namespace reasonalloc {

// Every server setting and its default: reasonalloc-server's flags take their defaults from a
// default-constructed ServerOptions, and the components' own options nest here.
struct ServerOptions {
  std::string listen = kDefaultTarget;  // unix:///path (or unix:path)
  unsigned socket_mode = 0600;          // permission bits of the socket file
  // Unix-socket peers whose uid may call KvSidecar methods, besides the server's own uid; empty =
  // any peer that can open the socket.
  std::vector<uint32_t> allow_uids;
  std::string tcp_listen;                          // optional host:port (port 0 = any free port)
  std::string metrics_address = "127.0.0.1:9464";  // empty = no metrics endpoint
  std::string device = "cpu";                      // cpu | cuda:N
  // The session registry: arena pool bytes (--max_arena_bytes), --max_sessions, leases.
  SessionRegistry::Options sessions;
  int max_threads = 64;  // threads serving calls (gRPC resource quota)
  int max_watchers = Sidecar::Options().max_watchers;  // WatchMetrics streams at once
  // Events buffered per watcher.
  int watch_queue = static_cast<int>(Sidecar::Options().watch_queue);
  std::string profile_dir;  // empty = no layer profiles
  uint64_t max_message_bytes = kDefaultMaxMessageBytes;
  absl::Duration drain_timeout = absl::Seconds(10);
  absl::Duration testing_compress_delay = absl::ZeroDuration();
  // Most scratch bytes one compression event may allocate; 0 = DefaultMaxEventBytes().
  uint64_t max_event_bytes = 0;
  int max_profiles = 1024;  // layer profiles held (PutProfile beyond is RESOURCE_EXHAUSTED)
  // Unix-socket connections one uid may hold open at once (more are closed at accept).
  int max_connections_per_uid = 64;
  // A connection with no call in flight for this long is closed by the server.
  absl::Duration max_connection_idle = absl::Minutes(5);
};

// An eighth of the machine's physical memory, at least 256 MiB: what --max_event_bytes 0 means.
uint64_t DefaultMaxEventBytes();

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);
  ~Server();

  void Start();  // health SERVING
  void Drain();  // idempotent, thread-safe
  void Wait();   // until drained
  // True when the drain had to cut connections whose peers stopped reading: gRPC's own teardown
  // (grpc::Server's destructor) may then wait seconds more on them, so the process releases its
  // sessions (unlinking their shared memory) with ReleaseSessions and ends without it.
  bool forced() const { return forced_.load(); }
  void ReleaseSessions();

  const std::vector<std::string>& listen_addresses() const { return listen_addresses_; }
  const std::string& metrics_address() const { return metrics_address_; }

 private:
  explicit Server(const ServerOptions& options);

  ServerOptions options_;
  std::atomic<bool> forced_{false};
  std::string socket_path_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<ProfileStore> profiles_;
  std::unique_ptr<SessionRegistry> registry_;
  std::unique_ptr<Sidecar> app_;
  std::unique_ptr<SidecarService> service_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<PeerTable> peers_;
  std::unique_ptr<UnixListener> unix_listener_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::string> listen_addresses_;
  std::string metrics_address_;
  Mutex drain_mu_;
  bool drained_ ABSL_GUARDED_BY(drain_mu_) = false;
};

// Parses "unix:///abs/path" or "unix:rel/or/abs" into the file path; InvalidArgument naming `field`
// otherwise.
absl::StatusOr<std::string> UnixSocketPath(const std::string& target, absl::string_view field);

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_SERVER_H_
