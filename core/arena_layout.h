// Layout version 1 of a managed session's shared arenas (README "Shared-memory data plane"), and
// the in-place operations on them. Pure arithmetic and memory moves: the server maps the bytes
// (host shared memory now, CUDA later) and the clients read the same descriptors.
//
// kv: "k" and "v", [rows, d] in the model's dtype, rows = L·Hkv·(B + Δ). Heads are flattened
// varlen: head i (= l·Hkv + h) owns rows [offset[i], offset[i] + capacity[i]) with capacity[i] =
// budget[i] + Δ, so Σ capacity ≤ rows whatever the allocator does.
//
// query_ring: "q", [L, Hq, α, d] in the model's dtype; the query of decode step s is in slot
// s mod α.
//
// result: "len" int32 [L·Hkv] (the worker sets each head's live rows before Compress; the sidecar
// sets the kept count after), "offset" int64 [L·Hkv], "capacity" int32 [L·Hkv], "budget" int32
// [L·Hkv], "keep_mask" uint64 [L·Hkv, words] (pre-event positions), "epoch" uint64 [1], written
// last.
//
// h2o_acc (h2o sessions): "attention" fp32 [rows], aligned with the rows of "k": the worker may add
// each decode step's attention (group mean) to its live tokens' rows and set "present" uint64 [1]
// to 1 before Compress; the sidecar then uses it instead of the window queries
// (InlineTensors.attention's meaning) and zeroes both after the event.
#ifndef REASONALLOC_CORE_ARENA_LAYOUT_H_
#define REASONALLOC_CORE_ARENA_LAYOUT_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/compute_backend.h"
#include "core/dtype.h"
#include "core/engine.h"
#include "core/session_config.h"

namespace reasonalloc {

inline constexpr uint32_t kLayoutVersion = 1;

// Element type of a layout array: a model dtype or one of the integer types of the result block.
enum class ArrayType { kModel, kInt32, kInt64, kUint64, kFloat32 };

struct ArrayLayout {
  std::string name;
  ArrayType type = ArrayType::kModel;
  std::vector<int64_t> shape;
  uint64_t byte_offset = 0;  // 64-byte aligned
  uint64_t byte_length = 0;
};

struct ArenaLayout {
  std::string kind;  // "kv", "query_ring", "result"
  uint64_t bytes = 0;
  std::vector<ArrayLayout> arrays;
  const ArrayLayout& Get(const std::string& name) const;
};

struct SessionLayout {
  ArenaLayout kv, query_ring, result;
  ArenaLayout h2o_acc;  // h2o sessions only (bytes = 0 otherwise)
  int64_t rows = 0;     // rows of "k" and "v"
  int words = 0;        // keep-mask words per head
  int64_t max_capacity = 0;
};

SessionLayout MakeSessionLayout(const SessionConfig& config);

// Per-head regions for the given budgets: offset[i] = Σ_{j<i} (budget[j] + Δ), capacity = budget +
// Δ.
void HeadRegions(std::span<const int32_t> budgets, int buffer, std::vector<int64_t>* offsets,
                 std::vector<int32_t>* capacities);

// An arena session's compaction, the same for host and device memory: the head regions of
// `decision`'s budgets, and each head's kept rows of `k` and `v` moved into them by `compactor`
// (null: an advisory session, whose rows the worker moves). On success the new regions replace
// *offsets and *capacities; on error the regions are as they were (the rows too, except after a
// device fault: Compactor).
absl::Status CompactIntoRegions(const Decision& decision, int buffer, size_t row_bytes,
                                Compactor* compactor, void* k, void* v,
                                std::vector<int64_t>* offsets, std::vector<int32_t>* capacities);

// Gathers each head's live rows (lengths[i] rows from offsets[i]) of `rows_base` ([rows, d] in
// `dtype`) into fp32 [heads, n_max, d]. Returns the first non-finite element as a message naming
// layer, head and row; OK otherwise. Bounds are the caller's (checked before).
absl::Status GatherLiveRows(DType dtype, const unsigned char* rows_base, int head_dim,
                            int num_kv_heads, std::span<const int64_t> offsets,
                            std::span<const int32_t> lengths, int64_t n_max, float* out);

// Moves each head's kept rows (decision.Kept(i), positions relative to old_offsets[i]) to
// new_offsets[i] onward, for K and V both, in place; regions may move either way, so the kept rows
// go through `scratch` first.
void CompactInPlace(const Decision& decision, std::span<const int64_t> old_offsets,
                    std::span<const int64_t> new_offsets, size_t row_bytes, unsigned char* k,
                    unsigned char* v, std::vector<unsigned char>* scratch);

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_ARENA_LAYOUT_H_
