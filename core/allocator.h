// Allocators decide how many tokens each (layer, KV head) keeps at a compression event
// (ALGORITHMS.md §3).
//
// Invariant: every budget is at least window + 1, and Σ budgets = L·Hkv·B exactly (heads that hold
// fewer tokens than their budget simply keep everything).
#ifndef REASONALLOC_CORE_ALLOCATOR_H_
#define REASONALLOC_CORE_ALLOCATOR_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/session_config.h"

namespace reasonalloc {

struct AllocationInputs {
  const SessionConfig* config = nullptr;
  std::span<const int32_t> lengths;            // [L * Hkv] live tokens per head
  std::span<const std::vector<float>> scores;  // [L * Hkv] candidate scores per head
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  // Fills `budgets` ([L * Hkv]).
  virtual absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const = 0;
};

absl::StatusOr<std::unique_ptr<Allocator>> MakeAllocator(const AllocatorConfig& config);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_ALLOCATOR_H_
