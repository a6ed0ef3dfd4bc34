#include "core/session_config.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/arena_layout.h"

namespace reasonalloc {
namespace {

absl::Status CheckRange(absl::string_view field, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " = ", value, " is out of range [", lo, ", ", hi, "]"));
  }
  return absl::OkStatus();
}

absl::Status CheckReal(absl::string_view field, double value, double lo, double hi) {
  if (!std::isfinite(value) || value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " = ", value, " is out of range [", lo, ", ", hi, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateGeometry(const ModelGeometry& m) {
  if (m.name.size() > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.name is ", m.name.size(), " bytes long; at most 256 allowed"));
  }
  if (auto s = CheckRange("model.num_layers", m.num_layers, 1, kMaxLayers); !s.ok()) return s;
  if (auto s = CheckRange("model.num_q_heads", m.num_q_heads, 1, kMaxHeads); !s.ok()) return s;
  if (auto s = CheckRange("model.num_kv_heads", m.num_kv_heads, 1, kMaxHeads); !s.ok()) return s;
  if (auto s = CheckRange("model.head_dim", m.head_dim, 1, kMaxHeadDim); !s.ok()) return s;
  if (auto s = CheckRange("model.max_context", m.max_context, 1, kMaxContext); !s.ok()) return s;
  if (m.num_q_heads % m.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.num_q_heads = ", m.num_q_heads,
                     " is not a multiple of model.num_kv_heads = ", m.num_kv_heads));
  }
  return absl::OkStatus();
}

absl::Status CheckBudgetValue(int budget, const BudgetConfig& b, const ModelGeometry& m,
                              absl::string_view field) {
  if (budget < b.window + 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " = ", budget, " is smaller than budget.window ", b.window, " + 1"));
  }
  if (budget > m.max_context) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " = ", budget, " is larger than model.max_context = ", m.max_context));
  }
  if (b.recent > b.window && b.sinks.value_or(0) + b.recent > budget) {
    return absl::InvalidArgumentError(absl::StrCat(
        "budget.sinks + budget.recent = ", b.sinks.value_or(0), " + ", b.recent, " is larger than ",
        field, " = ", budget, " (the always-kept tokens must fit it)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateBudget(const BudgetConfig& b, const ModelGeometry& m) {
  if (auto s = CheckRange("budget.window", b.window, 1, kMaxWindow); !s.ok()) return s;
  if (b.budget < b.window + 1 || b.budget > m.max_context) {
    return CheckBudgetValue(b.budget, b, m, "budget.budget");
  }
  if (auto s = CheckRange("budget.buffer", b.buffer, 1, m.max_context); !s.ok()) return s;
  if (b.sinks.has_value()) {
    if (auto s = CheckRange("budget.sinks", *b.sinks, 0, kMaxWindow); !s.ok()) return s;
  }
  if (auto s = CheckRange("budget.recent", b.recent, 0, kMaxWindow); !s.ok()) return s;
  // Sinks beyond what the budget leaves are dropped newest-first, as streaming always did; a
  // recency guarantee beyond the window must fit beside the sinks.
  return CheckBudgetValue(b.budget, b, m, "budget.budget");
}

int EffectiveSinks(const SessionConfig& c) {
  if (c.budget.sinks.has_value()) return *c.budget.sinks;
  return PolicyOf(c.scorer.kind).default_sinks;
}

int EffectiveRecent(const SessionConfig& c) { return std::max(c.budget.recent, c.budget.window); }

absl::Status ValidateSessionConfig(const SessionConfig& c) {
  if (auto s = ValidateGeometry(c.model); !s.ok()) return s;
  if (auto s = ValidateBudget(c.budget, c.model); !s.ok()) return s;

  const ScorerConfig& sc = c.scorer;
  // Kinds are parsed from names at the edge (core/policy.h); a value outside the registry is a
  // caller's bug, refused here rather than indexed.
  if (static_cast<size_t>(sc.kind) >= ScorerPolicies().size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("scorer.name: kind ", static_cast<int>(sc.kind), " is not a known scorer"));
  }
  if (static_cast<size_t>(c.allocator.kind) >= AllocatorPolicies().size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "allocator.name: kind ", static_cast<int>(c.allocator.kind), " is not a known allocator"));
  }
  if (auto s = CheckRange("scorer.pool_kernel", sc.pool_kernel, 1, kMaxPoolKernel); !s.ok())
    return s;
  if (sc.pool_kernel % 2 == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("scorer.pool_kernel = ", sc.pool_kernel, " must be odd"));
  }
  if (auto s = CheckReal("scorer.lambda", sc.lambda, 0.0, 1.0); !s.ok()) return s;
  if (auto s = CheckReal("scorer.threshold", sc.threshold, -1.0, 1.0); !s.ok()) return s;

  const AllocatorConfig& a = c.allocator;
  if (auto s = CheckReal("allocator.pyramid_beta", a.pyramid_beta, 1.0, 1e6); !s.ok()) return s;
  if (auto s = CheckReal("allocator.adakv_floor", a.adakv_floor, 0.0, 1.0); !s.ok()) return s;
  if (auto s = CheckReal("allocator.layer_exponent", a.layer_exponent, 0.0, 16.0); !s.ok())
    return s;
  if (auto s = CheckReal("allocator.head_exponent", a.head_exponent, 0.0, 16.0); !s.ok()) return s;
  // robustify needs n·lo ≤ total ≤ n·hi (docs/algorithms.md §3.4).
  if (auto s = CheckReal("allocator.head_floor", a.head_floor, 0.0, 1.0); !s.ok()) return s;
  if (auto s = CheckReal("allocator.clip_low", a.clip_low, 0.0, 1.0); !s.ok()) return s;
  if (auto s = CheckReal("allocator.clip_high", a.clip_high, 1.0, 1e6); !s.ok()) return s;
  if (a.profile.size() > 256) {
    return absl::InvalidArgumentError(absl::StrCat("allocator.profile is ", a.profile.size(),
                                                   " bytes long; at most 256 allowed"));
  }
  return absl::OkStatus();
}

int64_t MaxHeadCapacity(const SessionConfig& c) {
  const int64_t b = c.budget.budget;
  const int64_t delta = c.budget.buffer;
  int64_t cap = b + delta;
  if (PolicyOf(c.allocator.kind).reshapes_budgets) {
    // Layer allocators can give a layer up to clip_high (or 2 for pyramid) times its share, and
    // head routing can give one head most of its layer; bound by the layer's whole budget.
    const double layer_factor = std::max(2.0, c.allocator.clip_high);
    cap = static_cast<int64_t>(std::ceil(layer_factor * static_cast<double>(b))) *
              c.model.num_kv_heads +
          delta;
  }
  return std::min<int64_t>(cap, c.model.max_context);
}

ArenaBytes ComputeArenaBytes(const SessionConfig& c) {
  // Exactly what a MEMORY_KIND_HOST_SHM session creates (server/session_arenas.cc): one shared
  // memory object per arena of the layout, each occupying whole pages of /dev/shm. Advisory
  // sessions only get the result block (the worker's own buffers hold K, V and queries).
  const SessionLayout layout = MakeSessionLayout(c);
  static const uint64_t page = [] {
    const long p = ::sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<uint64_t>(p) : uint64_t{4096};
  }();
  auto pages = [](uint64_t bytes) {
    if (bytes == 0) return uint64_t{0};
    return (bytes + page - 1) / page * page;
  };
  ArenaBytes out;
  out.result = pages(layout.result.bytes);
  if (c.managed) {
    out.kv = pages(layout.kv.bytes);
    out.query_ring = pages(layout.query_ring.bytes);
    out.accumulator = pages(layout.h2o_acc.bytes);
  }
  return out;
}

}  // namespace reasonalloc
