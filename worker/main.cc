// reasonalloc-worker: the project's reference inference worker (a Llama GGUF model on the CPU)
// decoding through the sidecar or with the full cache.
//
//   reasonalloc-worker generate  --prompt TEXT [--full_cache | --target unix:///...] [policy flags]
//   reasonalloc-worker calibrate --target T --prompts FILE --out deploy/profiles/NAME.json
//   reasonalloc-worker tokenize  --text TEXT [--chat]
//   reasonalloc-worker logits    --tokens 1,2,3 --out logits.npy
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/api_defaults.h"
#include "core/cli_args.h"
#include "core/cli_help.h"
#include "core/npy.h"
#include "core/policy.h"
#include "core/status_macros.h"
#include "worker/chat_template.h"
#include "worker/driver.h"
#include "worker/model_files.h"
#include "worker/recall_tasks.h"
#include "worker/sensitivity.h"
#include "worker/tokenizer.h"

ABSL_FLAG(std::string, model, "",
          "GGUF file: a path, or a file name in the model folder (default: $REASONALLOC_MODEL, "
          "then the reference model)");
ABSL_FLAG(std::string, target, "",
          "generate, calibrate: sidecar address (unix:///path or host:port)");
ABSL_FLAG(bool, full_cache, false, "generate: keep every token (no sidecar)");
ABSL_FLAG(std::string, prompt, "",
          "generate, calibrate: the user's message (the chat template is applied)");
ABSL_FLAG(std::string, prompts, "",
          "generate, calibrate: file of prompts, one per line (\\n stands for a newline)");
ABSL_FLAG(int, batch, 1,
          "generate: decode this many copies of --prompt at once; calibrate --objective "
          "sensitivity or head_sensitivity: sequences (layer group or KV head x probe prompt) "
          "decoded together");
ABSL_FLAG(int, max_tokens, 256, "generate, calibrate: tokens to generate per sequence");
ABSL_FLAG(double, temperature, 0, "generate: sampling temperature (0 = greedy)");
ABSL_FLAG(uint64_t, seed, 0, "generate: sampling seed");
ABSL_FLAG(bool, ignore_eos, false,
          "generate, calibrate: never choose a control token (end of turn, ...): generate exactly "
          "--max_tokens");
ABSL_FLAG(std::string, scorer, "rkv",
          absl::StrCat("generate, calibrate: ", reasonalloc::ScorerNames()));
ABSL_FLAG(std::string, allocator, "reasonalloc",
          absl::StrCat("generate: ", reasonalloc::AllocatorNames()));
ABSL_FLAG(std::string, mode, "full",
          "generate: the reasonalloc allocator's mode: layer | head | full | off | static (the "
          "profile's head_demand splits each layer)");
ABSL_FLAG(std::string, profile, "",
          "generate: layer profile name; calibrate: the name of the profile written (empty = the "
          "model name)");
ABSL_FLAG(std::string, model_name, "",
          "generate, calibrate: model name given to the sidecar, which selects the layer profile "
          "of that name (empty = from the file name without its quantisation tag, else from "
          "general.name)");
ABSL_FLAG(bool, raw, false,
          "generate, calibrate: prompt with the text as it is, without the chat template (base "
          "models)");
ABSL_FLAG(int, budget, 64, "generate, calibrate: tokens kept per KV head (the mean over heads)");
ABSL_FLAG(int, buffer, 64, "generate, calibrate: Δ, decode steps between compression events");
ABSL_FLAG(int, window, 8, "generate, calibrate: α, the observation window");
ABSL_FLAG(int, sinks, -1,
          "generate: first tokens of every head always kept (-1 = the scorer's default: 4 for "
          "streaming, 0 for the others)");
ABSL_FLAG(int, recent, 0,
          "generate: last tokens of every head always kept, the scorer choosing the rest (0 = the "
          "window)");
ABSL_FLAG(std::string, text, "", "tokenize: the text");
ABSL_FLAG(bool, chat, false, "tokenize: apply the chat template");
ABSL_FLAG(std::string, tokens, "", "logits: comma-separated token ids");
ABSL_FLAG(std::string, out, "",
          "logits, calibrate: the output file (.npy for logits, the profile JSON for calibrate, a "
          "CSV for calibrate --objective head_sensitivity)");
ABSL_FLAG(std::string, objective, "k_rho",
          "calibrate: what the layer profile measures: k_rho (attention demand, the Reasoning "
          "Wave) or sensitivity (the KL cost of compressing each layer group alone to --budget "
          "with --scorer); head_sensitivity measures the same per KV head (each head of each "
          "group alone) and writes a CSV, not a profile");
ABSL_FLAG(
    std::string, recall_tasks, "",
    "calibrate --objective sensitivity: also measure each layer group's recall cost on these "
    "long-range recall tasks (bench/recall/tasks.py; use a seed other than the evaluation's): "
    "the KL over the answer tokens of the tasks the full cache answers, and the share whose "
    "answer survives; the profile's demand then mixes both costs (--recall_weight)");
ABSL_FLAG(double, recall_weight, 0.5,
          "calibrate --recall_tasks: the recall cost's share of the demand, in [0, 1] (demand = "
          "(1 - w) * KL demand + w * recall demand, each of mean 1)");
ABSL_FLAG(int, answer_tokens, 12,
          "calibrate --recall_tasks: tokens decoded after each recall prompt (the answer must "
          "appear among them)");
ABSL_FLAG(std::string, layers_csv, "",
          "calibrate --objective sensitivity: also write each layer's measured costs as CSV "
          "(layer, kl_per_token, recall_kl_per_token, recall_kept, recall_positions, demand)");
ABSL_FLAG(int, layer_group, 1,
          "calibrate --objective sensitivity, head_sensitivity: layers compressed together");
ABSL_FLAG(double, rho, reasonalloc::kDefaultCalibrationRho, "calibrate: attention-mass fraction ρ");
ABSL_FLAG(int, stride, reasonalloc::kDefaultCalibrationStride,
          "calibrate: measure every stride-th step");
ABSL_FLAG(bool, json, false, "generate: print a JSON summary line");

namespace reasonalloc::worker {
namespace {

// Length of the valid UTF-8 sequence at s[i] (no overlong forms, surrogates or code points past
// U+10FFFF), or 0.
size_t Utf8Length(const std::string& s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  size_t n;
  uint32_t cp;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10FFFF ||
      (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;
  }
  return n;
}

// A JSON string literal; bytes that are not valid UTF-8 (a generated text may end inside a
// character, or hold a lone byte-fallback token) become U+FFFD, so the line stays valid JSON.
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size();) {
    const unsigned char ch = static_cast<unsigned char>(s[i]);
    const size_t n = Utf8Length(s, i);
    if (n == 0) {
      out += "\\ufffd";
      ++i;
    } else if (ch == '"' || ch == '\\') {
      out += '\\';
      out += static_cast<char>(ch);
      ++i;
    } else if (ch < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", ch);
      out += buf;
      ++i;
    } else {
      out.append(s, i, n);
      i += n;
    }
  }
  return out + "\"";
}

int Fail(const absl::Status& status) {
  std::cerr << "reasonalloc-worker: " << status << "\n";
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

struct Loaded {
  std::string path;
  std::unique_ptr<GgufFile> file;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;

  // --model_name, else the file's name, else general.name.
  std::string ModelName() const {
    auto general = file->GetString("general.name");
    return ChooseModelName(absl::GetFlag(FLAGS_model_name), path, general.ok() ? *general : "");
  }

  // The prompt's tokens: the text as it is with --raw, else in the file's own chat template.
  absl::StatusOr<std::vector<int32_t>> Prompt(const std::string& text) const {
    auto prompt = PromptText(*file, text, absl::GetFlag(FLAGS_raw));
    if (!prompt.ok()) return prompt.status();
    return tokenizer->Encode(*prompt);
  }
};

// The file, and what the subcommand needs of it: the vocabulary (262k tokens take ~0.7 s) only
// where text is tokenized, the weights only where the model runs.
absl::StatusOr<Loaded> Load(bool with_model, bool with_tokenizer = true) {
  auto path = ResolveModelPath(absl::GetFlag(FLAGS_model));
  if (!path.ok()) return path.status();
  Loaded l;
  l.path = *path;
  auto file = GgufFile::Open(*path);
  if (!file.ok()) return file.status();
  l.file = *std::move(file);
  if (with_tokenizer) {
    auto tok = Tokenizer::FromGguf(*l.file);
    if (!tok.ok()) return tok.status();
    l.tokenizer = *std::move(tok);
  }
  if (with_model) {
    auto model = Model::Load(*l.file);
    if (!model.ok()) return model.status();
    l.model = *std::move(model);
  }
  return l;
}

absl::StatusOr<std::unique_ptr<Client>> Connect() {
  const std::string target = absl::GetFlag(FLAGS_target);
  if (target.empty()) return absl::InvalidArgumentError("--target is required (or --full_cache)");
  Client::Options options;
  options.target = target;
  options.timeout = absl::Seconds(120);
  return Client::Connect(options);
}

absl::StatusOr<Policy> PolicyFromFlags() {
  Policy p;
  ASSIGN_OR_RETURN(p.scorer, ParseScorer(absl::GetFlag(FLAGS_scorer), "--scorer"));
  ASSIGN_OR_RETURN(p.allocator, ParseAllocator(absl::GetFlag(FLAGS_allocator), "--allocator"));
  ASSIGN_OR_RETURN(p.reasonalloc_mode, ParseReasonAllocMode(absl::GetFlag(FLAGS_mode), "--mode"));
  p.profile = absl::GetFlag(FLAGS_profile);
  p.budget = absl::GetFlag(FLAGS_budget);
  p.buffer = absl::GetFlag(FLAGS_buffer);
  p.window = absl::GetFlag(FLAGS_window);
  p.sinks = absl::GetFlag(FLAGS_sinks);
  p.recent = absl::GetFlag(FLAGS_recent);
  return p;
}

absl::StatusOr<std::vector<std::string>> PromptsFromFlags() {
  if (absl::GetFlag(FLAGS_batch) < 1) return absl::InvalidArgumentError("--batch must be ≥ 1");
  std::vector<std::string> prompts;
  if (!absl::GetFlag(FLAGS_prompts).empty()) {
    auto p = ReadPrompts(absl::GetFlag(FLAGS_prompts));
    if (!p.ok()) return p.status();
    prompts = *std::move(p);
  } else if (!absl::GetFlag(FLAGS_prompt).empty()) {
    for (int b = 0; b < absl::GetFlag(FLAGS_batch); ++b)
      prompts.push_back(absl::GetFlag(FLAGS_prompt));
  }
  if (prompts.empty()) return absl::InvalidArgumentError("--prompt or --prompts is required");
  return prompts;
}

int Generate() {
  auto prompts = PromptsFromFlags();
  if (!prompts.ok()) return Fail(prompts.status());
  auto loaded = Load(true);
  if (!loaded.ok()) return Fail(loaded.status());
  const ModelConfig& config = loaded->model->config();
  std::vector<std::vector<int32_t>> ids;
  for (const std::string& p : *prompts) {
    auto prompt = loaded->Prompt(p);
    if (!prompt.ok()) return Fail(prompt.status());
    ids.push_back(*std::move(prompt));
  }
  RunOptions options;
  options.max_new_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  options.seed = absl::GetFlag(FLAGS_seed);
  options.stop_at_eos = !absl::GetFlag(FLAGS_ignore_eos);
  options.eos = loaded->tokenizer->eos();
  if (absl::GetFlag(FLAGS_ignore_eos)) options.suppress = loaded->tokenizer->ControlTokens();
  std::unique_ptr<Client> client;
  std::unique_ptr<KvBackend> backend;
  SidecarBackend* sidecar = nullptr;
  auto flags_policy = PolicyFromFlags();
  if (!flags_policy.ok()) return Fail(flags_policy.status());
  const Policy policy = *flags_policy;
  if (absl::GetFlag(FLAGS_full_cache)) {
    backend = std::make_unique<FullCacheBackend>(config, static_cast<int>(ids.size()));
  } else {
    auto c = Connect();
    if (!c.ok()) return Fail(c.status());
    client = *std::move(c);
    auto s = SidecarBackend::Open(client.get(), config, loaded->ModelName(),
                                  std::vector<Policy>(ids.size(), policy));
    if (!s.ok()) return Fail(s.status());
    sidecar = s->get();
    backend = *std::move(s);
  }
  auto result = Run(*loaded->model, backend.get(), ids, options);
  if (!result.ok()) return Fail(result.status());
  const bool json = absl::GetFlag(FLAGS_json);
  int64_t generated = 0;
  for (size_t b = 0; b < ids.size(); ++b) {
    generated += static_cast<int64_t>(result->generated[b].size());
    if (!json && (b == 0 || ids.size() <= 4)) {
      std::cout << "--- sequence " << b << " (" << ids[b].size() << " prompt tokens, "
                << result->generated[b].size() << " generated)\n"
                << loaded->tokenizer->Decode(result->generated[b]) << "\n";
    }
  }
  // The full cache of the same sequence: every position's K and V, fp32.
  const int64_t row_bytes = int64_t{config.layers} * config.kv_heads * config.head_dim * 2 * 4;
  const int64_t full_bytes = (static_cast<int64_t>(ids[0].size()) +
                              static_cast<int64_t>(result->generated[0].size()) - 1) *
                             row_bytes;
  const double tps = static_cast<double>(result->tokens) / result->seconds;
  if (json) {
    std::string gen = absl::StrJoin(result->generated[0], ",");
    std::cout << "{\"model_name\":" << JsonString(loaded->ModelName()) << ",\"policy\":\""
              << (sidecar ? policy.Name() : "full")
              << "\",\"budget\":" << (sidecar ? policy.budget : 0) << ",\"batch\":" << ids.size()
              << ",\"seconds\":" << result->seconds << ",\"steps\":" << result->tokens
              << ",\"tokens_per_second\":" << tps
              << ",\"compress_seconds\":" << (sidecar ? sidecar->compress_seconds() : 0.0)
              << ",\"events\":" << (sidecar ? sidecar->events() : 0)
              << ",\"peak_kv_bytes\":" << result->peak_bytes[0]
              << ",\"full_kv_bytes\":" << full_bytes << ",\"prompt_tokens\":" << ids[0].size()
              << ",\"generated\":[" << gen
              << "],\"text\":" << JsonString(loaded->tokenizer->Decode(result->generated[0]));
    // Every sequence's tokens (a batch of --prompts), sequence 0's again first.
    std::cout << ",\"sequences\":[";
    for (size_t b = 0; b < ids.size(); ++b) {
      std::cout << (b ? ",[" : "[") << absl::StrJoin(result->generated[b], ",") << "]";
    }
    std::cout << "]";
    if (sidecar) {
      std::cout << ",\"layer_budgets\":[" << absl::StrJoin(sidecar->LayerBudgets(0), ",") << "]";
    }
    std::cout << "}\n";
    return 0;
  }
  std::printf("--- %s: %lld steps (prompt and generated) in %.2f s = %.1f tokens/s at batch %zu\n",
              sidecar ? policy.Name().c_str() : "full cache",
              static_cast<long long>(result->tokens), result->seconds, tps, ids.size());
  std::printf("KV held (sequence 0): peak %.2f MiB, full cache %.2f MiB (%.1f%%)\n",
              result->peak_bytes[0] / 1048576.0, full_bytes / 1048576.0,
              100.0 * static_cast<double>(result->peak_bytes[0]) / static_cast<double>(full_bytes));
  if (sidecar) {
    std::printf("sidecar: %lld compression events, %.3f s in Compress (%.1f%% of the run)\n",
                static_cast<long long>(sidecar->events()), sidecar->compress_seconds(),
                100.0 * sidecar->compress_seconds() / result->seconds);
  }
  (void)generated;
  return 0;
}

// Prints the model file the other subcommands would load (for scripts and tests: one rule).
int Locate() {
  auto path = ResolveModelPath(absl::GetFlag(FLAGS_model));
  if (!path.ok()) return Fail(path.status());
  std::cout << *path << "\n";
  return 0;
}

int Tokenize() {
  auto loaded = Load(false);
  if (!loaded.ok()) return Fail(loaded.status());
  std::string text = absl::GetFlag(FLAGS_text);
  if (absl::GetFlag(FLAGS_chat)) {
    auto chat = ChatTemplateOf(*loaded->file);
    if (!chat.ok()) return Fail(chat.status());
    text = chat->Render(text);
  }
  std::cout << absl::StrJoin(loaded->tokenizer->Encode(text), ",") << "\n";
  return 0;
}

int Logits() {
  std::vector<int32_t> tokens;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_tokens), ',', absl::SkipEmpty())) {
    int32_t t;
    if (!absl::SimpleAtoi(s, &t))
      return Fail(
          absl::InvalidArgumentError(absl::StrCat("--tokens: \"", s, "\" is not an integer")));
    tokens.push_back(t);
  }
  if (tokens.empty()) return Fail(absl::InvalidArgumentError("--tokens is required"));
  if (absl::GetFlag(FLAGS_out).empty())
    return Fail(absl::InvalidArgumentError("--out is required"));
  auto loaded = Load(true, /*with_tokenizer=*/false);
  if (!loaded.ok()) return Fail(loaded.status());
  const ModelConfig& config = loaded->model->config();
  for (int32_t t : tokens) {
    if (t < 0 || t >= config.vocab)
      return Fail(absl::InvalidArgumentError(absl::StrCat("--tokens: ", t, " is out of range")));
  }
  FullCacheBackend cache(config, 1);
  StepOutputs out;
  NpyArray array;
  array.shape = {static_cast<int64_t>(tokens.size()), config.vocab};
  for (size_t i = 0; i < tokens.size(); ++i) {
    loaded->model->Step({tokens[i]}, {static_cast<int64_t>(i)}, &cache, &out);
    (void)cache.Commit(0, static_cast<int64_t>(i), nullptr, nullptr, nullptr);
    array.data.append(reinterpret_cast<const char*>(out.logits.data()), out.logits.size() * 4);
  }
  if (auto s = WriteNpyFile(absl::GetFlag(FLAGS_out), array); !s.ok()) return Fail(s);
  return 0;
}

// The name calibrate gives its profile: --profile, else the model name.
std::string ProfileName(const Loaded& loaded) {
  const std::string flag = absl::GetFlag(FLAGS_profile);
  return flag.empty() ? loaded.ModelName() : flag;
}

// An output file written into PATH.partial, opened before a long measurement so that an
// unwritable path is refused at once, and renamed to PATH by Commit: a run that fails leaves an
// earlier PATH as it was and no PATH.partial behind.
class PartialFile {
 public:
  PartialFile() = default;
  PartialFile(const PartialFile&) = delete;
  PartialFile& operator=(const PartialFile&) = delete;
  ~PartialFile() {
    std::error_code ec;
    if (!path_.empty() && !committed_) std::filesystem::remove(path_ + ".partial", ec);
  }
  // `flag` names the file in the error.
  absl::Status Open(const std::string& path, const std::string& flag) {
    path_ = path;
    f_.open(path + ".partial");
    if (!f_) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot write ", path));
    f_ << std::setprecision(std::numeric_limits<double>::max_digits10);
    return absl::OkStatus();
  }
  bool is_open() const { return f_.is_open(); }
  std::ofstream& out() { return f_; }
  absl::Status Commit() {
    f_.close();
    std::error_code ec;
    if (!f_ || (std::filesystem::rename(path_ + ".partial", path_, ec), ec)) {
      return absl::InternalError(absl::StrCat("cannot write ", path_));
    }
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  std::string path_;
  std::ofstream f_;
  bool committed_ = false;
};

// calibrate --objective head_sensitivity: each KV head's measured KL cost of compression alone, a
// CSV (layer, head, KL per token, relative to its layer's mean head, positions) and a table with
// each layer's spread across its heads.
int WriteHeadSensitivity(const ModelConfig& c, const SensitivityResult& r, const Policy& p,
                         int layer_group, const std::string& out_path, PartialFile& file) {
  std::ofstream& f = file.out();
  const size_t H = static_cast<size_t>(c.kv_heads);
  f << "layer,head,kl_per_token,relative_to_layer,positions\n";
  std::string table;
  for (size_t l = 0; l < static_cast<size_t>(c.layers); ++l) {
    double mean = 0, lo = INFINITY, hi = 0;
    for (size_t h = 0; h < H; ++h) {
      const double v = r.kl[l * H + h];
      mean += v / static_cast<double>(H);
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    absl::StrAppendFormat(&table, "%5zu ", l);
    for (size_t h = 0; h < H; ++h) {
      const double v = r.kl[l * H + h];
      f << l << "," << h << "," << v << "," << (mean > 0 ? v / mean : 0.0) << ","
        << r.positions[l * H + h] << "\n";
      absl::StrAppendFormat(&table, " %8.5f", v);
    }
    if (lo > 0) {
      absl::StrAppendFormat(&table, "  %6.2f\n", hi / lo);
    } else {
      absl::StrAppend(&table, "       -\n");
    }
  }
  if (auto s = file.Commit(); !s.ok()) return Fail(s);
  std::printf(
      "sensitivity of %d layers x %d KV heads (groups of %d layers, one head at a time) at "
      "budget %d with %s: full cache %.1f s, probes %.1f s, %lld events; wrote %s\n",
      c.layers, c.kv_heads, layer_group, p.budget, p.scorer_name().c_str(), r.full_seconds,
      r.probe_seconds, static_cast<long long>(r.events), out_path.c_str());
  std::printf("layer  KL/token of each head alone compressed, max/min\n%s", table.c_str());
  return 0;
}

// calibrate --objective sensitivity: the profile's demand is each layer group's measured KL cost
// of compression (worker/sensitivity.h), normalised to mean 1. head_sensitivity: per KV head.
int CalibrateSensitivity(bool per_head) {
  auto prompts = PromptsFromFlags();
  if (!prompts.ok()) return Fail(prompts.status());
  const std::string out_path = absl::GetFlag(FLAGS_out);
  if (out_path.empty()) return Fail(absl::InvalidArgumentError("--out is required"));
  auto loaded = Load(true);
  if (!loaded.ok()) return Fail(loaded.status());
  if (!IsValidModelName(ProfileName(*loaded))) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        absl::GetFlag(FLAGS_profile).empty() ? "--model_name \"" : "--profile \"",
        ProfileName(*loaded),
        "\" is not a valid profile name (1-128 of A-Z a-z 0-9 . _ -, not starting with '.')")));
  }
  // The recall side's flags, checked before anything is measured.
  const std::string recall_path = absl::GetFlag(FLAGS_recall_tasks);
  const std::string layers_csv = absl::GetFlag(FLAGS_layers_csv);
  const double recall_weight = absl::GetFlag(FLAGS_recall_weight);
  const int answer_tokens = absl::GetFlag(FLAGS_answer_tokens);
  if (per_head && (!recall_path.empty() || !layers_csv.empty())) {
    return Fail(absl::InvalidArgumentError(
        "--recall_tasks and --layers_csv go with --objective sensitivity, not head_sensitivity"));
  }
  if (!layers_csv.empty() && std::filesystem::path(layers_csv).lexically_normal() ==
                                 std::filesystem::path(out_path).lexically_normal()) {
    return Fail(absl::InvalidArgumentError("--layers_csv names the same file as --out"));
  }
  std::vector<RecallTask> recall;
  std::vector<std::vector<int32_t>> recall_ids;
  if (!recall_path.empty()) {
    int seed = -1;
    auto read = ReadRecallTasks(recall_path, "--recall_tasks", &seed);
    if (!read.ok()) return Fail(read.status());
    if (seed == 1) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--recall_tasks ", recall_path,
                       " holds the evaluation tasks (seed 1): calibrate on another seed, so the "
                       "recall benchmark judges tasks the profile never saw")));
    }
    recall = *std::move(read);
    const int context = loaded->model->config().context;
    for (const RecallTask& t : recall) {
      auto prompt = loaded->Prompt(t.head + t.tail);
      if (!prompt.ok()) return Fail(prompt.status());
      if (static_cast<int64_t>(prompt->size()) + answer_tokens > context) {
        return Fail(absl::InvalidArgumentError(
            absl::StrCat("--recall_tasks ", recall_path, ": task ", t.id, " is ", prompt->size(),
                         " tokens, with --answer_tokens ", answer_tokens,
                         " more than the model's context of ", context)));
      }
      recall_ids.push_back(*std::move(prompt));
    }
  }
  auto client = Connect();
  if (!client.ok()) return Fail(client.status());
  std::vector<std::vector<int32_t>> ids;
  for (const std::string& p : *prompts) {
    auto prompt = loaded->Prompt(p);
    if (!prompt.ok()) return Fail(prompt.status());
    ids.push_back(*std::move(prompt));
  }
  // The CSVs (the per-head one is --out; the layers CSV), written whole or not at all.
  PartialFile head_csv, csv;
  if (per_head) {
    if (auto s = head_csv.Open(out_path, "--out"); !s.ok()) return Fail(s);
  }
  if (!layers_csv.empty()) {
    if (auto s = csv.Open(layers_csv, "--layers_csv"); !s.ok()) return Fail(s);
  }
  SensitivityOptions options;
  auto flags_policy = PolicyFromFlags();
  if (!flags_policy.ok()) return Fail(flags_policy.status());
  options.policy = *flags_policy;
  options.policy.allocator =
      AllocatorKind::kUniform;  // one group of layers at a time: its budget is B
  options.layer_group = absl::GetFlag(FLAGS_layer_group);
  options.per_head = per_head;
  options.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.batch = std::max(1, absl::GetFlag(FLAGS_batch));
  options.suppress = loaded->tokenizer->ControlTokens();
  // The recall side first (a model that answers none of the tasks is told so at once): the same
  // groups compressed alone on the recall tasks, measured over the answer tokens of the tasks the
  // full cache answers.
  SensitivityResult recall_result;
  if (!recall.empty()) {
    SensitivityOptions ro = options;
    ro.max_tokens = answer_tokens;
    const Tokenizer& tok = *loaded->tokenizer;
    // The tokens greedy decoding must reproduce: through the one that ends the answer's word.
    ro.answer_tokens = [&](int p, const std::vector<int32_t>& generated) {
      return AnswerTokenCount(recall[static_cast<size_t>(p)].answer, generated,
                              [&](const std::vector<int32_t>& t) { return tok.Decode(t); });
    };
    auto r = MeasureSensitivity(*loaded->model, client->get(),
                                absl::StrCat(loaded->ModelName(), ".probe"), recall_ids, ro);
    if (!r.ok()) {
      if (r.status().code() == absl::StatusCode::kFailedPrecondition &&
          absl::StrContains(r.status().message(), "answers none")) {
        return Fail(absl::FailedPreconditionError(absl::StrCat(
            "--recall_tasks ", recall_path, ": the full cache answers none of the ", recall.size(),
            " tasks within --answer_tokens ", answer_tokens,
            " tokens (a model that cannot answer them cannot measure what recall costs)")));
      }
      return Fail(r.status());
    }
    recall_result = *std::move(r);
    // A recall side that lost nothing cannot weigh the layers: refused before the KL side runs.
    if (recall_weight > 0 && std::all_of(recall_result.kl.begin(), recall_result.kl.end(),
                                         [](double v) { return v == 0; })) {
      return Fail(absl::FailedPreconditionError(
          absl::StrCat("recall side: no layer group loses anything on the answer tokens of the ",
                       recall_result.answered,
                       " answered tasks at this budget: use a smaller --budget, "
                       "longer tasks, or --recall_weight 0")));
    }
  }
  // The probe sessions are named apart from the model, so no profile of the model's name (of
  // another geometry than a group of layers) is looked up for them.
  auto result = MeasureSensitivity(*loaded->model, client->get(),
                                   absl::StrCat(loaded->ModelName(), ".probe"), ids, options);
  if (!result.ok()) return Fail(result.status());
  if (per_head) {
    // The same refusal as the profile's: no head lost anything at this budget.
    if (std::all_of(result->kl.begin(), result->kl.end(), [](double v) { return v == 0; })) {
      return Fail(absl::FailedPreconditionError(
          "head sensitivity: no KV head loses anything at this budget (the budget holds the "
          "whole trajectory): use a smaller --budget or a larger --max_tokens"));
    }
    // The same checks of the values as the profile's (finite, not negative).
    if (auto d = DemandFromSensitivity(result->kl); !d.ok()) return Fail(d.status());
    return WriteHeadSensitivity(loaded->model->config(), *result, options.policy,
                                options.layer_group, out_path, head_csv);
  }
  auto demand = DemandFromSensitivity(result->kl);
  if (!demand.ok()) return Fail(demand.status());
  if (!recall.empty()) {
    // Weight 0: the recall side is measured and shown but the demand is the KL side's alone.
    auto recall_demand = recall_weight > 0 ? DemandFromSensitivity(recall_result.kl) : *demand;
    if (!recall_demand.ok()) {
      return Fail(absl::Status(recall_demand.status().code(),
                               absl::StrCat("recall side: ", recall_demand.status().message())));
    }
    for (size_t l = 0; l < demand->size(); ++l) {
      (*demand)[l] = (1 - recall_weight) * (*demand)[l] + recall_weight * (*recall_demand)[l];
    }
  }
  const ModelConfig& c = loaded->model->config();
  v1::LayerProfile profile;
  profile.set_name(ProfileName(*loaded));
  auto* g = profile.mutable_model();
  g->set_name(loaded->ModelName());
  g->set_num_layers(c.layers);
  g->set_num_q_heads(c.q_heads);
  g->set_num_kv_heads(c.kv_heads);
  g->set_head_dim(c.head_dim);
  g->set_dtype(v1::DTYPE_FLOAT32);
  g->set_max_context(c.context);
  profile.set_rho(1);  // not used by this objective; the field must lie in (0, 1]
  for (size_t l = 0; l < demand->size(); ++l) {
    profile.add_demand((*demand)[l]);
    profile.add_samples(result->positions[l]);
  }
  const Policy& p = options.policy;
  profile.set_provenance(absl::StrCat(
      "reasonalloc-worker calibrate --objective sensitivity on ",
      std::filesystem::path(loaded->path).filename().string(), ": ", ids.size(),
      " probe prompts from ", absl::GetFlag(FLAGS_prompts), ", ", options.max_tokens,
      " generated tokens each (greedy, full cache), then each group of ", options.layer_group,
      " layer(s) compressed alone by ", NameOf(p.scorer), " at budget ", p.budget, ", delta ",
      p.buffer, ", window ", p.window,
      "; demand = the group's mean KL(full || compressed) per token over "
      "its mean across layers",
      recall.empty() ? std::string()
                     : absl::StrCat("; recall side: the same on ", recall_result.answered, " of ",
                                    recall.size(), " recall tasks from ", recall_path,
                                    " that the full cache answers (KL over the answer tokens, ",
                                    answer_tokens, " decoded); demand = ", 1 - recall_weight,
                                    " x KL demand + ", recall_weight, " x recall demand")));
  std::string json;
  google::protobuf::util::JsonPrintOptions print;
  print.add_whitespace = true;
  print.preserve_proto_field_names = true;
  if (auto s = google::protobuf::util::MessageToJsonString(profile, &json, print); !s.ok()) {
    return Fail(absl::InternalError(std::string(s.message())));
  }
  std::ofstream f(out_path);
  f << json;
  if (!f.good()) return Fail(absl::InternalError(absl::StrCat("cannot write ", out_path)));
  std::printf(
      "sensitivity of %d layers (groups of %d) at budget %d with %s: full cache %.1f s, probes "
      "%.1f s, %lld events; wrote %s\n",
      c.layers, options.layer_group, p.budget, p.scorer_name().c_str(), result->full_seconds,
      result->probe_seconds, static_cast<long long>(result->events), out_path.c_str());
  const bool with_recall = !recall.empty();
  if (with_recall) {
    std::printf(
        "recall side: %d of %zu tasks answered by the full cache, %.1f s; probes %.1f s, %lld "
        "events\n",
        recall_result.answered, recall.size(), recall_result.full_seconds,
        recall_result.probe_seconds, static_cast<long long>(recall_result.events));
  }
  std::printf("layer  KL/token%s  demand\n", with_recall ? "  recall KL  kept" : "");
  if (csv.is_open()) {
    csv.out() << "layer,kl_per_token,recall_kl_per_token,recall_kept,recall_positions,demand\n";
  }
  for (int l = 0; l < c.layers; ++l) {
    const size_t i = static_cast<size_t>(l);
    const std::string bar(static_cast<size_t>((*demand)[i] * 20 + 0.5), '#');
    if (with_recall) {
      std::printf("%5d  %8.5f  %9.5f  %4.2f  %6.3f  %s\n", l, result->kl[i], recall_result.kl[i],
                  recall_result.kept[i], (*demand)[i], bar.c_str());
    } else {
      std::printf("%5d  %8.5f  %6.3f  %s\n", l, result->kl[i], (*demand)[i], bar.c_str());
    }
    if (csv.is_open()) {
      std::ofstream& row = csv.out();
      row << l << "," << result->kl[i] << ",";
      if (with_recall) {
        row << recall_result.kl[i] << "," << recall_result.kept[i] << ","
            << recall_result.positions[i];
      } else {
        row << ",,";
      }
      row << "," << (*demand)[i] << "\n";
    }
  }
  if (csv.is_open()) {
    if (auto s = csv.Commit(); !s.ok()) return Fail(s);
  }
  return 0;
}

int Calibrate() {
  const std::string objective = absl::GetFlag(FLAGS_objective);
  if (const double w = absl::GetFlag(FLAGS_recall_weight); !(w >= 0 && w <= 1)) {
    return Fail(
        absl::InvalidArgumentError(absl::StrCat("--recall_weight ", w, " is outside [0, 1]")));
  }
  if (const int n = absl::GetFlag(FLAGS_answer_tokens); n < 1 || n > 256) {
    return Fail(
        absl::InvalidArgumentError(absl::StrCat("--answer_tokens ", n, " is outside [1, 256]")));
  }
  if (objective == "sensitivity" || objective == "head_sensitivity") {
    return CalibrateSensitivity(objective == "head_sensitivity");
  }
  if (!absl::GetFlag(FLAGS_recall_tasks).empty() || !absl::GetFlag(FLAGS_layers_csv).empty()) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "--recall_tasks and --layers_csv go with --objective sensitivity, not ", objective)));
  }
  if (objective != "k_rho") {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        "--objective \"", objective, "\" is not one of k_rho, sensitivity, head_sensitivity")));
  }
  auto prompts = PromptsFromFlags();
  if (!prompts.ok()) return Fail(prompts.status());
  if (prompts->size() > 8)
    return Fail(absl::InvalidArgumentError("--prompts: at most 8 probe prompts"));
  const std::string out_path = absl::GetFlag(FLAGS_out);
  if (out_path.empty()) return Fail(absl::InvalidArgumentError("--out is required"));
  const int stride = absl::GetFlag(FLAGS_stride);
  if (stride < 1) return Fail(absl::InvalidArgumentError("--stride must be ≥ 1"));
  auto loaded = Load(true);
  if (!loaded.ok()) return Fail(loaded.status());
  // The profile is named after the model: refuse a name the sidecar would refuse only after the
  // whole run.
  if (!IsValidModelName(ProfileName(*loaded))) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(
        absl::GetFlag(FLAGS_profile).empty() ? "--model_name \"" : "--profile \"",
        ProfileName(*loaded),
        "\" is not a valid profile name (1-128 of A-Z a-z 0-9 . _ -, not starting with '.')")));
  }
  auto client = Connect();
  if (!client.ok()) return Fail(client.status());
  const ModelConfig& c = loaded->model->config();
  auto flags_policy = PolicyFromFlags();
  if (!flags_policy.ok()) return Fail(flags_policy.status());
  Policy policy = *flags_policy;
  auto request = SessionRequest(c, loaded->ModelName(), policy);
  if (!request.ok()) return Fail(request.status());
  request->set_mode(v1::SESSION_MODE_ADVISORY);
  request->set_memory(v1::MEMORY_KIND_INLINE);
  request->mutable_allocator()->set_name(std::string(NameOf(AllocatorKind::kUniform)));
  auto created = (*client)->CreateSession(*request);
  if (!created.ok()) return Fail(created.status());
  const std::string id = created->session().session_id();
  {
    grpc::ClientContext ctx;
    (*client)->AttachSessionTokens(&ctx, {id});
    v1::StartCalibrationRequest start;
    start.set_session_id(id);
    start.set_rho(absl::GetFlag(FLAGS_rho));
    start.set_stride(1);  // the worker chooses the steps; every call it makes is measured
    v1::CalibrationStatus status;
    if (auto s = (*client)->stub().StartCalibration(&ctx, start, &status); !s.ok()) {
      return Fail(absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message()));
    }
  }
  std::vector<std::vector<int32_t>> ids;
  for (const std::string& p : *prompts) {
    auto prompt = loaded->Prompt(p);
    if (!prompt.ok()) return Fail(prompt.status());
    ids.push_back(*std::move(prompt));
  }
  FullCacheBackend cache(c, static_cast<int>(ids.size()));
  const int window = policy.window;
  // Each sequence's recent queries, [α][L, Hq, d] as a ring.
  const size_t q_row = static_cast<size_t>(c.layers) * c.embd;
  std::vector<std::vector<float>> ring(ids.size(), std::vector<float>(q_row * window));
  int64_t calls = 0;
  RunOptions options;
  options.max_new_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.eos = loaded->tokenizer->eos();
  options.stop_at_eos = !absl::GetFlag(FLAGS_ignore_eos);
  const int64_t d = c.head_dim;
  options.after_step = [&](int b, int64_t step, const float* q) -> absl::Status {
    std::vector<float>& r = ring[static_cast<size_t>(b)];
    std::copy_n(q, q_row, r.begin() + static_cast<std::ptrdiff_t>((step % window) * q_row));
    if (step + 1 < window || (step + 1) % stride != 0) return absl::OkStatus();
    v1::CompressRequest req;
    req.set_session_id(id);
    req.set_step(calls++);
    req.set_omit_keep_mask(true);
    auto* in = req.mutable_inline_tensors();
    auto* qw = in->mutable_query_window();
    qw->set_dtype(v1::DTYPE_FLOAT32);
    for (int64_t s : {int64_t{c.layers}, int64_t{c.q_heads}, int64_t{window}, d}) qw->add_shape(s);
    std::string* qd = qw->mutable_data();
    qd->resize(static_cast<size_t>(c.layers) * c.q_heads * window * d * 4);
    float* qp = reinterpret_cast<float*>(qd->data());
    for (int l = 0; l < c.layers; ++l) {
      for (int h = 0; h < c.q_heads; ++h) {
        for (int w = 0; w < window; ++w) {
          const int64_t s = step - window + 1 + w;
          const float* src =
              r.data() + (s % window) * q_row + (static_cast<size_t>(l) * c.q_heads + h) * d;
          std::copy_n(src, d, qp + ((static_cast<int64_t>(l) * c.q_heads + h) * window + w) * d);
        }
      }
    }
    const int64_t n = step + 1;
    auto* keys = in->mutable_keys();
    keys->set_dtype(v1::DTYPE_FLOAT32);
    for (int64_t s : {int64_t{c.layers}, int64_t{c.kv_heads}, n, d}) keys->add_shape(s);
    std::string* kd = keys->mutable_data();
    kd->resize(static_cast<size_t>(c.layers) * c.kv_heads * n * d * 4);
    float* kp = reinterpret_cast<float*>(kd->data());
    for (int l = 0; l < c.layers; ++l) {
      for (int h = 0; h < c.kv_heads; ++h) {
        std::copy_n(cache.KeyRow(b, l, h, 0), n * d,
                    kp + (static_cast<int64_t>(l) * c.kv_heads + h) * n * d);
      }
    }
    auto resp = (*client)->Compress(req);
    if (!resp.ok()) return resp.status();
    return absl::OkStatus();
  };
  auto result = Run(*loaded->model, &cache, ids, options);
  if (!result.ok()) return Fail(result.status());
  grpc::ClientContext ctx;
  (*client)->AttachSessionTokens(&ctx, {id});
  v1::FinishCalibrationRequest finish;
  finish.set_session_id(id);
  finish.set_profile_name(ProfileName(*loaded));
  v1::LayerProfile profile;
  if (auto s = (*client)->stub().FinishCalibration(&ctx, finish, &profile); !s.ok()) {
    return Fail(absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message()));
  }
  (void)(*client)->CloseSession(id);
  int64_t generated = 0;
  for (const auto& g : result->generated) generated += static_cast<int64_t>(g.size());
  // Which file was measured: its name and size, and what its metadata says it is.
  auto general = loaded->file->GetString("general.name");
  auto architecture = loaded->file->GetString("general.architecture");
  std::error_code size_error;
  const auto file_bytes = std::filesystem::file_size(loaded->path, size_error);
  profile.set_provenance(absl::StrCat(
      "reasonalloc-worker calibrate on ", std::filesystem::path(loaded->path).filename().string(),
      " (", size_error ? 0 : file_bytes, " bytes, general.name \"", general.ok() ? *general : "",
      "\", architecture ", architecture.ok() ? *architecture : "", "): ", ids.size(),
      " probe prompts from ", absl::GetFlag(FLAGS_prompts), ", ", generated,
      " generated tokens (greedy, full cache), ", calls, " measurements every ", stride,
      " steps, window ", window, ", rho ", absl::GetFlag(FLAGS_rho)));
  std::string json;
  google::protobuf::util::JsonPrintOptions print;
  print.add_whitespace = true;
  print.preserve_proto_field_names = true;
  if (auto s = google::protobuf::util::MessageToJsonString(profile, &json, print); !s.ok()) {
    return Fail(absl::InternalError(std::string(s.message())));
  }
  std::ofstream f(out_path);
  f << json;
  if (!f.good()) return Fail(absl::InternalError(absl::StrCat("cannot write ", out_path)));
  std::printf("calibrated %d layers from %lld measurements; wrote %s\n", profile.demand_size(),
              static_cast<long long>(calls), out_path.c_str());
  for (int l = 0; l < profile.demand_size(); ++l) {
    std::printf("layer %2d  %5.2f  %s\n", l, profile.demand(l),
                std::string(static_cast<size_t>(profile.demand(l) * 20 + 0.5), '#').c_str());
  }
  return 0;
}

int Main(int argc, char** argv) {
  const ProgramHelp help{
      .program = "reasonalloc-worker",
      .summary =
          "the ReasonAlloc reference inference worker: a Llama-family decoder for GGUF "
          "files (CPU) that keeps its KV cache in the sidecar's shared-memory arenas and "
          "compresses it through the sidecar every --buffer steps.",
      .synopses = {},
      .commands =
          {{"generate",
            "reasonalloc-worker generate --prompt TEXT (--target T | --full_cache) [flags]",
            "Answers --prompt (or each line of --prompts), greedy unless --temperature; "
            "through the sidecar at --target with the policy flags, or with the full cache. "
            "--json prints a summary line (tokens, KV bytes held, events, budgets, every "
            "sequence's tokens)."},
           {"calibrate", "reasonalloc-worker calibrate --target T --out PROFILE.json [flags]",
            "Measures the per-layer attention demand (the Reasoning Wave) on probe prompts "
            "through the sidecar's calibration RPCs and writes a LayerProfile JSON."},
           {"tokenize", "reasonalloc-worker tokenize --text TEXT [--chat]",
            "Prints the token ids of --text (after the chat template with --chat)."},
           {"locate", "reasonalloc-worker locate [--model NAME|PATH]",
            "Prints the model file the other commands would load, or where it looked; scripts "
            "and tests find models through it."},
           {"logits", "reasonalloc-worker logits --tokens ID,ID,... --out LOGITS.npy",
            "Runs the full-cache forward pass over --tokens and writes the logits of every "
            "position as .npy."}},
      .sources = {"worker/main.cc"},
      .footer =
          "The model is --model, else $REASONALLOC_MODEL (a path, or a file name in the model "
          "folder), else SmolLM2-135M-Instruct.Q4_1.gguf in the model folder: "
          "$REASONALLOC_MODEL_DIR, else $XDG_CACHE_HOME/reasonalloc/models, else "
          "~/.cache/reasonalloc/models (scripts/setup fills it). `locate` prints the choice.\n"
          "Exit status: 0 on success, 1 when a step fails (the reason is printed) or a flag is "
          "unknown or malformed, 2 for a usage error (a missing or unknown command, a bad "
          "value)."};
  if (const int rc = MaybePrintHelp(argc, argv, help, std::cout, std::cerr); rc >= 0) return rc;
  const auto spelled = NormalizeFlagSpelling(argc, argv);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const std::string command = args.size() > 1 ? args[1] : "";
  if (command == "generate") return Generate();
  if (command == "calibrate") return Calibrate();
  if (command == "tokenize") return Tokenize();
  if (command == "logits") return Logits();
  if (command == "locate") return Locate();
  std::cerr << "usage: reasonalloc-worker generate|calibrate|tokenize|logits|locate [flags]; "
               "`reasonalloc-worker --help` for more\n";
  return 2;
}

}  // namespace
}  // namespace reasonalloc::worker

int main(int argc, char** argv) { return reasonalloc::worker::Main(argc, argv); }
