// CUDA runtime errors as absl::Status, for the sources of gpu/ (includes CUDA headers: gpu/ only).
#ifndef REASONALLOC_GPU_CUDA_STATUS_H_
#define REASONALLOC_GPU_CUDA_STATUS_H_

#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace reasonalloc::gpu {

// OK for cudaSuccess; otherwise clears the runtime's (non-sticky) last error, so that the thread's
// next launch does not report it, and maps the error: out of memory to RESOURCE_EXHAUSTED, no
// device or driver to FAILED_PRECONDITION, anything else to INTERNAL.
inline absl::Status CudaStatus(const char* what, cudaError_t err) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  const std::string msg = absl::StrCat(what, ": ", cudaGetErrorString(err));
  if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
      err == cudaErrorInvalidDevice) {
    return absl::FailedPreconditionError(msg);
  }
  return absl::InternalError(msg);
}

}  // namespace reasonalloc::gpu

#endif  // REASONALLOC_GPU_CUDA_STATUS_H_
