// The reasonalloc.v1.KvSidecar service: converts requests into the application layer's calls
// (server/sidecar.h) and every outcome into a gRPC status whose message names the field at fault.
#ifndef REASONALLOC_SERVER_SIDECAR_SERVICE_H_
#define REASONALLOC_SERVER_SIDECAR_SERVICE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "reasonalloc/v1/sidecar.grpc.pb.h"
#include "server/metrics.h"
#include "server/peer.h"
#include "server/sidecar.h"

namespace reasonalloc {

// The gRPC adapter over the application layer (server/sidecar.h): converts each message into the
// layer's domain types, calls it, converts the answer back and maps its status.
class SidecarService final : public v1::KvSidecar::Service {
 public:
  struct Options {
    // What GetServerInfo reports about the machine.
    std::string device_name;
    std::string device_uuid;
    std::string driver_version;
    uint64_t max_message_bytes = 0;
    // Connection credentials of Unix-socket peers (null: every peer is credential-less).
    const PeerTable* peers = nullptr;
  };

  SidecarService(Options options, Sidecar* app, Metrics* metrics);

  // Filled in once the listeners are bound.
  void SetAddresses(std::vector<std::string> listen, std::string metrics);

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

 private:
  absl::Status DoWatch(grpc::ServerContext* context, const v1::WatchMetricsRequest& request,
                       grpc::ServerWriter<v1::MetricsEvent>* writer);
  grpc::Status Finish(absl::string_view method, const absl::Status& status);
  // Who makes this call: its peer credentials and the session tokens it carries.
  Caller CallerOf(const grpc::ServerContext* context) const;
  void FillSessionInfo(const Session& session, v1::SessionInfo* out) const;

  const Options options_;
  Sidecar* const app_;
  Metrics* const metrics_;
  Mutex mu_;
  std::vector<std::string> listen_addresses_ ABSL_GUARDED_BY(mu_);
  std::string metrics_address_ ABSL_GUARDED_BY(mu_);
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_SIDECAR_SERVICE_H_
