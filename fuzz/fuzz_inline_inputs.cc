// Inline-tensor decoder (core/inline_inputs.h), the path every Compress with inline_tensors takes:
// a small session geometry and three tensors (dtype, rank, dims, bytes) and the lengths all come
// from the input; PrepareInlineInputs must accept or refuse with a status, never read outside the
// bytes it was given, and an accepted result must have the sizes it promises.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/inline_inputs.h"
#include "core/session_config.h"
#include "fuzz/fuzz_common.h"

namespace {

using reasonalloc::DType;
using reasonalloc::fuzz::PickDType;

struct OwnedTensor {
  reasonalloc::RawTensor raw;
  std::string bytes;
};

OwnedTensor PickTensor(FuzzedDataProvider& in, const std::vector<int64_t>& natural) {
  OwnedTensor t;
  t.raw.present = in.ConsumeBool();
  t.raw.dtype = PickDType(in);
  const int rank = in.ConsumeIntegralInRange<int>(0, 5);
  for (int i = 0; i < rank; ++i) {
    // Mostly the session's own dimension, sometimes anything (negative, zero, huge).
    const bool natural_dim = i < static_cast<int>(natural.size()) && in.ConsumeBool();
    t.raw.shape.push_back(natural_dim ? natural[static_cast<size_t>(i)]
                                      : in.ConsumeIntegralInRange<int64_t>(-3, 1 << 20));
  }
  // The byte count that the shape implies, when it is small, else anything up to 64 KiB.
  int64_t want = static_cast<int64_t>(reasonalloc::DTypeSize(t.raw.dtype));
  for (int64_t d : t.raw.shape) {
    if (d < 0 || d > (1 << 16) || want > (1 << 16)) {
      want = -1;
      break;
    }
    want *= d;
  }
  const size_t n = want >= 0 && want <= (1 << 16) && in.ConsumeBool()
                       ? static_cast<size_t>(want)
                       : in.ConsumeIntegralInRange<size_t>(0, 1 << 16);
  t.bytes = in.ConsumeBytesAsString(n);
  return t;  // raw.data is set by the caller, once the bytes no longer move
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  reasonalloc::SessionConfig config =
      reasonalloc::fuzz::PickSmallConfig(in, /*max_context=*/96, /*managed=*/in.ConsumeBool());
  const auto& m = config.model;
  if (!reasonalloc::ValidateSessionConfig(config).ok()) return 0;

  const int64_t n = in.ConsumeIntegralInRange<int64_t>(1, m.max_context);
  OwnedTensor q = PickTensor(in, {m.num_layers, m.num_q_heads, config.budget.window, m.head_dim});
  OwnedTensor k = PickTensor(in, {m.num_layers, m.num_kv_heads, n, m.head_dim});
  OwnedTensor v = PickTensor(in, {m.num_layers, m.num_kv_heads, n, m.head_dim});
  for (OwnedTensor* t : {&q, &k, &v}) t->raw.data = t->bytes;
  std::vector<int32_t> lengths;
  if (in.ConsumeBool()) {
    const int count =
        in.ConsumeBool() ? m.num_layers * m.num_kv_heads : in.ConsumeIntegralInRange<int>(0, 12);
    for (int i = 0; i < count; ++i) lengths.push_back(in.ConsumeIntegral<int32_t>());
  }
  auto prepared = reasonalloc::PrepareInlineInputs(config, q.raw, k.raw, v.raw, lengths);
  if (!prepared.ok()) return 0;
  const size_t heads = static_cast<size_t>(m.num_layers) * static_cast<size_t>(m.num_kv_heads);
  const size_t n_max = static_cast<size_t>(prepared->n_max);
  if (prepared->lengths.size() != heads ||
      prepared->keys.size() != heads * n_max * static_cast<size_t>(m.head_dim) ||
      prepared->query_window.size() !=
          static_cast<size_t>(m.num_layers) * static_cast<size_t>(m.num_q_heads) *
              static_cast<size_t>(config.budget.window) * static_cast<size_t>(m.head_dim)) {
    std::abort();  // accepted inputs of the wrong size
  }
  for (int32_t len : prepared->lengths) {
    if (len < 0 || static_cast<size_t>(len) > n_max) std::abort();
  }
  return 0;
}
