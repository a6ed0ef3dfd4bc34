// --help for the project's programs. Abseil's own --help lists only the flags declared in a file
// named after the program and exits 1; these programs declare their flags in several files and
// want usage text that names their subcommands. MaybePrintHelp answers every help request itself
// and exits 0.
//
// A flag belongs to subcommands when its help text starts with their names and a colon
// ("compress: ..." or "close, compress --session: ..."); every other flag is common to all of
// them. Every flag declared in the program's own source files is printed, so none can go
// undocumented.
#ifndef REASONALLOC_CORE_CLI_HELP_H_
#define REASONALLOC_CORE_CLI_HELP_H_

#include <algorithm>
#include <cstring>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "core/build_info.h"

namespace reasonalloc {

struct HelpCommand {
  std::string name;
  std::string synopsis;     // "reasonalloc close SESSION_ID..."
  std::string description;  // a sentence or two
};

struct ProgramHelp {
  std::string program;                // as the user types it
  std::string summary;                // what the program is, one paragraph
  std::vector<std::string> synopses;  // for programs without subcommands
  std::vector<HelpCommand> commands;
  std::vector<std::string> sources;  // path suffixes of the files declaring the program's flags
  std::string footer;                // environment, exit statuses, ...
};

namespace cli_help_internal {

struct FlagInfo {
  std::string name;
  std::string help;
  std::string default_value;
  bool is_string = false;
  std::string file;
  std::vector<std::string> commands;  // empty = common
};

inline bool IsProgramFlag(const absl::CommandLineFlag& flag, const ProgramHelp& help) {
  const std::string file = flag.Filename();
  return std::any_of(help.sources.begin(), help.sources.end(),
                     [&](const std::string& s) { return absl::StrContains(file, s); });
}

// The subcommands a help text starts with ("close, compress --session: ..."), if all are known.
inline std::vector<std::string> CommandsOf(const std::string& text, const ProgramHelp& help) {
  const size_t colon = text.find(": ");
  if (colon == std::string::npos || help.commands.empty()) return {};
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text).substr(0, colon), ", ")) {
    const std::string word(part.substr(0, part.find(' ')));
    if (std::none_of(help.commands.begin(), help.commands.end(),
                     [&](const HelpCommand& c) { return c.name == word; })) {
      return {};
    }
    out.push_back(word);
  }
  return out;
}

inline std::vector<FlagInfo> Flags(const ProgramHelp& help, bool library) {
  std::vector<FlagInfo> out;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (flag->IsRetired() || IsProgramFlag(*flag, help) == library) continue;
    FlagInfo info;
    info.name = std::string(name);
    info.help = flag->Help();
    info.default_value = flag->DefaultValue();
    info.is_string = flag->IsOfType<std::string>();
    info.file = flag->Filename();
    if (!library) info.commands = CommandsOf(info.help, help);
    out.push_back(std::move(info));
  }
  // The program's flags by name; a library's grouped by the file that declares them.
  std::sort(out.begin(), out.end(), [library](const FlagInfo& a, const FlagInfo& b) {
    return library ? std::tie(a.file, a.name) < std::tie(b.file, b.name) : a.name < b.name;
  });
  return out;
}

// `text` wrapped at 96 columns; every line starts with `indent` spaces, the first after `first`.
inline void Wrap(std::ostream& out, const std::string& first, size_t indent,
                 absl::string_view text) {
  std::string line = first;
  if (line.size() < indent) line.resize(indent, ' ');
  // Words follow `first` directly when it ends in a space (or is only the indent).
  bool empty = line.empty() || line.back() == ' ';
  for (absl::string_view word : absl::StrSplit(text, ' ', absl::SkipEmpty())) {
    if (!empty && line.size() + word.size() + 1 > 96) {
      out << line << "\n";
      line.assign(indent, ' ');
      empty = true;
    }
    if (!empty) line += ' ';
    line.append(word.data(), word.size());
    empty = false;
  }
  out << line << "\n";
}

// Under a command's heading the help text loses its "command[, command]: " prefix.
inline void PrintFlag(std::ostream& out, const FlagInfo& f, bool strip_prefix) {
  out << "  --" << f.name
      << " (default: " << (f.is_string ? "\"" + f.default_value + "\"" : f.default_value) << ")\n";
  absl::string_view text = f.help;
  if (strip_prefix && !f.commands.empty()) text.remove_prefix(text.find(": ") + 2);
  Wrap(out, "", 6, text);
}

inline void PrintUsage(std::ostream& out, const ProgramHelp& help) {
  Wrap(out, help.program + ": ", 0, help.summary);
  out << "\nUsage:\n";
  for (const auto& s : help.synopses) out << "  " << s << "\n";
  for (const auto& c : help.commands) out << "  " << c.synopsis << "\n";
  if (!help.commands.empty()) {
    out << "\nCommands:\n";
    for (const auto& c : help.commands) {
      Wrap(out, "  " + c.name + " ", 14, c.description);
    }
    out << "\n`" << help.program << " help COMMAND` (or `" << help.program
        << " COMMAND --help`) shows one command's flags.\n";
  }
}

inline void PrintFlagGroups(std::ostream& out, const ProgramHelp& help, const std::string& only) {
  const auto flags = Flags(help, /*library=*/false);
  out << "\nFlags (--a-b and --a_b are the same flag):\n";
  for (const auto& f : flags) {
    if (f.commands.empty()) PrintFlag(out, f, false);
  }
  for (const auto& c : help.commands) {
    if (!only.empty() && c.name != only) continue;
    bool header = false;
    for (const auto& f : flags) {
      if (std::find(f.commands.begin(), f.commands.end(), c.name) == f.commands.end()) continue;
      if (!header) out << "\nFlags of " << c.name << ":\n";
      header = true;
      PrintFlag(out, f, true);
    }
  }
}

}  // namespace cli_help_internal

// When argv asks for help (--help, -h, --helpshort, --helpfull and Abseil's other --help* forms,
// `help [COMMAND]`, or `COMMAND --help` for programs with subcommands), prints it to `out` and
// returns the exit status (0, or 2 for `help` of an unknown command); returns -1 otherwise.
// Installs this program's --version text either way. --helpfull adds the
// flags of the libraries linked in (Abseil's --version, --flagfile, ...).
inline int MaybePrintHelp(int argc, char** argv, const ProgramHelp& help, std::ostream& out,
                          std::ostream& err) {
  namespace in = cli_help_internal;
  // --version (Abseil's flag) prints this program's version and build.
  absl::FlagsUsageConfig config;
  config.version_string = [program = help.program] {
    return std::string(program) + " " + kVersion + " (revision " + kGitRevision + ", " +
           kBuildType + ", CUDA backend " + (kCudaBuilt ? "built" : "not built") + ")\n";
  };
  absl::SetFlagsUsageConfig(config);
  bool asked = false, full = false;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--") break;
    if (arg == "-h" || arg == "-help") asked = true;
    // --help, --helpfull, and Abseil's --help=SUBSTRING, --helpon=FILE, --helpmatch=SUBSTRING,
    // --helppackage: all of them get this help (the filtering forms the whole of it).
    if (arg.rfind("--help", 0) == 0) {
      asked = true;
      if (arg != "--help" && arg != "--helpshort") full = true;
      continue;
    }
    if (arg.size() > 2 && arg[0] == '-' && arg[1] == '-' && arg.find('=') == std::string::npos) {
      // A flag other than a bool takes the next argument as its value ("--text -h").
      std::string name = arg.substr(2);
      std::replace(name.begin(), name.end(), '-', '_');
      const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
      if (flag != nullptr && !flag->IsOfType<bool>()) ++i;
      continue;
    }
    if (!arg.empty() && arg[0] != '-') positional.push_back(arg);
  }
  if (!positional.empty() && positional[0] == "help") asked = true;
  std::string command;
  if (!help.commands.empty() && !positional.empty()) {
    if (positional[0] == "help") {
      if (positional.size() > 1) command = positional[1];
    } else if (asked) {
      command = positional[0];
    }
  }
  if (!asked) return -1;
  if (!command.empty()) {
    const auto it = std::find_if(help.commands.begin(), help.commands.end(),
                                 [&](const HelpCommand& c) { return c.name == command; });
    if (it == help.commands.end()) {
      // `help NAME` with an unknown NAME is a usage error; `--help` after an argument that is
      // no command shows the program's help.
      if (positional[0] == "help") {
        err << help.program << ": no command \"" << command << "\"; `" << help.program
            << " --help` lists them\n";
        return 2;
      }
      command.clear();
    } else {
      out << "Usage:\n  " << it->synopsis << "\n\n";
      in::Wrap(out, "", 0, it->description);
      in::PrintFlagGroups(out, help, command);
      return 0;
    }
  }
  in::PrintUsage(out, help);
  in::PrintFlagGroups(out, help, "");
  if (full) {
    out << "\nFlags of the libraries linked in:\n";
    for (const auto& f : in::Flags(help, /*library=*/true)) in::PrintFlag(out, f, false);
  }
  out << "\nHelp: --help (-h), --helpfull (adds the libraries' flags)"
      << (help.commands.empty() ? "" : ", help COMMAND") << "; --version prints the version.\n";
  if (!help.footer.empty()) {
    out << "\n";
    for (absl::string_view line : absl::StrSplit(help.footer, '\n')) in::Wrap(out, "", 0, line);
  }
  return 0;
}

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_CLI_HELP_H_
