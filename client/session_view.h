// Typed access to a managed MEMORY_KIND_HOST_SHM session's arenas (layout version 1): per layer and
// kv head, its K/V rows, live length, budget and keep bits; per query head, its ring slot. Append
// writes one decode step the way the layout expects (K and V at offset + len, len + 1, the queries
// in slot step mod α). Elements are raw model-dtype values (uint16_t bits for fp16 and bf16).
//
// Not thread-safe; the sidecar reads and rewrites the arenas during Compress, so the worker touches
// them only between calls.
#ifndef REASONALLOC_CLIENT_SESSION_VIEW_H_
#define REASONALLOC_CLIENT_SESSION_VIEW_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "client/mapped_arena.h"
#include "reasonalloc/v1/sidecar.pb.h"

namespace reasonalloc {

class SessionView {
 public:
  // Maps the arenas SessionInfo describes (CreateSession's or GetSession's answer).
  static absl::StatusOr<std::unique_ptr<SessionView>> Map(const v1::SessionInfo& info);

  int num_layers() const { return layers_; }
  int num_kv_heads() const { return hkv_; }
  int num_q_heads() const { return hq_; }
  int head_dim() const { return d_; }
  int window() const { return window_; }

  // Head (layer, kv_head): live rows, region, budget after the last event, keep bit of pre-event
  // position j at the last event.
  int32_t length(int layer, int kv_head) const { return len_[Head(layer, kv_head)]; }
  int32_t capacity(int layer, int kv_head) const { return capacity_[Head(layer, kv_head)]; }
  int32_t budget(int layer, int kv_head) const { return budget_[Head(layer, kv_head)]; }
  bool kept(int layer, int kv_head, int position) const;
  // Completed events; read with acquire order, so the rest of the result block is current.
  uint64_t epoch() const;

  // Row `row` (0-based within the head) of K / V; `row` < capacity.
  template <typename T>
  T* key_row(int layer, int kv_head, int row) const {
    return reinterpret_cast<T*>(k_ + RowByte(layer, kv_head, row));
  }
  template <typename T>
  T* value_row(int layer, int kv_head, int row) const {
    return reinterpret_cast<T*>(v_ + RowByte(layer, kv_head, row));
  }
  // The ring slot holding the query of decode step `step` for query head (layer, q_head).
  template <typename T>
  T* query_slot(int layer, int q_head, int64_t step) const {
    const int64_t slot = ((step % window_) + window_) % window_;
    return reinterpret_cast<T*>(q_ + ((int64_t{layer} * hq_ + q_head) * window_ + slot) * row_);
  }

  // One decode step: keys and values [L, Hkv, d], queries [L, Hq, d], all in the model dtype.
  // FAILED_PRECONDITION (nothing written) when a head is full: Compress first.
  absl::Status Append(int64_t step, const void* keys, const void* values, const void* queries);

 private:
  SessionView() = default;
  size_t Head(int layer, int kv_head) const {
    return static_cast<size_t>(int64_t{layer} * hkv_ + kv_head);
  }
  int64_t RowByte(int layer, int kv_head, int row) const {
    return (offset_[Head(layer, kv_head)] + row) * row_;
  }

  std::unique_ptr<MappedArena> kv_, ring_, result_;
  int layers_ = 0, hkv_ = 0, hq_ = 0, d_ = 0, window_ = 0, words_ = 0;
  int64_t row_ = 0;  // bytes per row
  unsigned char *k_ = nullptr, *v_ = nullptr, *q_ = nullptr;
  int32_t* len_ = nullptr;
  const int64_t* offset_ = nullptr;
  const int32_t* capacity_ = nullptr;
  const int32_t* budget_ = nullptr;
  const uint64_t* mask_ = nullptr;
  const uint64_t* epoch_ = nullptr;
};

}  // namespace reasonalloc

#endif  // REASONALLOC_CLIENT_SESSION_VIEW_H_
