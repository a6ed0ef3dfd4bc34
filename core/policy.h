// The policy registry: every scorer and allocator the engine implements, one row each, with what
// it needs and supports. Names travel as strings on the wire (ScorerConfig.name,
// AllocatorConfig.name); they are parsed into ScorerKind / AllocatorKind once, where a request,
// a flag or a file enters the process, and nothing past that point compares names.
//
// Validation, GetServerInfo, the CLI's and the worker's help texts, the arena layout (h2o's
// accumulator), the server's data-plane checks and the CUDA backend read these rows. Adding a
// policy means: its class in core/scorers/ or core/allocators/, its enumerator, one row in
// policy.cc, and its tests.
#ifndef REASONALLOC_CORE_POLICY_H_
#define REASONALLOC_CORE_POLICY_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace reasonalloc {

class Scorer;
class Allocator;
struct ScorerConfig;

enum class ScorerKind : uint8_t { kSnapKv, kStreaming, kH2o, kRkv };
enum class AllocatorKind : uint8_t { kUniform, kPyramid, kAdaKv, kReasonAlloc };
// Which levels of ReasonAlloc run (AllocatorConfig.reasonalloc_mode): both, the layer profile
// only, head routing only, neither (uniform budgets), or static: the layer profile and a fixed
// split of each layer among its heads by the profile's measured head demand.
enum class ReasonAllocMode : uint8_t { kFull, kLayer, kHead, kOff, kStatic };

// Data planes (the API's MemoryKind) as a bit set.
enum PlaneBits : uint32_t {
  kInlinePlane = 1u << 0,
  kHostShmPlane = 1u << 1,
  kCudaIpcPlane = 1u << 2,
  kEveryPlane = kInlinePlane | kHostShmPlane | kCudaIpcPlane,
};

struct ScorerPolicy {
  ScorerKind kind;
  absl::string_view name;     // the API's spelling
  absl::string_view summary;  // one line, for help texts and GetServerInfo
  // Reads the window queries (streaming ranks by position alone).
  bool uses_queries;
  // Carries per-token state between events (h2o's attention accumulator, core/h2o.h): the session
  // keeps it, and host shared-memory sessions get an h2o_acc arena for it.
  bool needs_accumulator;
  // The CUDA backend scores it on the device.
  bool cuda_kernel;
  // budget.sinks when unset.
  int default_sinks;
  // Data planes a managed session (the sidecar holds K and V) and an advisory session (the
  // worker holds them) may use with this scorer.
  uint32_t managed_planes;
  uint32_t advisory_planes;
  std::unique_ptr<Scorer> (*make)(const ScorerConfig& config);
};

struct AllocatorPolicy {
  AllocatorKind kind;
  absl::string_view name;
  absl::string_view summary;
  // May read a layer profile (reasonalloc in modes layer and full).
  bool uses_layer_profile;
  // May move budget between the heads of a layer by the layer's pooled scores (the pool counts of
  // allocator.h).
  bool routes_heads;
  // May give a head more than budget.budget rows (sizes the arenas: MaxHeadCapacity).
  bool reshapes_budgets;
  // The CUDA backend runs it (its layer budgets on the host, its pool counts on the device).
  bool cuda;
  std::unique_ptr<Allocator> (*make)();
};

std::span<const ScorerPolicy> ScorerPolicies();
std::span<const AllocatorPolicy> AllocatorPolicies();
const ScorerPolicy& PolicyOf(ScorerKind kind);
const AllocatorPolicy& PolicyOf(AllocatorKind kind);
// The one stateless instance of each allocator.
const Allocator& AllocatorOf(AllocatorKind kind);

inline absl::string_view NameOf(ScorerKind kind) { return PolicyOf(kind).name; }
inline absl::string_view NameOf(AllocatorKind kind) { return PolicyOf(kind).name; }

// Parses a name as the API spells it. Errors are InvalidArgument and name `field`, the bad value
// (cut to 64 bytes) and the accepted names.
absl::StatusOr<ScorerKind> ParseScorer(absl::string_view name,
                                       absl::string_view field = "scorer.name");
absl::StatusOr<AllocatorKind> ParseAllocator(absl::string_view name,
                                             absl::string_view field = "allocator.name");

// ReasonAlloc's mode as the CLI, the worker and the benchmarks spell it: full | layer | head | off.
absl::StatusOr<ReasonAllocMode> ParseReasonAllocMode(absl::string_view name,
                                                     absl::string_view field);
absl::string_view NameOf(ReasonAllocMode mode);

// "snapkv | streaming | h2o | rkv" (with `separator`), in registry order, for help texts.
std::string ScorerNames(absl::string_view separator = " | ");
std::string AllocatorNames(absl::string_view separator = " | ");

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_POLICY_H_
