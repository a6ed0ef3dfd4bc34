#include "core/arena_layout.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "absl/strings/str_cat.h"

namespace reasonalloc {
namespace {

uint64_t Align64(uint64_t x) { return (x + 63) & ~uint64_t{63}; }

void Add(ArenaLayout* a, std::string name, ArrayType type, std::vector<int64_t> shape,
         uint64_t item) {
  ArrayLayout arr;
  arr.name = std::move(name);
  arr.type = type;
  arr.shape = std::move(shape);
  uint64_t count = 1;
  for (int64_t s : arr.shape) count *= static_cast<uint64_t>(s);
  arr.byte_offset = Align64(a->bytes);
  arr.byte_length = count * item;
  a->bytes = arr.byte_offset + arr.byte_length;
  a->arrays.push_back(std::move(arr));
}

}  // namespace

const ArrayLayout& ArenaLayout::Get(const std::string& name) const {
  for (const auto& a : arrays) {
    if (a.name == name) return a;
  }
  throw std::logic_error("no array " + name + " in arena " + kind);
}

SessionLayout MakeSessionLayout(const SessionConfig& c) {
  const ModelGeometry& m = c.model;
  const uint64_t item = DTypeSize(m.dtype);
  const int64_t heads = m.num_heads_total();
  SessionLayout s;
  s.rows = heads * (int64_t{c.budget.budget} + c.budget.buffer);
  s.max_capacity = MaxHeadCapacity(c);
  s.words = static_cast<int>((s.max_capacity + 63) / 64);
  s.kv.kind = "kv";
  Add(&s.kv, "k", ArrayType::kModel, {s.rows, m.head_dim}, item);
  Add(&s.kv, "v", ArrayType::kModel, {s.rows, m.head_dim}, item);
  s.query_ring.kind = "query_ring";
  Add(&s.query_ring, "q", ArrayType::kModel,
      {m.num_layers, m.num_q_heads, c.budget.window, m.head_dim}, item);
  s.result.kind = "result";
  Add(&s.result, "len", ArrayType::kInt32, {heads}, 4);
  Add(&s.result, "offset", ArrayType::kInt64, {heads}, 8);
  Add(&s.result, "capacity", ArrayType::kInt32, {heads}, 4);
  Add(&s.result, "budget", ArrayType::kInt32, {heads}, 4);
  Add(&s.result, "keep_mask", ArrayType::kUint64, {heads, s.words}, 8);
  Add(&s.result, "epoch", ArrayType::kUint64, {1}, 8);
  if (PolicyOf(c.scorer.kind).needs_accumulator) {
    s.h2o_acc.kind = "h2o_acc";
    Add(&s.h2o_acc, "attention", ArrayType::kFloat32, {s.rows}, 4);
    Add(&s.h2o_acc, "present", ArrayType::kUint64, {1}, 8);
  }
  for (ArenaLayout* a : {&s.kv, &s.query_ring, &s.result, &s.h2o_acc}) a->bytes = Align64(a->bytes);
  return s;
}

void HeadRegions(std::span<const int32_t> budgets, int buffer, std::vector<int64_t>* offsets,
                 std::vector<int32_t>* capacities) {
  offsets->assign(budgets.size(), 0);
  capacities->assign(budgets.size(), 0);
  int64_t at = 0;
  for (size_t i = 0; i < budgets.size(); ++i) {
    (*offsets)[i] = at;
    (*capacities)[i] = budgets[i] + buffer;
    at += (*capacities)[i];
  }
}

absl::Status GatherLiveRows(DType dtype, const unsigned char* rows_base, int head_dim,
                            int num_kv_heads, std::span<const int64_t> offsets,
                            std::span<const int32_t> lengths, int64_t n_max, float* out) {
  const size_t row_bytes = DTypeSize(dtype) * static_cast<size_t>(head_dim);
  for (size_t i = 0; i < lengths.size(); ++i) {
    float* dst = out + static_cast<int64_t>(i) * n_max * head_dim;
    const int64_t bad =
        ConvertToFloat32(dtype, rows_base + static_cast<size_t>(offsets[i]) * row_bytes,
                         int64_t{lengths[i]} * head_dim, dst);
    if (bad >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv arena \"k\": layer ", i / static_cast<size_t>(num_kv_heads), ", kv head ",
          i % static_cast<size_t>(num_kv_heads), ", row ", bad / head_dim, " holds NaN or Inf"));
    }
    std::fill(dst + int64_t{lengths[i]} * head_dim, dst + n_max * head_dim, 0.0f);
  }
  return absl::OkStatus();
}

void CompactInPlace(const Decision& decision, std::span<const int64_t> old_offsets,
                    std::span<const int64_t> new_offsets, size_t row_bytes, unsigned char* k,
                    unsigned char* v, std::vector<unsigned char>* scratch) {
  const size_t kept_rows = decision.kept_indices.size();
  if (kept_rows == 0) return;  // nothing moves (and an empty scratch has no data pointer)
  scratch->resize(2 * kept_rows * row_bytes);
  unsigned char* sk = scratch->data();
  unsigned char* sv = sk + kept_rows * row_bytes;
  size_t r = 0;
  for (size_t i = 0; i < old_offsets.size(); ++i) {
    for (int32_t j : decision.Kept(static_cast<int64_t>(i))) {
      const size_t src = static_cast<size_t>(old_offsets[i] + j) * row_bytes;
      std::memcpy(sk + r * row_bytes, k + src, row_bytes);
      std::memcpy(sv + r * row_bytes, v + src, row_bytes);
      ++r;
    }
  }
  r = 0;
  for (size_t i = 0; i < new_offsets.size(); ++i) {
    const size_t n = static_cast<size_t>(decision.kept_lengths[i]);
    const size_t dst = static_cast<size_t>(new_offsets[i]) * row_bytes;
    std::memcpy(k + dst, sk + r * row_bytes, n * row_bytes);
    std::memcpy(v + dst, sv + r * row_bytes, n * row_bytes);
    r += n;
  }
}

absl::Status CompactIntoRegions(const Decision& decision, int buffer, size_t row_bytes,
                                Compactor* compactor, void* k, void* v,
                                std::vector<int64_t>* offsets, std::vector<int32_t>* capacities) {
  std::vector<int64_t> new_offsets;
  std::vector<int32_t> new_capacities;
  HeadRegions(decision.budgets, buffer, &new_offsets, &new_capacities);
  if (compactor != nullptr) {
    if (absl::Status s =
            compactor->CompactInPlace(decision, *offsets, new_offsets, row_bytes, k, v);
        !s.ok()) {
      return s;
    }
  }
  *offsets = std::move(new_offsets);
  *capacities = std::move(new_capacities);
  return absl::OkStatus();
}

}  // namespace reasonalloc
