#include "server/cuda_session_arenas.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "server/proto_convert.h"
#include "server/session_arenas.h"

namespace reasonalloc {

CudaSessionArenas::CudaSessionArenas(const SessionConfig& config,
                                     std::shared_ptr<gpu::GpuEngine> engine)
    : config_(config), layout_(MakeSessionLayout(config)), engine_(std::move(engine)) {}

absl::StatusOr<std::unique_ptr<CudaSessionArenas>> CudaSessionArenas::Create(
    const SessionConfig& config, std::shared_ptr<gpu::GpuEngine> engine) {
  if (!config.managed) {
    return absl::UnimplementedError(absl::StrCat(
        "mode = ", SessionModeName(false), " with memory = ", MemoryKindName(MemoryKind::kCudaIpc),
        " is not implemented in this build yet; use a managed session"));
  }
  if ((PolicyOf(config.scorer.kind).managed_planes & kCudaIpcPlane) == 0) {
    return absl::UnimplementedError(absl::StrCat(
        "scorer.name \"", NameOf(config.scorer.kind), "\" with memory = ",
        MemoryKindName(MemoryKind::kCudaIpc), " is not implemented in this build yet"));
  }
  const int device = engine->device();
  std::unique_ptr<CudaSessionArenas> a(new CudaSessionArenas(config, std::move(engine)));
  for (auto [arena, layout] :
       {std::pair{&a->kv_, &a->layout_.kv}, std::pair{&a->ring_, &a->layout_.query_ring},
        std::pair{&a->result_, &a->layout_.result}}) {
    auto created = DeviceArena::Create(device, layout->bytes);
    if (!created.ok()) return created.status();
    *arena = std::move(created).value();
  }
  // Compaction's scratch up front: an event never needs GPU memory it might not get.
  if (auto s = a->engine_->ReserveCompaction(
          a->layout_.rows,
          DTypeSize(config.model.dtype) * static_cast<size_t>(config.model.head_dim));
      !s.ok()) {
    return s;
  }
  const int64_t heads = config.model.num_heads_total();
  const std::vector<int32_t> budgets(static_cast<size_t>(heads), config.budget.budget);
  HeadRegions(budgets, config.budget.buffer, &a->offsets_, &a->capacities_);
  if (auto s = a->WriteResult("offset", a->offsets_.data(), a->offsets_.size() * sizeof(int64_t));
      !s.ok()) {
    return s;
  }
  if (auto s = a->WriteResult("capacity", a->capacities_.data(),
                              a->capacities_.size() * sizeof(int32_t));
      !s.ok()) {
    return s;
  }
  if (auto s = a->WriteResult("budget", budgets.data(), budgets.size() * sizeof(int32_t));
      !s.ok()) {
    return s;
  }
  return a;
}

uint64_t CudaSessionArenas::bytes() const {
  return layout_.kv.bytes + layout_.query_ring.bytes + layout_.result.bytes;
}

void CudaSessionArenas::Describe(
    google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>* out) const {
  DescribeArena(*kv_, layout_.kv, config_.model.dtype, out);
  DescribeArena(*ring_, layout_.query_ring, config_.model.dtype, out);
  DescribeArena(*result_, layout_.result, config_.model.dtype, out);
}

absl::Status CudaSessionArenas::WriteResult(const char* name, const void* data, size_t bytes) {
  return result_->cuda().CopyFromHost(layout_.result.Get(name).byte_offset, data, bytes);
}

absl::StatusOr<gpu::DeviceEventInputs> CudaSessionArenas::Prepare(int64_t step,
                                                                  const std::string& event_handle) {
  const ModelGeometry& m = config_.model;
  const int64_t heads = m.num_heads_total();
  const int window = config_.budget.window;
  if (!event_handle.empty()) {
    if (auto s = engine_->WaitIpcEvent(event_handle); !s.ok()) return s;
  }
  // Read on the engine's stream, after the worker's event when one was given.
  event_lengths_.assign(static_cast<size_t>(heads), 0);
  if (auto s = engine_->Download(event_lengths_.data(),
                                 static_cast<const unsigned char*>(result_->cuda().device_ptr()) +
                                     layout_.result.Get("len").byte_offset,
                                 event_lengths_.size() * sizeof(int32_t));
      !s.ok()) {
    return s;
  }
  int64_t n_max = 1;
  for (int64_t i = 0; i < heads; ++i) {
    const int32_t n = event_lengths_[static_cast<size_t>(i)];
    const int32_t cap = capacities_[static_cast<size_t>(i)];
    if (auto s = CheckHeadLength(config_, i, n, cap); !s.ok()) return s;
    n_max = std::max<int64_t>(n_max, n);
  }
  gpu::DeviceEventInputs in;
  in.keys =
      static_cast<const unsigned char*>(kv_->cuda().device_ptr()) + layout_.kv.Get("k").byte_offset;
  in.query_window = static_cast<const unsigned char*>(ring_->cuda().device_ptr()) +
                    layout_.query_ring.Get("q").byte_offset;
  in.n_max = n_max;
  in.lengths = event_lengths_;
  in.head_row_offsets = offsets_;
  in.ring_start = static_cast<int>((((step - window + 1) % window) + window) % window);
  in.check_finite = true;
  RETURN_IF_ERROR(WithContext(engine_->CheckEvent(in), "arenas"));
  return in;
}

absl::Status CudaSessionArenas::CheckFits(const Decision& decision) const {
  return CheckRegionsFit(decision, config_.budget.buffer, layout_);
}

absl::Status CudaSessionArenas::Compact(const Decision& decision) {
  const size_t row_bytes =
      DTypeSize(config_.model.dtype) * static_cast<size_t>(config_.model.head_dim);
  auto* kv = static_cast<unsigned char*>(kv_->cuda().device_ptr());
  return CompactIntoRegions(decision, config_.budget.buffer, row_bytes, engine_.get(),
                            kv + layout_.kv.Get("k").byte_offset,
                            kv + layout_.kv.Get("v").byte_offset, &offsets_, &capacities_);
}

absl::Status CudaSessionArenas::Publish(const Decision& decision, uint64_t epoch) {
  const size_t heads = decision.budgets.size();
  const std::vector<uint64_t> mask = ResultKeepMask(decision, layout_.words);
  for (auto [name, data, bytes] :
       {std::tuple<const char*, const void*, size_t>{"len", decision.kept_lengths.data(),
                                                     heads * sizeof(int32_t)},
        {"offset", offsets_.data(), heads * sizeof(int64_t)},
        {"capacity", capacities_.data(), heads * sizeof(int32_t)},
        {"budget", decision.budgets.data(), heads * sizeof(int32_t)},
        {"keep_mask", mask.data(), mask.size() * sizeof(uint64_t)},
        {"epoch", &epoch, sizeof(epoch)}}) {
    if (auto s = WriteResult(name, data, bytes); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace reasonalloc
