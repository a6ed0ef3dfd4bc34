// Conversions between the v1 API messages and the engine's types, with the API's defaults applied.
// Enum values outside the API (proto3 enums are open) are InvalidArgument naming the field.
#ifndef REASONALLOC_SERVER_PROTO_CONVERT_H_
#define REASONALLOC_SERVER_PROTO_CONVERT_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "core/inline_inputs.h"
#include "core/session_config.h"
#include "reasonalloc/v1/sidecar.pb.h"
#include "server/event_planes.h"

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

absl::StatusOr<MemoryKind> MemoryKindFromProto(v1::MemoryKind memory, absl::string_view field);
v1::MemoryKind MemoryKindToProto(MemoryKind memory);
// "SESSION_MODE_MANAGED" or "SESSION_MODE_ADVISORY".
std::string SessionModeName(bool managed);

// A Compress request as the application layer takes it. The call's tensors are views into
// `request`, which must outlive it; a tensor whose dtype is outside the API keeps its error in
// the call (InlineTensorsIn::decode_error), reported after the caller and the session are
// checked. The answer's sink and the caller's cancellation are the adapter's to set.
CompressCall CompressCallFromProto(const v1::CompressRequest& request);

// Bytes a CompressStream result keeps for each item whatever happens to it: an arena event's
// answer (about a hundred bytes) or an error, whose message is cut to fit (StreamItemError).
inline constexpr uint64_t kStreamItemReserve = 1024;
// An item's error as a CompressStream result carries it, its message cut to fit the reserve.
void StreamItemError(const absl::Status& status, v1::CompressResult* result);
// An inline event's answer written into `response` (ids of `request`, decision, compacted rows);
// refused, with `response` cleared, when the whole response would exceed `max_message_bytes` once
// the epoch and the timings are added. CompressStream passes `message_bytes`, the bytes its
// batch result is sure to need so far (kStreamItemReserve per item, plus each accepted inline
// answer): an answer that would take the batch result past `max_message_bytes` is refused too,
// before its event commits, so no committed event's answer is lost. (A staged answer whose event
// a later stage refuses stays counted: the count errs on the safe side.) `request`, `response`
// and `message_bytes` must outlive the sink.
InlineAnswerSink WireAnswerSink(const v1::CompressRequest& request, v1::CompressResponse* response,
                                uint64_t max_message_bytes, uint64_t* message_bytes = nullptr);
// The rest of a committed event's answer: ids, epoch and timings, and for arena events (whose
// decision is in the result arena) the decision's shape and evicted tokens.
void CompressOutcomeToProto(const CompressCall& call, const EventOutcome& outcome,
                            v1::CompressResponse* response);
// What WatchMetrics streams for a committed event.
v1::CompressEvent CompressEventToProto(const std::string& session_id, const std::string& model,
                                       int64_t step, uint64_t epoch, const Decision& decision,
                                       absl::Time now);

void DecisionToProto(const Decision& decision, int64_t n_max, bool with_mask, v1::Decision* out);
void TimingsToProto(const StageSeconds& seconds, v1::StageTimings* out);

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_PROTO_CONVERT_H_
