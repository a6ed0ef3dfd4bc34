#include "worker/recall_tasks.h"

#include <cctype>
#include <fstream>

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

}  // namespace

absl::StatusOr<std::vector<RecallTask>> ReadRecallTasks(const std::string& path,
                                                        const std::string& flag) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot read ", flag, " file ", path));
  std::vector<RecallTask> out;
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    if (line.empty() || line[0] == '#') continue;
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
  const std::string a = Lower(answer), t = Lower(text);
  if (a.empty()) return false;
  for (size_t at = t.find(a); at != std::string::npos; at = t.find(a, at + 1)) {
    const bool left = at == 0 || !Alnum(t[at - 1]);
    const bool right = at + a.size() >= t.size() || !Alnum(t[at + a.size()]);
    if (left && right) return true;
  }
  return false;
}

}  // namespace reasonalloc::worker
