#include "worker/driver.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/thread_pool.h"
#include "proto/policy_enums.h"
#include "worker/model_files.h"

namespace reasonalloc::worker {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The step's batch index b is active sequence slots[b].
class SlotStore : public KvStore {
 public:
  SlotStore(KvBackend* base, const std::vector<int>* slots) : base_(base), slots_(slots) {}
  int Length(int b, int l, int h) const override { return base_->Length(Slot(b), l, h); }
  float* KeyRow(int b, int l, int h, int row) override { return base_->KeyRow(Slot(b), l, h, row); }
  float* ValueRow(int b, int l, int h, int row) override {
    return base_->ValueRow(Slot(b), l, h, row);
  }

 private:
  int Slot(int b) const { return (*slots_)[static_cast<size_t>(b)]; }
  KvBackend* base_;
  const std::vector<int>* slots_;
};

}  // namespace

std::string Policy::mode_name() const {
  return allocator == AllocatorKind::kReasonAlloc ? std::string(NameOf(reasonalloc_mode)) : "";
}

std::string Policy::Name() const {
  std::string name = absl::StrCat(NameOf(scorer), "/", NameOf(allocator));
  if (allocator == AllocatorKind::kReasonAlloc) absl::StrAppend(&name, "-", mode_name());
  if (sinks >= 0) absl::StrAppend(&name, "+s", sinks);
  if (recent > window) absl::StrAppend(&name, "+r", recent);
  if (lambda > 0) absl::StrAppend(&name, "+l", lambda);
  if (!profile.empty()) absl::StrAppend(&name, "@", profile);
  return name;
}

absl::StatusOr<Policy> ParsePolicy(absl::string_view text) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy \"", text, "\": ", why,
                     " (expected scorer/allocator[-mode][+sN][+rN][+lX][@profile], e.g. "
                     "rkv/reasonalloc-full+r32)"));
  };
  std::string profile;
  if (const size_t at = text.find('@'); at != absl::string_view::npos) {
    profile = std::string(text.substr(at + 1));
    text = text.substr(0, at);
    if (!IsValidModelName(profile)) return bad(absl::StrCat("profile name \"", profile, "\""));
  }
  std::vector<std::string> parts = absl::StrSplit(text, '+');
  std::vector<std::string> names = absl::StrSplit(parts[0], '/');
  if (names.size() != 2 || names[0].empty() || names[1].empty()) {
    return bad("no scorer/allocator");
  }
  Policy p;
  auto scorer = ParseScorer(names[0], "scorer");
  if (!scorer.ok()) return bad(scorer.status().message());
  p.scorer = *scorer;
  std::string allocator = names[1];
  const std::string reasonalloc = absl::StrCat(NameOf(AllocatorKind::kReasonAlloc), "-");
  if (allocator.rfind(reasonalloc, 0) == 0) {
    auto mode = ParseReasonAllocMode(allocator.substr(reasonalloc.size()), "mode");
    if (!mode.ok()) return bad(mode.status().message());
    p.reasonalloc_mode = *mode;
    allocator = allocator.substr(0, reasonalloc.size() - 1);
  }
  auto kind = ParseAllocator(allocator, "allocator");
  if (!kind.ok()) return bad(kind.status().message());
  p.allocator = *kind;
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& knob = parts[i];
    if (knob.size() < 2) return bad(absl::StrCat("knob \"", knob, "\""));
    const std::string value = knob.substr(1);
    if (knob[0] == 's' || knob[0] == 'r') {
      int v;
      if (!absl::SimpleAtoi(value, &v) || v < 0) return bad(absl::StrCat("knob \"", knob, "\""));
      (knob[0] == 's' ? p.sinks : p.recent) = v;
    } else if (knob[0] == 'l') {
      double v;
      if (!absl::SimpleAtod(value, &v) || !(v > 0) || v > 1) {
        return bad(absl::StrCat("knob \"", knob, "\""));
      }
      p.lambda = v;
    } else {
      return bad(absl::StrCat("unknown knob \"", knob, "\""));
    }
  }
  p.profile = profile;
  return p;
}

absl::StatusOr<v1::CreateSessionRequest> SessionRequest(const ModelConfig& config,
                                                        const std::string& model_name,
                                                        const Policy& policy) {
  v1::CreateSessionRequest r;
  auto* m = r.mutable_model();
  m->set_name(model_name);
  m->set_num_layers(config.layers);
  m->set_num_q_heads(config.q_heads);
  m->set_num_kv_heads(config.kv_heads);
  m->set_head_dim(config.head_dim);
  m->set_dtype(v1::DTYPE_FLOAT32);
  m->set_max_context(config.context);
  r.mutable_budget()->set_budget(policy.budget);
  r.mutable_budget()->set_buffer(policy.buffer);
  r.mutable_budget()->set_window(policy.window);
  if (policy.sinks != -1) r.mutable_budget()->set_sinks(policy.sinks);
  r.mutable_budget()->set_recent(policy.recent);
  r.mutable_scorer()->set_name(policy.scorer_name());
  if (policy.lambda > 0) r.mutable_scorer()->set_lambda(policy.lambda);
  auto* a = r.mutable_allocator();
  a->set_name(policy.allocator_name());
  a->set_profile(policy.profile);
  if (policy.allocator == AllocatorKind::kReasonAlloc) {
    a->set_reasonalloc_mode(ReasonAllocModeToProto(policy.reasonalloc_mode));
  }
  r.set_mode(v1::SESSION_MODE_MANAGED);
  r.set_memory(v1::MEMORY_KIND_HOST_SHM);
  r.set_lease_seconds(SidecarBackend::kLeaseSeconds);
  return r;
}

absl::StatusOr<std::unique_ptr<SidecarBackend>> SidecarBackend::Open(
    Client* client, const ModelConfig& config, const std::string& model_name,
    const std::vector<Policy>& policies) {
  std::unique_ptr<SidecarBackend> backend(new SidecarBackend());
  backend->client_ = client;
  backend->config_ = config;
  for (const Policy& policy : policies) {
    auto request = SessionRequest(config, model_name, policy);
    if (!request.ok()) return request.status();
    auto created = client->CreateSession(*request);
    if (!created.ok()) return created.status();
    // The sidecar's warnings (no layer profile for this model, ...) are the same for every
    // sequence of a batch: print the first session's.
    if (backend->ids_.empty()) {
      for (const std::string& w : created->warnings()) {
        std::cerr << "reasonalloc-worker: sidecar: " << w << "\n";
      }
    }
    backend->ids_.push_back(created->session().session_id());
    auto view = SessionView::Map(created->session());
    if (!view.ok()) return view.status();
    backend->views_.push_back(*std::move(view));
  }
  backend->slot_events_.assign(policies.size(), 0);
  backend->slot_seconds_.assign(policies.size(), 0.0);
  backend->head_budget_sums_.assign(
      policies.size(), std::vector<double>(static_cast<size_t>(config.layers) * config.kv_heads));
  backend->last_contact_.assign(policies.size(), Now());
  return backend;
}

SidecarBackend::~SidecarBackend() {
  views_.clear();
  for (const std::string& id : ids_) (void)client_->CloseSession(id);
}

absl::Status SidecarBackend::BeforeStep(int slot, int64_t step) {
  const SessionView& view = *views_[static_cast<size_t>(slot)];
  bool full = false;
  for (int l = 0; l < config_.layers && !full; ++l) {
    for (int h = 0; h < config_.kv_heads && !full; ++h) {
      full = view.length(l, h) >= view.capacity(l, h);
    }
  }
  const size_t i = static_cast<size_t>(slot);
  if (!full) {
    // A sequence whose cache has not reached its budget yet sends nothing for many steps of a
    // slow model: renew its lease well before it runs out.
    if (Now() - last_contact_[i] < kLeaseSeconds / 4) return absl::OkStatus();
    auto renewed = client_->KeepAlive(ids_[i]);
    if (!renewed.ok()) {
      return absl::Status(renewed.status().code(), absl::StrCat("KeepAlive at step ", step - 1,
                                                                ": ", renewed.status().message()));
    }
    last_contact_[i] = Now();
    return absl::OkStatus();
  }
  v1::CompressRequest request;
  request.set_session_id(ids_[static_cast<size_t>(slot)]);
  request.set_step(step - 1);
  request.set_omit_keep_mask(true);
  const double t0 = Now();
  auto response = client_->Compress(request);
  const double seconds = Now() - t0;
  compress_seconds_ += seconds;
  slot_seconds_[i] += seconds;
  last_contact_[i] = Now();
  if (!response.ok()) {
    return absl::Status(response.status().code(), absl::StrCat("Compress at step ", step - 1, ": ",
                                                               response.status().message()));
  }
  ++events_;
  ++slot_events_[static_cast<size_t>(slot)];
  std::vector<double>& sums = head_budget_sums_[i];
  for (int l = 0; l < config_.layers; ++l) {
    for (int h = 0; h < config_.kv_heads; ++h) {
      sums[static_cast<size_t>(l) * config_.kv_heads + h] += view.budget(l, h);
    }
  }
  return absl::OkStatus();
}

absl::Status SidecarBackend::Commit(int slot, int64_t step, const float* keys, const float* values,
                                    const float* queries) {
  return views_[static_cast<size_t>(slot)]->Append(step, keys, values, queries);
}

int64_t SidecarBackend::Bytes(int slot) const {
  const SessionView& view = *views_[static_cast<size_t>(slot)];
  int64_t rows = 0;
  for (int l = 0; l < config_.layers; ++l) {
    for (int h = 0; h < config_.kv_heads; ++h) rows += view.length(l, h);
  }
  return rows * config_.head_dim * 2 * static_cast<int64_t>(sizeof(float));
}

std::vector<double> SidecarBackend::HeadBudgets(int slot) const {
  const size_t i = static_cast<size_t>(slot);
  std::vector<double> out = head_budget_sums_[i];
  if (slot_events_[i] > 0) {
    for (double& v : out) v /= static_cast<double>(slot_events_[i]);
  }
  return out;
}

std::vector<double> SidecarBackend::LayerBudgets(int slot) const {
  const SessionView& view = *views_[static_cast<size_t>(slot)];
  std::vector<double> out(static_cast<size_t>(config_.layers), 0.0);
  for (int l = 0; l < config_.layers; ++l) {
    for (int h = 0; h < config_.kv_heads; ++h) out[static_cast<size_t>(l)] += view.budget(l, h);
    out[static_cast<size_t>(l)] /= config_.kv_heads;
  }
  return out;
}

int32_t Sample(const float* logits, int vocab, float temperature, std::mt19937_64* rng,
               const std::vector<int32_t>& suppress) {
  auto allowed = [&](int32_t i) {
    return std::find(suppress.begin(), suppress.end(), i) == suppress.end();
  };
  if (temperature <= 0) {
    int32_t best = -1;
    for (int32_t i = 0; i < vocab; ++i) {
      if ((best < 0 || logits[i] > logits[best]) && allowed(i)) best = i;  // allowed: rarely asked
    }
    return best;
  }
  float mx = -INFINITY;
  for (int32_t i = 0; i < vocab; ++i) {
    if (allowed(i)) mx = std::max(mx, logits[i]);
  }
  std::vector<double> p(static_cast<size_t>(vocab));
  double sum = 0;
  for (int i = 0; i < vocab; ++i) {
    p[static_cast<size_t>(i)] = allowed(i) ? std::exp((logits[i] - mx) / temperature) : 0.0;
    sum += p[static_cast<size_t>(i)];
  }
  double u = std::uniform_real_distribution<double>(0.0, sum)(*rng);
  for (int i = 0; i < vocab; ++i) {
    u -= p[static_cast<size_t>(i)];
    if (u <= 0) return i;
  }
  return vocab - 1;
}

absl::StatusOr<RunResult> Run(const Model& model, KvBackend* kv,
                              const std::vector<std::vector<int32_t>>& prompts,
                              const RunOptions& options) {
  const ModelConfig& c = model.config();
  const int batch = static_cast<int>(prompts.size());
  for (int b = 0; b < batch; ++b) {
    if (prompts[static_cast<size_t>(b)].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("prompt ", b, " is empty"));
    }
    for (int32_t t : prompts[static_cast<size_t>(b)]) {
      if (t < 0 || t >= c.vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("prompt ", b, ": token ", t, " out of range"));
      }
    }
  }
  if (options.max_new_tokens < 1) return absl::InvalidArgumentError("--max_tokens must be ≥ 1");
  if (options.temperature < 0) return absl::InvalidArgumentError("--temperature must be ≥ 0");
  for (int b = 0; b < batch; ++b) {
    const int64_t total =
        static_cast<int64_t>(prompts[static_cast<size_t>(b)].size()) + options.max_new_tokens;
    if (total > c.context) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt ", b, ": ", prompts[static_cast<size_t>(b)].size(), " tokens + --max_tokens ",
          options.max_new_tokens, " exceed the model's context of ", c.context, " tokens"));
    }
  }
  RunResult result;
  result.generated.resize(static_cast<size_t>(batch));
  result.peak_bytes.assign(static_cast<size_t>(batch), 0);
  result.final_bytes.assign(static_cast<size_t>(batch), 0);
  std::vector<int64_t> pos(static_cast<size_t>(batch), 0);
  std::vector<int32_t> next(static_cast<size_t>(batch));
  std::vector<bool> done(static_cast<size_t>(batch), false);
  std::mt19937_64 rng(options.seed);
  StepOutputs out;
  const size_t kv_row = static_cast<size_t>(c.layers) * c.kv_heads * c.head_dim;
  const size_t q_row = static_cast<size_t>(c.layers) * c.embd;
  for (int b = 0; b < batch; ++b) next[static_cast<size_t>(b)] = prompts[static_cast<size_t>(b)][0];
  const double t0 = Now();
  while (true) {
    std::vector<int> slots;
    std::vector<int32_t> tokens;
    std::vector<int64_t> positions;
    for (int b = 0; b < batch; ++b) {
      if (done[static_cast<size_t>(b)]) continue;
      if (auto s = kv->BeforeStep(b, pos[static_cast<size_t>(b)]); !s.ok()) return s;
      slots.push_back(b);
      tokens.push_back(next[static_cast<size_t>(b)]);
      positions.push_back(pos[static_cast<size_t>(b)]);
    }
    if (slots.empty()) break;
    SlotStore store(kv, &slots);
    model.Step(tokens, positions, &store, &out);
    result.tokens += static_cast<int64_t>(slots.size());
    if (options.on_logits) {
      // Sequences whose last prompt token (or a generated one) was just fed.
      std::vector<size_t> predicting;
      for (size_t i = 0; i < slots.size(); ++i) {
        const size_t ub = static_cast<size_t>(slots[i]);
        if (pos[ub] + 1 >= static_cast<int64_t>(prompts[ub].size())) predicting.push_back(i);
      }
      ThreadPool::Shared().ParallelFor(static_cast<int64_t>(predicting.size()), [&](int64_t k) {
        const size_t i = predicting[static_cast<size_t>(k)];
        const size_t ub = static_cast<size_t>(slots[i]);
        options.on_logits(slots[i], static_cast<int>(result.generated[ub].size()),
                          out.logits.data() + i * static_cast<size_t>(c.vocab));
      });
    }
    for (size_t i = 0; i < slots.size(); ++i) {
      const int b = slots[i];
      const size_t ub = static_cast<size_t>(b);
      const int64_t step = pos[ub];
      if (auto s = kv->Commit(b, step, out.keys.data() + i * kv_row, out.values.data() + i * kv_row,
                              out.queries.data() + i * q_row);
          !s.ok()) {
        return s;
      }
      if (options.after_step) {
        if (auto s = options.after_step(b, step, out.queries.data() + i * q_row); !s.ok()) return s;
      }
      result.peak_bytes[ub] = std::max(result.peak_bytes[ub], kv->Bytes(b));
      ++pos[ub];
      const auto& prompt = prompts[ub];
      if (pos[ub] < static_cast<int64_t>(prompt.size())) {
        next[ub] = prompt[static_cast<size_t>(pos[ub])];
        continue;
      }
      const float* logits = out.logits.data() + i * static_cast<size_t>(c.vocab);
      const int index = static_cast<int>(result.generated[ub].size());
      const int32_t chosen = Sample(logits, c.vocab, options.temperature, &rng, options.suppress);
      result.generated[ub].push_back(chosen);
      int32_t fed = chosen;
      const bool forced = !options.forced.empty() && !options.forced[ub].empty();
      if (forced) {
        const auto& f = options.forced[ub];
        fed = static_cast<size_t>(index) < f.size() ? f[static_cast<size_t>(index)] : -1;
      }
      const bool eos = options.stop_at_eos && !forced && chosen == options.eos;
      if (eos || index + 1 >= options.max_new_tokens || fed < 0) {
        done[ub] = true;
        result.final_bytes[ub] = kv->Bytes(b);
        continue;
      }
      next[ub] = fed;
    }
  }
  result.seconds = Now() - t0;
  return result;
}

}  // namespace reasonalloc::worker
