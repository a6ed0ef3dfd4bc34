// Tokenizes many texts with the worker's tokenizer in one process, for the comparisons against
// reference tokenizers in tests/worker/test_tokenizers.py.
//
//   tokenize_tool MODEL.gguf TEXTS [plain]
//
// TEXTS holds one text per line, hex-encoded (so any byte, newline included, can be written).
// For each text one line is printed: the token ids, comma-separated (with BOS/EOS where the file
// asks for them, unless `plain`), a tab, and the hex of the ids decoded. Only the tokenizer's
// metadata is read: a vocab-only GGUF is enough.
#include <fstream>
#include <iostream>
#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_join.h"
#include "worker/gguf.h"
#include "worker/tokenizer.h"

int main(int argc, char** argv) {
  using reasonalloc::worker::GgufFile;
  using reasonalloc::worker::Tokenizer;
  if (argc < 3) {
    std::cerr << "usage: tokenize_tool MODEL.gguf TEXTS [plain]\n";
    return 2;
  }
  const bool add_special = !(argc > 3 && std::string(argv[3]) == "plain");
  auto file = GgufFile::Open(argv[1]);
  if (!file.ok()) {
    std::cerr << file.status() << "\n";
    return 1;
  }
  auto tokenizer = Tokenizer::FromGguf(**file);
  if (!tokenizer.ok()) {
    std::cerr << tokenizer.status() << "\n";
    return 1;
  }
  std::ifstream in(argv[2]);
  std::string line;
  while (std::getline(in, line)) {
    const std::string text = absl::HexStringToBytes(line);
    const auto ids = (*tokenizer)->Encode(text, add_special);
    std::cout << absl::StrJoin(ids, ",") << "\t"
              << absl::BytesToHexString((*tokenizer)->Decode(ids)) << "\n";
  }
  return 0;
}
