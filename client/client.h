// C++ client of the ReasonAlloc sidecar: a thin, typed wrapper over the v1 stub whose calls return
// absl::StatusOr (the server's gRPC status, code and message unchanged).
//
// Thread-safe: one Client may be shared by many threads; every call has its own deadline.
#ifndef REASONALLOC_CLIENT_CLIENT_H_
#define REASONALLOC_CLIENT_CLIENT_H_

#include <grpcpp/channel.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/api_defaults.h"
#include "core/build_info.h"
#include "core/sync.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "reasonalloc/v1/sidecar.grpc.pb.h"

namespace reasonalloc {

class Client {
 public:
  struct Options {
    std::string target = kDefaultTarget;  // unix:///path or host:port
    uint64_t max_message_bytes = kDefaultMaxMessageBytes;
    absl::Duration timeout = absl::Seconds(30);  // per call
  };

  // Never blocks: a server that is not there shows up as UNAVAILABLE on the first call.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const Options& options);

  absl::StatusOr<v1::ServerInfo> GetServerInfo();
  absl::StatusOr<v1::CreateSessionResponse> CreateSession(const v1::CreateSessionRequest& request);
  absl::StatusOr<v1::SessionInfo> GetSession(const std::string& session_id);
  absl::StatusOr<std::vector<v1::SessionInfo>> ListSessions(const std::string& model_name = "");
  absl::StatusOr<v1::CloseSessionResponse> CloseSession(const std::string& session_id);
  absl::StatusOr<v1::KeepAliveResponse> KeepAlive(const std::string& session_id,
                                                  double lease_seconds = 0);
  absl::StatusOr<v1::SessionInfo> UpdateBudget(const std::string& session_id, int budget);
  absl::StatusOr<v1::CompressResponse> Compress(const v1::CompressRequest& request);
  // grpc.health.v1 Check of `service` ("" = the whole server).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
      const std::string& service = "");

  // Session tokens: CreateSession keeps the token of every session this client creates, and each
  // call naming a session sends that session's token as "reasonalloc-session-token" metadata.
  // Needed when the session is used from another uid or over TCP; a process that did not create
  // the session adds its token here (it travels out of band, e.g. with the request it serves).
  void AddSessionToken(const std::string& session_id, const std::string& token);
  // For calls made through stub(): adds the tokens of `session_ids` (all known ones when empty).
  void AttachSessionTokens(grpc::ClientContext* context,
                           const std::vector<std::string>& session_ids = {}) const;

  // For streaming calls (CompressStream, WatchMetrics, health Watch).
  v1::KvSidecar::Stub& stub() { return *stub_; }
  grpc::health::v1::Health::Stub& health_stub() { return *health_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  const Options& options() const { return options_; }

 private:
  explicit Client(const Options& options);
  void SetDeadline(grpc::ClientContext* context) const;
  // A deadline and the session's token, if known.
  void Prepare(grpc::ClientContext* context, const std::string& session_id) const;

  Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvSidecar::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
  mutable Mutex tokens_mu_;
  std::map<std::string, std::string> tokens_ ABSL_GUARDED_BY(tokens_mu_);
};

}  // namespace reasonalloc

#endif  // REASONALLOC_CLIENT_CLIENT_H_
