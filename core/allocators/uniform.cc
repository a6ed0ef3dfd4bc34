// Uniform (docs/algorithms.md §3.1): every head of every layer keeps budget.budget tokens.
#include "core/allocators/allocators.h"

namespace reasonalloc {
namespace {

// Allocator's defaults are uniform: B per layer, no head routing.
class UniformAllocator final : public Allocator {};

}  // namespace

std::unique_ptr<Allocator> MakeUniformAllocator() { return std::make_unique<UniformAllocator>(); }

}  // namespace reasonalloc
