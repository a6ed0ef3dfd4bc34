#include "worker/sensitivity.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace reasonalloc::worker {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void LogSoftmax(const float* logits, int n, float* out) {
  float mx = -INFINITY;
  for (int i = 0; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  const float lse = mx + static_cast<float>(std::log(sum));
  for (int i = 0; i < n; ++i) out[i] = logits[i] - lse;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LayerProbeBackend>> LayerProbeBackend::Open(
    Client* client, const ModelConfig& config, const std::string& model_name, const Policy& policy,
    const std::vector<int>& first, const std::vector<int>& count, const std::vector<int>& head) {
  if (first.size() != count.size() || first.empty() ||
      (!head.empty() && head.size() != first.size())) {
    return absl::InvalidArgumentError("LayerProbeBackend: first, count and head differ in length");
  }
  std::unique_ptr<LayerProbeBackend> b(new LayerProbeBackend());
  b->config_ = config;
  b->first_ = first;
  b->count_ = count;
  b->head_ = head.empty() ? std::vector<int>(first.size(), -1) : head;
  b->full_ = std::make_unique<FullCacheBackend>(config, static_cast<int>(first.size()));
  for (size_t i = 0; i < first.size(); ++i) {
    if (first[i] < 0 || count[i] < 1 || first[i] + count[i] > config.layers) {
      return absl::InvalidArgumentError(absl::StrCat("LayerProbeBackend: layers [", first[i], ", ",
                                                     first[i] + count[i], ") outside [0, ",
                                                     config.layers, ")"));
    }
    const int h = b->head_[i];
    if (h < -1 || h >= config.kv_heads) {
      return absl::InvalidArgumentError(
          absl::StrCat("LayerProbeBackend: kv head ", h, " outside [0, ", config.kv_heads, ")"));
    }
    ModelConfig part = config;
    part.layers = count[i];
    if (h >= 0) {  // one KV head and its query group
      part.q_heads = config.q_heads / config.kv_heads;
      part.kv_heads = 1;
      part.embd = part.q_heads * config.head_dim;
    }
    auto probe = SidecarBackend::Open(client, part, model_name, {policy});
    if (!probe.ok()) return probe.status();
    b->probes_.push_back(*std::move(probe));
  }
  return b;
}

int LayerProbeBackend::Length(int b, int l, int h) const {
  return Probed(b, l, h)
             ? probes_[static_cast<size_t>(b)]->Length(0, l - first_[b], SessionHead(b, h))
             : full_->Length(b, l, h);
}

float* LayerProbeBackend::KeyRow(int b, int l, int h, int row) {
  return Probed(b, l, h)
             ? probes_[static_cast<size_t>(b)]->KeyRow(0, l - first_[b], SessionHead(b, h), row)
             : full_->KeyRow(b, l, h, row);
}

float* LayerProbeBackend::ValueRow(int b, int l, int h, int row) {
  return Probed(b, l, h)
             ? probes_[static_cast<size_t>(b)]->ValueRow(0, l - first_[b], SessionHead(b, h), row)
             : full_->ValueRow(b, l, h, row);
}

absl::Status LayerProbeBackend::BeforeStep(int slot, int64_t step) {
  return probes_[static_cast<size_t>(slot)]->BeforeStep(0, step);
}

absl::Status LayerProbeBackend::Commit(int slot, int64_t step, const float* keys,
                                       const float* values, const float* queries) {
  if (auto s = full_->Commit(slot, step, keys, values, queries); !s.ok()) return s;
  const size_t i = static_cast<size_t>(slot);
  const size_t d = static_cast<size_t>(config_.head_dim),
               Hkv = static_cast<size_t>(config_.kv_heads);
  const size_t G = static_cast<size_t>(config_.q_heads) / Hkv;
  const size_t first = static_cast<size_t>(first_[i]);
  if (head_[i] < 0) {  // whole layers: the group's rows are contiguous
    const size_t kv = first * Hkv * d, q = first * Hkv * G * d;
    return probes_[i]->Commit(0, step, keys + kv, values + kv, queries + q);
  }
  // One head per layer: gather its key and value rows and its query group, layer by layer.
  const size_t h = static_cast<size_t>(head_[i]), n = static_cast<size_t>(count_[i]);
  keys_.resize(n * d);
  values_.resize(n * d);
  queries_.resize(n * G * d);
  for (size_t l = 0; l < n; ++l) {
    const size_t kv = ((first + l) * Hkv + h) * d, q = ((first + l) * Hkv + h) * G * d;
    std::copy_n(keys + kv, d, keys_.data() + l * d);
    std::copy_n(values + kv, d, values_.data() + l * d);
    std::copy_n(queries + q, G * d, queries_.data() + l * G * d);
  }
  return probes_[i]->Commit(0, step, keys_.data(), values_.data(), queries_.data());
}

int64_t LayerProbeBackend::events() const {
  int64_t n = 0;
  for (const auto& p : probes_) n += p->events();
  return n;
}

absl::StatusOr<SensitivityResult> MeasureSensitivity(
    const Model& model, Client* client, const std::string& model_name,
    const std::vector<std::vector<int32_t>>& prompts, const SensitivityOptions& options) {
  const ModelConfig& c = model.config();
  const int P = static_cast<int>(prompts.size());
  const int N = options.max_tokens;
  if (P < 1) return absl::InvalidArgumentError("sensitivity: no probe prompts");
  if (options.layer_group < 1 || options.layer_group > c.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layer_group ", options.layer_group, " is outside [1, ", c.layers, "]"));
  }
  const size_t V = static_cast<size_t>(c.vocab);
  SensitivityResult result;

  // 1. The full cache's trajectories and log-probabilities.
  std::vector<float> full_lp(static_cast<size_t>(P) * N * V);
  RunOptions ro;
  ro.max_new_tokens = N;
  ro.stop_at_eos = false;
  ro.suppress = options.suppress;
  ro.on_logits = [&](int b, int index, const float* logits) {
    LogSoftmax(logits, c.vocab, full_lp.data() + (static_cast<size_t>(b) * N + index) * V);
  };
  FullCacheBackend full(c, P);
  const double t0 = Now();
  auto ref = Run(model, &full, prompts, ro);
  if (!ref.ok()) return ref.status();
  result.full_seconds = Now() - t0;
  // The prompts measured and how many generated tokens of each.
  std::vector<int> used, limit(static_cast<size_t>(P), N);
  for (int p = 0; p < P; ++p) {
    if (options.answer_tokens) {
      const int k = options.answer_tokens(p, ref->generated[static_cast<size_t>(p)]);
      limit[static_cast<size_t>(p)] = std::clamp(k, 0, N);
      if (k <= 0) continue;
    }
    used.push_back(p);
  }
  result.answered = static_cast<int>(used.size());
  if (used.empty()) {
    return absl::FailedPreconditionError(
        "sensitivity: the full cache answers none of the recall tasks");
  }
  const int U = static_cast<int>(used.size());
  std::vector<bool> suppressed(V, false);
  for (int32_t t : options.suppress) {
    if (t >= 0 && static_cast<size_t>(t) < V) suppressed[static_cast<size_t>(t)] = true;
  }

  // 2. Every (unit, prompt) teacher-forced with that unit compressed: a unit is a group of
  // layers, or per head one KV head of a group (unit u: group u / H, head u % H).
  std::vector<int> group_first;
  for (int l = 0; l < c.layers; l += options.layer_group) group_first.push_back(l);
  const int H = options.per_head ? c.kv_heads : 1;
  const int G = static_cast<int>(group_first.size()) * H;
  std::vector<double> group_kl(static_cast<size_t>(G), 0.0);
  std::vector<int64_t> group_n(static_cast<size_t>(G), 0);
  std::vector<int> group_kept(static_cast<size_t>(G), 0);
  const int total = G * U;
  const int batch = std::max(1, options.batch);
  const double t1 = Now();
  for (int start = 0; start < total; start += batch) {
    const int end = std::min(total, start + batch);
    std::vector<int> first, count, head, prompt_of;
    std::vector<std::vector<int32_t>> seq_prompts, forced;
    for (int s = start; s < end; ++s) {
      const int u = s / U, p = used[static_cast<size_t>(s % U)];
      first.push_back(group_first[static_cast<size_t>(u / H)]);
      count.push_back(std::min(options.layer_group, c.layers - first.back()));
      head.push_back(options.per_head ? u % H : -1);
      prompt_of.push_back(p);
      seq_prompts.push_back(prompts[static_cast<size_t>(p)]);
      forced.push_back(ref->generated[static_cast<size_t>(p)]);
    }
    auto backend =
        LayerProbeBackend::Open(client, c, model_name, options.policy, first, count, head);
    if (!backend.ok()) return backend.status();
    std::vector<double> kl(static_cast<size_t>(end - start), 0.0);
    std::vector<int64_t> n(static_cast<size_t>(end - start), 0);
    std::vector<char> agree(static_cast<size_t>(end - start), 1);
    RunOptions o;
    o.max_new_tokens = N;
    o.stop_at_eos = false;
    o.suppress = options.suppress;
    o.forced = forced;
    o.on_logits = [&](int s, int index, const float* logits) {
      const size_t p = static_cast<size_t>(prompt_of[static_cast<size_t>(s)]);
      if (index >= limit[p]) return;
      thread_local std::vector<float> lp;
      lp.resize(V);
      LogSoftmax(logits, c.vocab, lp.data());
      const float* f = full_lp.data() + (p * N + static_cast<size_t>(index)) * V;
      double sum = 0;
      // The greedy choice, as Sample makes it: on the logits, ties to the lower id.
      size_t best = V;
      for (size_t v = 0; v < V; ++v) {
        sum += std::exp(f[v]) * (f[v] - lp[v]);
        if (!suppressed[v] && (best == V || logits[v] > logits[best])) best = v;
      }
      kl[static_cast<size_t>(s)] += std::max(0.0, sum);
      ++n[static_cast<size_t>(s)];
      if (static_cast<int32_t>(best) != ref->generated[p][static_cast<size_t>(index)]) {
        agree[static_cast<size_t>(s)] = 0;
      }
    };
    auto run = Run(model, backend->get(), seq_prompts, o);
    if (!run.ok()) return run.status();
    result.events += (*backend)->events();
    for (int s = start; s < end; ++s) {
      const size_t g = static_cast<size_t>(s / U);
      group_kl[g] += kl[static_cast<size_t>(s - start)];
      group_n[g] += n[static_cast<size_t>(s - start)];
      group_kept[g] += agree[static_cast<size_t>(s - start)];
    }
  }
  result.probe_seconds = Now() - t1;
  result.kl.assign(static_cast<size_t>(c.layers) * H, 0.0);
  result.positions.assign(static_cast<size_t>(c.layers) * H, 0);
  result.kept.assign(static_cast<size_t>(c.layers) * H, 0.0);
  for (int u = 0; u < G; ++u) {
    const double mean = group_n[static_cast<size_t>(u)] > 0
                            ? group_kl[static_cast<size_t>(u)] /
                                  static_cast<double>(group_n[static_cast<size_t>(u)])
                            : 0.0;
    const int f = group_first[static_cast<size_t>(u / H)];
    for (int l = f; l < std::min(c.layers, f + options.layer_group); ++l) {
      const size_t e = static_cast<size_t>(l) * H + static_cast<size_t>(u % H);
      result.kl[e] = mean;
      result.positions[e] = group_n[static_cast<size_t>(u)];
      result.kept[e] = static_cast<double>(group_kept[static_cast<size_t>(u)]) / U;
    }
  }
  return result;
}

absl::StatusOr<std::vector<double>> DemandFromSensitivity(const std::vector<double>& kl) {
  if (kl.empty()) return absl::InvalidArgumentError("sensitivity: no layers");
  double mean = 0;
  for (double v : kl) {
    if (!(v >= 0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat("sensitivity: a measured KL is ", v));
    }
    mean += v;
  }
  mean /= static_cast<double>(kl.size());
  if (mean <= 0) {
    return absl::FailedPreconditionError(
        "sensitivity: no layer loses anything at this budget (the budget holds the whole "
        "trajectory): use a smaller --budget or a larger --max_tokens");
  }
  std::vector<double> demand;
  for (double v : kl) demand.push_back(v / mean);
  return demand;
}

}  // namespace reasonalloc::worker
