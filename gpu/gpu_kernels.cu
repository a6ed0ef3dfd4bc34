// Device code of the CUDA compute backend (gpu/gpu_engine.h) and its launchers (gpu_launch.h).
//
// Every kernel works on a flat list of heads (sessions × layers × kv heads), one HeadDesc each, so
// a batch of sessions is one launch per stage. Per-head arrays (scores, logits, scratch) are padded
// to a common `stride` (the batch's largest n_max).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "gpu/gpu_launch.h"

namespace reasonalloc::gpu::kernels {
namespace {

using launch::GatherDesc;
using launch::HeadDesc;
using launch::kReduceMax;
using launch::kReduceMean;
using launch::kReduceNone;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlock = 256;  // threads per block of every kernel below
constexpr int kWarps = kBlock / 32;

// Element loads converting to fp32 exactly (fp16 and bf16 values are all representable).
struct F32 {
  using Storage = float;
  static __device__ __forceinline__ float Load(const float* p) { return *p; }
};
struct F16 {
  using Storage = uint16_t;
  static __device__ __forceinline__ float Load(const uint16_t* p) {
    return __half2float(__ushort_as_half(*p));
  }
};
struct BF16 {
  using Storage = uint16_t;
  static __device__ __forceinline__ float Load(const uint16_t* p) {
    return __uint_as_float(static_cast<uint32_t>(*p) << 16);
  }
};

// ---- block-wide helpers (blockDim.x == kBlock) ----

template <typename T>
__device__ __forceinline__ T WarpSum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <typename T>
__device__ __forceinline__ T WarpMax(T v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// max() as the warp helpers take it (fmaxf for floats: a NaN loses to a number), as a functor
// for cub (CCCL's own cuda::maximum is newer than the CUDA 12.8 the images pin).
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return max(a, b);
  }
};

// Sum / max over the block (cub::BlockReduce), returned to every thread. Each instantiation has
// its own shared storage; the barrier before returning lets the next call reuse it.
template <typename T>
__device__ T BlockSum(T v) {
  using Reduce = cub::BlockReduce<T, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ T result;
  const T total = Reduce(temp).Sum(v);
  if (threadIdx.x == 0) result = total;
  __syncthreads();
  const T out = result;
  __syncthreads();
  return out;
}
template <typename T>
__device__ T BlockMax(T v) {
  using Reduce = cub::BlockReduce<T, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ T result;
  const T m = Reduce(temp).Reduce(v, MaxOp());
  if (threadIdx.x == 0) result = m;
  __syncthreads();
  const T out = result;
  __syncthreads();
  return out;
}

// Exclusive prefix sum of `flag` over the block (cub::BlockScan); *total gets the block's sum.
__device__ int BlockExclusiveScan(int flag, int* total) {
  using Scan = cub::BlockScan<int, kBlock>;
  __shared__ typename Scan::TempStorage temp;
  int before;
  Scan(temp).ExclusiveSum(flag, before, *total);
  __syncthreads();  // temp reusable by the next call
  return before;
}

// Order-preserving map of a score to 32 bits: larger score, larger key; -0 and +0 are one key (the
// CPU's comparisons treat them as equal); NaN below every number.
__device__ __forceinline__ uint32_t OrderKey(float s) {
  if (isnan(s)) return 0u;
  if (s == 0.0f) s = 0.0f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The k-th largest key (1 <= k <= number of valid slots) among slots [0, slots) for which
// key_at(e, &key) is true, by a most-significant-digit radix select with 8-bit digits; *need gets
// how many keys equal to it belong to the top k.
struct SelectShared {
  unsigned int hist[256];
  uint32_t prefix;
  long long remaining;
};
template <typename KeyAt>
__device__ uint32_t BlockRadixSelect(long long slots, long long k, KeyAt key_at, SelectShared* sh,
                                     long long* need) {
  uint32_t prefix = 0, mask = 0;
  long long remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kBlock) sh->hist[b] = 0;
    __syncthreads();
    for (long long e = threadIdx.x; e < slots; e += kBlock) {
      uint32_t key;
      if (key_at(e, &key) && (key & mask) == prefix)
        atomicAdd(&sh->hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long above = 0;
      int digit = 0;
      for (int b = 255; b >= 0; --b) {
        if (above + sh->hist[b] >= remaining) {
          digit = b;
          break;
        }
        above += sh->hist[b];
      }
      sh->remaining = remaining - above;
      sh->prefix = prefix | (static_cast<uint32_t>(digit) << shift);
    }
    __syncthreads();
    prefix = sh->prefix;
    remaining = sh->remaining;
    mask |= 255u << shift;
    __syncthreads();
  }
  *need = remaining;
  return prefix;
}

// ---- scoring ----

// Window logits of every head's group against a tile of 32 keys, scaled by 1/sqrt(d). With
// kReduceMax / kReduceMean the group's logits are reduced per window row ([window, stride] per
// head); with kReduceNone every query row is written ([G·window, stride], row g·window + a).
// Columns: the candidates, or every key when `all_keys`. Grid: (ceil(stride / 32), heads).
template <typename L>
__global__ void __launch_bounds__(kBlock)
    LogitsKernel(const HeadDesc* heads, int group, int window, int d, bool all_keys, int reduce,
                 float scale, long long stride, float* logits, long long head0) {
  const long long gh = head0 + blockIdx.y;
  const HeadDesc h = heads[gh];
  const int cand = h.n - window;
  if (cand <= 0) return;
  const int cols = all_keys ? h.n : cand;
  const int j0 = blockIdx.x * 32;
  if (j0 >= cols) return;
  extern __shared__ float ks[];  // [32][d + 1]
  using S = typename L::Storage;
  const S* keys = static_cast<const S*>(h.keys);
  for (int idx = threadIdx.x; idx < 32 * d; idx += kBlock) {
    const int r = idx / d, k = idx - r * d;
    const int j = j0 + r;
    ks[r * (d + 1) + k] = j < cols ? L::Load(keys + static_cast<long long>(j) * d + k) : 0.0f;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j = j0 + lane;
  const S* q = static_cast<const S*>(h.queries);
  const float* kr = ks + lane * (d + 1);
  const long long rows = reduce == kReduceNone ? static_cast<long long>(group) * window : window;
  float* out = logits + static_cast<long long>(gh) * rows * stride;
  const float inv_group = 1.0f / static_cast<float>(group);
  for (int a = warp; a < window; a += kWarps) {
    float red = 0.0f;
    for (int g = 0; g < group; ++g) {
      const S* qr = q + (static_cast<long long>(g) * window + (a + h.ring_start) % window) * d;
      float dot = 0.0f;
      for (int k = 0; k < d; ++k) dot = fmaf(L::Load(qr + k), kr[k], dot);
      dot *= scale;
      if (reduce == kReduceNone) {
        if (j < cols) out[(static_cast<long long>(g) * window + a) * stride + j] = dot;
      } else if (g == 0) {
        red = dot;
      } else {
        red = reduce == kReduceMax ? fmaxf(red, dot) : red + dot;
      }
    }
    if (reduce != kReduceNone && j < cols) {
      out[static_cast<long long>(a) * stride + j] = reduce == kReduceMean ? red * inv_group : red;
    }
  }
}

// (One-shot h2o, heads with 0 < n <= window: the CPU still computes those rows' softmax and fails
// on overflowing logits; here such heads have no candidates and are skipped, so no error is
// raised for them.)
//
// Softmax of each window row (over the candidates, or causally over all keys), scaled by
// `row_weight` and summed over the window, then 1-D pooling (stride 1, padding kernel/2; max
// ignores the padding, avg counts it as zeros). With kReduceNone each query head of the group is
// done in turn and the pooled scores averaged over the group. A row whose max is not finite sets
// overflow[head]. Grid: heads.
__global__ void __launch_bounds__(kBlock)
    SoftmaxPoolKernel(const HeadDesc* heads, int group, int window, bool all_keys, int reduce,
                      float row_weight, int pool_kernel, bool pool_max, long long stride,
                      const float* logits, float* importance, float* scores, int* overflow) {
  const long long gh = blockIdx.x;
  const int n = heads[gh].n;
  const int cand = n - window;
  if (cand <= 0) return;
  const int sets = reduce == kReduceNone ? group : 1;
  const long long rows = reduce == kReduceNone ? static_cast<long long>(group) * window : window;
  const float* base = logits + gh * rows * stride;
  float* im = importance + gh * stride;
  float* out = scores + gh * stride;
  const float inv_group = 1.0f / static_cast<float>(group);
  const int r = pool_kernel / 2;
  if (reduce == kReduceNone) {
    for (int j = threadIdx.x; j < cand; j += kBlock) out[j] = 0.0f;
  }
  for (int s = 0; s < sets; ++s) {
    for (int j = threadIdx.x; j < cand; j += kBlock) im[j] = 0.0f;
    __syncthreads();
    for (int a = 0; a < window; ++a) {
      const float* row = base + (static_cast<long long>(s) * window + a) * stride;
      const int len = all_keys ? cand + a + 1 : cand;
      float m = -INFINITY;
      for (int j = threadIdx.x; j < len; j += kBlock) m = fmaxf(m, row[j]);
      m = BlockMax(m);
      if (!isfinite(m)) {
        if (threadIdx.x == 0) overflow[gh] = 1;
        return;  // m is the same in every thread: the whole block leaves
      }
      float sum = 0.0f;
      for (int j = threadIdx.x; j < len; j += kBlock) sum += expf(row[j] - m);
      sum = BlockSum(sum);
      const float inv = row_weight / sum;
      for (int j = threadIdx.x; j < cand; j += kBlock) im[j] += expf(row[j] - m) * inv;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < cand; j += kBlock) {
      const int lo = max(0, j - r), hi = min(cand - 1, j + r);
      float p;
      if (pool_max) {
        p = im[lo];
        for (int i = lo + 1; i <= hi; ++i) p = fmaxf(p, im[i]);
      } else {
        p = 0.0f;
        for (int i = lo; i <= hi; ++i) p += im[i];
        p /= static_cast<float>(pool_kernel);
      }
      if (reduce == kReduceNone) {
        out[j] += p * inv_group;
      } else {
        out[j] = p;
      }
    }
    __syncthreads();
  }
}

// StreamingLLM: newer before older, newer being the age from the head's end (-(n - 1 - j)) so
// that ragged heads compare by recency. Grid: (ceil(stride / kBlock), heads).
__global__ void StreamingKernel(const HeadDesc* heads, int window, long long stride, float* scores,
                                long long head0) {
  const long long gh = head0 + blockIdx.y;
  const int n = heads[gh].n;
  const int cand = n - window;
  const int j = blockIdx.x * kBlock + threadIdx.x;
  if (j < cand) scores[gh * stride + j] = static_cast<float>(j - (n - 1));
}

// Always-kept rows above every scorer's scores, as core's ProtectScores: sinks 2^25, then rows
// younger than `recent` at 2^24 - age. Grid: (ceil(stride / kBlock), heads).
__global__ void ProtectKernel(const HeadDesc* heads, int window, int sinks, int recent,
                              long long stride, float* scores, long long head0) {
  const long long gh = head0 + blockIdx.y;
  const int n = heads[gh].n;
  const int cand = n - window;
  const int j = blockIdx.x * kBlock + threadIdx.x;
  if (j >= cand) return;
  if (j < sinks) {
    scores[gh * stride + j] = 33554432.0f;
  } else if (j >= n - recent) {
    scores[gh * stride + j] = 16777216.0f - static_cast<float>(n - 1 - j);
  }
}

// H2O with a carried accumulator: the score is the accumulated attention.
__global__ void AccumulatedKernel(const HeadDesc* heads, int window, long long stride,
                                  float* scores, long long head0) {
  const long long gh = head0 + blockIdx.y;
  const HeadDesc h = heads[gh];
  const int cand = h.n - window;
  const int j = blockIdx.x * kBlock + threadIdx.x;
  if (j < cand) scores[gh * stride + j] = h.accumulated ? h.accumulated[j] : 0.0f;
}

// R-KV, step 1: 1 / (‖k_j‖ + 1e-8) per key (norm accumulated in double, as the CPU does). Grid:
// (ceil(stride / kWarps), heads); a warp per key.
template <typename L>
__global__ void __launch_bounds__(kBlock)
    InvNormKernel(const HeadDesc* heads, int window, int d, long long stride, float* inv,
                  long long head0) {
  const long long gh = head0 + blockIdx.y;
  const HeadDesc h = heads[gh];
  if (h.n - window <= 0) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j = blockIdx.x * kWarps + warp;
  if (j >= h.n) return;
  using S = typename L::Storage;
  const S* k = static_cast<const S*>(h.keys) + static_cast<long long>(j) * d;
  double s = 0.0;
  for (int i = lane; i < d; i += 32) {
    const double x = L::Load(k + i);
    s += x * x;
  }
  s = WarpSum(s);
  if (lane == 0) {
    inv[gh * stride + j] = 1.0f / (static_cast<float>(sqrt(s)) + 1e-8f);
  }
}

// R-KV, step 2: rows of the cosine Gram matrix S of the normalised keys, 32 rows per block against
// every key in tiles of 32 (the diagonal excluded). Per row i it writes Σ_{j≠i} S_ij (in double)
// and its retain-last partner: the newest j > i with S_ij > T, else (T >= 0) the newest j < i with
// S_ij > T, else -1, with S at the partner. Grid: (ceil(stride / 32), heads).
template <typename L>
__global__ void __launch_bounds__(kBlock)
    GramRowsKernel(const HeadDesc* heads, int window, int d, long long stride, float threshold,
                   const float* inv, double* rowsum, int* partner, float* partner_value,
                   long long head0) {
  const long long gh = head0 + blockIdx.y;
  constexpr int kTile = 32, kChunk = 64, kRows = kTile / kWarps;
  __shared__ float a_tile[kTile][kChunk + 1];
  __shared__ float b_tile[kTile][kChunk + 1];
  const HeadDesc h = heads[gh];
  const int n = h.n;
  const int i0 = blockIdx.x * kTile;
  if (n - window <= 0 || i0 >= n) return;
  using S = typename L::Storage;
  const S* keys = static_cast<const S*>(h.keys);
  const float* iv = inv + gh * stride;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double rs[kRows];
  int above[kRows], below[kRows];
  float above_v[kRows], below_v[kRows];
  for (int r = 0; r < kRows; ++r) {
    rs[r] = 0.0;
    above[r] = below[r] = -1;
    above_v[r] = below_v[r] = 0.0f;
  }
  for (int j0 = 0; j0 < n; j0 += kTile) {
    float acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    for (int k0 = 0; k0 < d; k0 += kChunk) {
      const int kc = min(kChunk, d - k0);
      __syncthreads();
      for (int idx = threadIdx.x; idx < kTile * kChunk; idx += kBlock) {
        const int r = idx / kChunk, k = idx - r * kChunk;
        const int i = i0 + r, j = j0 + r;
        a_tile[r][k] = (i < n && k < kc)
                           ? L::Load(keys + static_cast<long long>(i) * d + k0 + k) * iv[i]
                           : 0.0f;
        b_tile[r][k] = (j < n && k < kc)
                           ? L::Load(keys + static_cast<long long>(j) * d + k0 + k) * iv[j]
                           : 0.0f;
      }
      __syncthreads();
      for (int r = 0; r < kRows; ++r) {
        const float* ar = a_tile[warp * kRows + r];
        const float* br = b_tile[lane];
        float s = acc[r];
        for (int k = 0; k < kc; ++k) s = fmaf(ar[k], br[k], s);
        acc[r] = s;
      }
    }
    const int j = j0 + lane;
    for (int r = 0; r < kRows; ++r) {
      const int i = i0 + warp * kRows + r;
      if (i < n && j < n && j != i) {
        const float u = acc[r];
        rs[r] += u;
        if (u > threshold) {
          if (j > i) {
            above[r] = j;
            above_v[r] = u;
          } else {
            below[r] = j;
            below_v[r] = u;
          }
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const int i = i0 + warp * kRows + r;
    const double sum = WarpSum(rs[r]);
    // The largest index wins; each lane saw increasing j, so its last match is its largest.
    int a = above[r], b = below[r];
    float av = above_v[r], bv = below_v[r];
    for (int o = 16; o > 0; o >>= 1) {
      const int oa = __shfl_xor_sync(kFullMask, a, o);
      const float oav = __shfl_xor_sync(kFullMask, av, o);
      if (oa > a) {
        a = oa;
        av = oav;
      }
      const int ob = __shfl_xor_sync(kFullMask, b, o);
      const float obv = __shfl_xor_sync(kFullMask, bv, o);
      if (ob > b) {
        b = ob;
        bv = obv;
      }
    }
    if (lane == 0 && i < n) {
      const long long at = gh * stride + i;
      rowsum[at] = sum;
      if (a >= 0) {
        partner[at] = a;
        partner_value[at] = av;
      } else if (threshold >= 0.0f && b >= 0) {
        partner[at] = b;
        partner_value[at] = bv;
      } else {
        partner[at] = -1;
        partner_value[at] = 0.0f;
      }
    }
  }
}

// R-KV, step 3: column means (row sums minus each row's retain-last entry, over n), their softmax
// over all n keys, and the mix Z = λ·I − (1 − λ)·R into the candidates' scores (which hold I).
// Grid: heads.
__global__ void __launch_bounds__(kBlock)
    RkvFinishKernel(const HeadDesc* heads, int window, long long stride, float lambda,
                    const double* rowsum, const int* partner, const float* partner_value,
                    double* column, float* scores) {
  const long long gh = blockIdx.x;
  const int n = heads[gh].n;
  const int cand = n - window;
  if (cand <= 0) return;
  double* col = column + gh * stride;
  for (int j = threadIdx.x; j < n; j += kBlock) col[j] = rowsum[gh * stride + j];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kBlock) {
    const int p = partner[gh * stride + i];
    if (p >= 0) atomicAdd(col + p, -static_cast<double>(partner_value[gh * stride + i]));
  }
  __syncthreads();
  double m = -1e300;
  for (int j = threadIdx.x; j < n; j += kBlock) {
    col[j] /= n;
    m = max(m, col[j]);
  }
  m = BlockMax(m);
  double z = 0.0;
  for (int j = threadIdx.x; j < n; j += kBlock) z += exp(col[j] - m);
  z = BlockSum(z);
  float* out = scores + gh * stride;
  for (int j = threadIdx.x; j < cand; j += kBlock) {
    const float r = static_cast<float>(exp(col[j] - m) / z);
    out[j] = lambda * out[j] - (1.0f - lambda) * r;
  }
}

// ---- allocation and selection ----

// Per layer (one block per session × layer): τ, the k-th largest of the pooled candidate scores of
// the layer's heads, and per head how many candidates lie above and at τ (every candidate when the
// pool holds at most k). Grid: sessions · L.
__global__ void __launch_bounds__(kBlock)
    LayerPoolKernel(const HeadDesc* heads, int num_layers, int kv_heads, int window,
                    long long stride, const float* scores, const long long* pool_k,
                    long long* greater, long long* equal) {
  __shared__ SelectShared sel;
  const long long first = static_cast<long long>(blockIdx.x) * kv_heads;
  const long long k = pool_k[blockIdx.x % num_layers];
  long long pool = 0;
  for (int h = 0; h < kv_heads; ++h) pool += max(0, heads[first + h].n - window);
  if (pool <= k) {
    for (int h = threadIdx.x; h < kv_heads; h += kBlock) {
      greater[first + h] = max(0, heads[first + h].n - window);
      equal[first + h] = 0;
    }
    return;
  }
  const float* base = scores + first * stride;
  auto key_at = [&](long long e, uint32_t* key) {
    const long long h = e / stride, j = e - h * stride;
    if (j >= heads[first + h].n - window) return false;
    *key = OrderKey(base[e]);
    return true;
  };
  long long need;
  const uint32_t tau =
      BlockRadixSelect(static_cast<long long>(kv_heads) * stride, k, key_at, &sel, &need);
  for (int h = 0; h < kv_heads; ++h) {
    const int cand = heads[first + h].n - window;
    long long gt = 0, eq = 0;
    for (int j = threadIdx.x; j < cand; j += kBlock) {
      const uint32_t key = OrderKey(base[h * stride + j]);
      gt += key > tau;
      eq += key == tau;
    }
    gt = BlockSum(gt);
    eq = BlockSum(eq);
    if (threadIdx.x == 0) {
      greater[first + h] = gt;
      equal[first + h] = eq;
    }
  }
}

// Per head: keep the top (b − window) candidates by score (ties to the lower index) and the last
// `window` tokens, or every token when n <= b; writes the kept positions ascending at
// kept + offsets[head] and sets their bits in the head's keep bitmask (zeroed before). Grid: heads.
__global__ void __launch_bounds__(kBlock)
    SelectKernel(const HeadDesc* heads, int window, long long stride, const float* scores,
                 const int* budgets, const long long* offsets, int words, int* kept,
                 unsigned long long* mask) {
  __shared__ SelectShared sel;
  const long long gh = blockIdx.x;
  const int n = heads[gh].n;
  const int b = budgets[gh];
  int* out = kept + offsets[gh];
  unsigned long long* mw = mask + gh * words;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (n <= b) {
    for (int j = threadIdx.x; j < n; j += kBlock) out[j] = j;
    for (int w = threadIdx.x; w < (n + 63) / 64; w += kBlock) {
      const int bits = min(64, n - 64 * w);
      mw[w] = bits == 64 ? ~0ull : ((1ull << bits) - 1);
    }
    return;
  }
  const int cand = n - window;
  const int k = b - window;
  const float* s = scores + gh * stride;
  auto key_at = [&](long long e, uint32_t* key) {
    *key = OrderKey(s[e]);
    return true;
  };
  long long need;
  const uint32_t tau = BlockRadixSelect(cand, k, key_at, &sel, &need);
  int eq_before = 0, kept_before = 0;
  for (int c0 = 0; c0 < cand; c0 += kBlock) {
    const int j = c0 + threadIdx.x;
    const bool valid = j < cand;
    const uint32_t key = valid ? OrderKey(s[j]) : 0u;
    const int eq = valid && key == tau;
    int eq_total;
    const int eq_rank = eq_before + BlockExclusiveScan(eq, &eq_total);
    const int keep = valid && (key > tau || (eq && eq_rank < need));
    int keep_total;
    const int pos = kept_before + BlockExclusiveScan(keep, &keep_total);
    if (keep) out[pos] = j;
    const unsigned bits = __ballot_sync(kFullMask, keep);
    if (lane == 0 && bits != 0) {
      const int first = c0 + warp * 32;
      atomicOr(mw + first / 64, static_cast<unsigned long long>(bits) << (32 * ((first / 32) & 1)));
    }
    eq_before += eq_total;
    kept_before += keep_total;
  }
  for (int j = cand + threadIdx.x; j < n; j += kBlock) {
    out[k + (j - cand)] = j;
    atomicOr(mw + j / 64, 1ull << (j % 64));
  }
}

// NaN/Inf in a head's live keys or its group's window queries. Grid: heads.
template <typename L>
__global__ void __launch_bounds__(kBlock)
    FiniteKernel(const HeadDesc* heads, int group, int window, int d, int* bad) {
  const long long gh = blockIdx.x;
  const HeadDesc h = heads[gh];
  using S = typename L::Storage;
  const S* k = static_cast<const S*>(h.keys);
  const S* q = static_cast<const S*>(h.queries);
  int found = 0;
  const long long key_elems = static_cast<long long>(h.n) * d;
  for (long long i = threadIdx.x; i < key_elems; i += kBlock) found |= !isfinite(L::Load(k + i));
  const long long q_elems = static_cast<long long>(group) * window * d;
  for (long long i = threadIdx.x; i < q_elems; i += kBlock) found |= !isfinite(L::Load(q + i));
  found = BlockSum(found);
  if (threadIdx.x == 0 && found != 0) bad[gh] = 1;
}

// Row copies by index lists. Grid: rows (sliced by the launcher).
__global__ void CopyRowsKernel(const unsigned char* src, unsigned char* dst,
                               const long long* src_rows, const long long* dst_rows,
                               long long count, long long row_bytes, long long t0) {
  const long long t = t0 + blockIdx.x;
  if (t >= count) return;
  const unsigned char* from = src + src_rows[t] * row_bytes;
  unsigned char* to = dst + dst_rows[t] * row_bytes;
  if (row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 4 == 0) {
    for (long long i = threadIdx.x; i < row_bytes / 4; i += blockDim.x) {
      reinterpret_cast<uint32_t*>(to)[i] = reinterpret_cast<const uint32_t*>(from)[i];
    }
  } else {
    for (long long i = threadIdx.x; i < row_bytes; i += blockDim.x) to[i] = from[i];
  }
}

// Compaction: each head's kept rows of its event's src gathered to the start of the head in dst,
// rows past its kept length zeroed. Grid: (heads, row blocks).
__global__ void GatherKernel(const GatherDesc* events, long long heads_per_event, const int* kept,
                             const long long* offsets, const int* kept_lengths,
                             long long row_bytes) {
  const long long gh = blockIdx.x;
  const GatherDesc g = events[gh / heads_per_event];
  const long long head = gh % heads_per_event;
  const unsigned char* src = g.src + head * g.n_max * row_bytes;
  unsigned char* dst = g.dst + head * g.max_kept * row_bytes;
  const int count = kept_lengths[gh];
  const int* rows = kept + offsets[gh];
  const bool words = row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(g.src) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(g.dst) % 4 == 0;
  for (long long r = blockIdx.y; r < g.max_kept; r += gridDim.y) {
    unsigned char* to = dst + r * row_bytes;
    if (r < count) {
      const unsigned char* from = src + static_cast<long long>(rows[r]) * row_bytes;
      if (words) {
        for (long long i = threadIdx.x; i < row_bytes / 4; i += blockDim.x) {
          reinterpret_cast<uint32_t*>(to)[i] = reinterpret_cast<const uint32_t*>(from)[i];
        }
      } else {
        for (long long i = threadIdx.x; i < row_bytes; i += blockDim.x) to[i] = from[i];
      }
    } else {
      for (long long i = threadIdx.x; i < row_bytes; i += blockDim.x) to[i] = 0;
    }
  }
}

}  // namespace
}  // namespace reasonalloc::gpu::kernels

namespace reasonalloc::gpu::launch {
namespace k = kernels;
namespace {

// Largest grid.y of a launch; longer head lists are launched in slices.
constexpr long long kMaxGridY = 65535;

template <typename F>
void Slices(long long num_heads, F&& launch_slice) {
  for (long long h0 = 0; h0 < num_heads; h0 += kMaxGridY) {
    launch_slice(h0, static_cast<unsigned>(std::min(kMaxGridY, num_heads - h0)));
  }
}

unsigned Blocks(long long n, long long per_block) {
  return static_cast<unsigned>(std::max(1ll, (n + per_block - 1) / per_block));
}

template <typename L>
cudaError_t ScoringAs(const ScoringParams& p, const HeadDesc* heads, long long num_heads,
                      long long stride, const ScoringBuffers& b, cudaStream_t stream) {
  if (p.scorer == Scorer::kStreaming) {
    Slices(num_heads, [&](long long h0, unsigned ny) {
      k::StreamingKernel<<<dim3(Blocks(stride, k::kBlock), ny), k::kBlock, 0, stream>>>(
          heads, p.window, stride, b.scores, h0);
    });
    return cudaGetLastError();
  }
  if (p.scorer == Scorer::kH2oAccumulated) {
    Slices(num_heads, [&](long long h0, unsigned ny) {
      k::AccumulatedKernel<<<dim3(Blocks(stride, k::kBlock), ny), k::kBlock, 0, stream>>>(
          heads, p.window, stride, b.scores, h0);
    });
    return cudaGetLastError();
  }
  const int d = p.head_dim;
  const size_t smem = sizeof(float) * 32 * static_cast<size_t>(d + 1);
  if (cudaError_t err = cudaFuncSetAttribute(
          k::LogitsKernel<L>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      err != cudaSuccess) {
    return err;
  }
  const float scale = 1.0f / sqrtf(static_cast<float>(d));
  Slices(num_heads, [&](long long h0, unsigned ny) {
    k::LogitsKernel<L><<<dim3(Blocks(stride, 32), ny), k::kBlock, smem, stream>>>(
        heads, p.group, p.window, d, p.all_keys, p.reduce, scale, stride, b.logits, h0);
  });
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  k::SoftmaxPoolKernel<<<static_cast<unsigned>(num_heads), k::kBlock, 0, stream>>>(
      heads, p.group, p.window, p.all_keys, p.reduce, p.row_weight, p.pool_kernel, p.pool_max,
      stride, b.logits, b.importance, b.scores, b.overflow);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (p.scorer != Scorer::kRkv) return cudaSuccess;
  Slices(num_heads, [&](long long h0, unsigned ny) {
    k::InvNormKernel<L><<<dim3(Blocks(stride, k::kWarps), ny), k::kBlock, 0, stream>>>(
        heads, p.window, d, stride, b.inv_norm, h0);
  });
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  Slices(num_heads, [&](long long h0, unsigned ny) {
    k::GramRowsKernel<L><<<dim3(Blocks(stride, 32), ny), k::kBlock, 0, stream>>>(
        heads, p.window, d, stride, p.threshold, b.inv_norm, b.rowsum, b.partner, b.partner_value,
        h0);
  });
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  k::RkvFinishKernel<<<static_cast<unsigned>(num_heads), k::kBlock, 0, stream>>>(
      heads, p.window, stride, p.lambda, b.rowsum, b.partner, b.partner_value, b.column, b.scores);
  return cudaGetLastError();
}

}  // namespace

cudaError_t Scoring(const ScoringParams& p, const HeadDesc* heads, long long num_heads,
                    long long stride, const ScoringBuffers& b, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  switch (p.elem) {
    case Elem::kF16:
      err = ScoringAs<k::F16>(p, heads, num_heads, stride, b, stream);
      break;
    case Elem::kBF16:
      err = ScoringAs<k::BF16>(p, heads, num_heads, stride, b, stream);
      break;
    case Elem::kF32:
    default:
      err = ScoringAs<k::F32>(p, heads, num_heads, stride, b, stream);
      break;
  }
  if (err != cudaSuccess || (p.sinks <= 0 && p.recent <= p.window)) return err;
  Slices(num_heads, [&](long long h0, unsigned ny) {
    k::ProtectKernel<<<dim3(Blocks(stride, k::kBlock), ny), k::kBlock, 0, stream>>>(
        heads, p.window, p.sinks, p.recent, stride, b.scores, h0);
  });
  return cudaGetLastError();
}

cudaError_t LayerPool(const HeadDesc* heads, long long num_events, int num_layers, int kv_heads,
                      int window, long long stride, const float* scores, const long long* pool_k,
                      long long* greater, long long* equal, cudaStream_t stream) {
  k::LayerPoolKernel<<<static_cast<unsigned>(num_events * num_layers), k::kBlock, 0, stream>>>(
      heads, num_layers, kv_heads, window, stride, scores, pool_k, greater, equal);
  return cudaGetLastError();
}

cudaError_t Select(const HeadDesc* heads, long long num_heads, int window, long long stride,
                   const float* scores, const int* budgets, const long long* offsets, int words,
                   int* kept, unsigned long long* mask, cudaStream_t stream) {
  k::SelectKernel<<<static_cast<unsigned>(num_heads), k::kBlock, 0, stream>>>(
      heads, window, stride, scores, budgets, offsets, words, kept, mask);
  return cudaGetLastError();
}

cudaError_t CheckFinite(Elem elem, const HeadDesc* heads, long long num_heads, int group,
                        int window, int head_dim, int* bad, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(num_heads);
  switch (elem) {
    case Elem::kF16:
      k::FiniteKernel<k::F16>
          <<<blocks, k::kBlock, 0, stream>>>(heads, group, window, head_dim, bad);
      break;
    case Elem::kBF16:
      k::FiniteKernel<k::BF16>
          <<<blocks, k::kBlock, 0, stream>>>(heads, group, window, head_dim, bad);
      break;
    case Elem::kF32:
    default:
      k::FiniteKernel<k::F32>
          <<<blocks, k::kBlock, 0, stream>>>(heads, group, window, head_dim, bad);
      break;
  }
  return cudaGetLastError();
}

cudaError_t CopyRows(const unsigned char* src, unsigned char* dst, const long long* src_rows,
                     const long long* dst_rows, long long count, long long row_bytes,
                     cudaStream_t stream) {
  constexpr long long kMaxGridX = 1ll << 30;
  for (long long t0 = 0; t0 < count; t0 += kMaxGridX) {
    const unsigned blocks = static_cast<unsigned>(std::min(kMaxGridX, count - t0));
    k::CopyRowsKernel<<<blocks, 128, 0, stream>>>(src, dst, src_rows, dst_rows, count, row_bytes,
                                                  t0);
  }
  return cudaGetLastError();
}

cudaError_t Gather(const GatherDesc* events, long long num_events, long long heads_per_event,
                   long long max_rows, const int* kept, const long long* offsets,
                   const int* kept_lengths, long long row_bytes, cudaStream_t stream) {
  const unsigned ry = static_cast<unsigned>(std::clamp(max_rows, 1ll, 64ll));
  k::GatherKernel<<<dim3(static_cast<unsigned>(num_events * heads_per_event), ry), 128, 0,
                    stream>>>(events, heads_per_event, kept, offsets, kept_lengths, row_bytes);
  return cudaGetLastError();
}

}  // namespace reasonalloc::gpu::launch
