// The allocators, one file each; core/policy.cc lists them.
#ifndef REASONALLOC_CORE_ALLOCATORS_ALLOCATORS_H_
#define REASONALLOC_CORE_ALLOCATORS_ALLOCATORS_H_

#include <memory>

#include "core/allocator.h"

namespace reasonalloc {

std::unique_ptr<Allocator> MakeUniformAllocator();
std::unique_ptr<Allocator> MakePyramidAllocator();
std::unique_ptr<Allocator> MakeAdaKvAllocator();
std::unique_ptr<Allocator> MakeReasonAllocAllocator();

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_ALLOCATORS_ALLOCATORS_H_
