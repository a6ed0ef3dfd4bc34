// The reasonalloc.v1.KvSidecar service: maps requests onto the session registry and the engine, and
// every outcome onto a gRPC status whose message names the field at fault.
#ifndef REASONALLOC_SERVER_SIDECAR_SERVICE_H_
#define REASONALLOC_SERVER_SIDECAR_SERVICE_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "reasonalloc/v1/sidecar.grpc.pb.h"
#include "server/event_hub.h"
#include "server/event_transaction.h"
#include "server/gpu_engine_pool.h"
#include "server/metrics.h"
#include "server/peer.h"
#include "server/profile_store.h"
#include "server/session_registry.h"

namespace reasonalloc {

class SidecarService final : public v1::KvSidecar::Service {
 public:
  struct Options {
    std::string backend = "cpu";
    std::string device_name;
    std::string device_uuid;
    std::string driver_version;
    int cuda_device = -1;  // --device cuda:N: N; MEMORY_KIND_CUDA_IPC sessions live there
    uint64_t max_message_bytes = 0;
    // Most scratch bytes one compression event may allocate (CompressInputs::max_event_bytes);
    // 0 = no limit.
    uint64_t max_event_bytes = 0;
    int max_watchers = 8;
    size_t watch_queue = 1024;  // events buffered per watcher before it drops
    // Connection credentials of Unix-socket peers (null: every peer is credential-less).
    const PeerTable* peers = nullptr;
    // Unix-socket uids that may call, besides the server's own; empty = any.
    std::vector<uint32_t> allow_uids;
    // Test hook: sleep this long inside every Compress, to exercise draining and racing calls.
    absl::Duration testing_compress_delay = absl::ZeroDuration();
  };

  SidecarService(Options options, SessionRegistry* registry, Metrics* metrics,
                 ProfileStore* profiles);

  // Filled in once the listeners are bound.
  void SetAddresses(std::vector<std::string> listen, std::string metrics);
  void SetDraining() {
    draining_.store(true);
    events_.Close();
  }

  grpc::Status GetServerInfo(grpc::ServerContext*, const v1::GetServerInfoRequest*,
                             v1::ServerInfo*) override;
  grpc::Status CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest*,
                             v1::CreateSessionResponse*) override;
  grpc::Status GetSession(grpc::ServerContext*, const v1::GetSessionRequest*,
                          v1::SessionInfo*) override;
  grpc::Status ListSessions(grpc::ServerContext*, const v1::ListSessionsRequest*,
                            v1::ListSessionsResponse*) override;
  grpc::Status CloseSession(grpc::ServerContext*, const v1::CloseSessionRequest*,
                            v1::CloseSessionResponse*) override;
  grpc::Status KeepAlive(grpc::ServerContext*, const v1::KeepAliveRequest*,
                         v1::KeepAliveResponse*) override;
  grpc::Status UpdateBudget(grpc::ServerContext*, const v1::UpdateBudgetRequest*,
                            v1::SessionInfo*) override;
  grpc::Status RegisterBuffers(grpc::ServerContext*, const v1::RegisterBuffersRequest*,
                               v1::RegisterBuffersResponse*) override;
  grpc::Status Compress(grpc::ServerContext*, const v1::CompressRequest*,
                        v1::CompressResponse*) override;
  grpc::Status CompressStream(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::CompressBatchResult, v1::CompressBatch>*) override;
  grpc::Status StartCalibration(grpc::ServerContext*, const v1::StartCalibrationRequest*,
                                v1::CalibrationStatus*) override;
  grpc::Status FinishCalibration(grpc::ServerContext*, const v1::FinishCalibrationRequest*,
                                 v1::LayerProfile*) override;
  grpc::Status GetProfile(grpc::ServerContext*, const v1::GetProfileRequest*,
                          v1::LayerProfile*) override;
  grpc::Status PutProfile(grpc::ServerContext*, const v1::PutProfileRequest*,
                          v1::PutProfileResponse*) override;
  grpc::Status ListProfiles(grpc::ServerContext*, const v1::ListProfilesRequest*,
                            v1::ListProfilesResponse*) override;
  grpc::Status WatchMetrics(grpc::ServerContext*, const v1::WatchMetricsRequest*,
                            grpc::ServerWriter<v1::MetricsEvent>*) override;

  // Called when a session leaves the registry (close or lease expiry).
  void OnSessionReleased(Session& session, const char* why);

 private:
  absl::Status DoWatch(grpc::ServerContext* context, const v1::WatchMetricsRequest& request,
                       grpc::ServerWriter<v1::MetricsEvent>* writer);
  void PublishEvent(const Session& session, int64_t step, uint64_t epoch, const Decision& decision);
  // Metrics and WatchMetrics of a committed event.
  // The answer of a committed shared-memory or CUDA arena event (the decision is in the arena).
  void RecordEvent(const Session& session, int64_t step, const Session::CommitResult& committed,
                   const Decision& decision);
  // One Compress request made ready to run: its session, its plane (by memory kind) and what to
  // record once committed (the answer of arena events, metrics, WatchMetrics).
  struct CompressJob {
    std::shared_ptr<Session> session;
    std::unique_ptr<EventPlane> plane;
    std::function<void(const EventOutcome&)> record;
    std::chrono::steady_clock::time_point t0;
  };
  absl::StatusOr<CompressJob> MakeCompressJob(grpc::ServerContext* context,
                                              const v1::CompressRequest& request,
                                              v1::CompressResponse* response);
  absl::Status DoCompress(grpc::ServerContext* context, const v1::CompressRequest& request,
                          v1::CompressResponse* response);
  grpc::Status Finish(absl::string_view method, const absl::Status& status);
  // Who makes this call: its peer credentials and the session tokens it carries. PERMISSION_DENIED
  // for a Unix-socket peer whose uid --allow_uid excludes.
  struct Caller {
    PeerIdentity peer;
    std::vector<std::string> tokens;
  };
  absl::StatusOr<Caller> Identify(const grpc::ServerContext* context) const;
  // The session `id` if the caller may use it (Session::Authorize); renews its lease on kYes.
  absl::StatusOr<std::shared_ptr<Session>> Use(const grpc::ServerContext* context,
                                               const std::string& id, SessionRegistry::Renew renew);
  absl::StatusOr<std::shared_ptr<Session>> Use(const Caller& caller, const std::string& id,
                                               SessionRegistry::Renew renew);
  void FillSessionInfo(const Session& session, v1::SessionInfo* out) const;
  void UpdatePoolGauges();

  const Options options_;
  SessionRegistry* const registry_;
  ProfileStore* const profiles_;
  GpuEnginePool gpu_engines_;  // CUDA sessions of one configuration share an engine
  Metrics* const metrics_;
  const absl::Time started_;
  std::atomic<bool> draining_{false};
  Mutex mu_;
  std::vector<std::string> listen_addresses_ ABSL_GUARDED_BY(mu_);
  std::string metrics_address_ ABSL_GUARDED_BY(mu_);
  Mutex gauges_mu_;  // pool gauges are read and set as one step
  EventHub events_;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_SIDECAR_SERVICE_H_
