#include "core/allocator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace reasonalloc {
namespace {

// Every (layer, head) keeps B (R-KV, SnapKV).
class UniformAllocator final : public Allocator {
 public:
  absl::Status Allocate(const AllocationInputs& in, std::span<int32_t> budgets) const override {
    std::fill(budgets.begin(), budgets.end(), in.config->budget.budget);
    return absl::OkStatus();
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Allocator>> MakeAllocator(const AllocatorConfig& config) {
  if (config.name == "uniform") return std::make_unique<UniformAllocator>();
  return absl::UnimplementedError(
      absl::StrCat("allocator.name \"", config.name, "\" is not implemented in this build yet"));
}

}  // namespace reasonalloc
