#include "server/health_service.h"

namespace reasonalloc {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

HealthService::HealthService(std::initializer_list<std::string> services) {
  for (const auto& s : services) status_[s] = HealthCheckResponse::NOT_SERVING;
}

void HealthService::SetAll(Status status) {
  MutexLock lock(&mu_);
  if (shutdown_) return;
  for (auto& [name, s] : status_) s = status;
  ++version_;
}

void HealthService::Shutdown() {
  MutexLock lock(&mu_);
  for (auto& [name, s] : status_) s = HealthCheckResponse::NOT_SERVING;
  shutdown_ = true;
  ++version_;
}

grpc::Status HealthService::Check(grpc::ServerContext*, const HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  MutexLock lock(&mu_);
  auto it = status_.find(request->service());
  if (it == status_.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        "service \"" + request->service() + "\" is unknown to the health checker");
  }
  response->set_status(it->second);
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(grpc::ServerContext* context, const HealthCheckRequest* request,
                                  grpc::ServerWriter<HealthCheckResponse>* writer) {
  uint64_t seen = 0;
  bool first = true;
  Status last = HealthCheckResponse::UNKNOWN;
  while (!context->IsCancelled()) {
    Status current;
    bool done;
    {
      MutexLock lock(&mu_);
      // Wake on a change, on shutdown, or periodically to notice a cancelled client.
      auto changed = [this, &seen, first]()
                         ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return first || version_ != seen; };
      mu_.AwaitWithTimeout(changed, absl::Milliseconds(200));
      seen = version_;
      auto it = status_.find(request->service());
      current = it == status_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
      done = shutdown_;
    }
    if (first || current != last) {
      HealthCheckResponse response;
      response.set_status(current);
      if (!writer->Write(response)) break;
      last = current;
      first = false;
    }
    if (done) break;
  }
  return grpc::Status::OK;
}

}  // namespace reasonalloc
