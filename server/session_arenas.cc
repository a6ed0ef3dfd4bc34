#include "server/session_arenas.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/proto_convert.h"

namespace reasonalloc {
namespace {

v1::DType ArrayDType(ArrayType t, DType model) {
  switch (t) {
    case ArrayType::kModel:
      return DTypeToProto(model);
    case ArrayType::kInt32:
      return v1::DTYPE_INT32;
    case ArrayType::kInt64:
      return v1::DTYPE_INT64;
    case ArrayType::kUint64:
      return v1::DTYPE_UINT64;
    case ArrayType::kFloat32:
      return v1::DTYPE_FLOAT32;
  }
  return v1::DTYPE_UNSPECIFIED;
}

}  // namespace

SessionArenas::SessionArenas(const SessionConfig& config)
    : config_(config), layout_(MakeSessionLayout(config)) {}

absl::StatusOr<std::unique_ptr<SessionArenas>> SessionArenas::Create(const SessionConfig& config) {
  std::unique_ptr<SessionArenas> a(new SessionArenas(config));
  for (auto [arena, layout] :
       {std::pair{&a->kv_, &a->layout_.kv}, std::pair{&a->ring_, &a->layout_.query_ring},
        std::pair{&a->result_, &a->layout_.result}, std::pair{&a->h2o_, &a->layout_.h2o_acc}}) {
    if (!config.managed && arena != &a->result_) continue;
    if (layout->bytes == 0) continue;
    auto created = HostArena::Create(layout->bytes);
    if (!created.ok()) return created.status();
    *arena = std::move(created).value();
  }
  const int64_t heads = config.model.num_heads_total();
  const std::vector<int32_t> budgets(static_cast<size_t>(heads), config.budget.budget);
  HeadRegions(budgets, config.budget.buffer, &a->offsets_, &a->capacities_);
  if (config.managed) std::copy(a->offsets_.begin(), a->offsets_.end(), a->Int64("offset"));
  std::copy(a->capacities_.begin(), a->capacities_.end(), a->Int32("capacity"));
  std::copy(budgets.begin(), budgets.end(), a->Int32("budget"));
  return a;
}

uint64_t SessionArenas::bytes() const {
  return (advisory() ? 0 : layout_.kv.bytes + layout_.query_ring.bytes + layout_.h2o_acc.bytes) +
         layout_.result.bytes;
}

int32_t* SessionArenas::Int32(const char* name) const {
  return reinterpret_cast<int32_t*>(result_->data() + layout_.result.Get(name).byte_offset);
}
int64_t* SessionArenas::Int64(const char* name) const {
  return reinterpret_cast<int64_t*>(result_->data() + layout_.result.Get(name).byte_offset);
}
uint64_t* SessionArenas::Uint64(const char* name) const {
  return reinterpret_cast<uint64_t*>(result_->data() + layout_.result.Get(name).byte_offset);
}

void DescribeArena(const Arena& arena, const ArenaLayout& layout, DType model_dtype,
                   google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>* out) {
  v1::ArenaDescriptor* d = out->Add();
  d->set_kind(layout.kind);
  arena.DescribeMemory(d);
  d->set_layout_version(kLayoutVersion);
  for (const ArrayLayout& a : layout.arrays) {
    v1::ArrayDescriptor* ad = d->add_arrays();
    ad->set_name(a.name);
    ad->set_dtype(ArrayDType(a.type, model_dtype));
    int64_t stride = 1;
    std::vector<int64_t> strides(a.shape.size());
    for (size_t i = a.shape.size(); i-- > 0;) {
      strides[i] = stride;
      stride *= a.shape[i];
    }
    for (size_t i = 0; i < a.shape.size(); ++i) {
      ad->add_shape(a.shape[i]);
      ad->add_strides(strides[i]);
    }
    ad->set_byte_offset(a.byte_offset);
    ad->set_byte_length(a.byte_length);
  }
}

void SessionArenas::Describe(google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>* out) const {
  for (auto [arena, layout] :
       {std::pair{kv_.get(), &layout_.kv}, std::pair{ring_.get(), &layout_.query_ring},
        std::pair{result_.get(), &layout_.result}, std::pair{h2o_.get(), &layout_.h2o_acc}}) {
    if (arena != nullptr) DescribeArena(*arena, *layout, config_.model.dtype, out);
  }
}

absl::StatusOr<ArenaInputs> SessionArenas::Read(int64_t step, uint64_t max_bytes) {
  const ModelGeometry& m = config_.model;
  const int64_t heads = m.num_heads_total();
  const int window = config_.budget.window;
  const int d = m.head_dim;
  ArenaInputs in;
  in.lengths.resize(static_cast<size_t>(heads));
  // One read of what the worker wrote; it is checked, then only the copy is used.
  std::memcpy(in.lengths.data(), Int32("len"), static_cast<size_t>(heads) * sizeof(int32_t));
  if (advisory() && external_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("this advisory ", MemoryKindName(MemoryKind::kHostShm),
                     " session has no buffers yet: call RegisterBuffers with the worker's keys and "
                     "query_window first"));
  }
  for (int64_t i = 0; i < heads; ++i) {
    const int32_t n = in.lengths[static_cast<size_t>(i)];
    const int32_t cap = capacities_[static_cast<size_t>(i)];
    if (advisory() && n > external_->key_rows()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "result arena \"len\"[", i, "] = ", n,
          " is more rows than the registered keys hold (N = ", external_->key_rows(), ")"));
    }
    if (auto s = CheckHeadLength(config_, i, n, cap); !s.ok()) return s;
    in.n_max = std::max<int64_t>(in.n_max, n);
  }
  const uint64_t copy_bytes = static_cast<uint64_t>(heads) * static_cast<uint64_t>(in.n_max) *
                              static_cast<uint64_t>(d) * sizeof(float);
  if (max_bytes > 0 && copy_bytes > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("result arena \"len\": the longest head holds ", in.n_max,
                     " rows; their fp32 copy for ", heads, " heads of d ", d, " is ", copy_bytes,
                     " bytes, above the server's --max_event_bytes ", max_bytes,
                     "; compress before heads grow this long"));
  }
  if (keys_.size() < static_cast<size_t>(heads * in.n_max * d)) {
    keys_.resize(static_cast<size_t>(heads * in.n_max * d));
  }
  in.keys = keys_.data();
  if (advisory()) {
    queries_.resize(static_cast<size_t>(m.num_layers) * m.num_q_heads * window * d);
    in.query_window = queries_.data();
    for (int64_t i = 0; i < heads; ++i) {
      if (auto s = external_->ReadKeys(
              static_cast<int>(i / m.num_kv_heads), static_cast<int>(i % m.num_kv_heads),
              in.lengths[static_cast<size_t>(i)], keys_.data() + i * in.n_max * d);
          !s.ok()) {
        return s;
      }
    }
    if (auto s = external_->ReadQueries(step, queries_.data()); !s.ok()) return s;
    return in;
  }
  if (auto s = GatherLiveRows(m.dtype, kv_->data() + layout_.kv.Get("k").byte_offset, d,
                              m.num_kv_heads, offsets_, in.lengths, in.n_max, keys_.data());
      !s.ok()) {
    return s;
  }
  if (h2o_ != nullptr) {
    auto* present =
        reinterpret_cast<uint64_t*>(h2o_->data() + layout_.h2o_acc.Get("present").byte_offset);
    if (std::atomic_ref<uint64_t>(*present).load(std::memory_order_acquire) != 0) {
      const auto* acc = reinterpret_cast<const float*>(
          h2o_->data() + layout_.h2o_acc.Get("attention").byte_offset);
      in.attention.assign(static_cast<size_t>(heads * in.n_max), 0.0f);
      for (int64_t i = 0; i < heads; ++i) {
        std::memcpy(in.attention.data() + i * in.n_max, acc + offsets_[static_cast<size_t>(i)],
                    static_cast<size_t>(in.lengths[static_cast<size_t>(i)]) * sizeof(float));
      }
    }
  }
  // Query ring, rotated so that the oldest of the window comes first.
  const size_t item = DTypeSize(m.dtype);
  const unsigned char* ring = ring_->data() + layout_.query_ring.Get("q").byte_offset;
  queries_.resize(static_cast<size_t>(m.num_layers) * m.num_q_heads * window * d);
  in.query_window = queries_.data();
  for (int64_t lq = 0; lq < int64_t{m.num_layers} * m.num_q_heads; ++lq) {
    for (int a = 0; a < window; ++a) {
      const int64_t s = step - window + 1 + a;
      const int64_t slot = ((s % window) + window) % window;
      const int64_t bad =
          ConvertToFloat32(m.dtype, ring + static_cast<size_t>((lq * window + slot) * d) * item, d,
                           queries_.data() + (lq * window + a) * d);
      if (bad >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("query_ring arena \"q\": layer ", lq / m.num_q_heads, ", query head ",
                         lq % m.num_q_heads, ", slot ", slot, " holds NaN or Inf"));
      }
    }
  }
  return in;
}

absl::Status CheckHeadLength(const SessionConfig& config, int64_t head, int32_t n,
                             int32_t capacity) {
  if (n >= 0 && n <= capacity) return absl::OkStatus();
  const int hkv = config.model.num_kv_heads;
  return absl::InvalidArgumentError(absl::StrCat(
      "result arena \"len\"[", head, "] (layer ", head / hkv, ", kv head ", head % hkv, ") = ", n,
      " is outside [0, capacity ", capacity,
      "]; a head may grow by at most buffer = ", config.budget.buffer, " tokens between events"));
}

absl::Status CheckRegionsFit(const Decision& decision, int buffer, const SessionLayout& layout) {
  int64_t rows = 0;
  for (size_t i = 0; i < decision.budgets.size(); ++i) {
    const int64_t cap = int64_t{decision.budgets[i]} + buffer;
    if (cap > int64_t{layout.words} * 64 || decision.kept_lengths[i] > decision.budgets[i]) {
      return absl::InternalError(absl::StrCat("head ", i, ": budget ", decision.budgets[i],
                                              " does not fit the arena layout"));
    }
    rows += cap;
  }
  if (rows > layout.rows) {
    return absl::InternalError(
        absl::StrCat("head regions need ", rows, " rows; the kv arena has ", layout.rows));
  }
  return absl::OkStatus();
}

std::vector<uint64_t> ResultKeepMask(const Decision& decision, int words) {
  const size_t heads = decision.kept_lengths.size();
  std::vector<uint64_t> mask(heads * static_cast<size_t>(words), 0);
  for (size_t i = 0; i < heads; ++i) {
    uint64_t* w = mask.data() + i * static_cast<size_t>(words);
    for (int32_t j : decision.Kept(static_cast<int64_t>(i))) w[j / 64] |= uint64_t{1} << (j % 64);
  }
  return mask;
}

absl::Status SessionArenas::CheckFits(const Decision& decision) const {
  return CheckRegionsFit(decision, config_.budget.buffer, layout_);
}

absl::Status SessionArenas::Compact(const Decision& decision) {
  const size_t row_bytes =
      DTypeSize(config_.model.dtype) * static_cast<size_t>(config_.model.head_dim);
  unsigned char* kv = advisory() ? nullptr : kv_->data();
  return CompactIntoRegions(
      decision, config_.budget.buffer, row_bytes, advisory() ? nullptr : &compactor_,
      kv == nullptr ? nullptr : kv + layout_.kv.Get("k").byte_offset,
      kv == nullptr ? nullptr : kv + layout_.kv.Get("v").byte_offset, &offsets_, &capacities_);
}

void SessionArenas::Publish(const Decision& decision, uint64_t epoch) {
  std::copy(decision.kept_lengths.begin(), decision.kept_lengths.end(), Int32("len"));
  if (!advisory()) std::copy(offsets_.begin(), offsets_.end(), Int64("offset"));
  std::copy(capacities_.begin(), capacities_.end(), Int32("capacity"));
  std::copy(decision.budgets.begin(), decision.budgets.end(), Int32("budget"));
  if (h2o_ != nullptr) {  // consumed: the next event's attention starts from zero
    auto* acc =
        reinterpret_cast<float*>(h2o_->data() + layout_.h2o_acc.Get("attention").byte_offset);
    std::fill(acc, acc + layout_.rows, 0.0f);
    std::atomic_ref<uint64_t>(
        *reinterpret_cast<uint64_t*>(h2o_->data() + layout_.h2o_acc.Get("present").byte_offset))
        .store(0, std::memory_order_relaxed);
  }
  const std::vector<uint64_t> mask = ResultKeepMask(decision, layout_.words);
  std::copy(mask.begin(), mask.end(), Uint64("keep_mask"));
  std::atomic_ref<uint64_t>(*Uint64("epoch")).store(epoch, std::memory_order_release);
}

unsigned char* SessionArenas::DataForTest(const std::string& kind) const {
  const HostArena* arena = kind == "kv"           ? kv_.get()
                           : kind == "query_ring" ? ring_.get()
                           : kind == "result"     ? result_.get()
                           : kind == "h2o_acc"    ? h2o_.get()
                                                  : nullptr;
  return arena == nullptr ? nullptr : arena->data();
}

}  // namespace reasonalloc
