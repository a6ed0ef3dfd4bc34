#include "client/session_view.h"

#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace reasonalloc {

absl::StatusOr<std::unique_ptr<SessionView>> SessionView::Map(const v1::SessionInfo& info) {
  if (info.memory() != v1::MEMORY_KIND_HOST_SHM || info.mode() != v1::SESSION_MODE_MANAGED) {
    return absl::InvalidArgumentError(
        "SessionView maps managed MEMORY_KIND_HOST_SHM sessions (advisory sessions map their "
        "result arena with MappedArena)");
  }
  std::unique_ptr<SessionView> v(new SessionView());
  for (const auto& d : info.arenas()) {
    std::unique_ptr<MappedArena>* slot = d.kind() == "kv"           ? &v->kv_
                                         : d.kind() == "query_ring" ? &v->ring_
                                         : d.kind() == "result"     ? &v->result_
                                                                    : nullptr;
    if (slot == nullptr) continue;  // e.g. h2o_acc: MappedArena
    auto m = MappedArena::Map(d);
    if (!m.ok()) return m.status();
    *slot = std::move(m).value();
  }
  if (!v->kv_ || !v->ring_ || !v->result_) {
    return absl::InvalidArgumentError("SessionInfo lacks the kv, query_ring or result arena");
  }
  const auto& m = info.model();
  v->layers_ = m.num_layers();
  v->hkv_ = m.num_kv_heads();
  v->hq_ = m.num_q_heads();
  v->d_ = m.head_dim();
  v->window_ = info.budget().window();
  v->row_ = int64_t{m.head_dim()} * (m.dtype() == v1::DTYPE_FLOAT32 ? 4 : 2);
  v->k_ = v->kv_->As<unsigned char>("k");
  v->v_ = v->kv_->As<unsigned char>("v");
  v->q_ = v->ring_->As<unsigned char>("q");
  v->len_ = v->result_->As<int32_t>("len");
  v->offset_ = v->result_->As<int64_t>("offset");
  v->capacity_ = v->result_->As<int32_t>("capacity");
  v->budget_ = v->result_->As<int32_t>("budget");
  v->mask_ = v->result_->As<uint64_t>("keep_mask");
  v->epoch_ = v->result_->As<uint64_t>("epoch");
  for (const auto& a : v->result_->descriptor().arrays()) {
    if (a.name() == "keep_mask" && a.shape_size() == 2) v->words_ = static_cast<int>(a.shape(1));
  }
  if (!v->k_ || !v->v_ || !v->q_ || !v->len_ || !v->offset_ || !v->capacity_ || !v->budget_ ||
      !v->mask_ || !v->epoch_ || v->words_ == 0) {
    return absl::InvalidArgumentError("the arenas lack an array of layout version 1");
  }
  return v;
}

bool SessionView::kept(int layer, int kv_head, int position) const {
  if (position < 0 || position >= words_ * 64) return false;
  const uint64_t w = mask_[Head(layer, kv_head) * static_cast<size_t>(words_) +
                           static_cast<size_t>(position / 64)];
  return (w >> (position % 64)) & 1;
}

uint64_t SessionView::epoch() const {
  return std::atomic_ref<const uint64_t>(*epoch_).load(std::memory_order_acquire);
}

absl::Status SessionView::Append(int64_t step, const void* keys, const void* values,
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
  for (int l = 0; l < layers_; ++l) {
    for (int h = 0; h < hkv_; ++h) {
      const int64_t src = (int64_t{l} * hkv_ + h) * row_;
      const int32_t row = length(l, h);
      std::memcpy(key_row<unsigned char>(l, h, row), k + src, static_cast<size_t>(row_));
      std::memcpy(value_row<unsigned char>(l, h, row), v + src, static_cast<size_t>(row_));
      ++len_[Head(l, h)];
    }
    for (int g = 0; g < hq_; ++g) {
      std::memcpy(query_slot<unsigned char>(l, g, step), q + (int64_t{l} * hq_ + g) * row_,
                  static_cast<size_t>(row_));
    }
  }
  return absl::OkStatus();
}

}  // namespace reasonalloc
