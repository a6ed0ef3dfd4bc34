// What the shared-memory decode-loop tests (arena_test, advisory_test) have in common: a small
// geometry, its session request, fp16 tensors and the query window rebuilt from the last steps.
#ifndef REASONALLOC_TESTS_INTEGRATION_SHM_TEST_COMMON_H_
#define REASONALLOC_TESTS_INTEGRATION_SHM_TEST_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "reasonalloc/v1/sidecar.pb.h"

namespace reasonalloc::shm_test {

inline constexpr int kL = 2, kHq = 4, kHkv = 2, kD = 8, kWindow = 4, kB = 16, kDelta = 8;
inline constexpr int kHeads = kL * kHkv;

// fp16 session of the small geometry; causal window softmax (softmax_all_keys), so that each window
// row sees a different prefix and the ring's order matters.
inline v1::CreateSessionRequest ShmTestRequest(const std::string& name, const std::string& scorer,
                                               const std::string& allocator, v1::MemoryKind memory,
                                               v1::SessionMode mode) {
  v1::CreateSessionRequest r;
  auto* m = r.mutable_model();
  m->set_name(name);
  m->set_num_layers(kL);
  m->set_num_q_heads(kHq);
  m->set_num_kv_heads(kHkv);
  m->set_head_dim(kD);
  m->set_dtype(v1::DTYPE_FLOAT16);
  m->set_max_context(4096);
  r.mutable_budget()->set_budget(kB);
  r.mutable_budget()->set_buffer(kDelta);
  r.mutable_budget()->set_window(kWindow);
  r.mutable_scorer()->set_name(scorer);
  r.mutable_scorer()->set_softmax_all_keys(true);
  r.mutable_allocator()->set_name(allocator);
  r.set_mode(mode);
  r.set_memory(memory);
  r.set_lease_seconds(600);
  return r;
}

inline v1::Tensor F16Tensor(const std::vector<int64_t>& shape, const std::vector<uint16_t>& v) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FLOAT16);
  for (int64_t s : shape) t.add_shape(s);
  t.set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * 2));
  return t;
}

// The query window [L, Hq, window, d], oldest first, from the last kWindow steps' queries [L, Hq,
// d].
inline v1::Tensor QueryWindow(const std::deque<std::vector<uint16_t>>& history) {
  std::vector<uint16_t> window(size_t{kL} * kHq * kWindow * kD);
  for (int lq = 0; lq < kL * kHq; ++lq) {
    for (int w = 0; w < kWindow; ++w) {
      std::copy_n(history[static_cast<size_t>(w)].begin() + lq * kD, kD,
                  window.begin() + (lq * kWindow + w) * kD);
    }
  }
  return F16Tensor({kL, kHq, kWindow, kD}, window);
}

// The same event as an inline Compress request: each head's rows so far (fp16 bits, [n, d]; `v`
// may be empty for advisory sessions) padded to the longest, and the query window of `history`.
inline v1::CompressRequest InlineEvent(const std::string& session_id, int64_t step,
                                       const std::vector<std::vector<uint16_t>>& k,
                                       const std::vector<std::vector<uint16_t>>& v,
                                       const std::deque<std::vector<uint16_t>>& history) {
  size_t n_max = 0;
  for (const auto& h : k) n_max = std::max(n_max, h.size() / kD);
  std::vector<uint16_t> kin(kHeads * n_max * kD), vin(v.empty() ? 0 : kHeads * n_max * kD);
  v1::CompressRequest r;
  r.set_session_id(session_id);
  r.set_step(step);
  auto* it = r.mutable_inline_tensors();
  for (size_t i = 0; i < k.size(); ++i) {
    std::copy(k[i].begin(), k[i].end(), kin.begin() + static_cast<int64_t>(i * n_max * kD));
    if (!v.empty()) {
      std::copy(v[i].begin(), v[i].end(), vin.begin() + static_cast<int64_t>(i * n_max * kD));
    }
    it->add_lengths(static_cast<int32_t>(k[i].size() / kD));
  }
  const auto nm = static_cast<int64_t>(n_max);
  *it->mutable_query_window() = QueryWindow(history);
  *it->mutable_keys() = F16Tensor({kL, kHkv, nm, kD}, kin);
  if (!v.empty()) *it->mutable_values() = F16Tensor({kL, kHkv, nm, kD}, vin);
  return r;
}

}  // namespace reasonalloc::shm_test

#endif  // REASONALLOC_TESTS_INTEGRATION_SHM_TEST_COMMON_H_
