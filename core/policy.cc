#include "core/policy.h"

#include <algorithm>
#include <array>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "core/allocator.h"
#include "core/allocators/allocators.h"
#include "core/check.h"
#include "core/scorer.h"
#include "core/scorers/scorers.h"
#include "core/session_config.h"

namespace reasonalloc {
namespace {

// One row per policy, in the enumerators' order.
constexpr ScorerPolicy kScorers[] = {
    {.kind = ScorerKind::kSnapKv,
     .name = "snapkv",
     .summary = "window queries' pooled attention on each token (SnapKV)",
     .uses_queries = true,
     .needs_accumulator = false,
     .cuda_kernel = true,
     .default_sinks = 0,
     .managed_planes = kEveryPlane,
     .advisory_planes = kInlinePlane | kHostShmPlane,
     .make = &MakeSnapKvScorer},
    {.kind = ScorerKind::kStreaming,
     .name = "streaming",
     .summary = "attention sinks and the most recent tokens (StreamingLLM)",
     .uses_queries = false,
     .needs_accumulator = false,
     .cuda_kernel = true,
     .default_sinks = kDefaultStreamingSinks,
     .managed_planes = kEveryPlane,
     .advisory_planes = kInlinePlane | kHostShmPlane,
     .make = &MakeStreamingScorer},
    {.kind = ScorerKind::kH2o,
     .name = "h2o",
     .summary = "attention accumulated since each token arrived (H2O)",
     .uses_queries = true,
     .needs_accumulator = true,
     .cuda_kernel = true,
     .default_sinks = 0,
     // The accumulator lives on the host: in an h2o_acc arena (managed shared memory) or in the
     // session (inline); CUDA sessions and advisory shared-memory sessions have neither.
     .managed_planes = kInlinePlane | kHostShmPlane,
     .advisory_planes = kInlinePlane,
     .make = &MakeH2oScorer},
    {.kind = ScorerKind::kRkv,
     .name = "rkv",
     .summary = "SnapKV importance minus key redundancy (R-KV)",
     .uses_queries = true,
     .needs_accumulator = false,
     .cuda_kernel = true,
     .default_sinks = 0,
     .managed_planes = kEveryPlane,
     .advisory_planes = kInlinePlane | kHostShmPlane,
     .make = &MakeRkvScorer},
};

constexpr AllocatorPolicy kAllocators[] = {
    {.kind = AllocatorKind::kUniform,
     .name = "uniform",
     .summary = "budget.budget tokens for every head of every layer",
     .uses_layer_profile = false,
     .routes_heads = false,
     .reshapes_budgets = false,
     .cuda = true,
     .make = &MakeUniformAllocator},
    {.kind = AllocatorKind::kPyramid,
     .name = "pyramid",
     .summary = "layer budgets falling linearly with depth (PyramidKV)",
     .uses_layer_profile = false,
     .routes_heads = false,
     .reshapes_budgets = true,
     .cuda = true,
     .make = &MakePyramidAllocator},
    {.kind = AllocatorKind::kAdaKv,
     .name = "adakv",
     .summary = "uniform layers, heads sharing each layer's pooled top scores (AdaKV)",
     .uses_layer_profile = false,
     .routes_heads = true,
     .reshapes_budgets = true,
     .cuda = true,
     .make = &MakeAdaKvAllocator},
    {.kind = AllocatorKind::kReasonAlloc,
     .name = "reasonalloc",
     .summary = "layer budgets from the model's layer profile, then head routing (ReasonAlloc)",
     .uses_layer_profile = true,
     .routes_heads = true,
     .reshapes_budgets = true,
     .cuda = true,
     .make = &MakeReasonAllocAllocator},
};

constexpr bool RowsInOrder() {
  for (size_t i = 0; i < std::size(kScorers); ++i) {
    if (static_cast<size_t>(kScorers[i].kind) != i) return false;
  }
  for (size_t i = 0; i < std::size(kAllocators); ++i) {
    if (static_cast<size_t>(kAllocators[i].kind) != i) return false;
  }
  return true;
}
static_assert(RowsInOrder(), "registry rows must follow their enumerators");

template <typename Row>
std::string Names(std::span<const Row> rows, absl::string_view separator) {
  std::string out;
  for (const Row& r : rows) absl::StrAppend(&out, out.empty() ? "" : separator, r.name);
  return out;
}

template <typename Kind, typename Row>
absl::StatusOr<Kind> Parse(std::span<const Row> rows, absl::string_view name,
                           absl::string_view field) {
  for (const Row& r : rows) {
    if (r.name == name) return r.kind;
  }
  if (name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " is empty; expected one of: ", Names(rows, ", ")));
  }
  if (name.size() > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " is ", name.size(), " bytes long; names have 64 at most"));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, " \"", name, "\" is unknown; expected one of: ", Names(rows, ", ")));
}

}  // namespace

std::span<const ScorerPolicy> ScorerPolicies() { return kScorers; }
std::span<const AllocatorPolicy> AllocatorPolicies() { return kAllocators; }

const ScorerPolicy& PolicyOf(ScorerKind kind) {
  const size_t i = static_cast<size_t>(kind);
  REASONALLOC_DCHECK(i < std::size(kScorers));
  return kScorers[std::min(i, std::size(kScorers) - 1)];
}

const AllocatorPolicy& PolicyOf(AllocatorKind kind) {
  const size_t i = static_cast<size_t>(kind);
  REASONALLOC_DCHECK(i < std::size(kAllocators));
  return kAllocators[std::min(i, std::size(kAllocators) - 1)];
}

const Allocator& AllocatorOf(AllocatorKind kind) {
  static const auto* const instances = [] {
    auto* a = new std::array<std::unique_ptr<Allocator>, std::size(kAllocators)>();
    for (size_t i = 0; i < std::size(kAllocators); ++i) (*a)[i] = kAllocators[i].make();
    return a;
  }();
  return *(*instances)[static_cast<size_t>(PolicyOf(kind).kind)];
}

absl::StatusOr<ScorerKind> ParseScorer(absl::string_view name, absl::string_view field) {
  return Parse<ScorerKind>(ScorerPolicies(), name, field);
}

absl::StatusOr<AllocatorKind> ParseAllocator(absl::string_view name, absl::string_view field) {
  return Parse<AllocatorKind>(AllocatorPolicies(), name, field);
}

absl::StatusOr<ReasonAllocMode> ParseReasonAllocMode(absl::string_view name,
                                                     absl::string_view field) {
  for (ReasonAllocMode m : {ReasonAllocMode::kFull, ReasonAllocMode::kLayer, ReasonAllocMode::kHead,
                            ReasonAllocMode::kOff, ReasonAllocMode::kStatic}) {
    if (NameOf(m) == name) return m;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      field, " \"", name.substr(0, 64), "\" is not one of full, layer, head, off, static"));
}

absl::string_view NameOf(ReasonAllocMode mode) {
  switch (mode) {
    case ReasonAllocMode::kFull:
      return "full";
    case ReasonAllocMode::kLayer:
      return "layer";
    case ReasonAllocMode::kHead:
      return "head";
    case ReasonAllocMode::kOff:
      return "off";
    case ReasonAllocMode::kStatic:
      return "static";
  }
  return "full";
}

std::string ScorerNames(absl::string_view separator) { return Names(ScorerPolicies(), separator); }

std::string AllocatorNames(absl::string_view separator) {
  return Names(AllocatorPolicies(), separator);
}

}  // namespace reasonalloc
