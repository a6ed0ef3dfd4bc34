// The sidecar's application layer: every KvSidecar method on domain types, free of gRPC.
//
// Each method takes the Caller (peer credentials and session tokens) and the call's inputs as
// engine and registry types, checks the caller (--allow_uid, the session's owner or token), does
// the work and returns absl::StatusOr, each error naming the field at fault. The gRPC service
// (server/sidecar_service.h) converts messages to and from these types and maps statuses; nothing
// else is left there. Compression runs through the event transaction
// (server/event_transaction.h), one plane per memory kind (server/event_planes.h).
#ifndef REASONALLOC_SERVER_SIDECAR_H_
#define REASONALLOC_SERVER_SIDECAR_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/session_config.h"
#include "reasonalloc/v1/sidecar.pb.h"
#include "server/event_hub.h"
#include "server/event_planes.h"
#include "server/event_transaction.h"
#include "server/gpu_engine_pool.h"
#include "server/metrics.h"
#include "server/peer.h"
#include "server/profile_store.h"
#include "server/session_registry.h"

namespace reasonalloc {

// Runs `body`; memory exhaustion anywhere in it (a large reply, a profile, a decision) becomes
// RESOURCE_EXHAUSTED for this caller, naming `method`, instead of ending the process or reaching
// gRPC as UNKNOWN.
template <typename F>
absl::Status GuardMemory(absl::string_view method, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(method,
                     ": the server ran out of memory for this request; send less per call "
                     "or retry later"));
  }
}

// Who makes a call.
struct Caller {
  PeerIdentity peer;
  std::vector<std::string> tokens;  // session tokens the call carries
};

// What CreateSession asks for.
struct SessionSpec {
  SessionConfig config;
  MemoryKind memory = MemoryKind::kInline;
  std::string client_tag;
  double lease_seconds = 0;  // 0 = the registry's default
};

struct CreatedSession {
  std::shared_ptr<Session> session;
  std::vector<std::string> warnings;
};

// What WatchMetrics asks for.
struct WatchSpec {
  std::vector<std::string> session_ids;  // empty = every session
  std::string model_name;                // empty = every model
  double pool_interval_seconds = 0;      // 0 = no pool gauges
};

struct PoolState {
  int sessions = 0;
  uint64_t capacity_bytes = 0;
  uint64_t reserved_bytes = 0;
};

class Sidecar {
 public:
  struct Options {
    std::string backend = "cpu";
    int cuda_device = -1;  // --device cuda:N: N; MEMORY_KIND_CUDA_IPC sessions live there
    // Most scratch bytes one compression event may allocate (CompressInputs::max_event_bytes);
    // 0 = no limit.
    uint64_t max_event_bytes = 0;
    int max_watchers = 8;       // ServerOptions (--max_watchers) takes its default from here
    size_t watch_queue = 1024;  // events buffered per watcher before it drops (--watch_queue)
    // Unix-socket uids that may call, besides the server's own; empty = any.
    std::vector<uint32_t> allow_uids;
    // Test hook: sleep this long inside every Compress, to exercise draining and racing calls.
    absl::Duration testing_compress_delay = absl::ZeroDuration();
  };

  Sidecar(Options options, SessionRegistry* registry, Metrics* metrics, ProfileStore* profiles);
  const Options& options() const { return options_; }

  // PERMISSION_DENIED for a Unix-socket peer whose uid --allow_uid excludes. Every method below
  // checks it first.
  absl::Status Admit(const Caller& caller) const;
  // Admit, then UNAVAILABLE while the server drains: what CreateSession checks before the
  // request's own fields.
  absl::Status AcceptingSessions(const Caller& caller) const;
  // New sessions and watchers are refused from now on; watchers' streams end.
  void SetDraining();
  bool draining() const { return draining_.load(); }
  PoolState Pool() const;
  absl::Time started() const { return started_; }

  absl::StatusOr<CreatedSession> CreateSession(const Caller& caller, const SessionSpec& spec);
  absl::StatusOr<std::shared_ptr<Session>> GetSession(const Caller& caller, const std::string& id);
  // The sessions the caller may see (a Unix-socket peer its own uid's; root, the server's uid
  // and credential-less peers all), of `model_name` when not empty.
  absl::StatusOr<std::vector<std::shared_ptr<Session>>> ListSessions(const Caller& caller,
                                                                     const std::string& model_name);
  // The bytes released; 0 for an unknown session (closing is idempotent).
  absl::StatusOr<uint64_t> CloseSession(const Caller& caller, const std::string& id);
  // The new lease deadline; `lease_seconds` 0 keeps the session's lease.
  absl::StatusOr<absl::Time> KeepAlive(const Caller& caller, const std::string& id,
                                       double lease_seconds);
  absl::StatusOr<std::shared_ptr<Session>> UpdateBudget(const Caller& caller, const std::string& id,
                                                        int budget);
  // The worker's own buffers of an advisory MEMORY_KIND_HOST_SHM session, as described on the
  // wire (the descriptors are checked field by field: server/external_buffers.h).
  absl::Status RegisterBuffers(
      const Caller& caller, const std::string& id,
      const google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>& buffers);

  // One compression event. `t0` starts its total time (the time the call arrived). Memory
  // exhaustion is RESOURCE_EXHAUSTED (GuardMemory), here and in CompressMany.
  absl::StatusOr<EventOutcome> Compress(
      const Caller& caller, const CompressCall& call,
      std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now());
  // A message's events: each with Compress's guarantees; events of sessions that share a CUDA
  // engine decide in one launch set (RunCompressEvents). out[i] is calls[i]'s outcome.
  std::vector<absl::StatusOr<EventOutcome>> CompressMany(const Caller& caller,
                                                         std::span<const CompressCall> calls);

  // The samples (layer budgets measured so far: none at the start) of the started calibration.
  absl::StatusOr<std::vector<int64_t>> StartCalibration(const Caller& caller, const std::string& id,
                                                        double rho, int stride);
  // Stores the calibrated profile under `profile_name` (empty: the session's model name) and
  // returns it as stored.
  absl::StatusOr<v1::LayerProfile> FinishCalibration(const Caller& caller, const std::string& id,
                                                     const std::string& profile_name, bool save);
  // Layer profiles are kept as their wire records (server/profile_store.h).
  absl::StatusOr<v1::LayerProfile> GetProfile(const Caller& caller, const std::string& name);
  absl::Status PutProfile(const Caller& caller, const v1::LayerProfile& profile, bool overwrite,
                          bool save);
  absl::StatusOr<std::vector<v1::LayerProfile>> ListProfiles(const Caller& caller);

  // A WatchMetrics subscription; Unwatch ends it.
  absl::StatusOr<std::shared_ptr<EventHub::Watcher>> Watch(const Caller& caller,
                                                           const WatchSpec& spec);
  void Unwatch(const std::shared_ptr<EventHub::Watcher>& watcher);

  // Called when a session leaves the registry (close or lease expiry).
  void OnSessionReleased(Session& session, const char* why);

 private:
  // The session `id` if the caller may use it (Session::Authorize); renews its lease on kYes.
  absl::StatusOr<std::shared_ptr<Session>> Use(const Caller& caller, const std::string& id,
                                               SessionRegistry::Renew renew);
  // A call made ready to run: its session, its plane (by memory kind) and what to record once
  // committed (metrics, WatchMetrics).
  struct Job {
    std::shared_ptr<Session> session;
    std::unique_ptr<EventPlane> plane;
    std::function<void(const EventOutcome&)> record;
  };
  absl::StatusOr<Job> MakeJob(const Caller& caller, const CompressCall& call);
  void RecordEvent(const Session& session, int64_t step, const Session::CommitResult& committed,
                   const Decision& decision);
  void UpdatePoolGauges();

  const Options options_;
  SessionRegistry* const registry_;
  ProfileStore* const profiles_;
  GpuEnginePool gpu_engines_;  // CUDA sessions of one configuration share an engine
  Metrics* const metrics_;
  const absl::Time started_;
  std::atomic<bool> draining_{false};
  Mutex gauges_mu_;  // pool gauges are read and set as one step
  EventHub events_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_SIDECAR_H_
