// The long-range recall benchmark: can the model still answer a question about a fact it read
// hundreds of tokens earlier, once its KV cache went through an eviction policy?
//
// 1. Every task (bench/recall/tasks.py: a fact, >= --min_distance tokens of filler, a question)
//    is decoded free-running and greedy with the full cache; a task counts only if the full cache
//    answers it (the answer as a whole word of the first --answer_tokens generated tokens).
// 2. Each policy × budget decodes those tasks through the sidecar (one managed session per task,
//    the prompt itself going through the budget token by token) and is scored the same way.
// Output (--out_dir): recall_runs.csv (one row per configuration and task, the full cache's rows
// under policy "full"), recall_meta.json; bench/recall/report.py makes the table and plot.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "core/cli_args.h"
#include "worker/chat_template.h"
#include "worker/driver.h"
#include "worker/model_files.h"
#include "worker/recall_tasks.h"
#include "worker/tokenizer.h"

ABSL_FLAG(std::string, model, "",
          "GGUF file: a path or a file name in the model folder (default: $REASONALLOC_MODEL, "
          "then the reference model; as the worker finds it)");
ABSL_FLAG(std::string, target, "", "Sidecar address");
ABSL_FLAG(std::string, model_name, "",
          "Model name (selects the profile; empty = from the file name, as the worker does)");
ABSL_FLAG(bool, raw, false, "Prompts as they are, without the chat template (base models)");
ABSL_FLAG(std::string, tasks, "bench/recall/tasks.tsv", "Tasks written by bench/recall/tasks.py");
ABSL_FLAG(int, max_tasks, 0, "Use only the first N tasks (0 = all)");
ABSL_FLAG(std::string, policies,
          "streaming/uniform,snapkv/uniform,h2o/uniform,rkv/uniform,rkv/adakv,"
          "rkv/reasonalloc-full",
          "scorer/allocator[-mode][+sN][+rN][+lX] list");
ABSL_FLAG(std::string, budgets, "32,64,128", "Budgets (tokens per head)");
ABSL_FLAG(int, delta, 64, "Δ");
ABSL_FLAG(int, window, 8, "α");
ABSL_FLAG(int, answer_tokens, 12, "Tokens decoded after the prompt");
ABSL_FLAG(int, min_distance, 512,
          "Fewest tokens between the fact and the end of the prompt; shorter tasks are left out");
ABSL_FLAG(int, batch, 48, "Sequences decoded together");
ABSL_FLAG(std::string, out_dir, "bench/results", "Where recall_runs.csv and recall_meta.json go");

namespace reasonalloc::worker {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int Fail(const absl::Status& s) {
  std::cerr << "recall: " << s << "\n";
  return 1;
}

struct Task : RecallTask {
  std::vector<int32_t> ids;
  int distance = 0;  // tokens of the tail (filler and question)
};

absl::StatusOr<std::vector<int>> Ints(const std::string& flag, const std::string& text) {
  std::vector<int> out;
  for (absl::string_view s : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int v;
    if (!absl::SimpleAtoi(s, &v) || v < 1) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": \"", s, "\""));
    }
    out.push_back(v);
  }
  return out;
}

std::string Csv(const std::string& s) {
  return absl::StrCat("\"", absl::StrReplaceAll(s, {{"\"", "\"\""}, {"\n", "\\n"}}), "\"");
}

int Main(int argc, char** argv) {
  const auto spelled = NormalizeFlagSpelling(argc, argv);
  absl::ParseCommandLine(argc, argv);
  auto path = ResolveModelPath(absl::GetFlag(FLAGS_model));
  if (!path.ok()) return Fail(path.status());
  auto file = GgufFile::Open(*path);
  if (!file.ok()) return Fail(file.status());
  auto tok = Tokenizer::FromGguf(**file);
  if (!tok.ok()) return Fail(tok.status());
  auto model = Model::Load(**file);
  if (!model.ok()) return Fail(model.status());
  const ModelConfig& mc = (*model)->config();
  auto general = (*file)->GetString("general.name");
  const std::string model_name =
      ChooseModelName(absl::GetFlag(FLAGS_model_name), *path, general.ok() ? *general : "");
  auto read = ReadRecallTasks(absl::GetFlag(FLAGS_tasks), "--tasks");
  if (!read.ok()) return Fail(read.status());
  std::vector<Task> tasks(read->size());
  for (size_t i = 0; i < tasks.size(); ++i) static_cast<RecallTask&>(tasks[i]) = (*read)[i];
  if (absl::GetFlag(FLAGS_max_tasks) > 0 &&
      static_cast<int>(tasks.size()) > absl::GetFlag(FLAGS_max_tasks)) {
    tasks.resize(static_cast<size_t>(absl::GetFlag(FLAGS_max_tasks)));
  }
  const int min_distance = absl::GetFlag(FLAGS_min_distance);
  std::vector<Task> usable;
  for (Task& t : tasks) {
    auto text = PromptText(**file, t.head + t.tail, absl::GetFlag(FLAGS_raw));
    if (!text.ok()) return Fail(text.status());
    t.ids = (*tok)->Encode(*text);
    t.distance = static_cast<int>((*tok)->Encode(t.tail, /*add_special=*/false).size());
    if (t.distance < min_distance) {
      std::fprintf(stderr, "recall: %s left out: %d tokens after the fact (< --min_distance %d)\n",
                   t.id.c_str(), t.distance, min_distance);
      continue;
    }
    usable.push_back(std::move(t));
  }
  if (usable.empty()) return Fail(absl::InvalidArgumentError("no task is long enough"));
  const int answer_tokens = absl::GetFlag(FLAGS_answer_tokens);
  const int group = std::max(1, absl::GetFlag(FLAGS_batch));

  std::vector<Policy> configs;
  auto budgets = Ints("budgets", absl::GetFlag(FLAGS_budgets));
  if (!budgets.ok()) return Fail(budgets.status());
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_policies), ',', absl::SkipEmpty())) {
    auto policy = ParsePolicy(std::string(name));
    if (!policy.ok()) return Fail(policy.status());
    for (int b : *budgets) {
      Policy p = *policy;
      p.budget = b;
      p.buffer = absl::GetFlag(FLAGS_delta);
      p.window = absl::GetFlag(FLAGS_window);
      configs.push_back(p);
    }
  }

  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  std::ofstream runs(out_dir + "/recall_runs.csv");
  if (!runs) return Fail(absl::NotFoundError(absl::StrCat("cannot write into ", out_dir)));
  runs << "policy,scorer,allocator,mode,budget,delta,task,kind,distance,prompt_tokens,correct,"
          "peak_kv_bytes,full_kv_bytes,events,answer,text\n";

  RunOptions ro;
  ro.max_new_tokens = answer_tokens;
  ro.stop_at_eos = true;
  ro.eos = (*tok)->eos();

  // 1. The full cache, in batches of --batch tasks.
  std::vector<int64_t> full_bytes(usable.size());
  std::vector<size_t> kept;
  const double t_full = Now();
  int64_t full_steps = 0;
  for (size_t start = 0; start < usable.size(); start += static_cast<size_t>(group)) {
    const size_t end = std::min(usable.size(), start + static_cast<size_t>(group));
    std::vector<std::vector<int32_t>> prompts;
    for (size_t i = start; i < end; ++i) prompts.push_back(usable[i].ids);
    FullCacheBackend full(mc, static_cast<int>(prompts.size()));
    auto r = Run(**model, &full, prompts, ro);
    if (!r.ok()) return Fail(r.status());
    full_steps += r->tokens;
    for (size_t i = start; i < end; ++i) {
      const Task& t = usable[i];
      const std::string text = (*tok)->Decode(r->generated[i - start]);
      const bool ok = AnswerMatches(t.answer, text);
      full_bytes[i] = r->peak_bytes[i - start];
      if (ok) kept.push_back(i);
      runs << "full,,,,0,0," << t.id << "," << t.kind << "," << t.distance << "," << t.ids.size()
           << "," << (ok ? 1 : 0) << "," << full_bytes[i] << "," << full_bytes[i] << ",0,"
           << Csv(t.answer) << "," << Csv(text) << "\n";
    }
  }
  const double full_s = Now() - t_full;
  std::fprintf(stderr, "full cache: %zu of %zu tasks answered, %.1f s (%.1f tokens/s)\n",
               kept.size(), usable.size(), full_s, static_cast<double>(full_steps) / full_s);
  runs.flush();
  if (kept.empty()) return Fail(absl::FailedPreconditionError("the full cache answers no task"));

  Client::Options options;
  options.target = absl::GetFlag(FLAGS_target);
  options.timeout = absl::Seconds(300);
  auto client = Client::Connect(options);
  if (!client.ok()) return Fail(client.status());

  // 2. Every configuration on the kept tasks; sequences (configuration, task) in batches.
  std::vector<std::pair<size_t, size_t>> seqs;
  for (size_t c = 0; c < configs.size(); ++c) {
    for (size_t i : kept) seqs.emplace_back(c, i);
  }
  const double t_grid = Now();
  int64_t grid_steps = 0;
  for (size_t start = 0; start < seqs.size(); start += static_cast<size_t>(group)) {
    const size_t end = std::min(seqs.size(), start + static_cast<size_t>(group));
    std::vector<Policy> policies;
    std::vector<std::vector<int32_t>> prompts;
    for (size_t s = start; s < end; ++s) {
      policies.push_back(configs[seqs[s].first]);
      prompts.push_back(usable[seqs[s].second].ids);
    }
    auto backend = SidecarBackend::Open(client->get(), mc, model_name, policies);
    if (!backend.ok()) return Fail(backend.status());
    const double t0 = Now();
    auto r = Run(**model, backend->get(), prompts, ro);
    if (!r.ok()) return Fail(r.status());
    grid_steps += r->tokens;
    int correct = 0;
    for (size_t s = start; s < end; ++s) {
      const Policy& p = configs[seqs[s].first];
      const Task& t = usable[seqs[s].second];
      const int slot = static_cast<int>(s - start);
      const std::string text = (*tok)->Decode(r->generated[static_cast<size_t>(slot)]);
      const bool ok = AnswerMatches(t.answer, text);
      correct += ok ? 1 : 0;
      runs << p.Name() << "," << p.scorer_name() << "," << p.allocator_name() << ","
           << p.mode_name() << "," << p.budget << "," << p.buffer << "," << t.id << "," << t.kind
           << "," << t.distance << "," << t.ids.size() << "," << (ok ? 1 : 0) << ","
           << r->peak_bytes[static_cast<size_t>(slot)] << "," << full_bytes[seqs[s].second] << ","
           << (*backend)->events(slot) << "," << Csv(t.answer) << "," << Csv(text) << "\n";
    }
    runs.flush();
    std::fprintf(stderr,
                 "sequences %zu..%zu of %zu: %.1f s (%.1f tokens/s), %d answered, %.1f s in "
                 "Compress\n",
                 start, end - 1, seqs.size(), Now() - t0,
                 static_cast<double>(r->tokens) / r->seconds, correct,
                 (*backend)->compress_seconds());
  }
  const double grid_s = Now() - t_grid;
  std::ofstream meta(out_dir + "/recall_meta.json");
  meta << "{\"model\":\"" << model_name << "\",\"tasks\":" << usable.size()
       << ",\"full_correct\":" << kept.size() << ",\"configurations\":" << configs.size()
       << ",\"answer_tokens\":" << answer_tokens << ",\"min_distance\":" << min_distance
       << ",\"full_cache_seconds\":" << full_s << ",\"grid_seconds\":" << grid_s
       << ",\"grid_sequence_steps\":" << grid_steps << "}\n";
  std::fprintf(stderr, "grid: %zu configurations × %zu tasks in %.1f s\n", configs.size(),
               kept.size(), grid_s);
  return 0;
}

}  // namespace
}  // namespace reasonalloc::worker

int main(int argc, char** argv) { return reasonalloc::worker::Main(argc, argv); }
