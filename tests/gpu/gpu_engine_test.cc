// The CUDA compute backend against the CPU engine on random and adversarial configurations: every
// scorer × allocator, fp32 / fp16 / bf16 caches, GQA groups 1 / 4 / 8, ties, heads with n <= b,
// empty heads, duplicated keys, batches of sessions with different lengths.
//
// What must hold (the tolerance is documented in README, "CUDA backend"):
//  - scores: |gpu − cpu| <= 1e-4 · max |cpu score of the head| + 1e-7 (summation order, device
//    expf);
//  - exact, given the GPU's own scores: the budgets are what the CPU's routing gives for them and
//    the kept sets are what the CPU's selector gives for them (pool counts, radix select, ties to
//    the lower index, the keep bitmask and the compaction are all exact);
//  - against the CPU's decisions: identical budgets and kept sets, except where the candidates
//    that differ have CPU scores within twice the tolerance (a tie at float rounding); these are
//    counted and printed, and there must be none on the exact-tie configurations.
// Runs on a GPU machine; elsewhere every test says why and skips.
#include "gpu/gpu_engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/allocator.h"
#include "core/dtype.h"
#include "core/engine.h"
#include "core/h2o.h"
#include "core/scorer.h"
#include "core/selector.h"
#include "gpu/device_probe.h"

namespace reasonalloc::gpu {
namespace {

constexpr double kRelTol = 1e-4;
constexpr double kAbsTol = 1e-7;

struct Case {
  std::string name;
  SessionConfig config;
  ProfileDemand demand;  // layer demand, and head demand for the static mode
  int events = 1;
  bool exact_ties = false;  // inputs quantised to a few levels: many scores tie exactly
  bool duplicate_keys = false;
  bool accumulated = false;  // h2o with a carried accumulator
  bool short_heads = false;  // some heads with n <= window or n <= b, some empty
  uint32_t seed = 0;
};

SessionConfig Geometry(int layers, int kv_heads, int group, int d, DType dtype) {
  SessionConfig c;
  c.model.name = "test";
  c.model.num_layers = layers;
  c.model.num_kv_heads = kv_heads;
  c.model.num_q_heads = kv_heads * group;
  c.model.head_dim = d;
  c.model.dtype = dtype;
  c.model.max_context = 1 << 16;
  return c;
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  std::mt19937 rng(2026);
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const int groups[] = {1, 4, 8};
  const char* scorers[] = {"streaming", "snapkv", "rkv", "h2o"};
  const char* allocators[] = {"uniform", "pyramid", "adakv", "reasonalloc"};
  int index = 0;
  for (int rep = 0; rep < 5; ++rep) {
    for (const char* scorer : scorers) {
      for (const char* allocator : allocators) {
        for (int variant = 0; variant < 3; ++variant) {
          Case k;
          k.seed = static_cast<uint32_t>(rng());
          const int layers = 1 + static_cast<int>(rng() % 4);
          const int kv = 1 + static_cast<int>(rng() % 3);
          const int group = groups[(index + variant) % 3];
          const int d = (rng() % 2) ? 64 : 16 * (1 + static_cast<int>(rng() % 8));
          k.config = Geometry(layers, kv, group, d, dtypes[(index + rep) % 3]);
          k.config.budget.window = 1 + static_cast<int>(rng() % 12);
          k.config.budget.budget = k.config.budget.window + 2 + static_cast<int>(rng() % 80);
          k.config.budget.sinks = static_cast<int>(rng() % 6);
          if (rng() % 2) {
            k.config.budget.recent =
                std::min(k.config.budget.budget - *k.config.budget.sinks,
                         k.config.budget.window + static_cast<int>(rng() % 20));
          }
          k.config.scorer.kind = ParseScorer(scorer).value();
          k.config.scorer.pool_kernel = 1 + 2 * static_cast<int>(rng() % 5);
          k.config.scorer.pool_kind = rng() % 2 ? PoolKind::kMax : PoolKind::kAvg;
          const int reduce = static_cast<int>(rng() % 3);
          k.config.scorer.gqa_reduce = reduce == 0   ? GqaReduce::kMax
                                       : reduce == 1 ? GqaReduce::kMean
                                                     : GqaReduce::kMeanScores;
          k.config.scorer.softmax_all_keys = rng() % 3 == 0;
          k.config.scorer.lambda = 0.05 + 0.9 * (rng() % 100) / 100.0;
          k.config.scorer.threshold = (rng() % 4 == 0) ? -0.2 : 0.2 + 0.7 * (rng() % 100) / 100.0;
          k.config.allocator.kind = ParseAllocator(allocator).value();
          const ReasonAllocMode modes[] = {ReasonAllocMode::kFull, ReasonAllocMode::kLayer,
                                           ReasonAllocMode::kHead, ReasonAllocMode::kOff,
                                           ReasonAllocMode::kStatic};
          k.config.allocator.reasonalloc_mode = modes[rng() % 5];
          if (std::string(allocator) == "reasonalloc" && rng() % 4 != 0) {
            for (int l = 0; l < layers; ++l) {
              k.demand.layers.push_back(0.2 + (rng() % 100) / 25.0);
            }
          }
          if (std::string(allocator) == "reasonalloc" &&
              k.config.allocator.reasonalloc_mode == ReasonAllocMode::kStatic) {
            // Some heads demand nothing: the floor and the cap at short heads both matter.
            for (int h = 0; h < layers * kv; ++h) {
              k.demand.heads.push_back(rng() % 5 == 0 ? 0.0 : 0.1 + (rng() % 100) / 20.0);
            }
          }
          k.events = 1 + static_cast<int>(rng() % 3);
          k.exact_ties = variant == 1;
          k.duplicate_keys = variant == 2;
          k.short_heads = rng() % 4 == 0;
          k.accumulated = std::string(scorer) == "h2o" && rng() % 2 == 0;
          k.name = absl::StrCat("case", index, "_", scorer, "_", allocator, "_",
                                DTypeName(k.config.model.dtype), "_g", group,
                                k.exact_ties ? "_ties" : "", k.duplicate_keys ? "_dups" : "",
                                k.accumulated ? "_acc" : "");
          cases.push_back(k);
          ++index;
        }
      }
    }
  }
  return cases;
}

// Values rounded to the session dtype, as fp32 (the CPU engine's input) and as stored bytes.
struct Tensor {
  std::vector<float> values;
  std::vector<unsigned char> bytes;
};

Tensor MakeTensor(size_t count, DType dtype, bool quantised, std::mt19937& rng) {
  Tensor t;
  t.values.resize(count);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : t.values) {
    v = quantised ? static_cast<float>(static_cast<int>(rng() % 3) - 1) : normal(rng);
  }
  t.bytes.resize(count * DTypeSize(dtype));
  for (size_t i = 0; i < count; ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(t.bytes.data() + 4 * i, &t.values[i], 4);
    } else {
      const uint16_t bits =
          dtype == DType::kFloat16 ? FloatToHalf(t.values[i]) : FloatToBFloat16(t.values[i]);
      t.values[i] = dtype == DType::kFloat16 ? HalfToFloat(bits) : BFloat16ToFloat(bits);
      std::memcpy(t.bytes.data() + 2 * i, &bits, 2);
    }
  }
  return t;
}

struct Event {
  int64_t n_max = 0;
  std::vector<int32_t> lengths;
  Tensor queries, keys;
  std::vector<float> accumulated;
};

Event MakeEvent(const Case& k, std::mt19937& rng) {
  const ModelGeometry& m = k.config.model;
  const int window = k.config.budget.window;
  const int b = k.config.budget.budget;
  Event e;
  e.n_max = b + 1 + static_cast<int64_t>(rng() % 200);
  e.lengths.resize(static_cast<size_t>(m.num_heads_total()));
  for (auto& n : e.lengths) {
    n = static_cast<int32_t>(e.n_max - static_cast<int64_t>(rng() % 8));
    if (k.short_heads) {
      const int kind = static_cast<int>(rng() % 4);
      if (kind == 0) n = 0;
      if (kind == 1) n = static_cast<int32_t>(rng() % (window + 1));
      if (kind == 2) n = static_cast<int32_t>(std::min<int64_t>(b, e.n_max));
    }
  }
  const size_t q = static_cast<size_t>(m.num_layers) * m.num_q_heads * window * m.head_dim;
  const size_t kv = static_cast<size_t>(m.num_heads_total() * e.n_max) * m.head_dim;
  e.queries = MakeTensor(q, m.dtype, k.exact_ties, rng);
  e.keys = MakeTensor(kv, m.dtype, k.exact_ties, rng);
  if (k.duplicate_keys) {
    // Every third key repeats an earlier one of its head (redundancy ties for rkv).
    const size_t row = static_cast<size_t>(m.head_dim);
    const size_t esize = DTypeSize(m.dtype);
    for (int64_t head = 0; head < m.num_heads_total(); ++head) {
      for (int64_t j = 3; j < e.n_max; j += 3) {
        const int64_t from = static_cast<int64_t>(rng() % static_cast<uint32_t>(j));
        const size_t dst = static_cast<size_t>(head * e.n_max + j) * row;
        const size_t src = static_cast<size_t>(head * e.n_max + from) * row;
        std::copy_n(e.keys.values.begin() + static_cast<long>(src), row,
                    e.keys.values.begin() + static_cast<long>(dst));
        std::memcpy(e.keys.bytes.data() + dst * esize, e.keys.bytes.data() + src * esize,
                    row * esize);
      }
    }
  }
  if (k.accumulated) {
    e.accumulated.resize(static_cast<size_t>(m.num_heads_total() * e.n_max));
    for (auto& v : e.accumulated) {
      v = k.exact_ties ? static_cast<float>(rng() % 4) : static_cast<float>(rng() % 100000) / 1e3f;
    }
  }
  return e;
}

CompressInputs CpuInputs(const Event& e) {
  CompressInputs in;
  in.query_window = e.queries.values.data();
  in.keys = e.keys.values.data();
  in.n_max = e.n_max;
  in.lengths = e.lengths;
  if (!e.accumulated.empty()) in.accumulated = e.accumulated.data();
  return in;
}

// The CPU scorer's candidate scores per head.
std::vector<std::vector<float>> CpuScores(const Case& k, const Event& e) {
  const ModelGeometry& m = k.config.model;
  const int window = k.config.budget.window;
  const int group = m.group_size();
  const CompressInputs in = CpuInputs(e);
  std::vector<float> one_shot;
  const float* acc = in.accumulated;
  if (k.config.scorer.kind == ScorerKind::kH2o && acc == nullptr) {
    one_shot = H2oAccumulator(m, window).Prepare(in, nullptr, 0).value();
    acc = one_shot.data();
  }
  auto scorer = MakeScorer(k.config.scorer).value();
  std::vector<std::vector<float>> out(static_cast<size_t>(m.num_heads_total()));
  for (int64_t head = 0; head < m.num_heads_total(); ++head) {
    const int l = static_cast<int>(head / m.num_kv_heads),
              h = static_cast<int>(head % m.num_kv_heads);
    HeadInputs hi;
    hi.queries =
        in.query_window + ((int64_t{l} * m.num_q_heads + int64_t{h} * group) * window) * m.head_dim;
    hi.keys = in.keys + head * in.n_max * m.head_dim;
    hi.n = e.lengths[static_cast<size_t>(head)];
    hi.group = group;
    hi.window = window;
    hi.head_dim = m.head_dim;
    if (acc != nullptr) hi.accumulated = acc + head * in.n_max;
    auto& s = out[static_cast<size_t>(head)];
    s.assign(static_cast<size_t>(std::max(0, hi.n - window)), 0.0f);
    if (!s.empty()) {
      EXPECT_TRUE(scorer->ScoreHead(hi, s));
      ProtectScores(hi.n, window, EffectiveSinks(k.config), EffectiveRecent(k.config), s);
    }
  }
  return out;
}

double Tolerance(const std::vector<float>& cpu) {
  double m = 0;
  for (float v : cpu) m = std::max(m, std::abs(static_cast<double>(v)));
  return kRelTol * m + kAbsTol;
}

struct Tally {
  int configs = 0, events = 0, heads = 0;
  int rounding_ties = 0;       // heads whose kept set differs only among candidates within 2·tol
  int budget_ties = 0;         // layers whose budgets differ only through a pool tie within 2·tol
  double max_score_error = 0;  // relative to the head's largest |score|
};

class GpuEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ProbeResult probe = ProbeDevices();
    if (!CudaBuilt()) GTEST_SKIP() << "built without the CUDA backend";
    if (probe.devices.empty()) GTEST_SKIP() << "no GPU: " << probe.reason;
  }
};

void RunCase(const Case& k, Tally* tally) {
  SCOPED_TRACE(k.name);
  auto gpu = GpuEngine::Create(0, k.config, k.demand);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = Engine::Create(k.config, k.demand);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  std::mt19937 rng(k.seed);
  std::vector<Event> events;
  for (int i = 0; i < k.events; ++i) events.push_back(MakeEvent(k, rng));
  std::vector<void*> device;
  std::vector<DeviceEventInputs> inputs;
  auto upload = [&](const void* data, size_t bytes) -> void* {
    void* p = (*gpu)->Allocate(bytes).value();
    EXPECT_TRUE((*gpu)->Upload(p, data, bytes).ok());
    device.push_back(p);
    return p;
  };
  for (const Event& e : events) {
    DeviceEventInputs in;
    in.query_window = upload(e.queries.bytes.data(), e.queries.bytes.size());
    in.keys = upload(e.keys.bytes.data(), e.keys.bytes.size());
    in.n_max = e.n_max;
    in.lengths = e.lengths;
    if (!e.accumulated.empty()) {
      in.accumulated = static_cast<const float*>(
          upload(e.accumulated.data(), e.accumulated.size() * sizeof(float)));
    }
    inputs.push_back(in);
  }
  auto decisions = (*gpu)->CompressBatch(inputs);
  ASSERT_TRUE(decisions.ok()) << decisions.status();
  auto gpu_scores = (*gpu)->LastScoresForTest();
  ASSERT_TRUE(gpu_scores.ok()) << gpu_scores.status();
  const ModelGeometry& m = k.config.model;
  const int window = k.config.budget.window;
  const int64_t hl = m.num_heads_total();
  ++tally->configs;
  for (size_t ei = 0; ei < events.size(); ++ei) {
    SCOPED_TRACE(absl::StrCat("event ", ei));
    const Event& e = events[ei];
    const Decision& g = (*decisions)[ei];
    const auto& gs = (*gpu_scores)[ei];
    const auto cs = CpuScores(k, e);
    ++tally->events;
    // Scores within the tolerance.
    for (int64_t head = 0; head < hl; ++head) {
      const auto& a = gs[static_cast<size_t>(head)];
      const auto& c = cs[static_cast<size_t>(head)];
      ASSERT_EQ(a.size(), c.size());
      const double tol = Tolerance(c);
      for (size_t j = 0; j < c.size(); ++j) {
        const double err = std::abs(static_cast<double>(a[j]) - c[j]);
        ASSERT_LE(err, tol) << "head " << head << " candidate " << j << ": gpu " << a[j] << " cpu "
                            << c[j];
        tally->max_score_error = std::max(tally->max_score_error, err / (tol / kRelTol));
      }
    }
    // Exact given the GPU's scores: the CPU's routing and selector on them.
    std::vector<int32_t> routed(static_cast<size_t>(hl));
    auto allocator = MakeAllocator(k.config.allocator).value();
    AllocationInputs ai{&k.config, e.lengths, gs, k.demand.layers, k.demand.heads};
    ASSERT_TRUE(allocator->Allocate(ai, routed).ok());
    EXPECT_EQ(g.budgets, routed) << "budgets differ from the CPU routing of the GPU's scores";
    for (int64_t head = 0; head < hl; ++head) {
      const int n = e.lengths[static_cast<size_t>(head)];
      std::vector<int32_t> want;
      SelectHead(gs[static_cast<size_t>(head)], n, g.budgets[static_cast<size_t>(head)], window,
                 &want);
      const auto got = g.Kept(head);
      ASSERT_EQ(std::vector<int32_t>(got.begin(), got.end()), want) << "head " << head;
    }
    auto mask = (*gpu)->LastKeepMaskForTest(static_cast<int>(ei));
    ASSERT_TRUE(mask.ok()) << mask.status();
    EXPECT_EQ(*mask, BuildKeepMask(g, e.n_max));

    // Against the CPU engine's decision.
    auto c = (*cpu)->Compress(CpuInputs(e));
    ASSERT_TRUE(c.ok()) << c.status();
    for (int l = 0; l < m.num_layers; ++l) {
      bool layer_differs = false;
      for (int h = 0; h < m.num_kv_heads; ++h) {
        const size_t head = static_cast<size_t>(l) * m.num_kv_heads + h;
        layer_differs |= g.budgets[head] != c->budgets[head];
      }
      if (!layer_differs) continue;
      // The static split never looks at scores: any difference is a bug.
      ASSERT_FALSE(UsesHeadProfile(k.config)) << "layer " << l << ": static budgets differ";
      // Allowed only when the layer's pool has a tie at float rounding around its threshold.
      std::vector<float> pool;
      double tol = kAbsTol;
      for (int h = 0; h < m.num_kv_heads; ++h) {
        const auto& s = cs[static_cast<size_t>(l) * m.num_kv_heads + h];
        pool.insert(pool.end(), s.begin(), s.end());
        tol = std::max(tol, Tolerance(s));
      }
      std::sort(pool.begin(), pool.end(), std::greater<float>());
      const int64_t kk = PoolSizes(k.config, k.demand.layers).value()[static_cast<size_t>(l)];
      ASSERT_LT(kk, static_cast<int64_t>(pool.size())) << "layer " << l;
      const bool near_tie =
          pool[static_cast<size_t>(kk - 1)] - pool[static_cast<size_t>(kk)] <= 2 * tol;
      ASSERT_TRUE(near_tie) << "layer " << l << ": budgets differ without a pool tie";
      ASSERT_FALSE(k.exact_ties) << "layer " << l << ": budgets differ on exact ties";
      ++tally->budget_ties;
    }
    for (int64_t head = 0; head < hl; ++head) {
      const auto got = g.Kept(head);
      const auto want = c->Kept(head);
      if (std::equal(got.begin(), got.end(), want.begin(), want.end())) continue;
      if (g.budgets[static_cast<size_t>(head)] != c->budgets[static_cast<size_t>(head)]) continue;
      // Same budget, different sets: every swapped pair must be a tie at float rounding.
      const auto& s = cs[static_cast<size_t>(head)];
      const double tol = Tolerance(s);
      std::vector<int32_t> only_gpu, only_cpu;
      std::set_difference(got.begin(), got.end(), want.begin(), want.end(),
                          std::back_inserter(only_gpu));
      std::set_difference(want.begin(), want.end(), got.begin(), got.end(),
                          std::back_inserter(only_cpu));
      float lo = INFINITY, hi = -INFINITY;
      for (int32_t j : only_gpu) lo = std::min(lo, s[static_cast<size_t>(j)]);
      for (int32_t j : only_cpu) hi = std::max(hi, s[static_cast<size_t>(j)]);
      ASSERT_LE(hi - lo, 2 * tol) << "head " << head << ": kept sets differ beyond rounding";
      ASSERT_FALSE(k.exact_ties) << "head " << head << ": kept sets differ on exact ties";
      ++tally->rounding_ties;
    }
    tally->heads += static_cast<int>(hl);
  }

  // Managed mode: the compaction matches the CPU's gather of the same decision.
  if (k.config.managed && k.config.model.dtype == DType::kFloat16) {
    std::vector<DeviceGatherTarget> targets;
    std::vector<void*> outputs;
    const size_t row_bytes = static_cast<size_t>(m.head_dim) * 2;
    for (size_t ei = 0; ei < events.size(); ++ei) {
      DeviceGatherTarget t;
      t.src = inputs[ei].keys;
      t.max_kept = std::max(1, (*decisions)[ei].max_kept());
      const size_t bytes = static_cast<size_t>(hl * t.max_kept) * row_bytes;
      t.dst = (*gpu)->Allocate(bytes).value();
      outputs.push_back(t.dst);
      device.push_back(t.dst);
      targets.push_back(t);
    }
    ASSERT_TRUE((*gpu)->GatherKeptForTest(targets, row_bytes).ok());
    for (size_t ei = 0; ei < events.size(); ++ei) {
      const size_t bytes = static_cast<size_t>(hl * targets[ei].max_kept) * row_bytes;
      std::vector<unsigned char> got(bytes), want(bytes);
      ASSERT_TRUE((*gpu)->Download(got.data(), outputs[ei], bytes).ok());
      GatherKeptRows((*decisions)[ei], events[ei].keys.bytes.data(), events[ei].n_max, row_bytes,
                     targets[ei].max_kept, want.data());
      EXPECT_EQ(got, want) << "event " << ei;
    }
  }
  for (void* p : device) EXPECT_TRUE((*gpu)->Free(p).ok());
}

TEST_F(GpuEngineTest, MatchesTheCpuEngineOnRandomAndAdversarialConfigurations) {
  const std::vector<Case> cases = Cases();
  ASSERT_GE(cases.size(), 200u);
  Tally tally;
  for (const Case& k : cases) {
    RunCase(k, &tally);
    if (HasFatalFailure()) return;
  }
  std::cout << "GPU vs CPU: " << tally.configs << " configurations, " << tally.events << " events, "
            << tally.heads << " heads; largest score error " << tally.max_score_error
            << " of the head's largest |score|; kept sets differing at a "
            << "float-rounding tie: " << tally.rounding_ties
            << " heads; budgets at a pool tie: " << tally.budget_ties << " layers\n";
}

TEST_F(GpuEngineTest, LlamaGeometryEventAtBatchFour) {
  Case k;
  k.name = "llama8b";
  k.config = Geometry(32, 8, 4, 128, DType::kFloat16);
  k.config.budget.budget = 512;
  k.config.budget.window = 8;
  k.config.scorer.kind = ScorerKind::kRkv;
  k.config.allocator.kind = AllocatorKind::kReasonAlloc;
  for (int l = 0; l < 32; ++l) k.demand.layers.push_back(0.5 + std::abs(std::sin(l * 0.4)));
  k.events = 4;
  k.seed = 11;
  Tally tally;
  RunCase(k, &tally);
  std::cout << "Llama-8B geometry, 4 sessions: " << tally.heads << " heads, rounding ties "
            << tally.rounding_ties << ", budget ties " << tally.budget_ties << "\n";
}

// The streaming kernel ranks candidates by age from each head's end, not by row index: one layer,
// 2 KV heads of 30 and 14 rows, window 2, budget 8, sinks 4, adakv and reasonalloc head routing.
// Equal ages rank equal, so the budgets are [8, 8] and each head keeps its sinks and its newest
// rows (by row index the long head would get [10, 6] and keep its rows 24-25). The same case as
// the CPU engine's test Engine.StreamingRanksRaggedHeadsByAgeFromTheirEnds.
TEST_F(GpuEngineTest, StreamingRanksRaggedHeadsByAgeFromTheirEnds) {
  for (const std::string allocator : {"adakv", "reasonalloc"}) {
    SessionConfig c = Geometry(1, 2, 1, 4, DType::kFloat32);
    c.budget.budget = 8;
    c.budget.window = 2;
    c.budget.sinks = 4;
    c.scorer.kind = ScorerKind::kStreaming;
    c.allocator.kind = ParseAllocator(allocator).value();
    c.allocator.reasonalloc_mode = ReasonAllocMode::kHead;
    auto gpu = GpuEngine::Create(0, c);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    const std::vector<float> q(2 * 2 * 4, 1.0f), k(2 * 30 * 4, 1.0f);
    void* dq = (*gpu)->Allocate(q.size() * sizeof(float)).value();
    void* dk = (*gpu)->Allocate(k.size() * sizeof(float)).value();
    ASSERT_TRUE((*gpu)->Upload(dq, q.data(), q.size() * sizeof(float)).ok());
    ASSERT_TRUE((*gpu)->Upload(dk, k.data(), k.size() * sizeof(float)).ok());
    const std::vector<int32_t> lengths = {30, 14};
    DeviceEventInputs in;
    in.query_window = dq;
    in.keys = dk;
    in.n_max = 30;
    in.lengths = lengths;
    auto decisions = (*gpu)->CompressBatch(std::span<const DeviceEventInputs>(&in, 1));
    ASSERT_TRUE(decisions.ok()) << decisions.status();
    const Decision& d = (*decisions)[0];
    EXPECT_EQ(d.budgets, (std::vector<int32_t>{8, 8})) << allocator;
    const auto kept0 = d.Kept(0);
    const auto kept1 = d.Kept(1);
    EXPECT_EQ(std::vector<int32_t>(kept0.begin(), kept0.end()),
              (std::vector<int32_t>{0, 1, 2, 3, 26, 27, 28, 29}))
        << allocator;
    EXPECT_EQ(std::vector<int32_t>(kept1.begin(), kept1.end()),
              (std::vector<int32_t>{0, 1, 2, 3, 10, 11, 12, 13}))
        << allocator;
    EXPECT_TRUE((*gpu)->Free(dq).ok());
    EXPECT_TRUE((*gpu)->Free(dk).ok());
  }
}

// A logits scratch smaller than one batch: heads are scored in chunks, with the same results.
TEST_F(GpuEngineTest, ChunkedScoringMatchesTheCpuEngine) {
  ::setenv("REASONALLOC_GPU_LOGITS_BYTES", "200000", 1);
  Tally tally;
  std::vector<Case> cases = Cases();
  for (size_t i = 0; i < cases.size(); i += 7) {
    RunCase(cases[i], &tally);
    if (HasFatalFailure()) break;
  }
  ::unsetenv("REASONALLOC_GPU_LOGITS_BYTES");
  std::cout << "chunked scoring: " << tally.configs << " configurations, " << tally.heads
            << " heads\n";
}

TEST_F(GpuEngineTest, RejectsBadInputsNamingThem) {
  SessionConfig c = Geometry(2, 2, 2, 16, DType::kFloat16);
  c.budget.budget = 16;
  c.budget.window = 4;
  auto gpu = GpuEngine::Create(0, c);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ((*gpu)->CompressBatch({}).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> lengths(4, 10);
  DeviceEventInputs in;
  in.n_max = 10;
  in.lengths = lengths;
  auto st = (*gpu)->CompressBatch(std::span<const DeviceEventInputs>(&in, 1)).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("events[0]"), std::string::npos) << st;
  // A caller that knows the event's wire path names it.
  const std::string name = "arenas";
  st = (*gpu)
           ->CompressBatch(std::span<const DeviceEventInputs>(&in, 1),
                           std::span<const std::string>(&name, 1))
           .status();
  EXPECT_EQ(st.message().rfind("arenas: keys and query_window", 0), 0u) << st;
  void* p = (*gpu)->Allocate(1 << 16).value();
  in.keys = p;
  in.query_window = p;
  lengths[3] = 11;
  st = (*gpu)->CompressBatch(std::span<const DeviceEventInputs>(&in, 1)).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("lengths[3]"), std::string::npos) << st;
  EXPECT_FALSE(GpuEngine::Create(1 << 20, c).ok());
  EXPECT_TRUE((*gpu)->Free(p).ok());
}

// Runs everywhere: every configuration above is valid, and the checks the GPU test makes "given
// the GPU's scores" (the CPU's routing and selector applied to a backend's scores) reproduce the
// CPU engine's own decisions when fed the CPU scorer's scores.
TEST(GpuEngineHarness, ConfigurationsAreValidAndTheExactChecksHoldOnTheCpu) {
  int events = 0;
  for (const Case& k : Cases()) {
    SCOPED_TRACE(k.name);
    auto cpu = Engine::Create(k.config, k.demand);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    std::mt19937 rng(k.seed);
    for (int i = 0; i < k.events; ++i) {
      const Event e = MakeEvent(k, rng);
      const auto cs = CpuScores(k, e);
      auto c = (*cpu)->Compress(CpuInputs(e));
      ASSERT_TRUE(c.ok()) << c.status();
      std::vector<int32_t> routed(cs.size());
      auto allocator = MakeAllocator(k.config.allocator).value();
      AllocationInputs ai{&k.config, e.lengths, cs, k.demand.layers, k.demand.heads};
      ASSERT_TRUE(allocator->Allocate(ai, routed).ok());
      ASSERT_EQ(c->budgets, routed);
      for (size_t head = 0; head < cs.size(); ++head) {
        std::vector<int32_t> want;
        SelectHead(cs[head], e.lengths[head], c->budgets[head], k.config.budget.window, &want);
        const auto got = c->Kept(static_cast<int64_t>(head));
        ASSERT_EQ(std::vector<int32_t>(got.begin(), got.end()), want) << "head " << head;
      }
      ++events;
    }
  }
  std::cout << Cases().size() << " configurations, " << events << " events checked on the CPU\n";
}

TEST(GpuEngineWithoutGpu, SaysWhy) {
  const ProbeResult probe = ProbeDevices();
  if (!probe.devices.empty()) GTEST_SKIP() << "a GPU is visible: covered by the tests above";
  SessionConfig c = Geometry(1, 1, 1, 16, DType::kFloat16);
  c.budget.budget = 16;
  c.budget.window = 4;
  auto gpu = GpuEngine::Create(0, c);
  ASSERT_FALSE(gpu.ok());
  EXPECT_FALSE(gpu.status().message().empty());
  std::cout << "no GPU (" << probe.reason << "): GpuEngine::Create says " << gpu.status() << "\n";
}

}  // namespace
}  // namespace reasonalloc::gpu
