// The small session the server's unit tests share (2 layers, 2 kv heads, group 2, d 4, window 2,
// B 6, Δ 4, snapkv) and a worker's side of a managed host session's arenas.
#ifndef REASONALLOC_TESTS_UNIT_SMALL_SESSION_H_
#define REASONALLOC_TESTS_UNIT_SMALL_SESSION_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/arena_layout.h"
#include "core/session_config.h"
#include "server/session_arenas.h"

namespace reasonalloc::small_session {

constexpr int kL = 2, kHkv = 2, kG = 2, kD = 4, kWindow = 2, kBudget = 6, kDelta = 4;

inline SessionConfig Config(bool managed = true, std::string model = "test") {
  SessionConfig c;
  c.model.name = std::move(model);
  c.model.num_layers = kL;
  c.model.num_kv_heads = kHkv;
  c.model.num_q_heads = kHkv * kG;
  c.model.head_dim = kD;
  c.model.dtype = DType::kFloat32;
  c.model.max_context = 256;
  c.budget.budget = kBudget;
  c.budget.buffer = kDelta;
  c.budget.window = kWindow;
  c.scorer.kind = ScorerKind::kSnapKv;
  c.managed = managed;
  return c;
}

// The arrays of a host session's arenas a worker writes and the sidecar publishes.
struct WorkerView {
  unsigned char* kv = nullptr;  // managed sessions
  int32_t* len = nullptr;
  uint64_t* epoch = nullptr;
};

inline WorkerView ViewOf(SessionArenas& arenas, const SessionConfig& config) {
  const SessionLayout layout = MakeSessionLayout(config);
  WorkerView view;
  view.kv = arenas.DataForTest("kv");
  unsigned char* result = arenas.DataForTest("result");
  view.len = reinterpret_cast<int32_t*>(result + layout.result.Get("len").byte_offset);
  view.epoch = reinterpret_cast<uint64_t*>(result + layout.result.Get("epoch").byte_offset);
  return view;
}

// A managed session's arenas as a worker leaves them before an event: every head full to its
// capacity (B + Δ rows) with finite keys and values, the query ring filled.
inline WorkerView FillManagedArenas(SessionArenas& arenas, const SessionConfig& config) {
  const SessionLayout layout = MakeSessionLayout(config);
  const WorkerView view = ViewOf(arenas, config);
  unsigned char* ring = arenas.DataForTest("query_ring");
  auto fill = [](unsigned char* p, uint64_t bytes, float base) {
    std::vector<float> v(bytes / sizeof(float));
    for (size_t i = 0; i < v.size(); ++i) v[i] = base + 0.01f * static_cast<float>(i % 89);
    std::memcpy(p, v.data(), v.size() * sizeof(float));
  };
  fill(view.kv + layout.kv.Get("k").byte_offset, layout.kv.Get("k").byte_length, 0.1f);
  fill(view.kv + layout.kv.Get("v").byte_offset, layout.kv.Get("v").byte_length, 0.2f);
  fill(ring + layout.query_ring.Get("q").byte_offset, layout.query_ring.Get("q").byte_length, 0.5f);
  for (int i = 0; i < kL * kHkv; ++i) view.len[i] = config.budget.budget + config.budget.buffer;
  return view;
}

}  // namespace reasonalloc::small_session

#endif  // REASONALLOC_TESTS_UNIT_SMALL_SESSION_H_
