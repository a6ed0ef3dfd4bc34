// The one place where absl::Status becomes grpc::Status: absl codes equal gRPC codes by design.
#ifndef REASONALLOC_PROTO_GRPC_STATUS_H_
#define REASONALLOC_PROTO_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace reasonalloc {

inline grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

inline absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace reasonalloc

#endif  // REASONALLOC_PROTO_GRPC_STATUS_H_
