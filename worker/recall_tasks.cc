#include "worker/recall_tasks.h"

#include <cctype>
#include <cstddef>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"

namespace reasonalloc::worker {
namespace {

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool Alnum(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; }

// The answer as a whole word of the text; with `closed`, only where a character follows it.
bool Matches(const std::string& answer, const std::string& text, bool closed) {
  const std::string a = Lower(answer), t = Lower(text);
  if (a.empty()) return false;
  for (size_t at = t.find(a); at != std::string::npos; at = t.find(a, at + 1)) {
    const bool left = at == 0 || !Alnum(t[at - 1]);
    const size_t end = at + a.size();
    const bool right = end >= t.size() ? !closed : !Alnum(t[end]);
    if (left && right) return true;
  }
  return false;
}

}  // namespace

absl::StatusOr<std::vector<RecallTask>> ReadRecallTasks(const std::string& path,
                                                        const std::string& flag, int* seed) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot read ", flag, " file ", path));
  if (seed != nullptr) *seed = -1;
  std::vector<RecallTask> out;
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    if (line.empty()) continue;
    if (line[0] == '#') {
      const size_t at = line.find("(seed ");
      if (n == 1 && seed != nullptr && at != std::string::npos) {
        const std::string rest = line.substr(at + 6);
        int v;
        if (absl::SimpleAtoi(rest.substr(0, rest.find(',')), &v)) *seed = v;
      }
      continue;
    }
    std::vector<std::string> cols = absl::StrSplit(line, '\t');
    if (cols.size() != 5) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " ", path, " line ", n, ": ", cols.size(), " columns, want 5"));
    }
    RecallTask t;
    t.id = cols[0];
    t.kind = cols[1];
    t.answer = cols[2];
    t.head = absl::StrReplaceAll(cols[3], {{"\\n", "\n"}});
    t.tail = absl::StrReplaceAll(cols[4], {{"\\n", "\n"}});
    if (t.answer.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " ", path, " line ", n, ": empty answer"));
    }
    out.push_back(std::move(t));
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": no tasks"));
  return out;
}

bool AnswerMatches(const std::string& answer, const std::string& text) {
  return Matches(answer, text, /*closed=*/false);
}

int AnswerTokenCount(const std::string& answer, const std::vector<int32_t>& generated,
                     const std::function<std::string(const std::vector<int32_t>&)>& decode) {
  if (!AnswerMatches(answer, decode(generated))) return 0;
  for (size_t k = 1; k < generated.size(); ++k) {
    if (Matches(answer,
                decode({generated.begin(), generated.begin() + static_cast<std::ptrdiff_t>(k)}),
                /*closed=*/true)) {
      return static_cast<int>(k);
    }
  }
  return static_cast<int>(generated.size());
}

}  // namespace reasonalloc::worker
