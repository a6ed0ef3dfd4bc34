#include "server/sidecar_service.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <new>
#include <numeric>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/api_defaults.h"
#include "core/blas.h"
#include "core/build_info.h"
#include "core/h2o.h"
#include "core/inline_inputs.h"
#include "core/policy.h"
#include "core/status_macros.h"
#include "proto/grpc_status.h"
#include "server/event_planes.h"
#include "server/external_buffers.h"
#include "server/proto_convert.h"
#include "spdlog/spdlog.h"

namespace reasonalloc {
namespace {

int64_t UnixMillis(absl::Time t) { return absl::ToUnixMillis(t); }

// Runs one handler body; memory exhaustion anywhere in it (a large reply, a profile, a decision)
// becomes RESOURCE_EXHAUSTED for this caller instead of ending the process or reaching gRPC as
// UNKNOWN.
template <typename F>
absl::Status Guarded(absl::string_view method, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat(method,
                     ": the server ran out of memory for this request; send less per call "
                     "or retry later"));
  }
}

uint32_t PlaneBit(v1::MemoryKind m) {
  switch (m) {
    case v1::MEMORY_KIND_INLINE:
      return kInlinePlane;
    case v1::MEMORY_KIND_HOST_SHM:
      return kHostShmPlane;
    case v1::MEMORY_KIND_CUDA_IPC:
      return kCudaIpcPlane;
    default:
      return 0;
  }
}

// The policy registry as GetServerInfo reports it; CUDA sessions only where the server has a
// device.
void FillPolicies(bool cuda, v1::ServerInfo* out) {
  const std::array<v1::MemoryKind, 3> kinds = {v1::MEMORY_KIND_INLINE, v1::MEMORY_KIND_HOST_SHM,
                                               v1::MEMORY_KIND_CUDA_IPC};
  for (const ScorerPolicy& p : ScorerPolicies()) {
    out->add_scorers(std::string(p.name));
    v1::PolicyInfo* info = out->add_policies();
    info->set_kind(v1::PolicyInfo::KIND_SCORER);
    info->set_name(std::string(p.name));
    info->set_summary(std::string(p.summary));
    for (v1::MemoryKind m : kinds) {
      if (m == v1::MEMORY_KIND_CUDA_IPC && !cuda) continue;
      if ((p.managed_planes & PlaneBit(m)) != 0) info->add_managed_memory(m);
      // No advisory CUDA sessions in this build (server/cuda_session_arenas.cc).
      if ((p.advisory_planes & PlaneBit(m)) != 0 && m != v1::MEMORY_KIND_CUDA_IPC) {
        info->add_advisory_memory(m);
      }
    }
    info->set_uses_queries(p.uses_queries);
    info->set_needs_accumulator(p.needs_accumulator);
    info->set_cuda(p.cuda_kernel);
    info->set_default_sinks(p.default_sinks);
  }
  for (const AllocatorPolicy& p : AllocatorPolicies()) {
    out->add_allocators(std::string(p.name));
    v1::PolicyInfo* info = out->add_policies();
    info->set_kind(v1::PolicyInfo::KIND_ALLOCATOR);
    info->set_name(std::string(p.name));
    info->set_summary(std::string(p.summary));
    info->set_uses_layer_profile(p.uses_layer_profile);
    info->set_routes_heads(p.routes_heads);
    info->set_cuda(p.cuda);
  }
}

}  // namespace

SidecarService::SidecarService(Options options, SessionRegistry* registry, Metrics* metrics,
                               ProfileStore* profiles)
    : options_(std::move(options)),
      registry_(registry),
      profiles_(profiles),
      metrics_(metrics),
      started_(absl::Now()),
      events_(options_.max_watchers, options_.watch_queue,
              [metrics](int64_t dropped) { metrics->CountWatchDropped(dropped); }) {
  UpdatePoolGauges();
}

void SidecarService::SetAddresses(std::vector<std::string> listen, std::string metrics) {
  MutexLock lock(&mu_);
  listen_addresses_ = std::move(listen);
  metrics_address_ = std::move(metrics);
}

grpc::Status SidecarService::Finish(absl::string_view method, const absl::Status& status) {
  metrics_->CountRequest(method, static_cast<int>(status.code()));
  if (!status.ok()) {
    const bool client_fault = status.code() != absl::StatusCode::kInternal &&
                              status.code() != absl::StatusCode::kUnknown &&
                              status.code() != absl::StatusCode::kDataLoss;
    if (client_fault) {
      spdlog::debug("{}: {}", std::string(method), status.ToString());
    } else {
      spdlog::error("{}: {}", std::string(method), status.ToString());
    }
  }
  return ToGrpcStatus(status);
}

absl::StatusOr<SidecarService::Caller> SidecarService::Identify(
    const grpc::ServerContext* context) const {
  Caller caller;
  if (options_.peers != nullptr) caller.peer = options_.peers->Lookup(context->peer());
  if (caller.peer.local && !options_.allow_uids.empty() && caller.peer.uid != ::geteuid() &&
      std::find(options_.allow_uids.begin(), options_.allow_uids.end(), caller.peer.uid) ==
          options_.allow_uids.end()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "peer uid ", caller.peer.uid, " may not call this server (--allow_uid ",
        absl::StrJoin(options_.allow_uids, ","), " and the server's own uid ", ::geteuid(), ")"));
  }
  const auto tokens = context->client_metadata().equal_range(kSessionTokenKey);
  for (auto it = tokens.first; it != tokens.second && caller.tokens.size() < 4096; ++it) {
    caller.tokens.emplace_back(it->second.data(), it->second.size());
  }
  return caller;
}

absl::StatusOr<std::shared_ptr<Session>> SidecarService::Use(const grpc::ServerContext* context,
                                                             const std::string& id,
                                                             SessionRegistry::Renew renew) {
  auto caller = Identify(context);
  if (!caller.ok()) return caller.status();
  return Use(*caller, id, renew);
}

absl::StatusOr<std::shared_ptr<Session>> SidecarService::Use(const Caller& caller,
                                                             const std::string& id,
                                                             SessionRegistry::Renew renew) {
  return registry_->Get(id, renew, [&caller](const Session& session) {
    return session.Authorize(caller.peer, caller.tokens);
  });
}

void SidecarService::UpdatePoolGauges() {
  MutexLock lock(&gauges_mu_);
  int64_t capacity_tokens = 0;
  const auto sessions = registry_->List();
  for (const auto& s : sessions) {
    // The engine is held while its config is read: UpdateBudget may replace it meanwhile.
    const auto engine = s->engine();
    const SessionConfig& c = engine->config();
    capacity_tokens += c.model.num_heads_total() * (c.budget.budget + c.budget.buffer);
  }
  metrics_->SetPool(static_cast<int>(sessions.size()), registry_->capacity_bytes(),
                    registry_->reserved_bytes(), capacity_tokens);
}

void SidecarService::OnSessionReleased(Session& session, const char* why) {
  metrics_->CountSessionEnd(why);
  metrics_->AddKeptTokens(-session.Release());
  UpdatePoolGauges();
  spdlog::info("session {} {} (released {} arena bytes)", session.id(), why,
               session.reserved_bytes());
}

void SidecarService::FillSessionInfo(const Session& session, v1::SessionInfo* out) const {
  const auto engine = session.engine();
  const SessionConfig& c = engine->config();
  const Session::State st = session.Snapshot();
  out->set_session_id(session.id());
  SessionConfigToProto(c, out->mutable_model(), out->mutable_budget(), out->mutable_scorer(),
                       out->mutable_allocator());
  out->set_mode(c.managed ? v1::SESSION_MODE_MANAGED : v1::SESSION_MODE_ADVISORY);
  if (const SessionArenas* arenas = session.arenas(); arenas != nullptr) {
    out->set_memory(v1::MEMORY_KIND_HOST_SHM);
    arenas->Describe(out->mutable_arenas());
  } else if (const CudaSessionArenas* cuda = session.cuda_arenas(); cuda != nullptr) {
    out->set_memory(v1::MEMORY_KIND_CUDA_IPC);
    cuda->Describe(out->mutable_arenas());
  } else {
    out->set_memory(v1::MEMORY_KIND_INLINE);
  }
  out->set_client_tag(session.client_tag());
  out->mutable_owner()->set_local(session.owner().local);
  out->mutable_owner()->set_uid(session.owner().uid);
  out->mutable_owner()->set_gid(session.owner().gid);
  out->mutable_owner()->set_pid(session.owner().pid);
  out->set_lease_seconds(absl::ToDoubleSeconds(st.lease));
  out->set_lease_expires_unix_ms(UnixMillis(st.lease_deadline));
  out->set_created_unix_ms(UnixMillis(session.created()));
  out->set_last_step(st.last_step);
  out->set_epoch(st.epoch);
  out->set_evicted_tokens_total(st.evicted_total);
  out->set_reserved_bytes(session.reserved_bytes());
  // Layer budgets before head routing (uniform layers until layer profiles are loaded).
  out->set_profile(session.profile());
  if (auto layers = LayerBudgets(c, engine->layer_demand()); layers.ok()) {
    out->mutable_layer_budgets()->Assign(layers->begin(), layers->end());
  }
  out->mutable_budgets()->Assign(st.budgets.begin(), st.budgets.end());
  out->mutable_kept_lengths()->Assign(st.kept_lengths.begin(), st.kept_lengths.end());
}

grpc::Status SidecarService::GetServerInfo(grpc::ServerContext* context,
                                           const v1::GetServerInfoRequest*, v1::ServerInfo* out) {
  return Finish("GetServerInfo", Guarded("GetServerInfo", [&]() -> absl::Status {
                  if (auto caller = Identify(context); !caller.ok()) {
                    return caller.status();
                  }
                  out->set_version(kVersion);
                  out->set_build(absl::StrCat(kGitRevision, " ", kBuildType,
                                              kCudaBuilt ? " +cuda" : "", " blas=", BlasBackend()));
                  out->set_backend(options_.backend);
                  out->set_device_name(options_.device_name);
                  out->set_device_uuid(options_.device_uuid);
                  out->set_driver_version(options_.driver_version);
                  const uint64_t capacity = registry_->capacity_bytes();
                  out->set_arena_capacity_bytes(capacity);
                  out->set_arena_free_bytes(capacity - registry_->reserved_bytes());
                  FillPolicies(options_.cuda_device >= 0, out);
                  out->add_dtypes(v1::DTYPE_FLOAT32);
                  out->add_dtypes(v1::DTYPE_FLOAT16);
                  out->add_dtypes(v1::DTYPE_BFLOAT16);
                  out->add_memory_kinds(v1::MEMORY_KIND_INLINE);
                  out->add_memory_kinds(v1::MEMORY_KIND_HOST_SHM);
                  if (options_.cuda_device >= 0) out->add_memory_kinds(v1::MEMORY_KIND_CUDA_IPC);
                  out->set_layout_version(1);
                  {
                    MutexLock lock(&mu_);
                    for (const auto& a : listen_addresses_) out->add_listen_addresses(a);
                    out->set_metrics_address(metrics_address_);
                  }
                  out->set_max_message_bytes(options_.max_message_bytes);
                  out->set_sessions(registry_->size());
                  out->set_uptime_seconds(absl::ToDoubleSeconds(absl::Now() - started_));
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::CreateSession(grpc::ServerContext* context,
                                           const v1::CreateSessionRequest* request,
                                           v1::CreateSessionResponse* response) {
  auto run = [&]() -> absl::Status {
    auto caller = Identify(context);
    if (!caller.ok()) return caller.status();
    if (draining_.load()) return absl::UnavailableError("the server is draining");
    bool host_shm = false;
    bool cuda_ipc = false;
    switch (request->memory()) {
      case v1::MEMORY_KIND_UNSPECIFIED:
      case v1::MEMORY_KIND_INLINE:
        break;
      case v1::MEMORY_KIND_HOST_SHM:
        host_shm = true;
        break;
      case v1::MEMORY_KIND_CUDA_IPC:
        if (options_.cuda_device < 0) {
          return absl::FailedPreconditionError(absl::StrCat(
              "memory = MEMORY_KIND_CUDA_IPC needs a server started with --device cuda:N; this "
              "one computes on ",
              options_.backend));
        }
        cuda_ipc = true;
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat(
            "memory = ", static_cast<int>(request->memory()), " is not a known MemoryKind"));
    }
    if (request->client_tag().size() > 256) {
      return absl::InvalidArgumentError(absl::StrCat("client_tag is ", request->client_tag().size(),
                                                     " bytes long; at most 256 allowed"));
    }
    auto config = SessionConfigFromProto(*request);
    if (!config.ok()) return config.status();
    auto lease = registry_->LeaseFor(request->lease_seconds(), "lease_seconds");
    if (!lease.ok()) return lease.status();
    if ((host_shm || cuda_ipc) &&
        int64_t{config->budget.budget} + config->budget.buffer > config->model.max_context) {
      // A head's arena region holds budget + buffer rows, and positions end at max_context.
      return absl::InvalidArgumentError(absl::StrCat(
          "budget.budget + budget.buffer = ", config->budget.budget, " + ", config->budget.buffer,
          " exceeds model.max_context = ", config->model.max_context,
          "; an arena session's heads hold budget + buffer rows, so lower budget.buffer or raise "
          "model.max_context"));
    }
    // What the scorer supports on this data plane (core/policy.cc).
    const ScorerPolicy& scorer = PolicyOf(config->scorer.kind);
    const uint32_t plane = cuda_ipc ? kCudaIpcPlane : host_shm ? kHostShmPlane : kInlinePlane;
    if (((config->managed ? scorer.managed_planes : scorer.advisory_planes) & plane) == 0) {
      const v1::MemoryKind memory = cuda_ipc   ? v1::MEMORY_KIND_CUDA_IPC
                                    : host_shm ? v1::MEMORY_KIND_HOST_SHM
                                               : v1::MEMORY_KIND_INLINE;
      const v1::SessionMode mode =
          config->managed ? v1::SESSION_MODE_MANAGED : v1::SESSION_MODE_ADVISORY;
      std::string supported;
      for (v1::MemoryKind m :
           {v1::MEMORY_KIND_INLINE, v1::MEMORY_KIND_HOST_SHM, v1::MEMORY_KIND_CUDA_IPC}) {
        if (((config->managed ? scorer.managed_planes : scorer.advisory_planes) & PlaneBit(m)) !=
            0) {
          absl::StrAppend(&supported, supported.empty() ? "" : ", ", v1::MemoryKind_Name(m));
        }
      }
      return absl::UnimplementedError(absl::StrCat(
          "scorer.name \"", scorer.name, "\" with mode = ", v1::SessionMode_Name(mode),
          " and memory = ", v1::MemoryKind_Name(memory),
          " is not implemented in this build yet; with this mode it runs on: ", supported));
    }
    // ReasonAlloc's layer level follows the model's profile (or the one named); without one the
    // layers are uniform and the answer says so.
    std::vector<double> demand;
    std::string profile_name;
    std::string warning;
    if (AllocatorOf(config->allocator.kind).UsesLayerProfile(config->allocator)) {
      const bool named = !config->allocator.profile.empty();
      const std::string name = named ? config->allocator.profile : config->model.name;
      if (named && !ProfileStore::ValidName(name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "allocator.profile \"", name.substr(0, 64),
            "\" is not a profile name (1-128 characters of letters, digits, '-', '_' and '.', "
            "not starting with '.')"));
      }
      auto profile = profiles_->Get(name);
      // The profile named after the model is used only when the server or the caller put it: a
      // neighbour's profile under that name must not steer this caller's sessions.
      if (profile.ok() && !named && profile->owner() != "server" &&
          profile->owner() != ProfileStore::OwnerOf(&caller->peer)) {
        warning = absl::StrCat("the layer profile \"", name, "\" belongs to ", profile->owner(),
                               ", not to the server or the caller: uniform layer budgets (name it "
                               "in allocator.profile to use it)");
        profile = absl::NotFoundError("not usable");
      }
      if (profile.ok()) {
        if (auto s = ProfileStore::CheckGeometry(*profile, config->model); !s.ok()) return s;
        demand.assign(profile->demand().begin(), profile->demand().end());
        profile_name = name;
      } else if (named) {
        return absl::FailedPreconditionError(
            absl::StrCat("allocator.profile \"", name.substr(0, 128), "\" is not loaded"));
      } else if (warning.empty()) {
        warning = absl::StrCat("no layer profile for model \"", name,
                               "\": uniform layer budgets (PutProfile or --profile-dir adds one)");
      }
    }
    const std::vector<double> layer_demand = demand;
    auto session = registry_->Create(*config, request->client_tag(), *lease, std::move(demand),
                                     profile_name, caller->peer);
    if (!session.ok()) return session.status();
    if (cuda_ipc) {
      auto engine = gpu_engines_.Get(options_.cuda_device, *config, layer_demand);
      if (!engine.ok()) {
        (void)registry_->Close((*session)->id());
        return engine.status();
      }
      auto arenas = CudaSessionArenas::Create(*config, std::move(engine).value());
      if (!arenas.ok()) {
        (void)registry_->Close((*session)->id());
        return arenas.status();
      }
      (*session)->AttachCudaArenas(std::move(arenas).value());
    }
    if (host_shm) {
      auto arenas = SessionArenas::Create(*config);
      if (!arenas.ok()) {
        (void)registry_->Close((*session)->id());
        return arenas.status();
      }
      (*session)->AttachArenas(std::move(arenas).value());
    }
    FillSessionInfo(**session, response->mutable_session());
    response->set_session_token((*session)->token());
    if (!warning.empty()) {
      response->add_warnings(warning);
      spdlog::warn("session {}: {}", (*session)->id(), warning);
    }
    UpdatePoolGauges();
    spdlog::info(
        "session {} created: model {} L={} Hq={} Hkv={} d={} B={} scorer={} allocator={} "
        "({} arena bytes), owner {}",
        (*session)->id(), config->model.name, config->model.num_layers, config->model.num_q_heads,
        config->model.num_kv_heads, config->model.head_dim, config->budget.budget,
        std::string(NameOf(config->scorer.kind)), std::string(NameOf(config->allocator.kind)),
        (*session)->reserved_bytes(), caller->peer.Describe());
    return absl::OkStatus();
  };
  return Finish("CreateSession", Guarded("CreateSession", run));
}

grpc::Status SidecarService::GetSession(grpc::ServerContext* context,
                                        const v1::GetSessionRequest* request,
                                        v1::SessionInfo* response) {
  return Finish("GetSession", Guarded("GetSession", [&]() -> absl::Status {
                  auto session = Use(context, request->session_id(), SessionRegistry::Renew::kNo);
                  if (session.ok()) FillSessionInfo(**session, response);
                  return session.status();
                }));
}

grpc::Status SidecarService::ListSessions(grpc::ServerContext* context,
                                          const v1::ListSessionsRequest* request,
                                          v1::ListSessionsResponse* response) {
  return Finish("ListSessions", Guarded("ListSessions", [&]() -> absl::Status {
                  auto caller = Identify(context);
                  if (!caller.ok()) return caller.status();
                  // A Unix-socket peer sees its own uid's sessions; root, the server's uid and
                  // credential-less (TCP) peers see all (without their tokens, which are never
                  // listed).
                  const bool sees_all = !caller->peer.local || caller->peer.uid == 0 ||
                                        caller->peer.uid == ::geteuid();
                  for (const auto& s : registry_->List()) {
                    if (!request->model_name().empty() && s->model().name != request->model_name())
                      continue;
                    if (!sees_all && !s->OwnedBy(caller->peer)) continue;
                    FillSessionInfo(*s, response->add_sessions());
                  }
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::CloseSession(grpc::ServerContext* context,
                                          const v1::CloseSessionRequest* request,
                                          v1::CloseSessionResponse* response) {
  return Finish("CloseSession", Guarded("CloseSession", [&]() -> absl::Status {
                  // Closing an unknown session is OK (idempotent); closing another's is not.
                  if (auto s = Use(context, request->session_id(), SessionRegistry::Renew::kNo);
                      !s.ok() && s.status().code() != absl::StatusCode::kNotFound) {
                    return s.status();
                  }
                  auto released = registry_->Close(request->session_id());
                  if (released.ok()) {
                    response->set_existed(*released > 0);
                    response->set_released_bytes(*released);
                  }
                  return released.status();
                }));
}

grpc::Status SidecarService::KeepAlive(grpc::ServerContext* context,
                                       const v1::KeepAliveRequest* request,
                                       v1::KeepAliveResponse* response) {
  return Finish("KeepAlive", Guarded("KeepAlive", [&]() -> absl::Status {
                  auto run = [&]() -> absl::Status {
                    absl::Duration lease = absl::ZeroDuration();
                    if (request->lease_seconds() != 0) {
                      auto l = registry_->LeaseFor(request->lease_seconds(), "lease_seconds");
                      if (!l.ok()) return l.status();
                      lease = *l;
                    }
                    auto session =
                        Use(context, request->session_id(), SessionRegistry::Renew::kYes);
                    if (!session.ok()) return session.status();
                    response->set_lease_expires_unix_ms(UnixMillis((*session)->Renew(lease)));
                    return absl::OkStatus();
                  };
                  return run();
                }));
}

grpc::Status SidecarService::UpdateBudget(grpc::ServerContext* context,
                                          const v1::UpdateBudgetRequest* request,
                                          v1::SessionInfo* response) {
  return Finish("UpdateBudget", Guarded("UpdateBudget", [&]() -> absl::Status {
                  auto current = Use(context, request->session_id(), SessionRegistry::Renew::kNo);
                  if (!current.ok()) return current.status();
                  if ((*current)->arenas() != nullptr || (*current)->cuda_arenas() != nullptr) {
                    return absl::FailedPreconditionError(
                        "budget cannot change on a MEMORY_KIND_HOST_SHM or MEMORY_KIND_CUDA_IPC "
                        "session (its arenas are sized by it); create a new session");
                  }
                  auto session = registry_->UpdateBudget(request->session_id(), request->budget());
                  if (session.ok()) {
                    FillSessionInfo(**session, response);
                    UpdatePoolGauges();
                  }
                  return session.status();
                }));
}

grpc::Status SidecarService::RegisterBuffers(grpc::ServerContext* context,
                                             const v1::RegisterBuffersRequest* request,
                                             v1::RegisterBuffersResponse*) {
  auto run = [&]() -> absl::Status {
    auto caller = Identify(context);
    if (!caller.ok()) return caller.status();
    auto session = Use(*caller, request->session_id(), SessionRegistry::Renew::kYes);
    if (!session.ok()) return session.status();
    SessionArenas* arenas = (*session)->arenas();
    if (arenas == nullptr || !arenas->advisory()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "session_id ", request->session_id(),
          " is not an advisory MEMORY_KIND_HOST_SHM session; only those register the worker's "
          "buffers (managed sessions get the server's arenas, inline ones send tensors)"));
    }
    // Buffers never change under a running event.
    auto guard = (*session)->BeginCompress();
    if (!guard.ok()) return guard.status();
    auto buffers =
        ExternalBuffers::Open(request->buffers(), (*session)->engine()->config(), caller->peer);
    if (!buffers.ok()) {
      const absl::StatusCode code = buffers.status().code();
      metrics_->CountIpcImportFailure(code == absl::StatusCode::kUnimplemented ? "unsupported"
                                      : code == absl::StatusCode::kNotFound ||
                                              code == absl::StatusCode::kPermissionDenied
                                          ? "open_failed"
                                          : "bad_handle");
      return buffers.status();
    }
    arenas->Register(std::move(buffers).value());
    spdlog::info("session {}: buffers registered", request->session_id());
    return absl::OkStatus();
  };
  return Finish("RegisterBuffers", Guarded("RegisterBuffers", run));
}

absl::StatusOr<SidecarService::CompressJob> SidecarService::MakeCompressJob(
    grpc::ServerContext* context, const v1::CompressRequest& request,
    v1::CompressResponse* response) {
  CompressJob job;
  job.t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(job.session, Use(context, request.session_id(), SessionRegistry::Renew::kYes));
  Session& session = *job.session;
  PlaneLimits limits;
  limits.max_event_bytes = options_.max_event_bytes;
  limits.max_message_bytes = options_.max_message_bytes;
  limits.testing_delay = options_.testing_compress_delay;
  limits.cancelled = [context] { return context != nullptr && context->IsCancelled(); };
  limits.on_device_batch = [this](int events) { metrics_->ObserveDeviceBatch(events); };
  // The memory kind decides the plane; the transaction's order is the same for all of them.
  bool arena_answer = true;
  if (SessionArenas* arenas = session.arenas(); arenas != nullptr) {
    job.plane = std::make_unique<HostShmPlane>(request, *arenas, std::move(limits));
  } else if (CudaSessionArenas* cuda = session.cuda_arenas(); cuda != nullptr) {
    job.plane = std::make_unique<CudaPlane>(request, *cuda, std::move(limits));
  } else {
    job.plane = std::make_unique<InlinePlane>(request, response, std::move(limits));
    arena_answer = false;
  }
  const int64_t step = request.step();
  Session* s = job.session.get();
  job.record = [this, s, step, response, arena_answer](const EventOutcome& outcome) {
    if (arena_answer) AnswerArenaEvent(*s, step, outcome, response);
    RecordEvent(*s, step, outcome.committed, outcome.decision);
  };
  return job;
}

absl::Status SidecarService::DoCompress(grpc::ServerContext* context,
                                        const v1::CompressRequest& request,
                                        v1::CompressResponse* response) {
  ASSIGN_OR_RETURN(CompressJob job, MakeCompressJob(context, request, response));
  return RunCompressEvent(*job.session, request.step(), *job.plane, job.t0, job.record).status();
}

void SidecarService::RecordEvent(const Session& session, int64_t step,
                                 const Session::CommitResult& committed, const Decision& decision) {
  const auto engine = session.engine();  // held: UpdateBudget may replace the session's engine
  const SessionConfig& config = engine->config();
  metrics_->ObserveCompress(decision.seconds);
  metrics_->ObserveEvent(NameOf(config.scorer.kind), NameOf(config.allocator.kind),
                         config.model.name, decision);
  metrics_->AddKeptTokens(committed.kept_delta);
  if (events_.active()) PublishEvent(session, step, committed.epoch, decision);
}

grpc::Status SidecarService::Compress(grpc::ServerContext* context,
                                      const v1::CompressRequest* request,
                                      v1::CompressResponse* response) {
  return Finish("Compress",
                Guarded("Compress", [&] { return DoCompress(context, *request, response); }));
}

grpc::Status SidecarService::CompressStream(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::CompressBatchResult, v1::CompressBatch>* stream) {
  v1::CompressBatch batch;
  while (!context->IsCancelled() && stream->Read(&batch)) {
    v1::CompressBatchResult out;
    // One job per request; the events of sessions sharing a CUDA engine decide together
    // (RunCompressEvents), everything else as Compress would.
    std::vector<absl::Status> status(static_cast<size_t>(batch.requests_size()));
    std::vector<CompressJob> prepared;
    std::vector<EventJob> jobs;
    std::vector<size_t> job_of;  // request index of each job
    for (int i = 0; i < batch.requests_size(); ++i) {
      v1::CompressResult* result = out.add_results();
      status[static_cast<size_t>(i)] = Guarded("CompressStream", [&]() -> absl::Status {
        ASSIGN_OR_RETURN(CompressJob job,
                         MakeCompressJob(context, batch.requests(i), result->mutable_response()));
        prepared.push_back(std::move(job));
        job_of.push_back(static_cast<size_t>(i));
        return absl::OkStatus();
      });
    }
    for (size_t k = 0; k < prepared.size(); ++k) {
      EventJob j;
      j.session = prepared[k].session.get();
      j.step = batch.requests(static_cast<int>(job_of[k])).step();
      j.plane = prepared[k].plane.get();
      // t0 stays unset: each event's time starts when it starts, as for Compress.
      j.record = prepared[k].record;
      jobs.push_back(std::move(j));
    }
    const absl::Status run = Guarded("CompressStream", [&] {
      RunCompressEvents(jobs);
      return absl::OkStatus();
    });
    for (size_t k = 0; k < jobs.size(); ++k) {
      // Out of memory part-way: the events that ran keep their own outcome (some are committed);
      // only those it never reached report it.
      status[job_of[k]] = !run.ok() && IsNotRun(jobs[k].outcome) ? run : jobs[k].outcome.status();
    }
    for (int i = 0; i < batch.requests_size(); ++i) {
      const absl::Status& s = status[static_cast<size_t>(i)];
      metrics_->CountRequest("CompressStream.item", static_cast<int>(s.code()));
      if (!s.ok()) {
        v1::CompressResult* result = out.mutable_results(i);
        result->clear_response();
        result->mutable_error()->set_code(static_cast<int>(s.code()));
        result->mutable_error()->set_message(std::string(s.message()));
      }
    }
    // Every event of the batch is committed by now: a result that cannot be delivered must end the
    // stream with an error, never look like a clean end.
    if (out.ByteSizeLong() > options_.max_message_bytes) {
      return Finish(
          "CompressStream",
          absl::ResourceExhaustedError(absl::StrCat(
              "the batch result is ", out.ByteSizeLong(), " bytes, above max_message_bytes ",
              options_.max_message_bytes, "; send fewer requests per CompressBatch")));
    }
    if (!stream->Write(out)) {
      return Finish(
          "CompressStream",
          absl::CancelledError("the client stopped reading before all results were sent"));
    }
  }
  return Finish("CompressStream", absl::OkStatus());
}

grpc::Status SidecarService::StartCalibration(grpc::ServerContext* context,
                                              const v1::StartCalibrationRequest* request,
                                              v1::CalibrationStatus* response) {
  return Finish(
      "StartCalibration", Guarded("StartCalibration", [&]() -> absl::Status {
        auto run = [&]() -> absl::Status {
          auto session = Use(context, request->session_id(), SessionRegistry::Renew::kYes);
          if (!session.ok()) return session.status();
          const double rho = request->rho() == 0 ? kDefaultCalibrationRho : request->rho();
          const int stride = request->stride() == 0 ? kDefaultCalibrationStride : request->stride();
          if ((*session)->arenas() != nullptr || (*session)->cuda_arenas() != nullptr) {
            return absl::UnimplementedError(
                "calibration of a MEMORY_KIND_HOST_SHM or MEMORY_KIND_CUDA_IPC session is not "
                "implemented in this build yet "
                "(the full cache outgrows its arenas); calibrate with a MEMORY_KIND_INLINE "
                "session");
          }
          if (auto s = (*session)->StartCalibration(rho, stride); !s.ok()) return s;
          response->set_session_id(request->session_id());
          const auto samples = (*session)->CalibrationSamples();
          response->mutable_samples()->Assign(samples.begin(), samples.end());
          return absl::OkStatus();
        };
        return run();
      }));
}

grpc::Status SidecarService::FinishCalibration(grpc::ServerContext* context,
                                               const v1::FinishCalibrationRequest* request,
                                               v1::LayerProfile* response) {
  auto run = [&]() -> absl::Status {
    auto session = Use(context, request->session_id(), SessionRegistry::Renew::kYes);
    if (!session.ok()) return session.status();
    auto caller = Identify(context);
    if (!caller.ok()) return caller.status();
    const std::string name =
        request->profile_name().empty() ? (*session)->model().name : request->profile_name();
    if (!ProfileStore::ValidName(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          request->profile_name().empty() ? "profile_name (empty: the session's model.name) \""
                                          : "profile_name \"",
          name.substr(0, 64),
          "\" must be 1-128 characters of letters, digits, '-', '_' and '.' (not starting with "
          "'.'); the calibration is kept, retry with a valid name"));
    }
    const auto engine = (*session)->engine();
    const SessionConfig& c = engine->config();
    v1::LayerProfile p;
    // The profile is stored before calibration ends: a refused store leaves it running.
    auto keep = [&](const Session::Calibration& calibration) -> absl::Status {
      p.set_name(name);
      v1::BudgetConfig unused_budget;
      v1::ScorerConfig unused_scorer;
      v1::AllocatorConfig unused_allocator;
      SessionConfigToProto(c, p.mutable_model(), &unused_budget, &unused_scorer, &unused_allocator);
      p.set_rho(calibration.rho);
      p.mutable_demand()->Assign(calibration.demand.begin(), calibration.demand.end());
      p.mutable_samples()->Assign(calibration.samples.begin(), calibration.samples.end());
      p.set_provenance(absl::StrCat("measured by reasonalloc-server ", kVersion, " (", kGitRevision,
                                    ") in session ", (*session)->id(), " at ",
                                    absl::FormatTime(absl::Now(), absl::UTCTimeZone())));
      return profiles_->Put(p, /*overwrite=*/true, request->save(), &caller->peer);
    };
    if (auto s = (*session)->FinishCalibration(keep); !s.ok()) return s;
    auto stored = profiles_->Get(name);
    if (!stored.ok()) return stored.status();
    *response = *std::move(stored);
    spdlog::info("layer profile \"{}\" calibrated ({} layers)", name, p.demand_size());
    return absl::OkStatus();
  };
  return Finish("FinishCalibration", Guarded("FinishCalibration", run));
}

grpc::Status SidecarService::GetProfile(grpc::ServerContext* context,
                                        const v1::GetProfileRequest* request,
                                        v1::LayerProfile* response) {
  return Finish("GetProfile", Guarded("GetProfile", [&]() -> absl::Status {
                  if (auto caller = Identify(context); !caller.ok()) return caller.status();
                  auto p = profiles_->Get(request->name());
                  if (p.ok()) *response = *std::move(p);
                  return p.status();
                }));
}

grpc::Status SidecarService::PutProfile(grpc::ServerContext* context,
                                        const v1::PutProfileRequest* request,
                                        v1::PutProfileResponse*) {
  auto caller = Identify(context);
  if (!caller.ok()) return Finish("PutProfile", caller.status());
  return Finish("PutProfile", Guarded("PutProfile", [&] {
                  return profiles_->Put(request->profile(), request->overwrite(), request->save(),
                                        &caller->peer);
                }));
}

grpc::Status SidecarService::ListProfiles(grpc::ServerContext* context,
                                          const v1::ListProfilesRequest*,
                                          v1::ListProfilesResponse* response) {
  return Finish("ListProfiles", Guarded("ListProfiles", [&]() -> absl::Status {
                  if (auto caller = Identify(context); !caller.ok()) return caller.status();
                  for (auto& p : profiles_->List()) *response->add_profiles() = std::move(p);
                  return absl::OkStatus();
                }));
}

void SidecarService::PublishEvent(const Session& session, int64_t step, uint64_t epoch,
                                  const Decision& decision) {
  v1::CompressEvent e;
  e.set_session_id(session.id());
  e.set_model_name(session.model().name);
  e.set_step(step);
  e.set_epoch(epoch);
  int32_t lo = 0;
  int32_t hi = 0;
  for (int l = 0; l < decision.num_layers; ++l) {
    int32_t layer = 0;
    for (int h = 0; h < decision.num_kv_heads; ++h) {
      const int32_t b = decision.budgets[static_cast<size_t>(l * decision.num_kv_heads + h)];
      layer += b;
      lo = (l == 0 && h == 0) ? b : std::min(lo, b);
      hi = std::max(hi, b);
    }
    // Tokens per KV head, the mean over the layer's heads (rounded): the unit of --budget and
    // of GetSession's layer_budgets.
    e.add_layer_budgets(static_cast<int32_t>(
        std::lround(static_cast<double>(layer) / std::max(decision.num_kv_heads, 1))));
  }
  e.set_head_budget_spread(lo > 0 ? static_cast<double>(hi) / lo : 0.0);
  e.set_evicted_tokens(decision.evicted_tokens);
  TimingsToProto(decision.seconds, e.mutable_timings());
  e.set_unix_ms(UnixMillis(absl::Now()));
  events_.Publish(e);
}

grpc::Status SidecarService::WatchMetrics(grpc::ServerContext* context,
                                          const v1::WatchMetricsRequest* request,
                                          grpc::ServerWriter<v1::MetricsEvent>* writer) {
  return Finish("WatchMetrics", Guarded("WatchMetrics", [&]() -> absl::Status {
                  return DoWatch(context, *request, writer);
                }));
}

absl::Status SidecarService::DoWatch(grpc::ServerContext* context,
                                     const v1::WatchMetricsRequest& request,
                                     grpc::ServerWriter<v1::MetricsEvent>* writer) {
  if (auto caller = Identify(context); !caller.ok()) return caller.status();
  if (draining_.load()) return absl::UnavailableError("the server is draining");
  const double interval = request.pool_interval_seconds();
  if (!std::isfinite(interval) || (interval != 0 && (interval < 0.05 || interval > 3600))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pool_interval_seconds = ", interval, " must be 0 (no pool gauges) or in [0.05, 3600]"));
  }
  std::set<std::string> sessions;
  for (int i = 0; i < request.session_ids_size(); ++i) {
    if (auto s = CheckSessionId(request.session_ids(i)); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("session_ids[", i, "]: ", s.message()));
    }
    sessions.insert(request.session_ids(i));
  }
  if (request.model_name().size() > 256) {
    return absl::InvalidArgumentError("model_name is longer than 256 bytes");
  }
  auto watcher = events_.Subscribe(std::move(sessions), request.model_name());
  if (!watcher.ok()) return watcher.status();
  metrics_->SetWatchers(events_.watchers());
  struct Unsubscribe {
    SidecarService* self;
    std::shared_ptr<EventHub::Watcher> w;
    ~Unsubscribe() {
      self->events_.Unsubscribe(w);
      self->metrics_->SetWatchers(self->events_.watchers());
    }
  } unsubscribe{this, *watcher};

  // Cancellation is polled (a check costs ~100 µs), events and pool ticks are waited for.
  constexpr absl::Duration kPoll = absl::Milliseconds(100);
  constexpr absl::Duration kBatch = absl::Milliseconds(20);
  absl::Time next_pool = absl::Now();
  while (true) {
    if (context->IsCancelled()) return absl::CancelledError("the watcher went away");
    if ((*watcher)->closed()) return absl::OkStatus();  // drain: the stream ends cleanly
    absl::Time now = absl::Now();
    if (interval > 0 && now >= next_pool) {
      v1::MetricsEvent m;
      v1::PoolGauges* pool = m.mutable_pool();
      pool->set_sessions(registry_->size());
      pool->set_arena_capacity_bytes(registry_->capacity_bytes());
      pool->set_arena_reserved_bytes(registry_->reserved_bytes());
      pool->set_unix_ms(UnixMillis(now));
      if (!writer->Write(m)) return absl::CancelledError("the watcher went away");
      next_pool = now + absl::Seconds(interval);
    }
    absl::Time deadline = now + kPoll;
    if (interval > 0) deadline = std::min(deadline, next_pool);
    // Drain what is queued before polling for cancellation again.
    v1::CompressEvent event;
    uint64_t dropped = 0;
    int sent = 0;
    for (; sent < 256 && (*watcher)->Next(deadline, &event, &dropped); ++sent) {
      v1::MetricsEvent m;
      *m.mutable_compress() = std::move(event);
      m.set_dropped_before(dropped);
      if (!writer->Write(m)) return absl::CancelledError("the watcher went away");
      deadline = absl::Now();  // only what is already queued
    }
    // Let events accumulate for a moment rather than waking this thread (and the watcher's) once
    // per Compress: on a busy node the wake-ups, not the bytes, are what a watcher costs.
    if (sent > 0) absl::SleepFor(kBatch);
  }
}

}  // namespace reasonalloc
