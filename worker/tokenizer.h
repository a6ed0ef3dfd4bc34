// The byte-level BPE tokenizer of a GGUF file ("gpt2" model): vocabulary, merges and special
// tokens from the metadata, the pre-tokenizer of SmolLM/StarCoder (every digit alone, then the
// GPT-2 split), and the ChatML chat template.
//
// Letters and digits are classified exactly for ASCII; any other code point that is not
// whitespace counts as a letter (the model's prompts here are English; a full Unicode category
// table is not carried).
#ifndef REASONALLOC_WORKER_TOKENIZER_H_
#define REASONALLOC_WORKER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/gguf.h"

namespace reasonalloc::worker {

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& file);

  // Special tokens written literally in `text` (e.g. "<|im_start|>") become their ids.
  std::vector<int32_t> Encode(const std::string& text) const;
  std::string Decode(const std::vector<int32_t>& ids) const;
  std::string TokenText(int32_t id) const;

  // The prompt of a one-turn chat: the template's default system message, the user's message and
  // the opening of the assistant's turn.
  std::string ChatPrompt(const std::string& user) const;

  // Ids of the control tokens (<|im_end|>, <|endoftext|>, ...).
  std::vector<int32_t> ControlTokens() const;

  int32_t vocab_size() const { return static_cast<int32_t>(tokens_.size()); }
  int32_t eos() const { return eos_; }
  int32_t bos() const { return bos_; }

 private:
  Tokenizer() = default;
  void Bpe(const std::string& piece, std::vector<int32_t>* out) const;

  std::vector<std::string> tokens_;
  std::vector<int64_t> types_;
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<std::string, int32_t> merge_rank_;  // "left right" -> rank
  std::vector<std::string> specials_;                    // literal texts, longest first
  std::string byte_to_unicode_[256];
  std::unordered_map<std::string, unsigned char> unicode_to_byte_;
  std::string system_prompt_;
  int32_t eos_ = -1, bos_ = -1;
};

}  // namespace reasonalloc::worker

#endif  // REASONALLOC_WORKER_TOKENIZER_H_
