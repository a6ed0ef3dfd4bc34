// The Llama-family forward pass on the CPU in fp32, one decode step for a batch of sequences at a
// time: RMSNorm, RoPE with the file's θ, grouped-query attention over whatever rows a KvStore holds
// for each head, SwiGLU, tied or separate output embeddings. Two GGUF architectures: `llama` (also
// Mistral and SmolLM; adjacent-pair RoPE, which the converter's permutation of Q and K expects;
// optional rope_freqs factors) and `qwen2` (biases on Q, K and V; NEOX RoPE over the two halves of
// each head, as llama.cpp runs it). Weights are dequantised to fp32 once at load; the matrix
// products go through core's BLAS.
#ifndef REASONALLOC_WORKER_MODEL_H_
#define REASONALLOC_WORKER_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/gguf.h"

namespace reasonalloc::worker {

struct ModelConfig {
  std::string name;
  std::string architecture;  // general.architecture: "llama" or "qwen2"
  bool rope_neox = false;    // rotate (x[i], x[i + d/2]) rather than (x[2i], x[2i+1])
  int layers = 0, embd = 0, ff = 0, q_heads = 0, kv_heads = 0, head_dim = 0, vocab = 0;
  int context = 0;
  float rope_theta = 10000.0f, rms_eps = 1e-5f;
};

// Where each sequence's keys and values live. Row `row` of head (layer, kv_head) of sequence b;
// Length is the number of rows before the current step. The model writes the step's K and V at
// row Length and attends over Length + 1 rows; the caller commits the step afterwards.
class KvStore {
 public:
  virtual ~KvStore() = default;
  virtual int Length(int b, int layer, int kv_head) const = 0;
  virtual float* KeyRow(int b, int layer, int kv_head, int row) = 0;
  virtual float* ValueRow(int b, int layer, int kv_head, int row) = 0;
};

// One step's per-sequence outputs beside the logits: the new keys and values [B, L, Hkv, d] and
// the queries [B, L, Hq, d] (post-RoPE), which the sidecar's query ring takes.
struct StepOutputs {
  std::vector<float> logits;  // [B, vocab]
  std::vector<float> keys, values, queries;
};

class Model {
 public:
  static absl::StatusOr<std::unique_ptr<Model>> Load(const GgufFile& file);
  const ModelConfig& config() const { return config_; }

  // One token per sequence at the given absolute positions (RoPE positions are never changed
  // afterwards, whatever is evicted).
  void Step(const std::vector<int32_t>& tokens, const std::vector<int64_t>& positions, KvStore* kv,
            StepOutputs* out) const;

 private:
  struct Layer {
    std::vector<float> attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
    std::vector<float> bq, bk, bv, bo;  // empty when the file has no bias
  };
  Model() = default;
  ModelConfig config_;
  std::vector<float> embed_, output_, output_norm_;  // output_ empty when tied
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [d/2], divided by rope_freqs.weight where the file has it
};

// A full cache in process memory: every row kept (the reference the sidecar is measured against).
class FullCache : public KvStore {
 public:
  FullCache(const ModelConfig& config, int batch);
  int Length(int b, int layer, int kv_head) const override;
  float* KeyRow(int b, int layer, int kv_head, int row) override;
  float* ValueRow(int b, int layer, int kv_head, int row) override;
  // After a step: every head of sequence b holds one more row (grows as needed).
  void Commit(int b);
  void Reserve(int b, int rows);
  int64_t bytes(int b) const;  // fp32 bytes held by sequence b

 private:
  size_t Head(int b, int l, int h) const {
    return (static_cast<size_t>(b) * layers_ + static_cast<size_t>(l)) * kv_heads_ +
           static_cast<size_t>(h);
  }
  void Ensure(size_t head, int rows);
  int layers_, kv_heads_, d_;
  std::vector<std::vector<float>> k_, v_;
  std::vector<int> len_;
};

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_MODEL_H_
