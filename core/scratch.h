// Per-thread scratch of the scorers and the selector: reused across heads and events so that the
// steady state allocates nothing, bounded by the scoring tile, and given back after a large event
// so that one big request does not leave the process holding its peak.
#ifndef REASONALLOC_CORE_SCRATCH_H_
#define REASONALLOC_CORE_SCRATCH_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace reasonalloc {

// Most bytes one scoring tile (a block of attention logits or of the R-KV similarity matrix) may
// hold. A head whose whole block fits is scored in one piece, as before tiling; a larger one is
// scored in row tiles, so that its scratch grows with N, not with N².
size_t ScoreTileBytes();
// For tests: a smaller tile forces the tiled paths on small inputs. 0 restores the default.
void SetScoreTileBytesForTesting(size_t bytes);

// Per-thread buffers larger than this are freed when a head is done. As large as the default
// scoring tile, so that heads scored in one piece, or in tiles, reuse their buffers from head to
// head; only what grows with a long head's N beyond it (its normalised keys, say) goes back.
inline constexpr size_t kRetainedScratchBytes = size_t{16} << 20;

template <typename T>
T* Sized(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

template <typename T>
void TrimScratch(std::vector<T>& v) {
  if (v.capacity() * sizeof(T) > kRetainedScratchBytes) std::vector<T>().swap(v);
}

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_SCRATCH_H_
