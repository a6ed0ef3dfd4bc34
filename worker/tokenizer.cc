#include "worker/tokenizer.h"

#include <algorithm>
#include <climits>

#include "absl/strings/str_cat.h"

namespace reasonalloc::worker {
namespace {

std::string Utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xF0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Length of the UTF-8 sequence starting with byte `c` (1 for stray continuation bytes).
size_t Utf8Length(unsigned char c) {
  if (c >= 0xF0) return 4;
  if (c >= 0xE0) return 3;
  if (c >= 0xC0) return 2;
  return 1;
}

enum class Cls { kLetter, kDigit, kSpace, kOther };

// The class of the code point starting at text[i] (see the header for non-ASCII).
Cls Classify(const std::string& text, size_t i) {
  const auto c = static_cast<unsigned char>(text[i]);
  if (c >= 0x80) return Cls::kLetter;
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return Cls::kLetter;
  if (c >= '0' && c <= '9') return Cls::kDigit;
  if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') return Cls::kSpace;
  return Cls::kOther;
}

size_t Next(const std::string& text, size_t i) {
  return std::min(text.size(), i + Utf8Length(static_cast<unsigned char>(text[i])));
}

// The GPT-2 pre-tokenizer regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// applied to `text`, appending the pieces.
void SplitGpt2(const std::string& text, std::vector<std::string>* out) {
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    const size_t start = i;
    if (text[i] == '\'') {
      static const char* kSuffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
      bool matched = false;
      for (const char* suffix : kSuffixes) {
        const std::string s(suffix);
        if (text.compare(i + 1, s.size(), s) == 0) {
          out->push_back(text.substr(i, 1 + s.size()));
          i += 1 + s.size();
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    // " ?X+" for X in letters, digits, other.
    size_t j = i;
    if (text[j] == ' ' && j + 1 < n && Classify(text, j + 1) != Cls::kSpace) ++j;
    const Cls cls = Classify(text, j);
    if (cls != Cls::kSpace) {
      while (j < n && Classify(text, j) == cls) j = Next(text, j);
      out->push_back(text.substr(start, j - start));
      i = j;
      continue;
    }
    // Whitespace: \s+(?!\S) leaves the last blank to the next piece when a non-blank follows; a
    // single blank before a non-blank is matched by \s+.
    size_t end = i;
    while (end < n && Classify(text, end) == Cls::kSpace) ++end;
    if (end < n && end - i > 1) --end;
    out->push_back(text.substr(i, end - i));
    i = end;
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& file) {
  auto model = file.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  if (*model != "gpt2") {
    return absl::UnimplementedError(absl::StrCat(
        "tokenizer.ggml.model \"", *model, "\" is not supported (only byte-level BPE, gpt2)"));
  }
  auto tokens = file.GetStrings("tokenizer.ggml.tokens");
  auto merges = file.GetStrings("tokenizer.ggml.merges");
  if (!tokens.ok()) return tokens.status();
  if (!merges.ok()) return merges.status();
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->tokens_ = **tokens;
  if (auto types = file.GetInts("tokenizer.ggml.token_type"); types.ok()) t->types_ = **types;
  t->types_.resize(t->tokens_.size(), 1);
  for (size_t i = 0; i < t->tokens_.size(); ++i) {
    t->ids_.emplace(t->tokens_[i], static_cast<int32_t>(i));
    // 3 = control, 4 = user-defined: written literally in text.
    if ((t->types_[i] == 3 || t->types_[i] == 4) && !t->tokens_[i].empty()) {
      t->specials_.push_back(t->tokens_[i]);
    }
  }
  std::sort(t->specials_.begin(), t->specials_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  for (size_t r = 0; r < (*merges)->size(); ++r) {
    t->merge_rank_.emplace((**merges)[r], static_cast<int32_t>(r));
  }
  // GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onward.
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + extra++);
    t->byte_to_unicode_[b] = Utf8(cp);
    t->unicode_to_byte_[t->byte_to_unicode_[b]] = static_cast<unsigned char>(b);
  }
  auto id = [&](const char* key) -> int32_t {
    auto v = file.GetInt(key);
    return v.ok() && *v >= 0 && *v < static_cast<int64_t>(t->tokens_.size())
               ? static_cast<int32_t>(*v)
               : -1;
  };
  t->eos_ = id("tokenizer.ggml.eos_token_id");
  t->bos_ = id("tokenizer.ggml.bos_token_id");
  auto chat = file.GetString("tokenizer.chat_template");
  if (!chat.ok()) return chat.status();
  const std::string open = "<|im_start|>system\n";
  const size_t at = chat->find(open);
  const size_t close = at == std::string::npos ? at : chat->find("<|im_end|>", at);
  if (at == std::string::npos || close == std::string::npos ||
      chat->find("<|im_start|>assistant\n") == std::string::npos) {
    return absl::UnimplementedError(
        "tokenizer.chat_template is not the ChatML template with a default system message");
  }
  t->system_prompt_ = chat->substr(at + open.size(), close - at - open.size());
  return t;
}

void Tokenizer::Bpe(const std::string& piece, std::vector<int32_t>* out) const {
  std::vector<std::string> symbols;
  for (unsigned char c : piece) symbols.push_back(byte_to_unicode_[c]);
  while (symbols.size() > 1) {
    int best = INT_MAX;
    size_t at = 0;
    for (size_t k = 0; k + 1 < symbols.size(); ++k) {
      auto it = merge_rank_.find(absl::StrCat(symbols[k], " ", symbols[k + 1]));
      if (it != merge_rank_.end() && it->second < best) {
        best = it->second;
        at = k;
      }
    }
    if (best == INT_MAX) break;
    symbols[at] += symbols[at + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  for (const std::string& s : symbols) {
    auto it = ids_.find(s);
    if (it != ids_.end()) {
      out->push_back(it->second);
    } else {
      // Not in the vocabulary as a whole: fall back to its bytes (every byte is a token).
      for (size_t k = 0; k < s.size();) {
        const size_t len = Utf8Length(static_cast<unsigned char>(s[k]));
        auto b = ids_.find(s.substr(k, len));
        if (b != ids_.end()) out->push_back(b->second);
        k += len;
      }
    }
  }
}

std::vector<int32_t> Tokenizer::Encode(const std::string& text) const {
  std::vector<int32_t> out;
  size_t i = 0;
  std::string plain;
  auto flush = [&] {
    if (plain.empty()) return;
    // Digits: each one is its own piece; the rest goes through the GPT-2 split.
    std::vector<std::string> pieces;
    std::string run;
    for (char c : plain) {
      if (c >= '0' && c <= '9') {
        SplitGpt2(run, &pieces);
        run.clear();
        pieces.emplace_back(1, c);
      } else {
        run += c;
      }
    }
    SplitGpt2(run, &pieces);
    for (const std::string& p : pieces) Bpe(p, &out);
    plain.clear();
  };
  while (i < text.size()) {
    bool special = false;
    if (text[i] == '<') {
      for (const std::string& s : specials_) {
        if (text.compare(i, s.size(), s) == 0) {
          flush();
          out.push_back(ids_.at(s));
          i += s.size();
          special = true;
          break;
        }
      }
    }
    if (!special) plain += text[i++];
  }
  flush();
  return out;
}

std::string Tokenizer::TokenText(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& token = tokens_[static_cast<size_t>(id)];
  if (types_[static_cast<size_t>(id)] == 3 || types_[static_cast<size_t>(id)] == 4) return token;
  std::string bytes;
  for (size_t k = 0; k < token.size();) {
    const size_t len = Utf8Length(static_cast<unsigned char>(token[k]));
    auto it = unicode_to_byte_.find(token.substr(k, len));
    if (it != unicode_to_byte_.end()) {
      bytes += static_cast<char>(it->second);
    } else {
      bytes += token.substr(k, len);
    }
    k += len;
  }
  return bytes;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) out += TokenText(id);
  return out;
}

std::vector<int32_t> Tokenizer::ControlTokens() const {
  std::vector<int32_t> out;
  for (size_t i = 0; i < types_.size(); ++i) {
    if (types_[i] == 3) out.push_back(static_cast<int32_t>(i));
  }
  return out;
}

std::string Tokenizer::ChatPrompt(const std::string& user) const {
  return absl::StrCat("<|im_start|>system\n", system_prompt_, "<|im_end|>\n<|im_start|>user\n",
                      user, "<|im_end|>\n<|im_start|>assistant\n");
}

}  // namespace reasonalloc::worker
