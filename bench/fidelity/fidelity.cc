// The fidelity benchmark: every eviction policy against the full cache, on real reasoning
// trajectories of the reference worker's model (docs/algorithms.md §7).
//
// 1. The full cache generates a greedy trajectory of --max_tokens tokens for every prompt (control
//    tokens suppressed so each has the same length); its log-probabilities are kept.
// 2. Each configuration (policy × budget × Δ) replays those trajectories teacher-forced through
//    the sidecar, one managed session per prompt, --group configurations per batch: per position
//    KL(full ‖ compressed) and whether the compressed model's greedy choice is the full cache's
//    token. The first such disagreement is also where a free-running greedy decode first diverges
//    (the two runs see identical inputs until then).
// 3. Optionally (--free_running_budgets) free-running greedy decodes, compared position by
//    position with the full trajectory.
// Output (--out_dir): fidelity_runs.csv (one row per configuration and prompt),
// fidelity_layers.csv (final per-layer budgets), fidelity_heads.csv (each head's budget averaged
// over the events, for sequences whose heads of one layer were given different budgets: head
// routing), fidelity_meta.json; bench/fidelity/report.py
// turns them into the table and plots.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/cli_args.h"
#include "worker/chat_template.h"
#include "worker/driver.h"
#include "worker/model_files.h"
#include "worker/tokenizer.h"

ABSL_FLAG(std::string, model, "",
          "GGUF file: a path or a file name in the model folder (default: $REASONALLOC_MODEL, "
          "then the reference model; as the worker finds it)");
ABSL_FLAG(std::string, target, "", "Sidecar address");
ABSL_FLAG(bool, raw, false, "Prompts as they are, without the chat template (base models)");
ABSL_FLAG(std::string, prompts, "bench/fidelity/prompts.txt", "One prompt per line");
ABSL_FLAG(int, max_prompts, 0, "Use only the first N prompts (0 = all)");
ABSL_FLAG(int, max_tokens, 768, "Generated tokens per trajectory");
ABSL_FLAG(std::string, policies,
          "streaming/uniform,snapkv/uniform,h2o/uniform,rkv/uniform,rkv/pyramid,rkv/adakv,"
          "rkv/reasonalloc-layer,rkv/reasonalloc-head,rkv/reasonalloc-full",
          "scorer/allocator[-mode] list");
ABSL_FLAG(std::string, budgets, "32,64,128,256", "Budgets (tokens per head)");
ABSL_FLAG(int, delta, 64, "Δ for the grid");
ABSL_FLAG(std::string, delta_sweep, "16,32,128",
          "Extra Δ values, for --sweep_policy at --sweep_budget");
ABSL_FLAG(std::string, sweep_policy, "rkv/reasonalloc-full", "Policy of the Δ sweep");
ABSL_FLAG(int, sweep_budget, 64, "Budget of the Δ sweep");
ABSL_FLAG(std::string, free_running_budgets, "64", "Budgets that also get a free-running decode");
ABSL_FLAG(int, window, 8, "α");
ABSL_FLAG(int, group, 4, "Configurations decoded together in one batch");
ABSL_FLAG(std::string, out_dir, "bench/results", "Where the CSV and JSON files go");
ABSL_FLAG(std::string, model_name, "",
          "Model name (selects the profile; empty = from the file name, as the worker does)");

namespace reasonalloc::worker {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int Fail(const absl::Status& s) {
  std::cerr << "fidelity: " << s << "\n";
  return 1;
}

struct Config {
  Policy policy;
  bool free_running = false;
};

struct SeqStats {
  double kl_sum = 0;
  int agree = 0, positions = 0, first_divergence = -1, free_agree = -1;
  std::vector<float> kl;  // per position, for the tail

  // Share of the KL carried by the worst 5 % of positions (at least one).
  double TopShare() const {
    if (kl.empty() || kl_sum <= 0) return 0;
    std::vector<float> v = kl;
    const size_t k = std::max<size_t>(1, v.size() / 20);
    std::partial_sort(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end(),
                      std::greater<float>());
    double top = 0;
    for (size_t i = 0; i < k; ++i) top += v[i];
    return top / kl_sum;
  }
};

absl::StatusOr<std::vector<int>> Ints(const std::string& flag, const std::string& text) {
  std::vector<int> out;
  for (absl::string_view s : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int v;
    if (!absl::SimpleAtoi(s, &v) || v < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": \"", s, "\""));
    }
    out.push_back(v);
  }
  return out;
}

void LogSoftmax(const float* logits, int n, std::vector<float>* out) {
  out->resize(static_cast<size_t>(n));
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  for (int i = 0; i < n; ++i) (*out)[static_cast<size_t>(i)] = logits[i] - lse;
}

int Main(int argc, char** argv) {
  const auto spelled = NormalizeFlagSpelling(argc, argv);
  absl::ParseCommandLine(argc, argv);
  auto path = ResolveModelPath(absl::GetFlag(FLAGS_model));
  if (!path.ok()) return Fail(path.status());
  auto file = GgufFile::Open(*path);
  if (!file.ok()) return Fail(file.status());
  auto tok = Tokenizer::FromGguf(**file);
  if (!tok.ok()) return Fail(tok.status());
  auto model = Model::Load(**file);
  if (!model.ok()) return Fail(model.status());
  const ModelConfig& mc = (*model)->config();
  auto general = (*file)->GetString("general.name");
  const std::string model_name =
      ChooseModelName(absl::GetFlag(FLAGS_model_name), *path, general.ok() ? *general : "");
  auto prompts = ReadPrompts(absl::GetFlag(FLAGS_prompts));
  if (!prompts.ok()) return Fail(prompts.status());
  if (absl::GetFlag(FLAGS_max_prompts) > 0 &&
      static_cast<int>(prompts->size()) > absl::GetFlag(FLAGS_max_prompts)) {
    prompts->resize(static_cast<size_t>(absl::GetFlag(FLAGS_max_prompts)));
  }
  const int P = static_cast<int>(prompts->size());
  const int N = absl::GetFlag(FLAGS_max_tokens);
  std::vector<std::vector<int32_t>> ids;
  for (const std::string& p : *prompts) {
    auto text = PromptText(**file, p, absl::GetFlag(FLAGS_raw));
    if (!text.ok()) return Fail(text.status());
    ids.push_back((*tok)->Encode(*text));
  }
  const std::vector<int32_t> suppress = (*tok)->ControlTokens();

  // The configurations.
  std::vector<Config> configs;
  auto budgets = Ints("budgets", absl::GetFlag(FLAGS_budgets));
  auto sweep = Ints("delta_sweep", absl::GetFlag(FLAGS_delta_sweep));
  auto free_budgets = Ints("free_running_budgets", absl::GetFlag(FLAGS_free_running_budgets));
  if (!budgets.ok()) return Fail(budgets.status());
  if (!sweep.ok()) return Fail(sweep.status());
  if (!free_budgets.ok()) return Fail(free_budgets.status());
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_policies), ',', absl::SkipEmpty())) {
    auto policy = ParsePolicy(std::string(name));
    if (!policy.ok()) return Fail(policy.status());
    for (int b : *budgets) {
      Config c;
      c.policy = *policy;
      c.policy.budget = b;
      c.policy.buffer = absl::GetFlag(FLAGS_delta);
      c.policy.window = absl::GetFlag(FLAGS_window);
      configs.push_back(c);
      if (std::find(free_budgets->begin(), free_budgets->end(), b) != free_budgets->end()) {
        c.free_running = true;
        configs.push_back(c);
      }
    }
  }
  if (!absl::GetFlag(FLAGS_sweep_policy).empty()) {
    auto policy = ParsePolicy(absl::GetFlag(FLAGS_sweep_policy));
    if (!policy.ok()) return Fail(policy.status());
    for (int d : *sweep) {
      Config c;
      c.policy = *policy;
      c.policy.budget = absl::GetFlag(FLAGS_sweep_budget);
      c.policy.buffer = d;
      c.policy.window = absl::GetFlag(FLAGS_window);
      configs.push_back(c);
    }
  }

  Client::Options options;
  options.target = absl::GetFlag(FLAGS_target);
  options.timeout = absl::Seconds(300);
  auto client = Client::Connect(options);
  if (!client.ok()) return Fail(client.status());

  // 1. The full-cache trajectories and their log-probabilities.
  const size_t V = static_cast<size_t>(mc.vocab);
  std::vector<float> full_lp(static_cast<size_t>(P) * N * V);
  FullCacheBackend full(mc, P);
  RunOptions ro;
  ro.max_new_tokens = N;
  ro.stop_at_eos = false;
  ro.suppress = suppress;
  ro.on_logits = [&](int b, int index, const float* logits) {
    thread_local std::vector<float> lp;
    LogSoftmax(logits, mc.vocab, &lp);
    std::copy(lp.begin(), lp.end(), full_lp.begin() + (static_cast<size_t>(b) * N + index) * V);
  };
  std::fprintf(stderr, "full cache: %d prompts × %d tokens\n", P, N);
  auto ref = Run(**model, &full, ids, ro);
  if (!ref.ok()) return Fail(ref.status());
  const double full_tps = static_cast<double>(ref->tokens) / ref->seconds;
  std::fprintf(stderr, "full cache: %.1f s (%.1f tokens/s at batch %d)\n", ref->seconds, full_tps,
               P);
  std::vector<int64_t> full_bytes(static_cast<size_t>(P));
  for (int b = 0; b < P; ++b)
    full_bytes[static_cast<size_t>(b)] = ref->final_bytes[static_cast<size_t>(b)];

  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  std::ofstream runs(out_dir + "/fidelity_runs.csv"), layers(out_dir + "/fidelity_layers.csv");
  if (!runs || !layers)
    return Fail(absl::NotFoundError(absl::StrCat("cannot write into ", out_dir)));
  runs << "policy,scorer,allocator,mode,budget,delta,run,prompt,prompt_tokens,generated,kl_mean,"
          "top1,first_divergence,free_agreement,peak_kv_bytes,full_kv_bytes,events,compress_s,"
          "kl_top5_share\n";
  layers << "policy,budget,delta,prompt,layer,layer_budget\n";
  std::ofstream heads(out_dir + "/fidelity_heads.csv");
  heads << "policy,budget,delta,prompt,layer,head,mean_budget\n";
  const double t_grid = Now();
  int64_t grid_steps = 0;
  const int group = std::max(1, absl::GetFlag(FLAGS_group));
  // Batches of --group configurations (×P prompts each); a batch may mix teacher-forced and
  // free-running configurations (forcing is per sequence).
  std::vector<std::vector<size_t>> batches;
  for (size_t ci = 0; ci < configs.size(); ci += static_cast<size_t>(group)) {
    std::vector<size_t> batch;
    for (size_t k = ci; k < std::min(configs.size(), ci + static_cast<size_t>(group)); ++k) {
      batch.push_back(k);
    }
    batches.push_back(std::move(batch));
  }
  for (const std::vector<size_t>& batch : batches) {
    {
      std::vector<Policy> policies;
      std::vector<size_t> slot_config;
      std::vector<std::vector<int32_t>> slot_prompt, slot_forced;
      for (size_t ci : batch) {
        for (int b = 0; b < P; ++b) {
          policies.push_back(configs[ci].policy);
          slot_config.push_back(ci);
          slot_prompt.push_back(ids[static_cast<size_t>(b)]);
          slot_forced.push_back(configs[ci].free_running ? std::vector<int32_t>{}
                                                         : ref->generated[static_cast<size_t>(b)]);
        }
      }
      if (policies.empty()) continue;
      auto backend = SidecarBackend::Open(client->get(), mc, model_name, policies);
      if (!backend.ok()) return Fail(backend.status());
      std::vector<SeqStats> stats(policies.size());
      RunOptions o;
      o.max_new_tokens = N;
      o.stop_at_eos = false;
      o.suppress = suppress;
      o.forced = slot_forced;
      o.on_logits = [&](int s, int index, const float* logits) {
        const int b = s % P;
        SeqStats& st = stats[static_cast<size_t>(s)];
        const int32_t want = ref->generated[static_cast<size_t>(b)][static_cast<size_t>(index)];
        if (configs[slot_config[static_cast<size_t>(s)]].free_running) return;
        thread_local std::vector<float> clp;
        LogSoftmax(logits, mc.vocab, &clp);
        const float* f = full_lp.data() + (static_cast<size_t>(b) * N + index) * V;
        double kl = 0;
        for (size_t v = 0; v < V; ++v) kl += std::exp(f[v]) * (f[v] - clp[v]);
        st.kl_sum += std::max(0.0, kl);
        st.kl.push_back(static_cast<float>(std::max(0.0, kl)));
        const bool same = Sample(logits, mc.vocab, 0, nullptr, suppress) == want;
        st.agree += same ? 1 : 0;
        if (!same && st.first_divergence < 0) st.first_divergence = index;
        ++st.positions;
      };
      const double t0 = Now();
      auto result = Run(**model, backend->get(), slot_prompt, o);
      if (!result.ok()) return Fail(result.status());
      grid_steps += result->tokens;
      std::fprintf(stderr,
                   "configs %zu..%zu%s: %zu sequences, %.1f s (%.1f tokens/s), %lld events, %.1f s "
                   "in Compress\n",
                   batch.front(), batch.back(), "", policies.size(), Now() - t0,
                   static_cast<double>(result->tokens) / result->seconds,
                   static_cast<long long>((*backend)->events()), (*backend)->compress_seconds());
      for (size_t s = 0; s < policies.size(); ++s) {
        const Config& c = configs[slot_config[s]];
        const int b = static_cast<int>(s) % P;
        SeqStats& st = stats[s];
        const auto& gen = result->generated[s];
        const auto& want = ref->generated[static_cast<size_t>(b)];
        const int free_pass = c.free_running ? 1 : 0;
        if (free_pass == 1) {
          st.free_agree = 0;
          for (size_t i = 0; i < gen.size() && i < want.size(); ++i) {
            st.free_agree += gen[i] == want[i] ? 1 : 0;
            if (gen[i] != want[i] && st.first_divergence < 0)
              st.first_divergence = static_cast<int>(i);
          }
        }
        const std::string name = c.policy.Name();
        runs << name << "," << c.policy.scorer_name() << "," << c.policy.allocator_name() << ","
             << c.policy.mode_name() << "," << c.policy.budget << "," << c.policy.buffer << ","
             << (free_pass ? "free" : "forced") << "," << b << ","
             << ids[static_cast<size_t>(b)].size() << "," << gen.size() << ",";
        if (free_pass == 0) {
          runs << st.kl_sum / std::max(1, st.positions) << ","
               << static_cast<double>(st.agree) / std::max(1, st.positions) << ",";
        } else {
          runs << ",,";
        }
        runs << (st.first_divergence < 0 ? static_cast<int>(gen.size()) : st.first_divergence)
             << ","
             << (free_pass ? absl::StrCat(static_cast<double>(st.free_agree) /
                                          std::max<size_t>(1, gen.size()))
                           : "")
             << "," << result->peak_bytes[s] << "," << full_bytes[static_cast<size_t>(b)] << ","
             << (*backend)->events(static_cast<int>(s)) << ","
             << (*backend)->compress_seconds(static_cast<int>(s)) << ","
             << (free_pass ? "" : absl::StrCat(st.TopShare())) << "\n";
        if (free_pass == 0) {
          const auto lb = (*backend)->LayerBudgets(static_cast<int>(s));
          for (size_t l = 0; l < lb.size(); ++l) {
            layers << name << "," << c.policy.budget << "," << c.policy.buffer << "," << b << ","
                   << l << "," << lb[l] << "\n";
          }
          const auto hb = (*backend)->HeadBudgets(static_cast<int>(s));
          const size_t H = static_cast<size_t>(mc.kv_heads);
          bool routed = false;
          for (size_t e = 0; e < hb.size() && !routed; ++e) routed = hb[e] != hb[e - e % H];
          for (size_t e = 0; routed && e < hb.size(); ++e) {
            heads << name << "," << c.policy.budget << "," << c.policy.buffer << "," << b << ","
                  << e / H << "," << e % H << "," << hb[e] << "\n";
          }
        }
      }
      runs.flush();
      layers.flush();
      heads.flush();
    }
  }
  const double grid_s = Now() - t_grid;
  std::ofstream meta(out_dir + "/fidelity_meta.json");
  meta << "{\"model\":\"" << model_name << "\",\"prompts\":" << P << ",\"generated_tokens\":" << N
       << ",\"configurations\":" << configs.size() << ",\"full_cache_seconds\":" << ref->seconds
       << ",\"full_cache_tokens_per_second\":" << full_tps << ",\"grid_seconds\":" << grid_s
       << ",\"grid_sequence_steps\":" << grid_steps << "}\n";
  std::fprintf(stderr, "grid: %zu configurations in %.1f s\n", configs.size(), grid_s);
  return 0;
}

}  // namespace
}  // namespace reasonalloc::worker

int main(int argc, char** argv) { return reasonalloc::worker::Main(argc, argv); }
