// RegisterBuffers descriptor checks (server/external_buffers.h): two ArenaDescriptors built from
// the input (kind, memory, layout version, name, array name, dtype, shape, strides, offsets,
// lengths), mostly close to valid ones. Names usually point at a real shared-memory object this
// target creates (of a size the input chooses), so the extent checks run against a real fstat.
// When Open accepts, every head's keys and the query window are read: any read outside the object
// must be an error, never a fault.
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/session_config.h"
#include "fuzz/fuzz_common.h"
#include "server/external_buffers.h"

namespace {

using reasonalloc::v1::ArenaDescriptor;

constexpr size_t kObjectBytes = 1 << 16;

constexpr char kTag[] = "regbuf";
const reasonalloc::fuzz::SharedObject& TheObject() {
  return reasonalloc::fuzz::TheSharedObject<kTag>(kObjectBytes);
}

void Fill(FuzzedDataProvider& in, bool keys, const reasonalloc::SessionConfig& config,
          ArenaDescriptor* d) {
  const auto& m = config.model;
  d->set_kind(in.ConsumeIntegralInRange<int>(0, 9) == 0 ? in.ConsumeRandomLengthString(16)
                                                        : (keys ? "keys" : "query_window"));
  d->set_memory(static_cast<reasonalloc::v1::MemoryKind>(in.ConsumeIntegralInRange<int>(0, 3)));
  d->set_layout_version(in.ConsumeIntegralInRange<int>(0, 9) == 0 ? 2 : 1);
  d->set_shm_name(in.ConsumeIntegralInRange<int>(0, 9) == 0 ? in.ConsumeRandomLengthString(32)
                                                            : TheObject().name);
  d->set_byte_length(in.ConsumeIntegralInRange<uint64_t>(0, 2 * kObjectBytes));
  auto* a = d->add_arrays();
  a->set_name(in.ConsumeIntegralInRange<int>(0, 9) == 0 ? "x" : (keys ? "k" : "q"));
  a->set_dtype(static_cast<reasonalloc::v1::DType>(in.ConsumeIntegralInRange<int>(0, 4)));
  const std::vector<int64_t> natural = {
      m.num_layers, keys ? m.num_kv_heads : m.num_q_heads,
      keys ? in.ConsumeIntegralInRange<int64_t>(1, 40) : config.budget.window, m.head_dim};
  const int rank =
      in.ConsumeIntegralInRange<int>(0, 9) == 0 ? in.ConsumeIntegralInRange<int>(0, 5) : 4;
  int64_t stride = 1;
  std::vector<int64_t> strides(static_cast<size_t>(rank));
  for (int i = rank - 1; i >= 0; --i) {
    strides[static_cast<size_t>(i)] =
        in.ConsumeBool() ? stride : in.ConsumeIntegralInRange<int64_t>(-4, int64_t{1} << 40);
    if (i < static_cast<int>(natural.size())) stride *= natural[static_cast<size_t>(i)];
  }
  for (int i = 0; i < rank; ++i) {
    a->add_shape(in.ConsumeBool() && i < static_cast<int>(natural.size())
                     ? natural[static_cast<size_t>(i)]
                     : in.ConsumeIntegralInRange<int64_t>(-2, int64_t{1} << 40));
    a->add_strides(strides[static_cast<size_t>(i)]);
  }
  a->set_byte_offset(in.ConsumeBool() ? 0 : in.ConsumeIntegral<uint64_t>() % (4 * kObjectBytes));
  a->set_byte_length(in.ConsumeIntegralInRange<uint64_t>(0, 2 * kObjectBytes));
  if (in.ConsumeIntegralInRange<int>(0, 19) == 0) d->add_arrays()->set_name("extra");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  reasonalloc::SessionConfig config =
      reasonalloc::fuzz::PickSmallConfig(in, /*max_context=*/64, /*managed=*/false);
  const auto& m = config.model;
  if (!reasonalloc::ValidateSessionConfig(config).ok()) return 0;

  google::protobuf::RepeatedPtrField<ArenaDescriptor> buffers;
  const bool keys_first = in.ConsumeBool();
  const int count =
      in.ConsumeIntegralInRange<int>(0, 19) == 0 ? in.ConsumeIntegralInRange<int>(0, 3) : 2;
  for (int i = 0; i < count; ++i) Fill(in, (i == 0) == keys_first, config, buffers.Add());
  reasonalloc::PeerIdentity caller;
  caller.local = in.ConsumeIntegralInRange<int>(0, 19) != 0;
  caller.uid = getuid();
  // The object shrinks or grows after registration: reads must notice, not fault.
  const size_t object_bytes =
      in.ConsumeBool() ? kObjectBytes : in.ConsumeIntegralInRange<size_t>(0, kObjectBytes);
  if (ftruncate(TheObject().fd, static_cast<off_t>(kObjectBytes)) != 0) std::abort();
  auto opened = reasonalloc::ExternalBuffers::Open(buffers, config, caller);
  if (!opened.ok()) return 0;
  if (ftruncate(TheObject().fd, static_cast<off_t>(object_bytes)) != 0) std::abort();
  const int64_t rows = (*opened)->key_rows();
  std::vector<float> out(static_cast<size_t>(rows) * static_cast<size_t>(m.head_dim));
  for (int l = 0; l < m.num_layers; ++l) {
    for (int h = 0; h < m.num_kv_heads; ++h) (void)(*opened)->ReadKeys(l, h, rows, out.data());
  }
  std::vector<float> queries(
      static_cast<size_t>(m.num_layers) * static_cast<size_t>(m.num_q_heads) *
      static_cast<size_t>(config.budget.window) * static_cast<size_t>(m.head_dim));
  (void)(*opened)->ReadQueries(in.ConsumeIntegralInRange<int64_t>(0, 100), queries.data());
  return 0;
}
