#include "worker/model_files.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"

namespace reasonalloc::worker {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

// A regular file this process may read (a folder is not a model file); else why not, in `why`.
bool Readable(const std::string& path, std::string* why) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return false;
  if (!S_ISREG(st.st_mode)) {
    *why = ": not a regular file";
    return false;
  }
  if (::access(path.c_str(), R_OK) != 0) {
    *why = ": not readable";
    return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::string> ModelDirectory() {
  if (std::string dir = Env("REASONALLOC_MODEL_DIR"); !dir.empty()) return dir;
  if (std::string xdg = Env("XDG_CACHE_HOME"); !xdg.empty()) {
    return absl::StrCat(xdg, "/reasonalloc/models");
  }
  if (std::string home = Env("HOME"); !home.empty()) {
    return absl::StrCat(home, "/.cache/reasonalloc/models");
  }
  return absl::NotFoundError(
      "no model folder: none of $REASONALLOC_MODEL_DIR, $XDG_CACHE_HOME, $HOME is set");
}

absl::StatusOr<std::string> ResolveModelPath(const std::string& flag) {
  auto dir = ModelDirectory();
  std::vector<std::string> looked;
  // A path is taken as it is; a bare file name is looked up in the model folder.
  auto find = [&](const std::string& name, const std::string& source) -> std::string {
    std::string why;
    if (name.find('/') != std::string::npos) {
      const bool ok = Readable(name, &why);
      looked.push_back(absl::StrCat(name, " (", source, ")", why));
      return ok ? name : "";
    }
    if (!dir.ok()) {
      looked.push_back(absl::StrCat(name, " (", source, "; ", dir.status().message(), ")"));
      return "";
    }
    const std::string path = absl::StrCat(*dir, "/", name);
    const bool ok = Readable(path, &why);
    looked.push_back(absl::StrCat(path, " (", source, " in the model folder)", why));
    return ok ? path : "";
  };
  std::string source, name;
  if (!flag.empty()) {
    source = "--model";
    name = flag;
  } else if (std::string env = Env("REASONALLOC_MODEL"); !env.empty()) {
    source = "$REASONALLOC_MODEL";
    name = env;
  } else {
    source = "the reference model";
    name = kReferenceModelFile;
  }
  if (std::string path = find(name, source); !path.empty()) return path;
  return absl::NotFoundError(absl::StrCat(
      "model file not found; looked at ", absl::StrJoin(looked, ", "),
      ". The model folder is $REASONALLOC_MODEL_DIR, else $XDG_CACHE_HOME/reasonalloc/models, "
      "else ~/.cache/reasonalloc/models; scripts/setup (or scripts/fetch-model) puts the "
      "reference model there, or pass --model PATH"));
}

std::string SanitiseModelName(const std::string& text) {
  std::string out;
  for (char ch : absl::AsciiStrToLower(text)) {
    const bool keep = std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '_';
    if (keep) {
      out += ch;
    } else if (!out.empty() && out.back() != '-') {
      out += '-';
    }
  }
  while (!out.empty() && (out.front() == '.' || out.front() == '-')) out.erase(out.begin());
  while (!out.empty() && out.back() == '-') out.pop_back();
  if (out.size() > 128) out.resize(128);
  return out;
}

bool IsValidModelName(const std::string& name) {
  if (name.empty() || name.size() > 128 || name[0] == '.') return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

std::string ModelNameFromPath(const std::string& path) {
  std::string name =
      path.substr(path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/') + 1);
  name = absl::AsciiStrToLower(name);
  if (name.size() > 5 && name.ends_with(".gguf")) name.resize(name.size() - 5);
  // A trailing quantisation tag after a '.' or '-': q<digit>... (q4_1, q4_k_m, q8_0),
  // iq<digit>... (iq4_xs), f16, f32, bf16, fp16.
  const size_t cut = name.find_last_of(".-");
  if (cut != std::string::npos && cut > 0) {
    const std::string tag = name.substr(cut + 1);
    const bool quant = (tag.size() >= 2 && tag[0] == 'q' && std::isdigit(tag[1])) ||
                       (tag.size() >= 3 && tag.starts_with("iq") && std::isdigit(tag[2])) ||
                       tag == "f16" || tag == "f32" || tag == "bf16" || tag == "fp16";
    if (quant) name.resize(cut);
  }
  return SanitiseModelName(name);
}

std::string ModelNameFromGeneralName(const std::string& general_name) {
  return SanitiseModelName(general_name);
}

std::string ChooseModelName(const std::string& flag, const std::string& path,
                            const std::string& general_name) {
  if (!flag.empty()) return flag;
  if (std::string name = ModelNameFromPath(path); !name.empty()) return name;
  if (std::string name = ModelNameFromGeneralName(general_name); !name.empty()) return name;
  return "model";
}

absl::StatusOr<std::vector<std::string>> ReadPrompts(const std::string& path) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot read --prompts file ", path));
  std::vector<std::string> out;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    out.push_back(absl::StrReplaceAll(line, {{"\\n", "\n"}}));
  }
  if (out.empty())
    return absl::InvalidArgumentError(absl::StrCat("--prompts file ", path, " has no prompts"));
  return out;
}

}  // namespace reasonalloc::worker
