// .npy reader (core/npy.h): any bytes give an array or an error, never a crash; an accepted array
// serialises and parses back to the same array.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto array = reasonalloc::ParseNpy(bytes, "fuzz");
  if (!array.ok()) return 0;
  const std::string again = reasonalloc::SerializeNpy(*array);
  auto back = reasonalloc::ParseNpy(again, "fuzz");
  if (!back.ok() || back->shape != array->shape || back->dtype != array->dtype ||
      back->data != array->data) {
    std::abort();  // the writer and the reader disagree
  }
  (void)reasonalloc::NpyToInt64(*array, "fuzz");
  return 0;
}
