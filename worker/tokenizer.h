// The tokenizer of a GGUF file, as llama.cpp reads it from the metadata:
//
//   tokenizer.ggml.model = "gpt2": byte-level BPE (vocabulary and ranked merges) after a
//     pre-tokenizer chosen by tokenizer.ggml.pre:
//       "smollm" (also "starcoder", "refact", "codeshell"): every \p{N} alone, then the GPT-2 split
//         's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//       "gpt2": the GPT-2 split alone;
//       "qwen2" (also "stablelm2"):
//         (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//         \s*[\r\n]+|\s+(?!\S)|\s+
//   tokenizer.ggml.model = "llama": SentencePiece BPE. Spaces become U+2581 ("▁"), a "▁" is put
//     before the text (and after every special token) when tokenizer.ggml.add_space_prefix says so
//     (default true), then adjacent symbols merge greedily, the pair whose merged piece scores
//     highest first (leftmost on ties); characters left outside the vocabulary become their
//     <0xNN> byte tokens (or the unknown token where the vocabulary has none).
//
// Control, user-defined and unknown tokens written literally in the text are matched first
// (leftmost, longest), as llama.cpp does with parse_special. \p{L} and \p{N} are the Unicode
// categories (worker/unicode_tables.h); \s is Unicode White_Space. Other pre-tokenizers and
// tokenizer models are errors that name them.
#ifndef REASONALLOC_WORKER_TOKENIZER_H_
#define REASONALLOC_WORKER_TOKENIZER_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/gguf.h"

namespace reasonalloc::worker {

class Tokenizer {
 public:
  enum class Model { kBpe, kSpm };
  enum class Pre { kNone, kGpt2, kSmollm, kQwen2 };

  // Reads the vocabulary from the file's metadata only (no tensor is touched), so a vocab-only
  // GGUF is enough.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& file);

  // Special tokens written literally in `text` (e.g. "<|im_start|>") become their ids. With
  // `add_special`, BOS (EOS) is added where the file's tokenizer.ggml.add_bos_token
  // (add_eos_token) asks for it; add_bos_token defaults to true for "llama", false for "gpt2".
  std::vector<int32_t> Encode(const std::string& text, bool add_special = true) const;
  // The bytes of the tokens: byte tokens are their byte, "▁" is a space (SentencePiece), control
  // tokens are their text.
  std::string Decode(const std::vector<int32_t>& ids) const;
  std::string TokenText(int32_t id) const;

  // Ids of the control tokens (<|im_end|>, <|endoftext|>, ...).
  std::vector<int32_t> ControlTokens() const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t eos() const { return eos_; }
  int32_t bos() const { return bos_; }
  bool add_bos() const { return add_bos_; }
  bool add_space_prefix() const { return add_space_prefix_; }
  Model model() const { return model_; }
  Pre pre() const { return pre_; }

 private:
  Tokenizer() = default;
  // Encodes text without special tokens; `after_special` tells whether a special token (or the
  // start of the text) precedes it (the SentencePiece dummy prefix).
  void EncodePlain(const std::string& text, bool after_special, std::vector<int32_t>* out) const;
  void Bpe(const std::string& piece, std::vector<int32_t>* out) const;
  void Spm(const std::string& text, std::vector<int32_t>* out) const;
  void SpmResegment(const std::string& piece,
                    const std::unordered_map<std::string, std::pair<std::string, std::string>>& rev,
                    std::vector<int32_t>* out) const;
  int32_t Id(const std::string& text) const;

  Model model_ = Model::kBpe;
  Pre pre_ = Pre::kNone;
  std::vector<std::string> tokens_;
  std::vector<int64_t> types_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<std::string, int32_t> merge_rank_;  // "left right" -> rank
  // Special token ids by the first byte of their text, longest text first.
  std::array<std::vector<int32_t>, 256> specials_;
  std::string byte_to_unicode_[256];
  std::unordered_map<std::string, unsigned char> unicode_to_byte_;
  std::array<int32_t, 256> byte_token_{};  // SentencePiece <0xNN> ids (-1 when absent)
  int32_t eos_ = -1, bos_ = -1, unk_ = -1;
  bool add_bos_ = false, add_eos_ = false, add_space_prefix_ = false;
};

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_TOKENIZER_H_
