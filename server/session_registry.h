// Sessions, their leases and the global arena-capacity accounting.
//
// Invariants:
// - reserved_bytes() == Σ over live sessions of their reservation, and never exceeds the capacity:
// a
//   session that does not fit is refused (RESOURCE_EXHAUSTED) before anything is reserved, so
//   admitted sessions are never disturbed.
// - A session leaves the registry exactly once (close or lease expiry); its bytes are released
// then. Calls
//   already holding the session's shared_ptr finish on it; new lookups get NOT_FOUND.
// - At most one Compress runs per session at a time; a second is refused with FAILED_PRECONDITION
// rather
//   than queued, because two events racing on one sequence mean the worker lost track of its own
//   steps.
#ifndef REASONALLOC_SERVER_SESSION_REGISTRY_H_
#define REASONALLOC_SERVER_SESSION_REGISTRY_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "core/h2o.h"
#include "core/layer_profile.h"
#include "core/session_config.h"
#include "core/sync.h"
#include "server/cuda_session_arenas.h"
#include "server/peer.h"
#include "server/session_arenas.h"

namespace reasonalloc {

// Metadata key of a session's token: a caller presenting it may use the session whatever its
// credentials (another uid, TCP). Repeatable, so that one stream can carry several sessions'
// tokens.
inline constexpr const char kSessionTokenKey[] = "reasonalloc-session-token";

class Session {
 public:
  Session(std::string id, std::shared_ptr<const Engine> engine, uint64_t reserved,
          std::string client_tag, absl::Duration lease, std::string profile,
          PeerIdentity owner = {});

  const std::string& id() const { return id_; }
  // Geometry, mode, scorer and allocator never change; the budget may (UpdateBudget): read it from
  // engine()->config().
  const ModelGeometry& model() const { return model_; }
  const std::string& client_tag() const { return client_tag_; }
  // The layer profile whose wave the session uses; empty = uniform layers.
  const std::string& profile() const { return profile_; }
  // The connection credentials that created the session (non-local: created over TCP).
  const PeerIdentity& owner() const { return owner_; }
  // Returned once, by CreateSession; never listed.
  const std::string& token() const { return token_; }
  // OK when `caller` has the owner's uid (both Unix-socket peers) or one of `tokens` is the
  // session's token; PERMISSION_DENIED naming session_id otherwise.
  absl::Status Authorize(const PeerIdentity& caller, const std::vector<std::string>& tokens) const;
  // True when `caller` is the owner by credentials (no token considered).
  bool OwnedBy(const PeerIdentity& caller) const;

  // Calibration (StartCalibration .. FinishCalibration): Compress keeps every token and, on every
  // stride-th step, measures k_rho from the newest query.
  absl::Status StartCalibration(double rho, int stride) ABSL_LOCKS_EXCLUDED(calib_mu_);
  bool calibrating() const ABSL_LOCKS_EXCLUDED(calib_mu_);
  // CANCELLED (nothing recorded) when in.cancelled fires during the measurement.
  absl::Status ObserveCalibration(int64_t step, const CompressInputs& in)
      ABSL_LOCKS_EXCLUDED(calib_mu_);
  std::vector<int64_t> CalibrationSamples() const ABSL_LOCKS_EXCLUDED(calib_mu_);
  struct Calibration {
    double rho = 0;
    std::vector<double> demand;
    std::vector<int64_t> samples;
  };
  // Hands the measurements to `keep` (which stores them); calibration ends only when it returns
  // OK, so a refused store (a bad profile name, say) leaves the session calibrating for a retry.
  absl::Status FinishCalibration(const std::function<absl::Status(const Calibration&)>& keep)
      ABSL_LOCKS_EXCLUDED(calib_mu_);
  absl::Time created() const { return created_; }
  std::shared_ptr<const Engine> engine() const ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t reserved_bytes() const ABSL_LOCKS_EXCLUDED(mu_);

  struct State {
    int64_t last_step = -1;
    uint64_t epoch = 0;
    uint64_t evicted_total = 0;
    std::vector<int32_t> budgets;
    std::vector<int32_t> kept_lengths;
    absl::Duration lease;
    absl::Time lease_deadline;
  };
  State Snapshot() const ABSL_LOCKS_EXCLUDED(mu_);
  // Extends the lease to now + lease (the session's own lease length when `lease` is zero).
  absl::Time Renew(absl::Duration lease = absl::ZeroDuration()) ABSL_LOCKS_EXCLUDED(mu_);
  // FAILED_PRECONDITION unless `step` comes after the previous event's step.
  absl::Status CheckStep(int64_t step) const ABSL_LOCKS_EXCLUDED(mu_);
  // Records a finished event. `kept_delta` is the change in tokens held, zero once the session has
  // left the registry (its tokens were already accounted out by Release).
  struct CommitResult {
    uint64_t epoch = 0;
    int64_t kept_delta = 0;
  };
  CommitResult Commit(int64_t step, const Decision& decision) ABSL_LOCKS_EXCLUDED(mu_);
  // Marks the session as gone from the registry; returns the tokens it held. Called exactly once.
  int64_t Release() ABSL_LOCKS_EXCLUDED(mu_);

  // Exclusive right to run Compress; released when the guard goes out of scope.
  class CompressGuard {
   public:
    explicit CompressGuard(Session* s) : s_(s) {}
    CompressGuard(CompressGuard&& o) noexcept : s_(o.s_) { o.s_ = nullptr; }
    CompressGuard(const CompressGuard&) = delete;
    CompressGuard& operator=(const CompressGuard&) = delete;
    CompressGuard& operator=(CompressGuard&&) = delete;
    ~CompressGuard() {
      if (s_ != nullptr) s_->busy_.store(false, std::memory_order_release);
    }

   private:
    Session* s_;
  };
  absl::StatusOr<CompressGuard> BeginCompress();
  // Host shared-memory arenas (MEMORY_KIND_HOST_SHM sessions), attached once right after
  // creation; null for inline sessions. Only the holder of the compress guard reads or writes
  // through them.
  void AttachArenas(std::unique_ptr<SessionArenas> arenas) ABSL_LOCKS_EXCLUDED(mu_);
  SessionArenas* arenas() const ABSL_LOCKS_EXCLUDED(mu_);
  // CUDA arenas (MEMORY_KIND_CUDA_IPC sessions on a --device cuda:N server), likewise.
  void AttachCudaArenas(std::unique_ptr<CudaSessionArenas> arenas) ABSL_LOCKS_EXCLUDED(mu_);
  CudaSessionArenas* cuda_arenas() const ABSL_LOCKS_EXCLUDED(mu_);
  // The h2o accumulator (null for other scorers); only the holder of the compress guard uses it.
  H2oAccumulator* h2o() { return h2o_.get(); }

 private:
  friend class SessionRegistry;
  bool Expired(absl::Time now) const ABSL_LOCKS_EXCLUDED(mu_);

  const std::string id_;
  const ModelGeometry model_;
  const std::string client_tag_;
  const std::string profile_;
  const PeerIdentity owner_;
  const std::string token_;
  const absl::Time created_;
  mutable Mutex calib_mu_;
  std::unique_ptr<CalibrationAccumulator> calibration_ ABSL_GUARDED_BY(calib_mu_);
  int calibration_stride_ ABSL_GUARDED_BY(calib_mu_) = 16;
  std::atomic<bool> busy_{false};
  std::unique_ptr<H2oAccumulator> h2o_;
  std::unique_ptr<SessionArenas> arenas_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<CudaSessionArenas> cuda_arenas_ ABSL_GUARDED_BY(mu_);
  mutable Mutex mu_;
  std::shared_ptr<const Engine> engine_ ABSL_GUARDED_BY(mu_);
  uint64_t reserved_ ABSL_GUARDED_BY(mu_);
  State state_ ABSL_GUARDED_BY(mu_);
  bool released_ ABSL_GUARDED_BY(mu_) = false;
};

class SessionRegistry {
 public:
  struct Options {
    uint64_t capacity_bytes = uint64_t{8} << 30;  // arena pool size
    int max_sessions = 4096;
    absl::Duration default_lease = absl::Seconds(60);
    absl::Duration max_lease = absl::Hours(24);
    absl::Duration reap_interval = absl::Milliseconds(100);
  };
  // Called (outside the registry's lock) for each session that leaves: "closed" or "expired".
  using ReleaseCallback = std::function<void(Session&, const char* why)>;

  explicit SessionRegistry(Options options, ReleaseCallback on_release = nullptr);
  ~SessionRegistry();
  SessionRegistry(const SessionRegistry&) = delete;
  SessionRegistry& operator=(const SessionRegistry&) = delete;

  // Validates the configuration, reserves its bytes and admits the session.
  // `demand` and `profile`: the layer profile the session follows (empty = uniform layers).
  absl::StatusOr<std::shared_ptr<Session>> Create(const SessionConfig& config,
                                                  std::string client_tag, absl::Duration lease,
                                                  ProfileDemand demand = {},
                                                  std::string profile = "",
                                                  PeerIdentity owner = {});
  // NOT_FOUND for unknown, closed and expired sessions (a lapsed lease is never revived, even
  // before the reaper has run). Using a session (Compress, KeepAlive) renews its lease; looking at
  // it (GetSession) does not.
  enum class Renew { kYes, kNo };
  // `authorize`, when given, runs before the lease is renewed and its error is returned instead.
  using Authorizer = std::function<absl::Status(const Session&)>;
  absl::StatusOr<std::shared_ptr<Session>> Get(const std::string& id, Renew renew = Renew::kYes,
                                               const Authorizer& authorize = nullptr);
  // OK whether or not the session existed; returns the bytes released (0 if it did not exist).
  absl::StatusOr<uint64_t> Close(const std::string& id);
  absl::StatusOr<std::shared_ptr<Session>> UpdateBudget(const std::string& id, int budget);
  std::vector<std::shared_ptr<Session>> List() const;
  // Removes sessions whose lease lapsed before `now`; returns how many. The reaper thread calls
  // this.
  int ReapExpired(absl::Time now);

  // Lease length for a request: zero means the default; negative, non-finite or above the maximum
  // is InvalidArgument naming `field`.
  absl::StatusOr<absl::Duration> LeaseFor(double seconds, absl::string_view field) const;

  uint64_t capacity_bytes() const { return options_.capacity_bytes; }
  uint64_t reserved_bytes() const ABSL_LOCKS_EXCLUDED(mu_);
  int size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void ReaperLoop();

  const Options options_;
  const ReleaseCallback on_release_;
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  uint64_t reserved_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread reaper_;
};

// 128 random bits as 32 hex digits: session ids must not be guessable by other local users.
std::string NewSessionId();
inline constexpr size_t kMaxSessionIdBytes = 64;
// InvalidArgument for an empty or oversized session_id (never echoed back whole).
absl::Status CheckSessionId(const std::string& id);

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_SESSION_REGISTRY_H_
