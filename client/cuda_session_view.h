// The worker's side of a managed MEMORY_KIND_CUDA_IPC session: imports the session's CUDA arenas
// (cudaIpcOpenMemHandle on the device the descriptors name) and writes decode steps into them the
// way layout version 1 expects, the CUDA counterpart of SessionView. Elements are raw model-dtype
// values; the host-side arguments are copied to the device.
//
// The result block (len, offset, capacity, budget, keep_mask, epoch) is read into a host copy by
// Refresh(); call it after each Compress. Destroy the view (closing the mappings) before
// CloseSession: CUDA keeps an imported allocation alive until the importer closes it.
// Not thread-safe; the sidecar rewrites the arenas during Compress.
#ifndef REASONALLOC_CLIENT_CUDA_SESSION_VIEW_H_
#define REASONALLOC_CLIENT_CUDA_SESSION_VIEW_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "gpu/cuda_arena.h"
#include "reasonalloc/v1/sidecar.pb.h"

namespace reasonalloc {

class CudaSessionView {
 public:
  static absl::StatusOr<std::unique_ptr<CudaSessionView>> Map(const v1::SessionInfo& info);

  int num_layers() const { return layers_; }
  int num_kv_heads() const { return hkv_; }
  int num_q_heads() const { return hq_; }
  int head_dim() const { return d_; }
  int window() const { return window_; }

  // Reads the result block (after CreateSession and after every Compress).
  absl::Status Refresh();
  int32_t length(int layer, int kv_head) const { return len_[Head(layer, kv_head)]; }
  int32_t capacity(int layer, int kv_head) const { return capacity_[Head(layer, kv_head)]; }
  int32_t budget(int layer, int kv_head) const { return budget_[Head(layer, kv_head)]; }
  bool kept(int layer, int kv_head, int position) const;
  uint64_t epoch() const { return epoch_; }

  // One decode step from host memory: keys and values [L, Hkv, d], queries [L, Hq, d]; then len +1
  // per head. FAILED_PRECONDITION (nothing written) when a head is full.
  absl::Status Append(int64_t step, const void* keys, const void* values, const void* queries);
  // Row `row` of a head's K or V (row < its length), copied to `out` (row_bytes()).
  absl::Status ReadKeyRow(int layer, int kv_head, int row, void* out) const;
  absl::Status ReadValueRow(int layer, int kv_head, int row, void* out) const;
  int64_t row_bytes() const { return row_; }

 private:
  CudaSessionView() = default;
  size_t Head(int layer, int kv_head) const {
    return static_cast<size_t>(int64_t{layer} * hkv_ + kv_head);
  }
  uint64_t Array(const v1::ArenaDescriptor& d, const char* name) const;

  std::unique_ptr<gpu::CudaArenaMapping> kv_, ring_, result_;
  int layers_ = 0, hkv_ = 0, hq_ = 0, d_ = 0, window_ = 0, words_ = 0;
  int64_t row_ = 0;
  uint64_t k_ = 0, v_ = 0, q_ = 0;  // byte offsets inside kv_ / ring_
  uint64_t len_at_ = 0, offset_at_ = 0, capacity_at_ = 0, budget_at_ = 0, mask_at_ = 0,
           epoch_at_ = 0;
  std::vector<int32_t> len_, capacity_, budget_;
  std::vector<int64_t> offset_;
  std::vector<uint64_t> mask_;
  uint64_t epoch_ = 0;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_CLIENT_CUDA_SESSION_VIEW_H_
