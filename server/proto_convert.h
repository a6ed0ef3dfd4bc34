// Conversions between the v1 API messages and the engine's types, with the API's defaults applied.
// Enum values outside the API (proto3 enums are open) are InvalidArgument naming the field.
#ifndef REASONALLOC_SERVER_PROTO_CONVERT_H_
#define REASONALLOC_SERVER_PROTO_CONVERT_H_

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/engine.h"
#include "core/inline_inputs.h"
#include "core/session_config.h"
#include "reasonalloc/v1/sidecar.pb.h"

namespace reasonalloc {

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, absl::string_view field);
v1::DType DTypeToProto(DType dtype);

// Builds the engine configuration of a CreateSession request (defaults filled, not yet validated).
absl::StatusOr<SessionConfig> SessionConfigFromProto(const v1::CreateSessionRequest& request);
// The request's configuration as the API reports it back: every default made explicit.
void SessionConfigToProto(const SessionConfig& config, v1::ModelGeometry* model,
                          v1::BudgetConfig* budget, v1::ScorerConfig* scorer,
                          v1::AllocatorConfig* allocator);

// A view of a wire tensor; `present` is false for a tensor that was not set.
absl::StatusOr<RawTensor> RawTensorFromProto(const v1::Tensor& tensor, bool present,
                                             absl::string_view field);

void DecisionToProto(const Decision& decision, int64_t n_max, bool with_mask, v1::Decision* out);
void TimingsToProto(const StageSeconds& seconds, v1::StageTimings* out);

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_PROTO_CONVERT_H_
