// The client's arena descriptor checks (client/mapped_arena.h), which stand between a sidecar's
// CreateSession answer and the worker's pointers: a descriptor built from the input (memory kind,
// layout version, byte_length, arrays with offsets and lengths) naming a real shared-memory object
// of a size the input chooses. When Map accepts, the first and last byte of every array are read
// and written: each must lie inside the mapping.
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/mapped_arena.h"
#include "fuzz/fuzz_common.h"

namespace {

constexpr uint64_t kObjectBytes = 1 << 16;

constexpr char kTag[] = "arena";
const reasonalloc::fuzz::SharedObject& TheObject() {
  return reasonalloc::fuzz::TheSharedObject<kTag>(kObjectBytes);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  const reasonalloc::fuzz::SharedObject& object = TheObject();
  const uint64_t object_bytes =
      in.ConsumeBool() ? kObjectBytes : in.ConsumeIntegralInRange<uint64_t>(0, kObjectBytes);
  if (ftruncate(object.fd, static_cast<off_t>(object_bytes)) != 0) std::abort();
  reasonalloc::v1::ArenaDescriptor d;
  d.set_kind(in.ConsumeRandomLengthString(8));
  d.set_memory(static_cast<reasonalloc::v1::MemoryKind>(in.ConsumeIntegralInRange<int>(0, 3)));
  d.set_layout_version(in.ConsumeIntegralInRange<int>(0, 9) == 0 ? 0 : 1);
  d.set_shm_name(in.ConsumeIntegralInRange<int>(0, 9) == 0 ? in.ConsumeRandomLengthString(32)
                                                           : object.name);
  d.set_byte_length(in.ConsumeBool() ? object_bytes
                                     : in.ConsumeIntegral<uint64_t>() % (2 * kObjectBytes + 1));
  const int arrays = in.ConsumeIntegralInRange<int>(0, 4);
  for (int i = 0; i < arrays; ++i) {
    auto* a = d.add_arrays();
    a->set_name(absl::StrCat("a", i));
    a->set_byte_offset(in.ConsumeBool() ? in.ConsumeIntegralInRange<uint64_t>(0, d.byte_length())
                                        : in.ConsumeIntegral<uint64_t>());
    a->set_byte_length(in.ConsumeBool() ? in.ConsumeIntegralInRange<uint64_t>(0, d.byte_length())
                                        : in.ConsumeIntegral<uint64_t>());
  }
  auto mapped = reasonalloc::MappedArena::Map(d);
  if (!mapped.ok()) return 0;
  for (const auto& a : d.arrays()) {
    if (a.byte_length() == 0) continue;
    auto base = (*mapped)->Array(a.name());
    if (!base.ok()) std::abort();
    volatile unsigned char* p = *base;
    p[0] = static_cast<unsigned char>(p[0] + 1);
    p[a.byte_length() - 1] = static_cast<unsigned char>(p[a.byte_length() - 1] + 1);
  }
  return 0;
}
