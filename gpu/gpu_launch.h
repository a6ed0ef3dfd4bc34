// Launchers of the CUDA backend's kernels (gpu/gpu_kernels.cu), called by gpu/gpu_engine.cc.
// Internal to gpu/: C++17 so that nvcc compiles the side that defines them, and free of the
// engine's types.
#ifndef REASONALLOC_GPU_GPU_LAUNCH_H_
#define REASONALLOC_GPU_GPU_LAUNCH_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace reasonalloc::gpu::launch {

struct HeadDesc {
  const void* queries = nullptr;       // [G, window, d] of the head's query group
  const void* keys = nullptr;          // [n_max, d]
  const float* accumulated = nullptr;  // [n_max] (h2o) or null
  int n = 0;                           // live tokens
  int ring_start = 0;                  // window row a is query slot (ring_start + a) mod window
};

struct GatherDesc {
  const unsigned char* src = nullptr;
  unsigned char* dst = nullptr;
  long long n_max = 0;
  long long max_kept = 0;
};

enum class Elem { kF32, kF16, kBF16 };
enum class Scorer { kStreaming, kSnapKv, kRkv, kH2oAccumulated, kH2oWindow };
enum Reduce : int { kReduceMax = 0, kReduceMean = 1, kReduceNone = 2 };

struct ScoringParams {
  Elem elem = Elem::kF32;
  Scorer scorer = Scorer::kSnapKv;
  int group = 1, window = 8, head_dim = 0;
  int sinks = 0, recent = 0;  // always-kept rows (core/scorer.h ProtectScores), defaults resolved
  bool all_keys = false;      // softmax over every key, causal inside the window
  int reduce = kReduceMax;
  float row_weight = 1.0f;  // each window row's softmax is scaled by it
  int pool_kernel = 7;
  bool pool_max = true;
  float lambda = 0.1f, threshold = 0.5f;
};

// Scratch of the scoring kernels, each padded per head to `stride` (logits: rows × stride per
// head, rows = window, or G·window with kReduceNone).
struct ScoringBuffers {
  float* scores = nullptr;
  int* overflow = nullptr;
  float* logits = nullptr;
  float* importance = nullptr;
  float* inv_norm = nullptr;
  double* rowsum = nullptr;
  int* partner = nullptr;
  float* partner_value = nullptr;
  double* column = nullptr;
};

// Scores every head's candidates into buffers.scores; overflow[head] is set where logits overflow.
cudaError_t Scoring(const ScoringParams& p, const HeadDesc* heads, long long num_heads,
                    long long stride, const ScoringBuffers& b, cudaStream_t stream);

// Per (event, layer): counts above / at the pool_k[l]-th largest of the layer's pooled candidates.
cudaError_t LayerPool(const HeadDesc* heads, long long num_events, int num_layers, int kv_heads,
                      int window, long long stride, const float* scores, const long long* pool_k,
                      long long* greater, long long* equal, cudaStream_t stream);

// Per head: the kept positions (ascending, at kept + offsets[head]) and the keep bitmask ([heads,
// words], zeroed by the caller).
cudaError_t Select(const HeadDesc* heads, long long num_heads, int window, long long stride,
                   const float* scores, const int* budgets, const long long* offsets, int words,
                   int* kept, unsigned long long* mask, cudaStream_t stream);

// Per head: bad[head] = 1 when a live key row or a window query of the head's group holds NaN or
// Inf (bad zeroed by the caller).
cudaError_t CheckFinite(Elem elem, const HeadDesc* heads, long long num_heads, int group,
                        int window, int head_dim, int* bad, cudaStream_t stream);

// dst row dst_rows[t] = src row src_rows[t] for t < count (rows of row_bytes).
cudaError_t CopyRows(const unsigned char* src, unsigned char* dst, const long long* src_rows,
                     const long long* dst_rows, long long count, long long row_bytes,
                     cudaStream_t stream);

// Compaction of the kept rows of each event's src into its dst.
cudaError_t Gather(const GatherDesc* events, long long num_events, long long heads_per_event,
                   long long max_rows, const int* kept, const long long* offsets,
                   const int* kept_lengths, long long row_bytes, cudaStream_t stream);

}  // namespace reasonalloc::gpu::launch

#endif  // REASONALLOC_GPU_GPU_LAUNCH_H_
