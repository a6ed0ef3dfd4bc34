// A test helper, not a shipped program: writes one tensor of a GGUF file, dequantised to fp32 by
// the worker's reader, as a .npy file (shape ne[n-1], ..., ne[0], C order), so the Python tests can
// compare the reader against the `gguf` package's own dequantisation on synthetic and real files.
//
//   gguf_dequant_tool MODEL.gguf --list              (one line per tensor: name, type, dims)
//   gguf_dequant_tool MODEL.gguf TENSOR OUT.npy [TENSOR OUT.npy ...]
#include <iostream>
#include <string>
#include <vector>

#include "core/npy.h"
#include "worker/gguf.h"

int main(int argc, char** argv) {
  using reasonalloc::NpyArray;
  using reasonalloc::worker::GgmlTypeName;
  using reasonalloc::worker::GgufFile;
  if (argc < 3 || (argc != 3 && argc % 2 != 0)) {
    std::cerr << "usage: gguf_dequant_tool MODEL.gguf --list | MODEL.gguf TENSOR OUT.npy ...\n";
    return 2;
  }
  auto file = GgufFile::Open(argv[1]);
  if (!file.ok()) {
    std::cerr << file.status() << "\n";
    return 1;
  }
  if (argc == 3) {
    for (const auto& t : (*file)->tensors()) {
      std::cout << t.name << " " << GgmlTypeName(t.type);
      for (int64_t d : t.dims) std::cout << " " << d;
      std::cout << "\n";
    }
    return 0;
  }
  for (int i = 2; i + 1 < argc; i += 2) {
    auto values = (*file)->Dequantize(argv[i]);
    if (!values.ok()) {
      std::cerr << values.status() << "\n";
      return 1;
    }
    NpyArray array;
    const auto& dims = (**(*file)->Tensor(argv[i])).dims;
    array.shape.assign(dims.rbegin(), dims.rend());
    array.data.assign(reinterpret_cast<const char*>(values->data()),
                      values->size() * sizeof(float));
    if (auto s = reasonalloc::WriteNpyFile(argv[i + 1], array); !s.ok()) {
      std::cerr << s << "\n";
      return 1;
    }
  }
  return 0;
}
