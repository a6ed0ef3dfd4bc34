// The host shared-memory data plane, two processes: the real server and this test as the worker.
// A synthetic decode loop writes K, V and queries into the session's arenas and calls Compress with
// a few dozen bytes of control; after every event the kept tokens, the budgets and the compacted
// rows must equal, bit for bit, what the inline Compress path decides for the same tensors.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <deque>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/mapped_arena.h"
#include "client/session_view.h"
#include "core/dtype.h"
#include "tests/integration/server_process.h"
#include "tests/integration/shm_test_common.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;
using testing::ServerProcess;
using namespace shm_test;  // NOLINT: the shared geometry and helpers

v1::CreateSessionRequest Request(const std::string& allocator, v1::MemoryKind memory,
                                 const std::string& scorer = "rkv") {
  return ShmTestRequest("arena-test", scorer, allocator, memory, v1::SESSION_MODE_MANAGED);
}

struct Arenas {
  std::unique_ptr<MappedArena> kv, ring, result, h2o;
};

Arenas MapAll(const v1::SessionInfo& info) {
  Arenas a;
  for (const auto& d : info.arenas()) {
    auto m = MappedArena::Map(d);
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) continue;
    if (d.kind() == "kv") a.kv = std::move(m).value();
    if (d.kind() == "query_ring") a.ring = std::move(m).value();
    if (d.kind() == "result") a.result = std::move(m).value();
    if (d.kind() == "h2o_acc") a.h2o = std::move(m).value();
  }
  return a;
}

// Counts in *uneven the events that gave the heads unequal budgets (moved head regions). With
// `attention` (h2o), the worker adds each step's attention into the h2o_acc arena and the inline
// twin receives the same sums as InlineTensors.attention.
void RunDecodeLoop(const std::string& scorer, const std::string& allocator, int steps, int* uneven,
                   bool attention = false) {
  *uneven = 0;
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  auto shm = c.CreateSession(Request(allocator, v1::MEMORY_KIND_HOST_SHM, scorer));
  ASSERT_TRUE(shm.ok()) << shm.status();
  auto inl = c.CreateSession(Request(allocator, v1::MEMORY_KIND_INLINE, scorer));
  ASSERT_TRUE(inl.ok()) << inl.status();
  ASSERT_EQ(shm->session().memory(), v1::MEMORY_KIND_HOST_SHM);
  ASSERT_EQ(shm->session().arenas_size(), scorer == "h2o" ? 4 : 3);
  Arenas a = MapAll(shm->session());
  ASSERT_TRUE(a.kv && a.ring && a.result);
  ASSERT_EQ(a.h2o != nullptr, scorer == "h2o");
  float* acc = a.h2o ? a.h2o->As<float>("attention") : nullptr;
  uint64_t* present = a.h2o ? a.h2o->As<uint64_t>("present") : nullptr;
  std::vector<std::vector<float>> att(kHeads);  // the worker's sums since the last event
  uint16_t* k_rows = a.kv->As<uint16_t>("k");
  uint16_t* v_rows = a.kv->As<uint16_t>("v");
  uint16_t* ring = a.ring->As<uint16_t>("q");
  int32_t* len = a.result->As<int32_t>("len");
  const int64_t* offset = a.result->As<int64_t>("offset");
  const int32_t* budget = a.result->As<int32_t>("budget");
  const uint64_t* mask = a.result->As<uint64_t>("keep_mask");
  const uint64_t* epoch = a.result->As<uint64_t>("epoch");
  int words = 0;
  for (const auto& arr : a.result->descriptor().arrays()) {
    if (arr.name() == "keep_mask") words = static_cast<int>(arr.shape(1));
  }

  // The worker's own view of each head's cache (the inline path's input), fp16 bits.
  std::vector<std::vector<uint16_t>> k(kHeads), v(kHeads);
  std::deque<std::vector<uint16_t>> history;  // last kWindow steps' queries [L, Hq, d]
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  int events = 0;
  for (int step = 0; step < steps; ++step) {
    for (int i = 0; i < kHeads; ++i) {
      std::vector<uint16_t> kr(kD), vr(kD);
      for (int t = 0; t < kD; ++t) {
        // Every fifth token repeats an older key, so that R-KV's redundancy matters.
        kr[static_cast<size_t>(t)] = FloatToHalf(normal(rng));
        vr[static_cast<size_t>(t)] = FloatToHalf(normal(rng));
      }
      if (step % 5 == 4 && k[static_cast<size_t>(i)].size() >= kD) {
        std::copy_n(k[static_cast<size_t>(i)].begin(), kD, kr.begin());
      }
      const int64_t row = offset[i] + len[i];
      std::copy(kr.begin(), kr.end(), k_rows + row * kD);
      std::copy(vr.begin(), vr.end(), v_rows + row * kD);
      ++len[i];
      k[static_cast<size_t>(i)].insert(k[static_cast<size_t>(i)].end(), kr.begin(), kr.end());
      v[static_cast<size_t>(i)].insert(v[static_cast<size_t>(i)].end(), vr.begin(), vr.end());
    }
    std::vector<uint16_t> q(size_t{kL} * kHq * kD);
    for (auto& x : q) x = FloatToHalf(normal(rng));
    for (int lq = 0; lq < kL * kHq; ++lq) {
      std::copy_n(q.begin() + lq * kD, kD, ring + (lq * kWindow + step % kWindow) * kD);
    }
    history.push_back(q);
    if (history.size() > kWindow) history.pop_front();
    if (attention) {
      std::uniform_real_distribution<float> weight(0.0f, 1.0f);
      for (int i = 0; i < kHeads; ++i) {
        att[static_cast<size_t>(i)].resize(static_cast<size_t>(len[i]), 0.0f);
        for (int j = 0; j < len[i]; ++j) {
          const float w = weight(rng) / static_cast<float>(len[i]);
          acc[offset[i] + j] += w;
          att[static_cast<size_t>(i)][static_cast<size_t>(j)] += w;
        }
      }
      *present = 1;
    }
    // Events at step ≡ 2 (mod Δ): the ring's slots are then rotated against the window's order.
    if (step % kDelta != 2 || step < kDelta) continue;

    // The same event through both paths.
    v1::CompressRequest request;
    request.set_session_id(shm->session().session_id());
    request.set_step(step);
    auto got = c.Compress(request);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_LT(request.ByteSizeLong() + got->ByteSizeLong(), 1024u);
    if (present != nullptr) {
      ASSERT_EQ(*present, 0u);  // consumed by the event, and the sums zeroed
      ASSERT_EQ(acc[offset[0]], 0.0f);
    }
    ASSERT_EQ(std::atomic_ref<const uint64_t>(*epoch).load(std::memory_order_acquire),
              got->epoch());

    size_t n_max = 0;
    for (const auto& h : k) n_max = std::max(n_max, h.size() / kD);
    std::vector<uint16_t> kin(kHeads * n_max * kD), vin(kHeads * n_max * kD);
    v1::CompressRequest inline_request;
    inline_request.set_session_id(inl->session().session_id());
    inline_request.set_step(step);
    auto* it = inline_request.mutable_inline_tensors();
    for (int i = 0; i < kHeads; ++i) {
      std::copy(k[static_cast<size_t>(i)].begin(), k[static_cast<size_t>(i)].end(),
                kin.begin() + static_cast<int64_t>(i * n_max * kD));
      std::copy(v[static_cast<size_t>(i)].begin(), v[static_cast<size_t>(i)].end(),
                vin.begin() + static_cast<int64_t>(i * n_max * kD));
      it->add_lengths(static_cast<int32_t>(k[static_cast<size_t>(i)].size() / kD));
    }
    const auto nm = static_cast<int64_t>(n_max);
    *it->mutable_query_window() = QueryWindow(history);
    *it->mutable_keys() = F16Tensor({kL, kHkv, nm, kD}, kin);
    *it->mutable_values() = F16Tensor({kL, kHkv, nm, kD}, vin);
    if (attention) {
      std::vector<float> sums(kHeads * n_max, 0.0f);
      for (int i = 0; i < kHeads; ++i) {
        std::copy(att[static_cast<size_t>(i)].begin(), att[static_cast<size_t>(i)].end(),
                  sums.begin() + static_cast<int64_t>(i * n_max));
        att[static_cast<size_t>(i)].clear();  // consumed by the event
      }
      v1::Tensor* t = it->mutable_attention();
      t->set_dtype(v1::DTYPE_FLOAT32);
      for (int64_t x : {int64_t{kL}, int64_t{kHkv}, nm}) t->add_shape(x);
      t->set_data(std::string(reinterpret_cast<const char*>(sums.data()), sums.size() * 4));
    }
    auto want = c.Compress(inline_request);
    ASSERT_TRUE(want.ok()) << want.status();
    const v1::Decision& dw = want->decision();
    EXPECT_EQ(got->decision().evicted_tokens(), dw.evicted_tokens());

    int64_t at = 0;
    for (int i = 0; i < kHeads; ++i) {
      ASSERT_EQ(budget[i], dw.budgets(i)) << "step " << step << " head " << i;
      ASSERT_EQ(len[i], dw.kept_lengths(i)) << "step " << step << " head " << i;
      std::vector<uint16_t> kk, vk;
      for (int r = 0; r < dw.kept_lengths(i); ++r) {
        const int j = dw.kept_indices(static_cast<int>(at + r));
        ASSERT_TRUE(mask[i * words + j / 64] >> (j % 64) & 1) << "step " << step << " head " << i;
        kk.insert(kk.end(), k[static_cast<size_t>(i)].begin() + j * kD,
                  k[static_cast<size_t>(i)].begin() + (j + 1) * kD);
        vk.insert(vk.end(), v[static_cast<size_t>(i)].begin() + j * kD,
                  v[static_cast<size_t>(i)].begin() + (j + 1) * kD);
      }
      int bits = 0;
      for (int w = 0; w < words; ++w) bits += __builtin_popcountll(mask[i * words + w]);
      ASSERT_EQ(bits, dw.kept_lengths(i));
      at += dw.kept_lengths(i);
      // The arena's compacted rows are the kept rows, in order, at the head's new offset.
      ASSERT_TRUE(std::equal(kk.begin(), kk.end(), k_rows + offset[i] * kD)) << "head " << i;
      ASSERT_TRUE(std::equal(vk.begin(), vk.end(), v_rows + offset[i] * kD)) << "head " << i;
      k[static_cast<size_t>(i)] = kk;
      v[static_cast<size_t>(i)] = vk;
    }
    if (*std::min_element(budget, budget + kHeads) != *std::max_element(budget, budget + kHeads)) {
      ++*uneven;
    }
    ++events;
  }
  EXPECT_EQ(events, (steps + kDelta - 3) / kDelta - 1);

  // Closing the session unlinks its arenas.
  const std::string name = shm->session().arenas(0).shm_name();
  ASSERT_TRUE(c.CloseSession(shm->session().session_id()).ok());
  errno = 0;
  EXPECT_LT(shm_open(name.c_str(), O_RDONLY, 0), 0);
  EXPECT_EQ(errno, ENOENT);
}

TEST(HostArenas, SnapKvDecodeLoopMatchesInlineBitForBit) {
  int uneven = -1;
  RunDecodeLoop("snapkv", "uniform", 1000, &uneven);
  EXPECT_EQ(uneven, 0);
}

TEST(HostArenas, RkvAdaKvDecodeLoopMatchesInlineBitForBitWithMovingHeadRegions) {
  // adakv moves budgets between the heads of a layer at every event: head regions move.
  int uneven = -1;
  RunDecodeLoop("rkv", "adakv", 1000, &uneven);
  EXPECT_GT(uneven, 50);
}

TEST(HostArenas, H2oDecodeLoopFromWindowQueriesMatchesInlineBitForBit) {
  int uneven = -1;
  RunDecodeLoop("h2o", "uniform", 1000, &uneven);
}

TEST(HostArenas, H2oDecodeLoopWithWorkerAttentionMatchesInlineBitForBit) {
  int uneven = -1;
  RunDecodeLoop("h2o", "adakv", 1000, &uneven, /*attention=*/true);
}

// The C++ client's typed view: Append writes where the layout says, and after Compress the kept
// rows read back through key_row/value_row in ascending position order, with their keep bits.
TEST(HostArenas, SessionViewAppendsAndReadsBackTheCompactedRows) {
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  auto created = c.CreateSession(Request("uniform", v1::MEMORY_KIND_HOST_SHM, "snapkv"));
  ASSERT_TRUE(created.ok()) << created.status();
  auto view = SessionView::Map(created->session());
  ASSERT_TRUE(view.ok()) << view.status();
  SessionView& s = **view;
  // Token t of head i: every element of K is t + 1000 i, of V the negative (exact in fp16).
  auto token = [](int i, int t, float sign) { return FloatToHalf(sign * (t + 1000.0f * i)); };
  const int steps = kB + kDelta;
  for (int t = 0; t < steps; ++t) {
    std::vector<uint16_t> k(kHeads * kD), v(kHeads * kD), q(size_t{kL} * kHq * kD);
    for (int i = 0; i < kHeads; ++i) {
      std::fill_n(k.begin() + i * kD, kD, token(i, t, 1));
      std::fill_n(v.begin() + i * kD, kD, token(i, t, -1));
    }
    for (size_t j = 0; j < q.size(); ++j) q[j] = FloatToHalf(0.01f * static_cast<float>(j + t));
    ASSERT_TRUE(s.Append(t, k.data(), v.data(), q.data()).ok());
    EXPECT_EQ(s.query_slot<uint16_t>(1, 3, t)[2], q[(kHq + 3) * kD + 2]);
  }
  std::vector<uint16_t> full(kHeads * kD), qfull(size_t{kL} * kHq * kD);
  const absl::Status refused = s.Append(steps, full.data(), full.data(), qfull.data());
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.length(0, 0), steps);  // nothing written by the refused call
  EXPECT_EQ(s.epoch(), 0u);

  v1::CompressRequest r;
  r.set_session_id(created->session().session_id());
  r.set_step(steps - 1);
  ASSERT_TRUE(c.Compress(r).ok());
  EXPECT_EQ(s.epoch(), 1u);
  for (int l = 0; l < kL; ++l) {
    for (int h = 0; h < kHkv; ++h) {
      const int i = l * kHkv + h;
      ASSERT_EQ(s.length(l, h), kB);
      EXPECT_EQ(s.budget(l, h), kB);
      int row = 0;
      for (int position = 0; position < steps; ++position) {
        if (!s.kept(l, h, position)) continue;
        EXPECT_EQ(s.key_row<uint16_t>(l, h, row)[kD - 1], token(i, position, 1));
        EXPECT_EQ(s.value_row<uint16_t>(l, h, row)[0], token(i, position, -1));
        ++row;
      }
      EXPECT_EQ(row, kB);
      for (int w = steps - kWindow; w < steps; ++w) EXPECT_TRUE(s.kept(l, h, w));  // the window
    }
  }
}

TEST(HostArenas, BadUseIsRefusedWithTheFieldNamed) {
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  auto shm = c.CreateSession(Request("uniform", v1::MEMORY_KIND_HOST_SHM));
  ASSERT_TRUE(shm.ok()) << shm.status();
  const std::string id = shm->session().session_id();
  Arenas a = MapAll(shm->session());
  ASSERT_TRUE(a.result);
  int32_t* len = a.result->As<int32_t>("len");

  // A head longer than its region: INVALID_ARGUMENT naming "len", nothing read out of bounds.
  len[1] = kB + kDelta + 1;
  v1::CompressRequest r;
  r.set_session_id(id);
  r.set_step(1);
  auto bad = c.Compress(r);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("\"len\"[1]"));
  len[1] = -5;
  EXPECT_EQ(c.Compress(r).status().code(), absl::StatusCode::kInvalidArgument);
  len[1] = 0;

  // NaN written into a live key row.
  len[0] = 1;
  a.kv = MappedArena::Map(shm->session().arenas(0)).value();
  a.kv->As<uint16_t>("k")[3] = 0x7e00;
  auto nan = c.Compress(r);
  EXPECT_EQ(nan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(nan.status().message()), HasSubstr("layer 0, kv head 0, row 0"));
  a.kv->As<uint16_t>("k")[3] = 0;

  // Inline tensors on a shared-memory session; budget changes.
  r.mutable_inline_tensors()->add_lengths(1);
  EXPECT_EQ(c.Compress(r).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(c.UpdateBudget(id, 32).status().code(), absl::StatusCode::kFailedPrecondition);

  // A descriptor whose array lies outside the arena is refused by the client before mapping.
  v1::ArenaDescriptor forged = shm->session().arenas(2);
  forged.mutable_arrays(0)->set_byte_offset(forged.byte_length() + 8);
  EXPECT_EQ(MappedArena::Map(forged).status().code(), absl::StatusCode::kInvalidArgument);
  forged = shm->session().arenas(2);
  forged.set_byte_length(forged.byte_length() * 1000);
  EXPECT_EQ(MappedArena::Map(forged).status().code(), absl::StatusCode::kInvalidArgument);

  // Lease expiry and close free the arenas; the mapping this process holds stays valid memory.
  ASSERT_TRUE(c.CloseSession(id).ok());
  EXPECT_EQ(c.Compress(r).status().code(), absl::StatusCode::kNotFound);
  len[0] = 7;  // still mapped here: writing it is harmless, the server no longer reads it
}

}  // namespace
}  // namespace reasonalloc
