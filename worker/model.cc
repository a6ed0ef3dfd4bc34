#include "worker/model.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/blas.h"
#include "core/thread_pool.h"

namespace reasonalloc::worker {
namespace {

void RmsNorm(const float* x, const float* w, int n, float eps, float* out) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float scale = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * scale * w[i];
}

// Rotates pairs by pos·θ^(−2i/d). Normal RoPE (llama.cpp's LLAMA_ROPE_TYPE_NORM, for `llama`)
// pairs adjacent values (x[2i], x[2i+1]), which is what the GGUF converter's permutation of the Q
// and K weights expects; NEOX RoPE (LLAMA_ROPE_TYPE_NEOX, for `qwen2`, whose weights the converter
// leaves as Hugging Face has them) pairs x[i] with x[i + d/2].
void Rope(float* x, int d, int64_t pos, const std::vector<float>& inv_freq, bool neox) {
  const int stride = neox ? 1 : 2, offset = neox ? d / 2 : 1;
  for (int i = 0; i < d / 2; ++i) {
    const double angle = static_cast<double>(pos) * inv_freq[static_cast<size_t>(i)];
    const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
    float* p = x + stride * i;
    const float a = p[0], b = p[offset];
    p[0] = a * c - b * s;
    p[offset] = a * s + b * c;
  }
}

void AddBias(const std::vector<float>& bias, int rows, float* y) {
  if (bias.empty()) return;
  const size_t n = bias.size();
  for (int r = 0; r < rows; ++r) {
    for (size_t i = 0; i < n; ++i) y[static_cast<size_t>(r) * n + i] += bias[i];
  }
}

// Softmax attention of `group` queries ([group, d]) over `rows` keys and values ([rows, d]) into
// out [group, d]. Keys are read once for the whole group; the loops are written so the compiler
// vectorises them (an AVX2/FMA clone is chosen at run time where the CPU has it). Not under
// ThreadSanitizer: the clone's resolver runs before the TSan runtime starts and faults there.
#if defined(__SANITIZE_THREAD__)
#define REASONALLOC_ATTEND_CLONES
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define REASONALLOC_ATTEND_CLONES
#endif
#endif
#ifndef REASONALLOC_ATTEND_CLONES
#define REASONALLOC_ATTEND_CLONES __attribute__((target_clones("arch=haswell", "default")))
#endif
REASONALLOC_ATTEND_CLONES void AttendGroup(const float* q, int group, const float* keys,
                                           const float* values, int rows, int d, float scale,
                                           float* scores, float* out) {
  constexpr int kLanes = 8;
  for (int j = 0; j < rows; ++j) {
    const float* kj = keys + static_cast<size_t>(j) * d;
    for (int h = 0; h < group; ++h) {
      const float* qh = q + static_cast<size_t>(h) * d;
      float acc[kLanes] = {};
      int t = 0;
      for (; t + kLanes <= d; t += kLanes) {
        for (int u = 0; u < kLanes; ++u) acc[u] += qh[t + u] * kj[t + u];
      }
      float s = 0;
      for (int u = 0; u < kLanes; ++u) s += acc[u];
      for (; t < d; ++t) s += qh[t] * kj[t];
      scores[static_cast<size_t>(h) * rows + j] = s * scale;
    }
  }
  for (int h = 0; h < group; ++h) {
    float* p = scores + static_cast<size_t>(h) * rows;
    float mx = -INFINITY;
    for (int j = 0; j < rows; ++j) mx = std::max(mx, p[j]);
    float sum = 0;
    for (int j = 0; j < rows; ++j) {
      p[j] = std::exp(p[j] - mx);
      sum += p[j];
    }
    const float inv = 1.0f / sum;
    float* o = out + static_cast<size_t>(h) * d;
    std::fill_n(o, d, 0.0f);
    for (int j = 0; j < rows; ++j) {
      const float w = p[j] * inv;
      const float* vj = values + static_cast<size_t>(j) * d;
      for (int t = 0; t < d; ++t) o[t] += w * vj[t];
    }
  }
}

// y[m × n] = x[m × k] · w[n × k]ᵀ, the n output rows split over the shared pool (core's BLAS runs
// single-threaded): each part computes its rows of yᵀ = w · xᵀ, then y is transposed back.
void MatMul(const float* x, int m, const float* w, int n, int k, float* y) {
  ThreadPool& pool = ThreadPool::Shared();
  const int parts = std::min<int>(pool.size(), std::max(1, n / 64));
  std::vector<float> yt(static_cast<size_t>(n) * m);
  pool.ParallelFor(parts, [&](int64_t part) {
    const int n0 = static_cast<int>(int64_t{n} * part / parts);
    const int n1 = static_cast<int>(int64_t{n} * (part + 1) / parts);
    GemmABt(n1 - n0, m, k, 1.0f, w + static_cast<size_t>(n0) * k, x,
            yt.data() + static_cast<size_t>(n0) * m);
  });
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      y[static_cast<size_t>(i) * n + j] = yt[static_cast<size_t>(j) * m + i];
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const GgufFile& file) {
  auto arch = file.GetString("general.architecture");
  if (!arch.ok()) return arch.status();
  if (*arch != "llama" && *arch != "qwen2") {
    return absl::UnimplementedError(absl::StrCat("general.architecture \"", *arch,
                                                 "\" is not supported (llama and qwen2 are)"));
  }
  std::unique_ptr<Model> m(new Model());
  ModelConfig& c = m->config_;
  c.architecture = *arch;
  c.rope_neox = *arch == "qwen2";
  c.name = file.GetString("general.name").value_or(*arch);
  // Hyperparameters live under the architecture's own prefix ("llama.block_count", ...).
  const std::string prefix = *arch + ".";
  auto get = [&](const char* key, int* out) -> absl::Status {
    auto v = file.GetInt(prefix + key);
    if (!v.ok()) return v.status();
    if (*v <= 0 || *v > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, key, " = ", *v));
    }
    *out = static_cast<int>(*v);
    return absl::OkStatus();
  };
  for (auto [key, out] : {std::pair{"block_count", &c.layers},
                          {"embedding_length", &c.embd},
                          {"feed_forward_length", &c.ff},
                          {"attention.head_count", &c.q_heads},
                          {"attention.head_count_kv", &c.kv_heads},
                          {"context_length", &c.context}}) {
    if (auto s = get(key, out); !s.ok()) return s;
  }
  if (c.embd % c.q_heads != 0 || c.q_heads % c.kv_heads != 0) {
    return absl::InvalidArgumentError("head counts do not divide the embedding");
  }
  c.head_dim = c.embd / c.q_heads;
  if (c.head_dim % 2 != 0) return absl::InvalidArgumentError("odd head dimension");
  // What this forward pass does not implement is an error, never a silently wrong model.
  for (const char* key :
       {"attention.key_length", "attention.value_length", "rope.dimension_count"}) {
    if (auto v = file.GetInt(prefix + key); v.ok() && *v != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat(prefix, key, " = ", *v, " differs from ",
                                                   "embedding_length / head_count = ", c.head_dim,
                                                   ", which this worker does not support"));
    }
  }
  if (auto scaling = file.GetString(prefix + "rope.scaling.type");
      scaling.ok() && *scaling != "none") {
    return absl::UnimplementedError(
        absl::StrCat(prefix, "rope.scaling.type \"", *scaling, "\" is not supported"));
  }
  c.rope_theta = static_cast<float>(file.GetFloat(prefix + "rope.freq_base").value_or(10000.0));
  c.rms_eps =
      static_cast<float>(file.GetFloat(prefix + "attention.layer_norm_rms_epsilon").value_or(1e-5));
  auto embed = file.Tensor("token_embd.weight");
  if (!embed.ok()) return embed.status();
  if ((*embed)->dims.size() != 2 || (*embed)->dims[0] != c.embd) {
    return absl::InvalidArgumentError("token_embd.weight is not [embedding_length, vocab]");
  }
  c.vocab = static_cast<int>((*embed)->dims[1]);
  const int64_t kv_dim = int64_t{c.kv_heads} * c.head_dim;
  auto load = [&](const std::string& name, std::vector<int64_t> shape,
                  std::vector<float>* out) -> absl::Status {
    auto t = file.Dequantize(name, shape);
    if (!t.ok()) return t.status();
    *out = std::move(*t);
    return absl::OkStatus();
  };
  if (auto s = load("token_embd.weight", {c.embd, c.vocab}, &m->embed_); !s.ok()) return s;
  if (auto s = load("output_norm.weight", {c.embd}, &m->output_norm_); !s.ok()) return s;
  // An untied output head when the file has one; the token embeddings otherwise.
  if (file.Tensor("output.weight").ok()) {
    if (auto s = load("output.weight", {c.embd, c.vocab}, &m->output_); !s.ok()) return s;
  }
  m->layers_.resize(static_cast<size_t>(c.layers));
  for (int l = 0; l < c.layers; ++l) {
    Layer& L = m->layers_[static_cast<size_t>(l)];
    const std::string p = absl::StrCat("blk.", l, ".");
    struct Item {
      const char* name;
      std::vector<int64_t> shape;
      std::vector<float>* out;
      bool required;
    };
    // Biases: qwen2 has them on Q, K and V; llama.cpp also reads optional ones for llama.
    const Item items[] = {
        {"attn_norm.weight", {c.embd}, &L.attn_norm, true},
        {"attn_q.weight", {c.embd, c.embd}, &L.wq, true},
        {"attn_k.weight", {c.embd, kv_dim}, &L.wk, true},
        {"attn_v.weight", {c.embd, kv_dim}, &L.wv, true},
        {"attn_output.weight", {c.embd, c.embd}, &L.wo, true},
        {"attn_q.bias", {c.embd}, &L.bq, *arch == "qwen2"},
        {"attn_k.bias", {kv_dim}, &L.bk, *arch == "qwen2"},
        {"attn_v.bias", {kv_dim}, &L.bv, *arch == "qwen2"},
        {"attn_output.bias", {c.embd}, &L.bo, false},
        {"ffn_norm.weight", {c.embd}, &L.ffn_norm, true},
        {"ffn_gate.weight", {c.embd, c.ff}, &L.w_gate, true},
        {"ffn_up.weight", {c.embd, c.ff}, &L.w_up, true},
        {"ffn_down.weight", {c.ff, c.embd}, &L.w_down, true},
    };
    for (const Item& item : items) {
      if (!item.required && !file.Tensor(p + item.name).ok()) continue;
      if (auto s = load(p + item.name, item.shape, item.out); !s.ok()) return s;
    }
  }
  m->inv_freq_.resize(static_cast<size_t>(c.head_dim / 2));
  for (int i = 0; i < c.head_dim / 2; ++i) {
    m->inv_freq_[static_cast<size_t>(i)] =
        static_cast<float>(std::pow(static_cast<double>(c.rope_theta), -2.0 * i / c.head_dim));
  }
  // Llama 3's long-context RoPE ships as per-frequency divisors (llama.cpp's freq_factors).
  if (file.Tensor("rope_freqs.weight").ok()) {
    std::vector<float> factors;
    if (auto s = load("rope_freqs.weight", {c.head_dim / 2}, &factors); !s.ok()) return s;
    for (size_t i = 0; i < factors.size(); ++i) m->inv_freq_[i] /= factors[i];
  }
  return m;
}

void Model::Step(const std::vector<int32_t>& tokens, const std::vector<int64_t>& positions,
                 KvStore* kv, StepOutputs* out) const {
  const ModelConfig& c = config_;
  const int B = static_cast<int>(tokens.size());
  const int E = c.embd, d = c.head_dim, Hq = c.q_heads, Hkv = c.kv_heads, group = Hq / Hkv;
  const int kv_dim = Hkv * d;
  std::vector<float> x(static_cast<size_t>(B) * E), h(x.size()), q(x.size()), attn(x.size()),
      proj(x.size());
  std::vector<float> k(static_cast<size_t>(B) * kv_dim), v(k.size());
  std::vector<float> gate(static_cast<size_t>(B) * c.ff), up(gate.size());
  out->keys.assign(static_cast<size_t>(B) * c.layers * kv_dim, 0.0f);
  out->values.assign(out->keys.size(), 0.0f);
  out->queries.assign(static_cast<size_t>(B) * c.layers * E, 0.0f);
  for (int b = 0; b < B; ++b) {
    std::copy_n(embed_.data() + static_cast<size_t>(tokens[static_cast<size_t>(b)]) * E, E,
                x.data() + static_cast<size_t>(b) * E);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  ThreadPool& pool = ThreadPool::Shared();
  for (int l = 0; l < c.layers; ++l) {
    const Layer& L = layers_[static_cast<size_t>(l)];
    for (int b = 0; b < B; ++b) {
      RmsNorm(x.data() + static_cast<size_t>(b) * E, L.attn_norm.data(), E, c.rms_eps,
              h.data() + static_cast<size_t>(b) * E);
    }
    MatMul(h.data(), B, L.wq.data(), E, E, q.data());
    MatMul(h.data(), B, L.wk.data(), kv_dim, E, k.data());
    MatMul(h.data(), B, L.wv.data(), kv_dim, E, v.data());
    AddBias(L.bq, B, q.data());
    AddBias(L.bk, B, k.data());
    AddBias(L.bv, B, v.data());
    // Per (sequence, kv head): RoPE, store the new row, attend with the head's query group.
    pool.ParallelFor(int64_t{B} * Hkv, [&](int64_t job) {
      const int b = static_cast<int>(job / Hkv), g = static_cast<int>(job % Hkv);
      const int64_t pos = positions[static_cast<size_t>(b)];
      float* kr = k.data() + (static_cast<size_t>(b) * Hkv + g) * d;
      const float* vr = v.data() + (static_cast<size_t>(b) * Hkv + g) * d;
      Rope(kr, d, pos, inv_freq_, c.rope_neox);
      const int n = kv->Length(b, l, g);
      std::copy_n(kr, d, kv->KeyRow(b, l, g, n));
      std::copy_n(vr, d, kv->ValueRow(b, l, g, n));
      const size_t o = ((static_cast<size_t>(b) * c.layers + l) * Hkv + g) * d;
      std::copy_n(kr, d, out->keys.data() + o);
      std::copy_n(vr, d, out->values.data() + o);
      const float* keys = kv->KeyRow(b, l, g, 0);
      const float* values = kv->ValueRow(b, l, g, 0);
      for (int qh = g * group; qh < (g + 1) * group; ++qh) {
        float* qr = q.data() + static_cast<size_t>(b) * E + static_cast<size_t>(qh) * d;
        Rope(qr, d, pos, inv_freq_, c.rope_neox);
        std::copy_n(qr, d,
                    out->queries.data() + ((static_cast<size_t>(b) * c.layers + l) * Hq + qh) * d);
      }
      thread_local std::vector<float> scratch;
      scratch.resize(static_cast<size_t>(group) * (n + 1));
      AttendGroup(q.data() + static_cast<size_t>(b) * E + static_cast<size_t>(g) * group * d, group,
                  keys, values, n + 1, d, scale, scratch.data(),
                  attn.data() + static_cast<size_t>(b) * E + static_cast<size_t>(g) * group * d);
    });
    MatMul(attn.data(), B, L.wo.data(), E, E, proj.data());
    AddBias(L.bo, B, proj.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    for (int b = 0; b < B; ++b) {
      RmsNorm(x.data() + static_cast<size_t>(b) * E, L.ffn_norm.data(), E, c.rms_eps,
              h.data() + static_cast<size_t>(b) * E);
    }
    MatMul(h.data(), B, L.w_gate.data(), c.ff, E, gate.data());
    MatMul(h.data(), B, L.w_up.data(), c.ff, E, up.data());
    for (size_t i = 0; i < gate.size(); ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
    MatMul(gate.data(), B, L.w_down.data(), E, c.ff, proj.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
  }
  for (int b = 0; b < B; ++b) {
    RmsNorm(x.data() + static_cast<size_t>(b) * E, output_norm_.data(), E, c.rms_eps,
            h.data() + static_cast<size_t>(b) * E);
  }
  out->logits.resize(static_cast<size_t>(B) * c.vocab);
  MatMul(h.data(), B, output_.empty() ? embed_.data() : output_.data(), c.vocab, E,
         out->logits.data());
}

FullCache::FullCache(const ModelConfig& config, int batch)
    : layers_(config.layers), kv_heads_(config.kv_heads), d_(config.head_dim) {
  const size_t heads = static_cast<size_t>(batch) * layers_ * kv_heads_;
  k_.resize(heads);
  v_.resize(heads);
  len_.assign(heads, 0);
}

int FullCache::Length(int b, int layer, int kv_head) const { return len_[Head(b, layer, kv_head)]; }

void FullCache::Ensure(size_t head, int rows) {
  const size_t need = static_cast<size_t>(rows) * d_;
  if (k_[head].size() < need) {
    const size_t grown = std::max(need, 2 * k_[head].size());
    k_[head].resize(grown);
    v_[head].resize(grown);
  }
}

float* FullCache::KeyRow(int b, int layer, int kv_head, int row) {
  const size_t head = Head(b, layer, kv_head);
  Ensure(head, row + 1);
  return k_[head].data() + static_cast<size_t>(row) * d_;
}

float* FullCache::ValueRow(int b, int layer, int kv_head, int row) {
  const size_t head = Head(b, layer, kv_head);
  Ensure(head, row + 1);
  return v_[head].data() + static_cast<size_t>(row) * d_;
}

void FullCache::Commit(int b) {
  for (int l = 0; l < layers_; ++l) {
    for (int h = 0; h < kv_heads_; ++h) ++len_[Head(b, l, h)];
  }
}

void FullCache::Reserve(int b, int rows) {
  for (int l = 0; l < layers_; ++l) {
    for (int h = 0; h < kv_heads_; ++h) Ensure(Head(b, l, h), rows);
  }
}

int64_t FullCache::bytes(int b) const {
  int64_t rows = 0;
  for (int l = 0; l < layers_; ++l) {
    for (int h = 0; h < kv_heads_; ++h) rows += len_[Head(b, l, h)];
  }
  return rows * d_ * 2 * static_cast<int64_t>(sizeof(float));
}

}  // namespace reasonalloc::worker
