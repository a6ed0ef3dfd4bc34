// One compression event on the CUDA backend for the Llama-8B geometry (L 32, Hq 32, Hkv 8, d 128,
// fp16 cache, B 512, N 640, window 8), per scorer × allocator, at several batch sizes (sessions
// per event); medians over repetitions, each a whole CompressBatch (descriptors up, kernels,
// counts down, host routing, selection, kept indices down). Also the fraction of the physical
// limits it reaches: the bytes an event must read (every key and window query once) over the
// memory bandwidth, and its multiply-adds over the fp32 (CUDA-core) and dense fp16 tensor-core
// peaks (the scorer's kernels run on CUDA cores in fp32).
//
//   gpu_event_bench [--batches 1,64] [--reps 20] [--json out.json]
//                   [--peak-bandwidth-gbs 4800] [--peak-fp32-tflops 67] [--peak-tensor-tflops 989]
//
// The default peaks are the H200 SXM datasheet's. Without a GPU it prints why and exits 0.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/dtype.h"
#include "gpu/device_probe.h"
#include "gpu/gpu_engine.h"

ABSL_FLAG(std::string, batches, "1,64", "Sessions per event, comma-separated");
ABSL_FLAG(int, reps, 20, "Timed repetitions per configuration (after 3 warm-ups)");
ABSL_FLAG(std::string, json, "", "Also write the results as JSON to this file");
ABSL_FLAG(double, peak_bandwidth_gbs, 4800, "Memory bandwidth of the GPU, GB/s");
ABSL_FLAG(double, peak_fp32_tflops, 67, "fp32 CUDA-core peak, TFLOP/s");
ABSL_FLAG(double, peak_tensor_tflops, 989, "Dense fp16 tensor-core peak, TFLOP/s");

namespace reasonalloc {
namespace {

constexpr int kLayers = 32, kQHeads = 32, kKvHeads = 8, kDim = 128, kBudget = 512, kN = 640,
              kWindow = 8;

SessionConfig Config(const std::string& scorer, const std::string& allocator) {
  SessionConfig c;
  c.model.name = "llama-8b";
  c.model.num_layers = kLayers;
  c.model.num_q_heads = kQHeads;
  c.model.num_kv_heads = kKvHeads;
  c.model.head_dim = kDim;
  c.model.dtype = DType::kFloat16;
  c.model.max_context = 131072;
  c.budget.budget = kBudget;
  c.budget.window = kWindow;
  c.scorer.kind = ParseScorer(scorer).value();
  c.allocator.kind = ParseAllocator(allocator).value();
  return c;
}

// Multiply-adds of one head's event (the kernels' own count: the Gram matrix is computed whole).
double HeadMacs(const std::string& scorer) {
  const double group = kQHeads / kKvHeads;
  double macs = 0;
  if (scorer == "snapkv" || scorer == "rkv") macs += group * kWindow * (kN - kWindow) * kDim;
  if (scorer == "h2o") macs += group * kWindow * kN * kDim;
  if (scorer == "rkv") macs += double{kN} * kN * kDim;
  return macs;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double Quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1))];
}

int Run(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const gpu::ProbeResult probe = gpu::ProbeDevices();
  if (probe.devices.empty()) {
    std::cout << "gpu_event_bench: no GPU (" << probe.reason << "); nothing to measure\n";
    return 0;
  }
  std::vector<int> batches;
  for (absl::string_view b : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int x = 0;
    if (!absl::SimpleAtoi(b, &x) || x <= 0) {
      std::cerr << "--batches: \"" << b << "\" is not a positive integer\n";
      return 2;
    }
    batches.push_back(x);
  }
  const int reps = absl::GetFlag(FLAGS_reps);
  if (reps <= 0) {
    std::cerr << "--reps must be positive\n";
    return 2;
  }
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  std::cout << "GPU: " << probe.devices[0].name << " (driver "
            << gpu::FormatDriverVersion(probe.driver_version) << ", sm_"
            << probe.devices[0].compute_major << probe.devices[0].compute_minor << ")\n";
  std::cout << "Llama-8B geometry: L " << kLayers << ", Hq " << kQHeads << ", Hkv " << kKvHeads
            << ", d " << kDim << ", fp16, B " << kBudget << ", N " << kN << ", window " << kWindow
            << "; medians of " << reps << " events\n\n";

  // One random session's keys and window, copied into every session of the batch.
  const size_t key_elems = size_t{kLayers} * kKvHeads * kN * kDim;
  const size_t q_elems = size_t{kLayers} * kQHeads * kWindow * kDim;
  std::vector<uint16_t> keys(key_elems), queries(q_elems);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : keys) v = FloatToHalf(normal(rng));
  for (auto& v : queries) v = FloatToHalf(normal(rng));
  std::vector<int32_t> lengths(size_t{kLayers} * kKvHeads, kN);

  auto first = gpu::GpuEngine::Create(0, Config("snapkv", "uniform"));
  if (!first.ok()) {
    std::cerr << "GpuEngine: " << first.status() << "\n";
    return 1;
  }
  std::vector<void*> key_bufs, q_bufs;
  for (int s = 0; s < max_batch; ++s) {
    auto k = (*first)->Allocate(key_elems * 2);
    auto q = (*first)->Allocate(q_elems * 2);
    if (!k.ok() || !q.ok()) {
      std::cerr << "cudaMalloc failed\n";
      return 1;
    }
    if (!(*first)->Upload(*k, keys.data(), key_elems * 2).ok() ||
        !(*first)->Upload(*q, queries.data(), q_elems * 2).ok()) {
      std::cerr << "upload failed\n";
      return 1;
    }
    key_bufs.push_back(*k);
    q_bufs.push_back(*q);
  }

  const double bw = absl::GetFlag(FLAGS_peak_bandwidth_gbs) * 1e9;
  const double fp32 = absl::GetFlag(FLAGS_peak_fp32_tflops) * 1e12;
  const double tensor = absl::GetFlag(FLAGS_peak_tensor_tflops) * 1e12;
  std::printf("%-22s %6s %11s %11s %11s %9s %9s %9s\n", "scorer/allocator", "batch", "median us",
              "p10 us", "p90 us", "HBM %", "fp32 %", "tensor %");
  std::string json = "[";
  const std::vector<std::pair<std::string, std::string>> configs = {
      {"snapkv", "uniform"},    {"snapkv", "adakv"}, {"snapkv", "reasonalloc"},
      {"streaming", "uniform"}, {"h2o", "uniform"},  {"rkv", "uniform"},
      {"rkv", "pyramid"},       {"rkv", "adakv"},    {"rkv", "reasonalloc"}};
  std::vector<double> demand;
  for (int l = 0; l < kLayers; ++l) demand.push_back(l == 0 ? 4.0 : 0.6 + 0.02 * l);
  for (const auto& [scorer, allocator] : configs) {
    auto engine = gpu::GpuEngine::Create(
        0, Config(scorer, allocator), allocator == "reasonalloc" ? demand : std::vector<double>{});
    if (!engine.ok()) {
      std::cerr << scorer << "/" << allocator << ": " << engine.status() << "\n";
      return 1;
    }
    for (int batch : batches) {
      std::vector<gpu::DeviceEventInputs> events(static_cast<size_t>(batch));
      for (int s = 0; s < batch; ++s) {
        events[static_cast<size_t>(s)].keys = key_bufs[static_cast<size_t>(s)];
        events[static_cast<size_t>(s)].query_window = q_bufs[static_cast<size_t>(s)];
        events[static_cast<size_t>(s)].n_max = kN;
        events[static_cast<size_t>(s)].lengths = lengths;
      }
      std::vector<double> us;
      for (int r = 0; r < reps + 3; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        auto d = (*engine)->CompressBatch(events);
        const double t =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0)
                .count();
        if (!d.ok()) {
          std::cerr << scorer << "/" << allocator << ": " << d.status() << "\n";
          return 1;
        }
        if (r >= 3) us.push_back(t);
      }
      const double med = Median(us);
      const double heads = double{kLayers} * kKvHeads * batch;
      const double bytes = batch * 2.0 * (key_elems + q_elems);
      const double macs = heads * HeadMacs(scorer);
      const double hbm = scorer == "streaming" ? 0 : bytes / (med * 1e-6) / bw * 100;
      const double f32 = 2 * macs / (med * 1e-6) / fp32 * 100;
      const double tc = 2 * macs / (med * 1e-6) / tensor * 100;
      const std::string name = scorer + "/" + allocator;
      std::printf("%-22s %6d %11.1f %11.1f %11.1f %9.2f %9.2f %9.3f\n", name.c_str(), batch, med,
                  Quantile(us, 0.1), Quantile(us, 0.9), hbm, f32, tc);
      std::fflush(stdout);
      absl::StrAppend(&json, json.size() > 1 ? "," : "", "{\"scorer\":\"", scorer,
                      "\",\"allocator\":\"", allocator, "\",\"batch\":", batch,
                      ",\"median_us\":", med, ",\"p10_us\":", Quantile(us, 0.1),
                      ",\"p90_us\":", Quantile(us, 0.9), ",\"bytes\":", bytes, ",\"macs\":", macs,
                      "}");
    }
  }
  json += "]\n";
  for (void* p : key_bufs) (void)(*first)->Free(p);
  for (void* p : q_bufs) (void)(*first)->Free(p);
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream(path) << json;
  }
  return 0;
}

}  // namespace
}  // namespace reasonalloc

int main(int argc, char** argv) { return reasonalloc::Run(argc, argv); }
