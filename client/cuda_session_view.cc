#include "client/cuda_session_view.h"

#include "absl/strings/str_cat.h"

namespace reasonalloc {

uint64_t CudaSessionView::Array(const v1::ArenaDescriptor& d, const char* name) const {
  for (const auto& a : d.arrays()) {
    if (a.name() == name) return a.byte_offset();
  }
  return UINT64_MAX;
}

absl::StatusOr<std::unique_ptr<CudaSessionView>> CudaSessionView::Map(const v1::SessionInfo& info) {
  if (info.memory() != v1::MEMORY_KIND_CUDA_IPC || info.mode() != v1::SESSION_MODE_MANAGED) {
    return absl::InvalidArgumentError("CudaSessionView maps managed MEMORY_KIND_CUDA_IPC sessions");
  }
  std::unique_ptr<CudaSessionView> v(new CudaSessionView());
  for (const auto& d : info.arenas()) {
    std::unique_ptr<gpu::CudaArenaMapping>* slot = d.kind() == "kv"           ? &v->kv_
                                                   : d.kind() == "query_ring" ? &v->ring_
                                                   : d.kind() == "result"     ? &v->result_
                                                                              : nullptr;
    if (slot == nullptr) continue;
    if (d.layout_version() != 1) {
      return absl::FailedPreconditionError(
          absl::StrCat("arena \"", d.kind(), "\" has layout version ", d.layout_version(),
                       "; this client reads version 1"));
    }
    auto m = gpu::CudaArenaMapping::Open(d.cuda_ipc_handle(), d.cuda_byte_offset(), d.device_uuid(),
                                         d.byte_length());
    if (!m.ok()) return m.status();
    *slot = std::move(m).value();
    if (d.kind() == "kv") {
      v->k_ = v->Array(d, "k");
      v->v_ = v->Array(d, "v");
    } else if (d.kind() == "query_ring") {
      v->q_ = v->Array(d, "q");
    } else {
      v->len_at_ = v->Array(d, "len");
      v->offset_at_ = v->Array(d, "offset");
      v->capacity_at_ = v->Array(d, "capacity");
      v->budget_at_ = v->Array(d, "budget");
      v->mask_at_ = v->Array(d, "keep_mask");
      v->epoch_at_ = v->Array(d, "epoch");
      for (const auto& a : d.arrays()) {
        if (a.name() == "keep_mask" && a.shape_size() == 2)
          v->words_ = static_cast<int>(a.shape(1));
      }
    }
  }
  if (!v->kv_ || !v->ring_ || !v->result_) {
    return absl::InvalidArgumentError("SessionInfo lacks the kv, query_ring or result arena");
  }
  for (uint64_t at : {v->k_, v->v_, v->q_, v->len_at_, v->offset_at_, v->capacity_at_,
                      v->budget_at_, v->mask_at_, v->epoch_at_}) {
    if (at == UINT64_MAX) return absl::InvalidArgumentError("the arenas lack an array of layout 1");
  }
  if (v->words_ == 0)
    return absl::InvalidArgumentError("the result arena's keep_mask has no words");
  const auto& m = info.model();
  v->layers_ = m.num_layers();
  v->hkv_ = m.num_kv_heads();
  v->hq_ = m.num_q_heads();
  v->d_ = m.head_dim();
  v->window_ = info.budget().window();
  v->row_ = int64_t{m.head_dim()} * (m.dtype() == v1::DTYPE_FLOAT32 ? 4 : 2);
  if (auto s = v->Refresh(); !s.ok()) return s;
  return v;
}

absl::Status CudaSessionView::Refresh() {
  const size_t heads = static_cast<size_t>(layers_) * static_cast<size_t>(hkv_);
  len_.resize(heads);
  offset_.resize(heads);
  capacity_.resize(heads);
  budget_.resize(heads);
  mask_.resize(heads * static_cast<size_t>(words_));
  for (auto [at, dst, bytes] :
       {std::tuple<uint64_t, void*, size_t>{len_at_, len_.data(), heads * sizeof(int32_t)},
        {offset_at_, offset_.data(), heads * sizeof(int64_t)},
        {capacity_at_, capacity_.data(), heads * sizeof(int32_t)},
        {budget_at_, budget_.data(), heads * sizeof(int32_t)},
        {mask_at_, mask_.data(), mask_.size() * sizeof(uint64_t)},
        {epoch_at_, &epoch_, sizeof(epoch_)}}) {
    if (auto s = result_->CopyToHost(at, dst, bytes); !s.ok()) return s;
  }
  return absl::OkStatus();
}

bool CudaSessionView::kept(int layer, int kv_head, int position) const {
  if (position < 0 || position >= words_ * 64) return false;
  const uint64_t w = mask_[Head(layer, kv_head) * static_cast<size_t>(words_) +
                           static_cast<size_t>(position / 64)];
  return (w >> (position % 64)) & 1;
}

absl::Status CudaSessionView::Append(int64_t step, const void* keys, const void* values,
                                     const void* queries) {
  for (int l = 0; l < layers_; ++l) {
    for (int h = 0; h < hkv_; ++h) {
      if (length(l, h) >= capacity(l, h)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "layer ", l, ", kv head ", h, " is full (", capacity(l, h), " rows): call Compress"));
      }
    }
  }
  const auto* k = static_cast<const unsigned char*>(keys);
  const auto* v = static_cast<const unsigned char*>(values);
  const auto* q = static_cast<const unsigned char*>(queries);
  const int64_t slot = ((step % window_) + window_) % window_;
  std::vector<int32_t> len = len_;  // committed to len_ once the device holds it
  for (int l = 0; l < layers_; ++l) {
    for (int h = 0; h < hkv_; ++h) {
      const size_t i = Head(l, h);
      const uint64_t row = static_cast<uint64_t>((offset_[i] + len[i]) * row_);
      const size_t src = i * static_cast<size_t>(row_);
      if (auto s = kv_->CopyFromHost(k_ + row, k + src, static_cast<uint64_t>(row_)); !s.ok()) {
        return s;
      }
      if (auto s = kv_->CopyFromHost(v_ + row, v + src, static_cast<uint64_t>(row_)); !s.ok()) {
        return s;
      }
      ++len[i];
    }
    for (int h = 0; h < hq_; ++h) {
      const int64_t lq = int64_t{l} * hq_ + h;
      if (auto s =
              ring_->CopyFromHost(q_ + static_cast<uint64_t>((lq * window_ + slot) * row_),
                                  q + static_cast<size_t>(lq * row_), static_cast<uint64_t>(row_));
          !s.ok()) {
        return s;
      }
    }
  }
  if (auto s = result_->CopyFromHost(len_at_, len.data(), len.size() * sizeof(int32_t)); !s.ok()) {
    return s;
  }
  len_ = std::move(len);
  return absl::OkStatus();
}

absl::Status CudaSessionView::ReadKeyRow(int layer, int kv_head, int row, void* out) const {
  const size_t i = Head(layer, kv_head);
  if (row < 0 || row >= len_[i]) return absl::OutOfRangeError("row outside the head's length");
  return kv_->CopyToHost(k_ + static_cast<uint64_t>((offset_[i] + row) * row_), out,
                         static_cast<uint64_t>(row_));
}

absl::Status CudaSessionView::ReadValueRow(int layer, int kv_head, int row, void* out) const {
  const size_t i = Head(layer, kv_head);
  if (row < 0 || row >= len_[i]) return absl::OutOfRangeError("row outside the head's length");
  return kv_->CopyToHost(v_ + static_cast<uint64_t>((offset_[i] + row) * row_), out,
                         static_cast<uint64_t>(row_));
}

}  // namespace reasonalloc
