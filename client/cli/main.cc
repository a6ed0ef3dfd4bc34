// reasonalloc: command-line client of the sidecar.
//
//   reasonalloc info      [--target T] [--json]
//   reasonalloc health    [--target T] [--service S]         exit 0 only when SERVING (a probe)
//   reasonalloc sessions  [--target T] [--json] [--model M]
//   reasonalloc close     [--target T] SESSION_ID...
//   reasonalloc compress  [--target T] --queries Q.npy --keys K.npy [--values V.npy]
//                         [--lengths LEN.npy] --out DIR [--session ID --step N | session flags]
//   reasonalloc watch     [--target T] [--session ID,...] [--model M] [--pool_interval S]
//                         [--count N] [--plain]           live WatchMetrics view
//   reasonalloc profiles  [--target T] [--json]            layer profiles held, with their owners
//   reasonalloc put-profile [--target T] FILE.json [--overwrite] [--save]
//   reasonalloc replay    --trace DIR [--scorers ...] [--allocators ...] [--budgets ...] [--csv F]
//
// Exit codes: 0 success, 1 the server answered with an error (or Abseil's parser refused a flag),
// 2 bad usage or local I/O error.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/replay.h"
#include "client/cli/watch.h"
#include "client/client.h"
#include "client/npy_tensor.h"
#include "core/api_defaults.h"
#include "core/build_info.h"
#include "core/cli_args.h"
#include "core/cli_help.h"
#include "core/npy.h"
#include "core/policy.h"
#include "core/session_config.h"
#include "proto/grpc_status.h"
#include "proto/json.h"
#include "proto/policy_enums.h"

ABSL_FLAG(std::string, target, "",
          "Server address (default: $REASONALLOC_TARGET, else the server's default socket)");
ABSL_FLAG(double, timeout_seconds, 60, "Deadline of each call");
ABSL_FLAG(uint64_t, max_message_bytes, reasonalloc::kDefaultMaxMessageBytes,
          "Largest message sent or received");
ABSL_FLAG(bool, json, false, "Print the server's answer as JSON");
ABSL_FLAG(std::string, service, "", "health: the service to check (empty = the server)");
ABSL_FLAG(std::string, model, "", "sessions, watch: only this model");
ABSL_FLAG(bool, overwrite, false, "put-profile: replace a profile of the same name");
ABSL_FLAG(bool, save, false, "put-profile: also write it into the server's --profile_dir");
// compress
ABSL_FLAG(std::string, queries, "", "compress: query window .npy [L, Hq, window, d]");
ABSL_FLAG(std::string, keys, "", "compress: keys .npy [L, Hkv, N, d]");
ABSL_FLAG(std::string, values, "", "compress: values .npy [L, Hkv, N, d] (managed mode)");
ABSL_FLAG(std::string, lengths, "", "compress: live rows per head .npy [L, Hkv] (int32/int64)");
ABSL_FLAG(std::string, out, "", "compress: directory for the decision .npy files");
ABSL_FLAG(std::string, session, "",
          "compress, watch: compress: an existing session (else a temporary one); watch: "
          "comma-separated sessions (empty = all)");
ABSL_FLAG(std::string, session_token, "",
          "close, compress --session: the session's token (CreateSession's answer), needed from "
          "another uid than the creator's or over TCP");
ABSL_FLAG(int64_t, step, 0, "compress: decode step of the event");
ABSL_FLAG(std::string, model_name, "cli", "compress: model name of a temporary session");
ABSL_FLAG(int32_t, budget, reasonalloc::BudgetConfig{}.budget,
          "compress: B, tokens kept per head (window included)");
ABSL_FLAG(int32_t, buffer, reasonalloc::BudgetConfig{}.buffer, "compress: Δ");
ABSL_FLAG(int32_t, sinks, -1,
          "compress: first tokens of every head always kept (-1 = the scorer's default: 4 for "
          "streaming, 0 for the others)");
ABSL_FLAG(int32_t, recent, 0, "compress: last tokens of every head always kept (0 = the window)");
ABSL_FLAG(int32_t, max_context, 131072, "compress: model.max_context (raised to N if smaller)");
ABSL_FLAG(std::string, scorer, std::string(reasonalloc::NameOf(reasonalloc::ScorerConfig{}.kind)),
          absl::StrCat("compress: ", reasonalloc::ScorerNames()));
ABSL_FLAG(std::string, allocator,
          std::string(reasonalloc::NameOf(reasonalloc::AllocatorConfig{}.kind)),
          absl::StrCat("compress: ", reasonalloc::AllocatorNames()));
ABSL_FLAG(std::string, reasonalloc_mode,
          std::string(reasonalloc::NameOf(reasonalloc::AllocatorConfig{}.reasonalloc_mode)),
          "compress: full | layer | head | off | static");
ABSL_FLAG(int32_t, pool_kernel, reasonalloc::ScorerConfig{}.pool_kernel,
          "compress: pooling kernel (odd)");
ABSL_FLAG(std::string, pool_kind, "max", "compress: max | avg");
ABSL_FLAG(std::string, gqa_reduce, "max",
          "compress: max | mean (on logits, before the softmax) | mean_scores (after pooling)");
ABSL_FLAG(bool, softmax_all_keys, false,
          "compress: window softmax over all keys, causal in the window (kvpress), not candidates");
ABSL_FLAG(double, lambda, reasonalloc::ScorerConfig{}.lambda, "compress: rkv importance weight λ");
ABSL_FLAG(double, threshold, reasonalloc::ScorerConfig{}.threshold,
          "compress: rkv redundancy threshold T");
ABSL_FLAG(double, pyramid_beta, 20.0, "compress: pyramid β");
ABSL_FLAG(double, adakv_floor, 0.2, "compress: adakv floor a");

namespace reasonalloc {
namespace {

constexpr int kServerError = 1;
constexpr int kUsageError = 2;

int Fail(int code, absl::string_view context, const absl::Status& status) {
  std::cerr << "reasonalloc: " << std::string(context) << ": " << status.ToString() << "\n";
  return code;
}

absl::StatusOr<std::unique_ptr<Client>> Connect() {
  Client::Options options;
  options.target = absl::GetFlag(FLAGS_target);
  if (options.target.empty()) {
    const char* env = std::getenv("REASONALLOC_TARGET");
    options.target = env != nullptr ? env : kDefaultTarget;
  }
  options.timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_seconds));
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  return Client::Connect(options);
}

int Info(Client& client) {
  auto info = client.GetServerInfo();
  if (!info.ok()) return Fail(kServerError, client.options().target, info.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(*info);
    return 0;
  }
  std::cout << "version        " << info->version() << " (" << info->build() << ")\n"
            << "backend        " << info->backend() << " (" << info->device_name() << ")\n"
            << "arena          " << info->arena_free_bytes() << " of "
            << info->arena_capacity_bytes() << " bytes free\n"
            << "sessions       " << info->sessions() << "\n"
            << "scorers        ";
  for (const auto& s : info->scorers()) std::cout << s << " ";
  std::cout << "\nallocators     ";
  for (const auto& a : info->allocators()) std::cout << a << " ";
  std::cout << "\nlisten         ";
  for (const auto& a : info->listen_addresses()) std::cout << a << " ";
  std::cout << "\nmetrics        " << info->metrics_address() << "\n"
            << "max message    " << info->max_message_bytes() << " bytes\n"
            << absl::StrFormat("uptime         %.1f s\n", info->uptime_seconds());
  // The policy registry: what each policy needs and the memory kinds it runs on here.
  auto kinds = [](const auto& list) {
    std::string out;
    for (int m : list) {
      absl::StrAppend(&out, out.empty() ? "" : ",",
                      v1::MemoryKind_Name(static_cast<v1::MemoryKind>(m)));
    }
    return out.empty() ? std::string("none") : out;
  };
  for (const v1::PolicyInfo& p : info->policies()) {
    const bool scorer = p.kind() == v1::PolicyInfo::KIND_SCORER;
    std::cout << absl::StrFormat("%-14s %-12s %s\n", scorer ? "scorer" : "allocator", p.name(),
                                 p.summary());
    if (scorer) {
      std::cout << absl::StrFormat(
          "%-27s managed: %s; advisory: %s%s%s\n", "", kinds(p.managed_memory()),
          kinds(p.advisory_memory()), p.needs_accumulator() ? "; carries an accumulator" : "",
          p.default_sinks() > 0 ? absl::StrCat("; ", p.default_sinks(), " sinks by default") : "");
    } else {
      std::cout << absl::StrFormat(
          "%-27s %s%s\n", "", p.uses_layer_profile() ? "reads a layer profile; " : "",
          p.routes_heads() ? "routes between heads" : "layer budgets only");
    }
  }
  return 0;
}

int Health(Client& client) {
  auto status = client.CheckHealth(absl::GetFlag(FLAGS_service));
  if (!status.ok()) return Fail(kServerError, client.options().target, status.status());
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*status) << "\n";
  return *status == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : kServerError;
}

int Sessions(Client& client) {
  auto sessions = client.ListSessions(absl::GetFlag(FLAGS_model));
  if (!sessions.ok()) return Fail(kServerError, client.options().target, sessions.status());
  if (absl::GetFlag(FLAGS_json)) {
    v1::ListSessionsResponse all;
    for (const auto& s : *sessions) *all.add_sessions() = s;
    std::cout << ToJson(all);
    return 0;
  }
  std::cout << absl::StrFormat("%-32s  %-16s  %-9s  %-8s  %6s  %6s  %12s  %s\n", "SESSION", "MODEL",
                               "SCORER", "ALLOC", "BUDGET", "EPOCH", "EVICTED", "TAG");
  for (const auto& s : *sessions) {
    std::cout << absl::StrFormat("%-32s  %-16s  %-9s  %-8s  %6d  %6d  %12d  %s\n", s.session_id(),
                                 s.model().name(), s.scorer().name(), s.allocator().name(),
                                 s.budget().budget(), s.epoch(), s.evicted_tokens_total(),
                                 s.client_tag());
  }
  return 0;
}

int Close(Client& client, const std::vector<char*>& args) {
  if (args.size() < 3) {
    std::cerr << "reasonalloc close: name at least one SESSION_ID\n";
    return kUsageError;
  }
  int rc = 0;
  for (size_t i = 2; i < args.size(); ++i) {
    if (const std::string token = absl::GetFlag(FLAGS_session_token); !token.empty()) {
      client.AddSessionToken(args[i], token);
    }
    auto closed = client.CloseSession(args[i]);
    if (!closed.ok()) {
      rc = Fail(kServerError, args[i], closed.status());
      continue;
    }
    std::cout << args[i] << (closed->existed() ? " closed" : " was not open") << "\n";
  }
  return rc;
}

grpc::ClientContext* WithDeadline(grpc::ClientContext* context) {
  context->set_deadline(
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_timeout_seconds) * 1000)));
  return context;
}

int Profiles(Client& client) {
  grpc::ClientContext context;
  v1::ListProfilesResponse all;
  const grpc::Status s =
      client.stub().ListProfiles(WithDeadline(&context), v1::ListProfilesRequest(), &all);
  if (!s.ok()) return Fail(kServerError, client.options().target, FromGrpcStatus(s));
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << ToJson(all);
    return 0;
  }
  // The name column is as wide as the longest name (at least 32), so columns stay aligned.
  int width = 32;
  for (const auto& p : all.profiles()) width = std::max(width, static_cast<int>(p.name().size()));
  std::cout << absl::StrFormat("%-*s  %6s  %5s  %-12s  %s\n", width, "PROFILE", "LAYERS", "RHO",
                               "OWNER", "MODEL");
  for (const auto& p : all.profiles()) {
    std::cout << absl::StrFormat("%-*s  %6d  %5.2f  %-12s  %s\n", width, p.name(), p.demand_size(),
                                 p.rho(), p.owner(), p.model().name());
  }
  return 0;
}

int PutProfile(Client& client, const std::vector<char*>& args) {
  if (args.size() != 3) {
    std::cerr << "reasonalloc put-profile: name one FILE.json (a LayerProfile in JSON)\n";
    return kUsageError;
  }
  std::ifstream in(args[2]);
  if (!in) {
    return Fail(kUsageError, args[2], absl::NotFoundError("cannot open the file"));
  }
  std::stringstream text;
  text << in.rdbuf();
  v1::PutProfileRequest request;
  if (const auto parsed =
          google::protobuf::util::JsonStringToMessage(text.str(), request.mutable_profile());
      !parsed.ok()) {
    return Fail(kUsageError, args[2],
                absl::InvalidArgumentError(absl::StrCat("not a LayerProfile JSON document: ",
                                                        std::string(parsed.message()))));
  }
  request.set_overwrite(absl::GetFlag(FLAGS_overwrite));
  request.set_save(absl::GetFlag(FLAGS_save));
  grpc::ClientContext context;
  v1::PutProfileResponse response;
  const grpc::Status s = client.stub().PutProfile(WithDeadline(&context), request, &response);
  if (!s.ok()) return Fail(kServerError, request.profile().name(), FromGrpcStatus(s));
  std::cout << "profile " << request.profile().name() << " stored\n";
  return 0;
}

absl::StatusOr<NpyArray> ReadInput(absl::Flag<std::string>& flag, absl::string_view name,
                                   bool required) {
  const std::string path = absl::GetFlag(flag);
  if (path.empty()) {
    if (required) return absl::InvalidArgumentError(absl::StrCat("--", name, " is required"));
    return NpyArray{};
  }
  return ReadNpyFile(path);
}

absl::Status WriteOutput(const std::string& dir, const std::string& name, const NpyArray& a) {
  return WriteNpyFile((std::filesystem::path(dir) / name).string(), a);
}

NpyArray Int32Array(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
  NpyArray a;
  a.dtype = NpyDType::kInt32;
  a.shape = std::move(shape);
  a.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(int32_t));
  return a;
}

int CompressCommand(Client& client) {
  auto queries = ReadInput(FLAGS_queries, "queries", true);
  if (!queries.ok()) return Fail(kUsageError, "compress", queries.status());
  auto keys = ReadInput(FLAGS_keys, "keys", true);
  if (!keys.ok()) return Fail(kUsageError, "compress", keys.status());
  auto values = ReadInput(FLAGS_values, "values", false);
  if (!values.ok()) return Fail(kUsageError, "compress", values.status());
  auto lengths = ReadInput(FLAGS_lengths, "lengths", false);
  if (!lengths.ok()) return Fail(kUsageError, "compress", lengths.status());
  const std::string out_dir = absl::GetFlag(FLAGS_out);
  if (out_dir.empty())
    return Fail(kUsageError, "compress", absl::InvalidArgumentError("--out is required"));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    return Fail(kUsageError, "compress",
                absl::InvalidArgumentError(absl::StrCat("--out ", out_dir, ": ", ec.message())));
  }
  if (queries->shape.size() != 4 || keys->shape.size() != 4) {
    return Fail(kUsageError, "compress",
                absl::InvalidArgumentError("--queries must be [L, Hq, window, d] and --keys "
                                           "[L, Hkv, N, d]"));
  }
  const bool has_values = !absl::GetFlag(FLAGS_values).empty();

  v1::CompressRequest request;
  v1::InlineTensors* in = request.mutable_inline_tensors();
  auto q = TensorFromNpy(*queries, "--queries");
  if (!q.ok()) return Fail(kUsageError, "compress", q.status());
  *in->mutable_query_window() = *q;
  auto k = TensorFromNpy(*keys, "--keys");
  if (!k.ok()) return Fail(kUsageError, "compress", k.status());
  *in->mutable_keys() = *k;
  if (has_values) {
    auto v = TensorFromNpy(*values, "--values");
    if (!v.ok()) return Fail(kUsageError, "compress", v.status());
    *in->mutable_values() = *v;
  }
  if (!absl::GetFlag(FLAGS_lengths).empty()) {
    auto values64 = NpyToInt64(*lengths, "--lengths");
    if (!values64.ok()) return Fail(kUsageError, "compress", values64.status());
    for (size_t i = 0; i < values64->size(); ++i) {
      const int64_t value = (*values64)[i];
      if (value < 0 || value > INT32_MAX) {
        return Fail(kUsageError, "compress",
                    absl::InvalidArgumentError(
                        absl::StrCat("--lengths[", i, "] = ", value, " is out of range")));
      }
      in->add_lengths(static_cast<int32_t>(value));
    }
  }

  std::string session_id = absl::GetFlag(FLAGS_session);
  if (const std::string token = absl::GetFlag(FLAGS_session_token);
      !token.empty() && !session_id.empty()) {
    client.AddSessionToken(session_id, token);
  }
  const bool temporary = session_id.empty();
  if (temporary) {
    v1::CreateSessionRequest create;
    v1::ModelGeometry* m = create.mutable_model();
    m->set_name(absl::GetFlag(FLAGS_model_name));
    m->set_num_layers(static_cast<int32_t>(queries->shape[0]));
    m->set_num_q_heads(static_cast<int32_t>(queries->shape[1]));
    m->set_num_kv_heads(static_cast<int32_t>(keys->shape[1]));
    m->set_head_dim(static_cast<int32_t>(keys->shape[3]));
    m->set_dtype(has_values ? in->values().dtype() : in->keys().dtype());
    m->set_max_context(
        static_cast<int32_t>(std::max<int64_t>(absl::GetFlag(FLAGS_max_context), keys->shape[2])));
    create.mutable_budget()->set_budget(absl::GetFlag(FLAGS_budget));
    create.mutable_budget()->set_buffer(absl::GetFlag(FLAGS_buffer));
    create.mutable_budget()->set_window(static_cast<int32_t>(queries->shape[2]));
    if (absl::GetFlag(FLAGS_sinks) != -1) {
      create.mutable_budget()->set_sinks(absl::GetFlag(FLAGS_sinks));
    }
    create.mutable_budget()->set_recent(absl::GetFlag(FLAGS_recent));
    // Names are checked here, against this build's registry, so that a typo names the flag.
    if (auto s = ParseScorer(absl::GetFlag(FLAGS_scorer), "--scorer"); !s.ok()) {
      return Fail(kUsageError, "compress", s.status());
    }
    if (auto a = ParseAllocator(absl::GetFlag(FLAGS_allocator), "--allocator"); !a.ok()) {
      return Fail(kUsageError, "compress", a.status());
    }
    create.mutable_scorer()->set_name(absl::GetFlag(FLAGS_scorer));
    create.mutable_scorer()->set_pool_kernel(absl::GetFlag(FLAGS_pool_kernel));
    const std::string pool = absl::GetFlag(FLAGS_pool_kind);
    const std::string gqa = absl::GetFlag(FLAGS_gqa_reduce);
    if ((pool != "max" && pool != "avg") ||
        (gqa != "max" && gqa != "mean" && gqa != "mean_scores")) {
      return Fail(kUsageError, "compress",
                  absl::InvalidArgumentError(
                      "--pool_kind must be max|avg and --gqa_reduce max|mean|mean_scores"));
    }
    create.mutable_scorer()->set_pool_kind(pool == "max" ? v1::POOL_KIND_MAX : v1::POOL_KIND_AVG);
    create.mutable_scorer()->set_gqa_reduce(gqa == "max"    ? v1::GQA_REDUCE_MAX
                                            : gqa == "mean" ? v1::GQA_REDUCE_MEAN
                                                            : v1::GQA_REDUCE_MEAN_SCORES);
    create.mutable_scorer()->set_softmax_all_keys(absl::GetFlag(FLAGS_softmax_all_keys));
    create.mutable_scorer()->set_lambda(absl::GetFlag(FLAGS_lambda));
    create.mutable_scorer()->set_threshold(absl::GetFlag(FLAGS_threshold));
    create.mutable_allocator()->set_pyramid_beta(absl::GetFlag(FLAGS_pyramid_beta));
    create.mutable_allocator()->set_adakv_floor(absl::GetFlag(FLAGS_adakv_floor));
    create.mutable_allocator()->set_name(absl::GetFlag(FLAGS_allocator));
    auto mode = ParseReasonAllocMode(absl::GetFlag(FLAGS_reasonalloc_mode), "--reasonalloc_mode");
    if (!mode.ok()) return Fail(kUsageError, "compress", mode.status());
    create.mutable_allocator()->set_reasonalloc_mode(ReasonAllocModeToProto(*mode));
    create.set_mode(has_values ? v1::SESSION_MODE_MANAGED : v1::SESSION_MODE_ADVISORY);
    create.set_memory(v1::MEMORY_KIND_INLINE);
    create.set_client_tag("reasonalloc compress");
    auto created = client.CreateSession(create);
    if (!created.ok()) return Fail(kServerError, "CreateSession", created.status());
    session_id = created->session().session_id();
    for (const auto& w : created->warnings()) std::cerr << "reasonalloc: warning: " << w << "\n";
  }
  request.set_session_id(session_id);
  request.set_step(absl::GetFlag(FLAGS_step));
  auto response = client.Compress(request);
  if (temporary) (void)client.CloseSession(session_id);
  if (!response.ok()) return Fail(kServerError, "Compress", response.status());

  const v1::Decision& d = response->decision();
  const int64_t L = d.num_layers();
  const int64_t H = d.num_kv_heads();
  const int64_t n_max = keys->shape[2];
  // Never index with what the server sent before checking it against what was asked.
  int64_t total_kept = 0;
  bool consistent = L == keys->shape[0] && H == keys->shape[1] && d.budgets_size() == L * H &&
                    d.kept_lengths_size() == L * H;
  for (int i = 0; consistent && i < d.kept_lengths_size(); ++i) {
    consistent = d.kept_lengths(i) >= 0 && d.kept_lengths(i) <= n_max;
    total_kept += d.kept_lengths(i);
  }
  consistent = consistent && total_kept == d.kept_indices_size();
  for (int i = 0; consistent && i < d.kept_indices_size(); ++i) {
    consistent = d.kept_indices(i) >= 0 && d.kept_indices(i) < n_max;
  }
  if (!consistent) {
    return Fail(kServerError, "Compress",
                absl::DataLossError("the decision does not match the request's geometry"));
  }
  std::vector<int32_t> budgets(d.budgets().begin(), d.budgets().end());
  std::vector<int32_t> kept(d.kept_lengths().begin(), d.kept_lengths().end());
  int64_t max_kept = 0;
  for (int32_t k_len : kept) max_kept = std::max<int64_t>(max_kept, k_len);
  std::vector<int32_t> padded(static_cast<size_t>(L * H * max_kept), -1);
  NpyArray mask;
  mask.dtype = NpyDType::kBool;
  mask.shape = {L, H, n_max};
  mask.data.assign(static_cast<size_t>(L * H * n_max), '\0');
  int64_t offset = 0;
  for (int64_t head = 0; head < L * H; ++head) {
    for (int32_t r = 0; r < kept[static_cast<size_t>(head)]; ++r) {
      const int32_t j = d.kept_indices(static_cast<int>(offset + r));
      padded[static_cast<size_t>(head * max_kept + r)] = j;
      mask.data[static_cast<size_t>(head * n_max + j)] = 1;
    }
    offset += kept[static_cast<size_t>(head)];
  }
  std::vector<std::pair<std::string, NpyArray>> outputs = {
      {"budgets.npy", Int32Array({L, H}, budgets)},
      {"kept_lengths.npy", Int32Array({L, H}, kept)},
      {"kept_indices.npy", Int32Array({L, H, max_kept}, padded)},
      {"keep_mask.npy", std::move(mask)}};
  for (auto [name, tensor] : {std::pair{"compacted_keys.npy", &response->compacted_keys()},
                              std::pair{"compacted_values.npy", &response->compacted_values()}}) {
    if (tensor->shape_size() == 0) continue;
    auto a = NpyFromTensor(*tensor, name);
    if (!a.ok()) return Fail(kServerError, "Compress", a.status());
    outputs.emplace_back(name, std::move(*a));
  }
  for (const auto& [name, array] : outputs) {
    if (auto s = WriteOutput(out_dir, name, array); !s.ok())
      return Fail(kUsageError, "compress", s);
  }

  int64_t total = 0;
  for (int64_t head = 0; head < L * H; ++head) {
    total += in->lengths().empty() ? n_max : in->lengths(static_cast<int>(head));
  }
  std::cout << absl::StrFormat(
      "session %s step %d epoch %d: kept %d of %d tokens (%d evicted) over %d layers x %d kv "
      "heads\n",
      session_id, response->step(), response->epoch(), total - d.evicted_tokens(), total,
      d.evicted_tokens(), L, H);
  std::cout << absl::StrFormat(
      "timings: score %.1f us, allocate %.1f us, select %.1f us, "
      "compact %.1f us, total %.1f us\n",
      response->timings().score_seconds() * 1e6, response->timings().allocate_seconds() * 1e6,
      response->timings().select_seconds() * 1e6, response->timings().compact_seconds() * 1e6,
      response->timings().total_seconds() * 1e6);
  std::cout << "wrote";
  for (const auto& [name, array] : outputs) std::cout << " " << name;
  std::cout << " to " << out_dir << "\n";
  return 0;
}

int Run(int argc, char** argv) {
  const ProgramHelp help{
      .program = "reasonalloc",
      .summary =
          "the ReasonAlloc sidecar's command-line client: health probes, server and "
          "session inspection, one-off compression of .npy tensors, a live metrics "
          "view, layer profiles, and an offline replay of recorded traces.",
      .synopses = {},
      .commands =
          {{"info", "reasonalloc info [--target T] [--json]",
            "The server's version, build, backend, limits, metrics address and profiles."},
           {"health", "reasonalloc health [--target T] [--service NAME] [--timeout_seconds S]",
            "grpc.health.v1 Check; exits 0 only when the service answers SERVING (a "
            "container probe)."},
           {"sessions", "reasonalloc sessions [--target T] [--model M] [--json]",
            "The live sessions: model, policy, budget, memory held, per-layer budgets (tokens "
            "per KV head, the mean over the layer's heads)."},
           {"close", "reasonalloc close SESSION_ID... [--session_token TOKEN]",
            "Closes sessions and releases their arenas."},
           {"compress",
            "reasonalloc compress --queries Q.npy --keys K.npy [--values V.npy] [--lengths "
            "L.npy] --out DIR [--session ID | policy flags]",
            "One compression event on .npy tensors, in an existing session or a temporary one "
            "built from the policy flags; writes the decision (kept indices, per-head "
            "budgets, ...) as .npy files into --out."},
           {"watch",
            "reasonalloc watch [--session ID,...] [--model M] [--pool_interval S] [--count N] "
            "[--plain]",
            "Streams WatchMetrics: one record per compression event and the arena pool's "
            "gauges; a live screen on a terminal, one line per record otherwise."},
           {"profiles", "reasonalloc profiles [--target T] [--json]",
            "The layer profiles the server holds, with their owner and provenance."},
           {"put-profile", "reasonalloc put-profile FILE.json [--overwrite] [--save]",
            "Sends a LayerProfile (JSON) to the server; --save also writes it into the "
            "server's --profile_dir."},
           {"replay",
            "reasonalloc replay --trace DIR [--scorers ...] [--allocators ...] [--budgets ...] "
            "[--csv FILE]",
            "Offline (no server): replays a recorded trace through every scorer x allocator x "
            "budget and prints attention recall."}},
      .sources = {"client/cli/"},
      .footer = absl::StrCat(
          "--target defaults to $REASONALLOC_TARGET, else the server's default socket (",
          kDefaultTarget,
          ").\nExit status: 0 on success, 1 when "
          "the server cannot be reached or refuses or fails a call (its gRPC code and "
          "message are printed), 2 for a usage error (a missing or unknown command, a "
          "wrong file, value or target). An unknown or malformed flag is refused by the flag "
          "parser with status 1.")};
  if (const int rc = MaybePrintHelp(argc, argv, help, std::cout, std::cerr); rc >= 0) return rc;
  const auto spelled = NormalizeFlagSpelling(argc, argv);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::cerr << "usage: reasonalloc COMMAND [flags]; `reasonalloc --help` lists the commands\n";
    return kUsageError;
  }
  const std::string command = args[1];
  auto client = Connect();
  if (!client.ok()) return Fail(kUsageError, "connect", client.status());
  if (command == "replay") return ReplayCommand();  // offline: needs no server
  if (command == "info") return Info(**client);
  if (command == "health") return Health(**client);
  if (command == "sessions") return Sessions(**client);
  if (command == "close") return Close(**client, args);
  if (command == "compress") return CompressCommand(**client);
  if (command == "watch") return WatchCommand(**client);
  if (command == "profiles") return Profiles(**client);
  if (command == "put-profile") return PutProfile(**client, args);
  std::cerr << "reasonalloc: unknown command \"" << command
            << "\"; expected info, health, sessions, close, compress, watch, profiles, "
               "put-profile or replay\n";
  return kUsageError;
}

}  // namespace
}  // namespace reasonalloc

int main(int argc, char** argv) { return reasonalloc::Run(argc, argv); }
