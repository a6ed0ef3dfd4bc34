// GGUF reader (worker/gguf.h): the worker opens model files an operator points it at. Any bytes
// give a file or an error; when the reader accepts, every metadata lookup and the dequantisation
// of every tensor it lists (up to a size) must stay inside the file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "worker/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd_create("fuzz.gguf", MFD_CLOEXEC);
  if (fd < 0) std::abort();
  if (size > 0 && write(fd, data, size) != static_cast<ssize_t>(size)) std::abort();
  auto file = reasonalloc::worker::GgufFile::Open(absl::StrCat("/proc/self/fd/", fd));
  if (file.ok()) {
    for (const auto& [key, value] : (*file)->metadata()) {
      (void)(*file)->GetInt(key);
      (void)(*file)->GetFloat(key);
      (void)(*file)->GetString(key);
      (void)(*file)->GetStrings(key);
      (void)(*file)->GetInts(key);
    }
    for (const auto& t : (*file)->tensors()) {
      if (t.elements() <= (1 << 20)) (void)(*file)->Dequantize(t.name);
    }
  }
  close(fd);
  return 0;
}
