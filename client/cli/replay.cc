// Trace layout (one folder, every array C-order .npy; float32, float16, or bfloat16 bits as
// uint16):
//   queries.npy        [L, Hq, window, d]  the observation window at the event
//   keys.npy           [L, Hkv, N, d]      post-RoPE keys of the cache at the event
//   values.npy         [L, Hkv, N, d]
//   later_queries.npy  [L, Hq, T, d]       the queries of the steps until the next event
//   lengths.npy        [L, Hkv] int32/int64, optional: live rows per head (default N)
#include "client/cli/replay.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/api_defaults.h"
#include "core/engine.h"
#include "core/npy.h"
#include "core/policy.h"
#include "core/quality.h"

ABSL_FLAG(std::string, trace, "", "replay: trace folder (see README, 'Offline replay')");
ABSL_FLAG(std::string, scorers, "snapkv,h2o,streaming,rkv", "replay: scorers to compare");
ABSL_FLAG(
    std::string, allocators, "uniform,pyramid,adakv,reasonalloc:head,reasonalloc:full",
    "replay: allocators (reasonalloc:full|layer|head|off; static needs a profile's head demand "
    "and is not replayed)");
ABSL_FLAG(std::string, budgets, "32,64,128,256", "replay: budgets B to compare");
ABSL_FLAG(std::string, layer_demand, "", "replay: per-layer demand D for reasonalloc (comma list)");
ABSL_FLAG(double, rho, reasonalloc::kDefaultCalibrationRho,
          "replay: recall threshold for the recall>=rho share");
ABSL_FLAG(std::string, csv, "", "replay: also write the table as CSV to this file");

namespace reasonalloc {
namespace {

struct Array {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

absl::StatusOr<Array> LoadFloat(const std::string& path) {
  auto npy = ReadNpyFile(path);
  if (!npy.ok()) return npy.status();
  DType dtype;
  switch (npy->dtype) {
    case NpyDType::kFloat32:
      dtype = DType::kFloat32;
      break;
    case NpyDType::kFloat16:
      dtype = DType::kFloat16;
      break;
    case NpyDType::kUInt16:
      dtype = DType::kBFloat16;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": expected float32, float16 or uint16"));
  }
  Array a;
  a.shape = npy->shape;
  a.data.resize(static_cast<size_t>(npy->NumElements()));
  const int64_t bad =
      ConvertToFloat32(dtype, npy->data.data(), static_cast<int64_t>(a.data.size()), a.data.data());
  if (bad >= 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": NaN or Inf at flat index ", bad));
  }
  return a;
}

absl::StatusOr<std::vector<std::string>> Split(const std::string& list) {
  std::vector<std::string> out = absl::StrSplit(list, ',', absl::SkipEmpty());
  if (out.empty()) return absl::InvalidArgumentError("empty list");
  return out;
}

int Fail(const absl::Status& s) {
  std::cerr << "reasonalloc replay: " << s.message() << "\n";
  return 2;
}

}  // namespace

int ReplayCommand() {
  const std::string dir = absl::GetFlag(FLAGS_trace);
  if (dir.empty()) return Fail(absl::InvalidArgumentError("--trace is required"));
  auto path = [&](const char* name) { return (std::filesystem::path(dir) / name).string(); };
  auto q = LoadFloat(path("queries.npy"));
  if (!q.ok()) return Fail(q.status());
  auto k = LoadFloat(path("keys.npy"));
  if (!k.ok()) return Fail(k.status());
  auto v = LoadFloat(path("values.npy"));
  if (!v.ok()) return Fail(v.status());
  auto later = LoadFloat(path("later_queries.npy"));
  if (!later.ok()) return Fail(later.status());
  if (q->shape.size() != 4 || k->shape.size() != 4 || v->shape != k->shape ||
      later->shape.size() != 4 || later->shape[0] != q->shape[0] ||
      later->shape[1] != q->shape[1] || later->shape[3] != q->shape[3] ||
      k->shape[0] != q->shape[0] || k->shape[3] != q->shape[3]) {
    return Fail(absl::InvalidArgumentError(
        "shapes must be queries [L, Hq, window, d], keys and values [L, Hkv, N, d], "
        "later_queries [L, Hq, T, d]"));
  }
  ModelGeometry m{"replay",
                  static_cast<int>(q->shape[0]),
                  static_cast<int>(q->shape[1]),
                  static_cast<int>(k->shape[1]),
                  static_cast<int>(q->shape[3]),
                  DType::kFloat32,
                  static_cast<int>(std::max<int64_t>(k->shape[2], 1 << 17))};
  const int64_t n_max = k->shape[2];
  std::vector<int32_t> lengths(static_cast<size_t>(m.num_heads_total()),
                               static_cast<int32_t>(n_max));
  if (std::filesystem::exists(path("lengths.npy"))) {
    auto l = ReadNpyFile(path("lengths.npy"));
    if (!l.ok()) return Fail(l.status());
    auto values64 = NpyToInt64(*l, "lengths.npy");
    if (!values64.ok()) return Fail(values64.status());
    if (static_cast<int64_t>(values64->size()) != m.num_heads_total()) {
      return Fail(absl::InvalidArgumentError("lengths.npy must be [L, Hkv]"));
    }
    for (size_t i = 0; i < lengths.size(); ++i) {
      const int64_t value = (*values64)[i];
      if (value < 0 || value > n_max) {
        return Fail(absl::InvalidArgumentError(
            absl::StrCat("lengths.npy[", i, "] = ", value, " is outside [0, N]")));
      }
      lengths[i] = static_cast<int32_t>(value);
    }
  }
  std::vector<double> demand;
  for (const auto& part :
       absl::StrSplit(absl::GetFlag(FLAGS_layer_demand), ',', absl::SkipEmpty())) {
    double x;
    if (!absl::SimpleAtod(part, &x)) return Fail(absl::InvalidArgumentError("--layer_demand"));
    demand.push_back(x);
  }
  auto scorers = Split(absl::GetFlag(FLAGS_scorers));
  auto allocators = Split(absl::GetFlag(FLAGS_allocators));
  auto budget_list = Split(absl::GetFlag(FLAGS_budgets));
  if (!scorers.ok() || !allocators.ok() || !budget_list.ok()) {
    return Fail(absl::InvalidArgumentError("--scorers, --allocators and --budgets must be lists"));
  }

  std::string csv =
      "scorer,allocator,budget,kept_fraction,output_error,recall,recall_ge_rho,"
      "budget_spread,event_ms\n";
  std::cout << absl::StrFormat("%-10s %-18s %7s %8s %10s %8s %10s %8s %9s\n", "scorer", "allocator",
                               "budget", "kept", "out_err", "recall", "rec>=rho", "spread",
                               "event_ms");
  int64_t total_tokens = 0;
  for (int32_t n : lengths) total_tokens += n;
  for (const std::string& scorer : *scorers) {
    for (const std::string& allocator_spec : *allocators) {
      for (const std::string& budget_text : *budget_list) {
        SessionConfig c;
        c.model = m;
        c.budget.window = static_cast<int>(q->shape[2]);
        if (!absl::SimpleAtoi(budget_text, &c.budget.budget)) {
          return Fail(absl::InvalidArgumentError(absl::StrCat("--budgets: \"", budget_text, "\"")));
        }
        auto scorer_kind = ParseScorer(scorer, "--scorers");
        if (!scorer_kind.ok()) return Fail(scorer_kind.status());
        c.scorer.kind = *scorer_kind;
        const std::vector<std::string> spec = absl::StrSplit(allocator_spec, ':');
        auto allocator_kind = ParseAllocator(spec[0], "--allocators");
        if (!allocator_kind.ok()) return Fail(allocator_kind.status());
        c.allocator.kind = *allocator_kind;
        if (spec.size() > 1) {
          auto mode = ParseReasonAllocMode(spec[1], "--allocators mode");
          if (!mode.ok()) return Fail(mode.status());
          if (*mode == ReasonAllocMode::kStatic) {
            return Fail(absl::InvalidArgumentError(
                "--allocators reasonalloc:static: replay takes no head demand (run it through a "
                "sidecar with a profile that has head_demand)"));
          }
          c.allocator.reasonalloc_mode = *mode;
        }
        auto engine = Engine::Create(c, AllocatorOf(c.allocator.kind).UsesLayerProfile(c.allocator)
                                            ? demand
                                            : std::vector<double>{});
        if (!engine.ok()) return Fail(engine.status());
        auto decision = (*engine)->Compress({q->data.data(), k->data.data(), n_max, lengths, {}});
        if (!decision.ok()) return Fail(decision.status());
        const Quality quality =
            MeasureQuality(m, *decision, later->data.data(), later->shape[2], k->data.data(),
                           v->data.data(), n_max, lengths, absl::GetFlag(FLAGS_rho));
        const double kept = total_tokens > 0
                                ? 1.0 - static_cast<double>(decision->evicted_tokens) / total_tokens
                                : 1;
        std::cout << absl::StrFormat("%-10s %-18s %7d %8.3f %10.4f %8.4f %10.3f %8.2f %9.2f\n",
                                     scorer, allocator_spec, c.budget.budget, kept,
                                     quality.output_error, quality.recall, quality.recall_at_rho,
                                     quality.budget_spread, decision->seconds.total * 1e3);
        absl::StrAppend(
            &csv, absl::StrFormat("%s,%s,%d,%.6f,%.6f,%.6f,%.6f,%.4f,%.4f\n", scorer,
                                  allocator_spec, c.budget.budget, kept, quality.output_error,
                                  quality.recall, quality.recall_at_rho, quality.budget_spread,
                                  decision->seconds.total * 1e3));
      }
    }
  }
  if (const std::string out = absl::GetFlag(FLAGS_csv); !out.empty()) {
    std::ofstream f(out);
    f << csv;
    if (!f.good())
      return Fail(absl::InvalidArgumentError(absl::StrCat("--csv ", out, ": cannot write")));
  }
  return 0;
}

}  // namespace reasonalloc
