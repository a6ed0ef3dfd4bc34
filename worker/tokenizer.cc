#include "worker/tokenizer.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "worker/unicode_tables.h"

namespace reasonalloc::worker {
namespace {

// GGUF token types (llama.cpp's llama_token_type).
constexpr int64_t kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6;

const char kSpmSpace[] = "\xE2\x96\x81";  // U+2581

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

enum class Cls { kLetter, kNumber, kSpace, kOther };

bool InRanges(const unicode::Range* begin, const unicode::Range* end, uint32_t cp) {
  const unicode::Range* it = std::upper_bound(
      begin, end, cp, [](uint32_t v, const unicode::Range& r) { return v < r.lo; });
  return it != begin && cp <= (it - 1)->hi;
}

bool IsWhiteSpace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

Cls Classify(uint32_t cp) {
  if (IsWhiteSpace(cp)) return Cls::kSpace;
  if (InRanges(std::begin(unicode::kLetterRanges), std::end(unicode::kLetterRanges), cp)) {
    return Cls::kLetter;
  }
  if (InRanges(std::begin(unicode::kNumberRanges), std::end(unicode::kNumberRanges), cp)) {
    return Cls::kNumber;
  }
  return Cls::kOther;
}

// One code point of a text: where it starts and its class. Invalid UTF-8 bytes are single code
// points of class "other" (U+FFFD is a symbol).
struct Cp {
  uint32_t cp;
  size_t off;
  Cls cls;
};

std::vector<Cp> CodePoints(const std::string& text) {
  std::vector<Cp> out;
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    size_t len = Utf8Length(c);
    uint32_t cp = c;
    bool valid = len <= text.size() - i && (len == 1 ? c < 0x80 : true);
    if (valid && len > 1) {
      cp = c & (0xFF >> (len + 1));
      for (size_t k = 1; k < len; ++k) {
        const auto d = static_cast<unsigned char>(text[i + k]);
        if ((d & 0xC0) != 0x80) valid = false;
        cp = (cp << 6) | (d & 0x3F);
      }
    }
    if (!valid) {
      len = 1;
      cp = 0xFFFD;
    }
    out.push_back({cp, i, Classify(cp)});
    i += len;
  }
  out.push_back({0, text.size(), Cls::kOther});  // sentinel: the end offset
  return out;
}

class Splitter {
 public:
  Splitter(const std::string& text, const std::vector<Cp>& c, std::vector<std::string>* out)
      : text_(text), c_(c), out_(out) {}

  void Emit(size_t from, size_t to) {
    if (to > from) out_->push_back(text_.substr(c_[from].off, c_[to].off - c_[from].off));
  }

  // 's|'t|'re|'ve|'m|'ll|'d (ASCII case-insensitive when `fold`): the length matched at i, or 0.
  size_t Contraction(size_t i, size_t e, bool fold) const {
    if (c_[i].cp != '\'' || i + 1 >= e) return 0;
    auto at = [&](size_t k) -> uint32_t {
      if (k >= e) return 0;
      const uint32_t v = c_[k].cp;
      return fold && v >= 'A' && v <= 'Z' ? v + 32 : v;
    };
    const uint32_t a = at(i + 1), b = at(i + 2);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
  }

  // The GPT-2 split over code points [b, e).
  void Gpt2(size_t b, size_t e) {
    size_t i = b;
    while (i < e) {
      if (const size_t n = Contraction(i, e, false)) {
        Emit(i, i + n);
        i += n;
        continue;
      }
      // " ?X+" for X in letters, numbers, other.
      size_t j = i;
      if (c_[j].cp == ' ' && j + 1 < e && c_[j + 1].cls != Cls::kSpace) ++j;
      const Cls cls = c_[j].cls;
      if (cls != Cls::kSpace) {
        while (j < e && c_[j].cls == cls) ++j;
        Emit(i, j);
        i = j;
        continue;
      }
      // \s+(?!\S) leaves the last blank to the next piece when a non-blank follows; a single
      // blank before a non-blank is matched by \s+.
      size_t end = i;
      while (end < e && c_[end].cls == Cls::kSpace) ++end;
      if (end < e && end - i > 1) --end;
      Emit(i, end);
      i = end;
    }
  }

  // Every \p{N} alone, the GPT-2 split between them.
  void Smollm(size_t b, size_t e) {
    size_t run = b;
    for (size_t i = b; i < e; ++i) {
      if (c_[i].cls != Cls::kNumber) continue;
      Gpt2(run, i);
      Emit(i, i + 1);
      run = i + 1;
    }
    Gpt2(run, e);
  }

  // Qwen2's split, the regex's alternatives tried in order at each position.
  void Qwen2(size_t b, size_t e) {
    auto rn = [&](size_t k) { return c_[k].cp == '\r' || c_[k].cp == '\n'; };
    size_t i = b;
    while (i < e) {
      const Cls cls = c_[i].cls;
      size_t j = i;
      if (const size_t n = Contraction(i, e, true)) {
        j = i + n;
      } else if (cls == Cls::kLetter ||
                 (cls != Cls::kNumber && !rn(i) && i + 1 < e && c_[i + 1].cls == Cls::kLetter)) {
        // [^\r\n\p{L}\p{N}]?\p{L}+
        j = i + 1;
        while (j < e && c_[j].cls == Cls::kLetter) ++j;
      } else if (cls == Cls::kNumber) {
        j = i + 1;  // \p{N}
      } else if (cls == Cls::kOther ||
                 (c_[i].cp == ' ' && i + 1 < e && c_[i + 1].cls == Cls::kOther)) {
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        j = c_[i].cp == ' ' ? i + 1 : i;
        while (j < e && c_[j].cls == Cls::kOther) ++j;
        while (j < e && rn(j)) ++j;
      } else {
        // Whitespace: \s*[\r\n]+ (up to the run's last line break), else \s+(?!\S), else \s+.
        size_t end = i;
        size_t last_rn = e;
        for (; end < e && c_[end].cls == Cls::kSpace; ++end) {
          if (rn(end)) last_rn = end;
        }
        if (last_rn != e) {
          j = last_rn + 1;
        } else if (end == e || end - i == 1) {
          j = end;
        } else {
          j = end - 1;
        }
      }
      Emit(i, j);
      i = j;
    }
  }

 private:
  const std::string& text_;
  const std::vector<Cp>& c_;
  std::vector<std::string>* out_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& file) {
  auto model = file.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  if (*model == "gpt2") {
    t->model_ = Model::kBpe;
    auto pre = file.GetString("tokenizer.ggml.pre");
    if (!pre.ok()) return pre.status();
    if (*pre == "smollm" || *pre == "starcoder" || *pre == "refact" || *pre == "codeshell") {
      t->pre_ = Pre::kSmollm;
    } else if (*pre == "qwen2" || *pre == "stablelm2") {
      t->pre_ = Pre::kQwen2;
    } else if (*pre == "gpt2") {
      t->pre_ = Pre::kGpt2;
    } else {
      return absl::UnimplementedError(absl::StrCat(
          "tokenizer.ggml.pre \"", *pre,
          "\" is not supported (smollm, starcoder, refact, codeshell, gpt2, qwen2, stablelm2)"));
    }
  } else if (*model == "llama") {
    t->model_ = Model::kSpm;
  } else {
    return absl::UnimplementedError(
        absl::StrCat("tokenizer.ggml.model \"", *model,
                     "\" is not supported (gpt2: byte-level BPE; llama: SentencePiece)"));
  }
  auto tokens = file.GetStrings("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  t->tokens_ = **tokens;
  const size_t n = t->tokens_.size();
  if (auto types = file.GetInts("tokenizer.ggml.token_type"); types.ok()) t->types_ = **types;
  t->types_.resize(n, kNormal);
  if (auto it = file.metadata().find("tokenizer.ggml.scores"); it != file.metadata().end()) {
    t->scores_.assign(it->second.floats.begin(), it->second.floats.end());
  }
  t->scores_.resize(n, 0.0f);
  t->byte_token_.fill(-1);
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = t->tokens_[i];
    t->ids_.emplace(text, static_cast<int32_t>(i));
    const int64_t type = t->types_[i];
    if ((type == kControl || type == kUserDefined || type == kUnknown) && !text.empty()) {
      t->specials_[static_cast<unsigned char>(text[0])].push_back(static_cast<int32_t>(i));
    }
    if (type == kByte && text.size() == 6 && text.compare(0, 3, "<0x") == 0 && text[5] == '>') {
      const long b = std::strtol(text.substr(3, 2).c_str(), nullptr, 16);
      if (b >= 0 && b < 256) t->byte_token_[static_cast<size_t>(b)] = static_cast<int32_t>(i);
    }
  }
  for (auto& bucket : t->specials_) {
    std::stable_sort(bucket.begin(), bucket.end(), [&](int32_t a, int32_t b) {
      return t->tokens_[static_cast<size_t>(a)].size() > t->tokens_[static_cast<size_t>(b)].size();
    });
  }
  if (t->model_ == Model::kBpe) {
    auto merges = file.GetStrings("tokenizer.ggml.merges");
    if (!merges.ok()) return merges.status();
    for (size_t r = 0; r < (*merges)->size(); ++r) {
      t->merge_rank_.emplace((**merges)[r], static_cast<int32_t>(r));
    }
    // GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 on.
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      const uint32_t cp =
          printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + extra++);
      t->byte_to_unicode_[b] = Utf8(cp);
      t->unicode_to_byte_[t->byte_to_unicode_[b]] = static_cast<unsigned char>(b);
    }
  }
  auto id = [&](const char* key) -> int32_t {
    auto v = file.GetInt(key);
    return v.ok() && *v >= 0 && *v < static_cast<int64_t>(n) ? static_cast<int32_t>(*v) : -1;
  };
  auto flag = [&](const char* key, bool fallback) {
    auto it = file.metadata().find(key);
    return it == file.metadata().end() ? fallback : it->second.i != 0;
  };
  t->eos_ = id("tokenizer.ggml.eos_token_id");
  t->bos_ = id("tokenizer.ggml.bos_token_id");
  t->unk_ = id("tokenizer.ggml.unknown_token_id");
  const bool spm = t->model_ == Model::kSpm;
  if (t->unk_ < 0 && spm) t->unk_ = t->Id("<unk>");
  t->add_bos_ = flag("tokenizer.ggml.add_bos_token", spm) && t->bos_ >= 0;
  t->add_eos_ = flag("tokenizer.ggml.add_eos_token", false) && t->eos_ >= 0;
  t->add_space_prefix_ = flag("tokenizer.ggml.add_space_prefix", spm) && spm;
  return t;
}

int32_t Tokenizer::Id(const std::string& text) const {
  auto it = ids_.find(text);
  return it == ids_.end() ? -1 : it->second;
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

void Tokenizer::SpmResegment(
    const std::string& piece,
    const std::unordered_map<std::string, std::pair<std::string, std::string>>& rev,
    std::vector<int32_t>* out) const {
  const int32_t id = Id(piece);
  if (id >= 0 && types_[static_cast<size_t>(id)] != kUnused &&
      types_[static_cast<size_t>(id)] != kControl && types_[static_cast<size_t>(id)] != kByte) {
    out->push_back(id);
    return;
  }
  if (auto it = rev.find(piece); it != rev.end()) {
    SpmResegment(it->second.first, rev, out);
    SpmResegment(it->second.second, rev, out);
    return;
  }
  // Outside the vocabulary: its bytes as <0xNN> tokens, or the unknown token where one is missing.
  const bool bytes = std::all_of(piece.begin(), piece.end(), [&](char c) {
    return byte_token_[static_cast<unsigned char>(c)] >= 0;
  });
  if (bytes) {
    for (unsigned char c : piece) out->push_back(byte_token_[c]);
  } else if (unk_ >= 0) {
    out->push_back(unk_);
  }
}

void Tokenizer::Spm(const std::string& text, std::vector<int32_t>* out) const {
  // Symbols: the UTF-8 characters, linked left to right; merged ones grow in place.
  struct Symbol {
    size_t off, len;
    int prev, next;
  };
  struct Bigram {
    float score;
    int left, right;
    size_t len;
  };
  auto worse = [](const Bigram& a, const Bigram& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::vector<Symbol> sym;
  for (size_t off = 0; off < text.size();) {
    const size_t len =
        std::min(Utf8Length(static_cast<unsigned char>(text[off])), text.size() - off);
    const int index = static_cast<int>(sym.size());
    sym.push_back({off, len, index - 1, off + len == text.size() ? -1 : index + 1});
    off += len;
  }
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(worse)> queue(worse);
  std::unordered_map<std::string, std::pair<std::string, std::string>> rev;
  auto try_add = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = sym[static_cast<size_t>(left)];
    const Symbol& r = sym[static_cast<size_t>(right)];
    const std::string merged = text.substr(l.off, l.len + r.len);
    const int32_t id = Id(merged);
    if (id < 0) return;
    // Merges form normal, user-defined and unused pieces (SentencePiece's rule), never control
    // or byte tokens; unused ones are split again at the end.
    const int64_t type = types_[static_cast<size_t>(id)];
    if (type != kNormal && type != kUserDefined && type != kUnused) return;
    queue.push({scores_[static_cast<size_t>(id)], left, right, merged.size()});
    if (type == kUnused) {
      rev[merged] = {text.substr(l.off, l.len), text.substr(r.off, r.len)};
    }
  };
  for (int i = 1; i < static_cast<int>(sym.size()); ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = sym[static_cast<size_t>(b.left)];
    Symbol& r = sym[static_cast<size_t>(b.right)];
    if (l.len == 0 || r.len == 0 || l.len + r.len != b.len) continue;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) sym[static_cast<size_t>(r.next)].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
  for (int i = sym.empty() ? -1 : 0; i != -1; i = sym[static_cast<size_t>(i)].next) {
    const Symbol& s = sym[static_cast<size_t>(i)];
    SpmResegment(text.substr(s.off, s.len), rev, out);
  }
}

void Tokenizer::EncodePlain(const std::string& text, bool after_special,
                            std::vector<int32_t>* out) const {
  if (model_ == Model::kSpm) {
    std::string escaped = add_space_prefix_ && after_special ? kSpmSpace : "";
    escaped += absl::StrReplaceAll(text, {{" ", kSpmSpace}});
    Spm(escaped, out);
    return;
  }
  const std::vector<Cp> cps = CodePoints(text);
  const size_t e = cps.size() - 1;
  std::vector<std::string> pieces;
  Splitter split(text, cps, &pieces);
  switch (pre_) {
    case Pre::kQwen2:
      split.Qwen2(0, e);
      break;
    case Pre::kSmollm:
      split.Smollm(0, e);
      break;
    case Pre::kGpt2:
    case Pre::kNone:
      split.Gpt2(0, e);
      break;
  }
  for (const std::string& p : pieces) Bpe(p, out);
}

std::vector<int32_t> Tokenizer::Encode(const std::string& text, bool add_special) const {
  std::vector<int32_t> out;
  if (add_special && add_bos_) out.push_back(bos_);
  bool after_special = true;
  size_t plain_from = 0;
  auto flush = [&](size_t to) {
    if (to > plain_from) {
      EncodePlain(text.substr(plain_from, to - plain_from), after_special, &out);
      after_special = false;
    }
  };
  for (size_t i = 0; i < text.size();) {
    int32_t match = -1;
    for (int32_t id : specials_[static_cast<unsigned char>(text[i])]) {
      const std::string& s = tokens_[static_cast<size_t>(id)];
      if (text.compare(i, s.size(), s) == 0) {
        match = id;
        break;
      }
    }
    if (match < 0) {
      ++i;
      continue;
    }
    flush(i);
    out.push_back(match);
    after_special = true;
    i += tokens_[static_cast<size_t>(match)].size();
    plain_from = i;
  }
  flush(text.size());
  if (add_special && add_eos_) out.push_back(eos_);
  return out;
}

std::string Tokenizer::TokenText(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  const std::string& token = tokens_[static_cast<size_t>(id)];
  const int64_t type = types_[static_cast<size_t>(id)];
  if (type == kControl) return token;
  if (model_ == Model::kSpm) {
    if (type == kByte) {
      for (int b = 0; b < 256; ++b) {
        if (byte_token_[static_cast<size_t>(b)] == id) return std::string(1, static_cast<char>(b));
      }
    }
    return absl::StrReplaceAll(token, {{kSpmSpace, " "}});
  }
  if (type == kUserDefined) return token;
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
    if (types_[i] == kControl) out.push_back(static_cast<int32_t>(i));
  }
  return out;
}

}  // namespace reasonalloc::worker
