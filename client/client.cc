#include "client/client.h"

#include <grpcpp/create_channel.h>

#include "absl/strings/str_cat.h"
#include "proto/grpc_status.h"

namespace reasonalloc {
namespace {

template <typename Request>
std::string SessionOf(const Request& request) {
  if constexpr (requires { request.session_id(); }) {
    return request.session_id();
  } else {
    return "";
  }
}

}  // namespace

Client::Client(const Options& options) : options_(options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  channel_ = grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args);
  stub_ = v1::KvSidecar::NewStub(channel_);
  health_ = grpc::health::v1::Health::NewStub(channel_);
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const Options& options) {
  if (options.target.empty()) return absl::InvalidArgumentError("target is empty");
  if (options.max_message_bytes < 1024 || options.max_message_bytes > 0x7fffffffu) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_message_bytes = ", options.max_message_bytes, " is out of range [1024, 2147483647]"));
  }
  return std::unique_ptr<Client>(new Client(options));
}

void Client::SetDeadline(grpc::ClientContext* context) const {
  context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
}

void Client::AddSessionToken(const std::string& session_id, const std::string& token) {
  MutexLock lock(&tokens_mu_);
  tokens_[session_id] = token;
}

void Client::AttachSessionTokens(grpc::ClientContext* context,
                                 const std::vector<std::string>& session_ids) const {
  MutexLock lock(&tokens_mu_);
  if (session_ids.empty()) {
    for (const auto& [id, token] : tokens_)
      context->AddMetadata("reasonalloc-session-token", token);
    return;
  }
  for (const std::string& id : session_ids) {
    if (auto it = tokens_.find(id); it != tokens_.end()) {
      context->AddMetadata("reasonalloc-session-token", it->second);
    }
  }
}

void Client::Prepare(grpc::ClientContext* context, const std::string& session_id) const {
  SetDeadline(context);
  if (!session_id.empty()) AttachSessionTokens(context, {session_id});
}

// Every unary call has the same shape: a context with a deadline (and the session's token), the
// call, the status mapped once.
#define REASONALLOC_UNARY(method, request, Response)            \
  grpc::ClientContext context;                                  \
  Prepare(&context, SessionOf(request));                        \
  Response response;                                            \
  grpc::Status s = stub_->method(&context, request, &response); \
  if (!s.ok()) return FromGrpcStatus(s);                        \
  return response

absl::StatusOr<v1::ServerInfo> Client::GetServerInfo() {
  REASONALLOC_UNARY(GetServerInfo, v1::GetServerInfoRequest(), v1::ServerInfo);
}

absl::StatusOr<v1::CreateSessionResponse> Client::CreateSession(
    const v1::CreateSessionRequest& request) {
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::CreateSessionResponse response;
  grpc::Status s = stub_->CreateSession(&context, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  AddSessionToken(response.session().session_id(), response.session_token());
  return response;
}

absl::StatusOr<v1::SessionInfo> Client::GetSession(const std::string& session_id) {
  v1::GetSessionRequest request;
  request.set_session_id(session_id);
  REASONALLOC_UNARY(GetSession, request, v1::SessionInfo);
}

absl::StatusOr<std::vector<v1::SessionInfo>> Client::ListSessions(const std::string& model_name) {
  v1::ListSessionsRequest request;
  request.set_model_name(model_name);
  grpc::ClientContext context;
  SetDeadline(&context);
  v1::ListSessionsResponse response;
  grpc::Status s = stub_->ListSessions(&context, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return std::vector<v1::SessionInfo>(response.sessions().begin(), response.sessions().end());
}

absl::StatusOr<v1::CloseSessionResponse> Client::CloseSession(const std::string& session_id) {
  v1::CloseSessionRequest request;
  request.set_session_id(session_id);
  grpc::ClientContext context;
  Prepare(&context, session_id);
  v1::CloseSessionResponse response;
  grpc::Status s = stub_->CloseSession(&context, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  MutexLock lock(&tokens_mu_);
  tokens_.erase(session_id);
  return response;
}

absl::StatusOr<v1::KeepAliveResponse> Client::KeepAlive(const std::string& session_id,
                                                        double lease_seconds) {
  v1::KeepAliveRequest request;
  request.set_session_id(session_id);
  request.set_lease_seconds(lease_seconds);
  REASONALLOC_UNARY(KeepAlive, request, v1::KeepAliveResponse);
}

absl::StatusOr<v1::SessionInfo> Client::UpdateBudget(const std::string& session_id, int budget) {
  v1::UpdateBudgetRequest request;
  request.set_session_id(session_id);
  request.set_budget(budget);
  REASONALLOC_UNARY(UpdateBudget, request, v1::SessionInfo);
}

absl::StatusOr<v1::CompressResponse> Client::Compress(const v1::CompressRequest& request) {
  REASONALLOC_UNARY(Compress, request, v1::CompressResponse);
}

#undef REASONALLOC_UNARY

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Client::CheckHealth(
    const std::string& service) {
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::ClientContext context;
  SetDeadline(&context);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status s = health_->Check(&context, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response.status();
}

}  // namespace reasonalloc
