// grpc.health.v1 with NOT_SERVING while starting and draining. The server's own implementation
// (rather than gRPC's default one) so that the status can be NOT_SERVING from the first accepted
// connection, and so that the service is visible through reflection.
//
// Watch streams end when the server drains: the last message a watcher sees is NOT_SERVING.
#ifndef REASONALLOC_SERVER_HEALTH_SERVICE_H_
#define REASONALLOC_SERVER_HEALTH_SERVICE_H_

#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "core/sync.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace reasonalloc {

class HealthService final : public grpc::health::v1::Health::Service {
 public:
  using Status = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // Services known to the health checker; all start NOT_SERVING.
  explicit HealthService(std::initializer_list<std::string> services);

  void SetAll(Status status) ABSL_LOCKS_EXCLUDED(mu_);
  // Sets every service NOT_SERVING and ends all Watch streams.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);

  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  grpc::Status Watch(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  Mutex mu_;
  std::map<std::string, Status> status_ ABSL_GUARDED_BY(mu_);
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_HEALTH_SERVICE_H_
