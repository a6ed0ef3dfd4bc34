#include "server/sidecar_service.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/blas.h"
#include "core/build_info.h"
#include "core/policy.h"
#include "core/status_macros.h"
#include "proto/grpc_status.h"
#include "server/proto_convert.h"
#include "spdlog/spdlog.h"

namespace reasonalloc {
namespace {

int64_t UnixMillis(absl::Time t) { return absl::ToUnixMillis(t); }

// The policy registry as GetServerInfo reports it; CUDA sessions only where the server has a
// device.
void FillPolicies(bool cuda, v1::ServerInfo* out) {
  for (const ScorerPolicy& p : ScorerPolicies()) {
    out->add_scorers(std::string(p.name));
    v1::PolicyInfo* info = out->add_policies();
    info->set_kind(v1::PolicyInfo::KIND_SCORER);
    info->set_name(std::string(p.name));
    info->set_summary(std::string(p.summary));
    for (MemoryKind m : kMemoryKinds) {
      if (m == MemoryKind::kCudaIpc && !cuda) continue;
      if ((p.managed_planes & PlaneBit(m)) != 0) info->add_managed_memory(MemoryKindToProto(m));
      // No advisory CUDA sessions in this build (server/cuda_session_arenas.cc).
      if ((p.advisory_planes & PlaneBit(m)) != 0 && m != MemoryKind::kCudaIpc) {
        info->add_advisory_memory(MemoryKindToProto(m));
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

SidecarService::SidecarService(Options options, Sidecar* app, Metrics* metrics)
    : options_(std::move(options)), app_(app), metrics_(metrics) {}

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

Caller SidecarService::CallerOf(const grpc::ServerContext* context) const {
  Caller caller;
  if (options_.peers != nullptr) caller.peer = options_.peers->Lookup(context->peer());
  const auto tokens = context->client_metadata().equal_range(kSessionTokenKey);
  for (auto it = tokens.first; it != tokens.second && caller.tokens.size() < 4096; ++it) {
    caller.tokens.emplace_back(it->second.data(), it->second.size());
  }
  return caller;
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
  return Finish("GetServerInfo", GuardMemory("GetServerInfo", [&]() -> absl::Status {
                  RETURN_IF_ERROR(app_->Admit(CallerOf(context)));
                  const Sidecar::Options& o = app_->options();
                  out->set_version(kVersion);
                  out->set_build(absl::StrCat(kGitRevision, " ", kBuildType,
                                              kCudaBuilt ? " +cuda" : "", " blas=", BlasBackend()));
                  out->set_backend(o.backend);
                  out->set_device_name(options_.device_name);
                  out->set_device_uuid(options_.device_uuid);
                  out->set_driver_version(options_.driver_version);
                  const PoolState pool = app_->Pool();
                  out->set_arena_capacity_bytes(pool.capacity_bytes);
                  out->set_arena_free_bytes(pool.capacity_bytes - pool.reserved_bytes);
                  FillPolicies(o.cuda_device >= 0, out);
                  out->add_dtypes(v1::DTYPE_FLOAT32);
                  out->add_dtypes(v1::DTYPE_FLOAT16);
                  out->add_dtypes(v1::DTYPE_BFLOAT16);
                  out->add_memory_kinds(v1::MEMORY_KIND_INLINE);
                  out->add_memory_kinds(v1::MEMORY_KIND_HOST_SHM);
                  if (o.cuda_device >= 0) out->add_memory_kinds(v1::MEMORY_KIND_CUDA_IPC);
                  out->set_layout_version(1);
                  {
                    MutexLock lock(&mu_);
                    for (const auto& a : listen_addresses_) out->add_listen_addresses(a);
                    out->set_metrics_address(metrics_address_);
                  }
                  out->set_max_message_bytes(options_.max_message_bytes);
                  out->set_sessions(pool.sessions);
                  out->set_uptime_seconds(absl::ToDoubleSeconds(absl::Now() - app_->started()));
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::CreateSession(grpc::ServerContext* context,
                                           const v1::CreateSessionRequest* request,
                                           v1::CreateSessionResponse* response) {
  return Finish("CreateSession", GuardMemory("CreateSession", [&]() -> absl::Status {
                  const Caller caller = CallerOf(context);
                  // The caller and the drain come before the request's own fields.
                  RETURN_IF_ERROR(app_->AcceptingSessions(caller));
                  SessionSpec spec;
                  ASSIGN_OR_RETURN(spec.memory, MemoryKindFromProto(request->memory(), "memory"));
                  spec.client_tag = request->client_tag();
                  ASSIGN_OR_RETURN(spec.config, SessionConfigFromProto(*request));
                  spec.lease_seconds = request->lease_seconds();
                  ASSIGN_OR_RETURN(const CreatedSession created, app_->CreateSession(caller, spec));
                  FillSessionInfo(*created.session, response->mutable_session());
                  response->set_session_token(created.session->token());
                  for (const std::string& w : created.warnings) response->add_warnings(w);
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::GetSession(grpc::ServerContext* context,
                                        const v1::GetSessionRequest* request,
                                        v1::SessionInfo* response) {
  return Finish("GetSession", GuardMemory("GetSession", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(const auto session,
                                   app_->GetSession(CallerOf(context), request->session_id()));
                  FillSessionInfo(*session, response);
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::ListSessions(grpc::ServerContext* context,
                                          const v1::ListSessionsRequest* request,
                                          v1::ListSessionsResponse* response) {
  return Finish("ListSessions", GuardMemory("ListSessions", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(const auto sessions,
                                   app_->ListSessions(CallerOf(context), request->model_name()));
                  for (const auto& s : sessions) FillSessionInfo(*s, response->add_sessions());
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::CloseSession(grpc::ServerContext* context,
                                          const v1::CloseSessionRequest* request,
                                          v1::CloseSessionResponse* response) {
  return Finish("CloseSession", GuardMemory("CloseSession", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(const uint64_t released,
                                   app_->CloseSession(CallerOf(context), request->session_id()));
                  response->set_existed(released > 0);
                  response->set_released_bytes(released);
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::KeepAlive(grpc::ServerContext* context,
                                       const v1::KeepAliveRequest* request,
                                       v1::KeepAliveResponse* response) {
  return Finish("KeepAlive", GuardMemory("KeepAlive", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(const absl::Time deadline,
                                   app_->KeepAlive(CallerOf(context), request->session_id(),
                                                   request->lease_seconds()));
                  response->set_lease_expires_unix_ms(UnixMillis(deadline));
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::UpdateBudget(grpc::ServerContext* context,
                                          const v1::UpdateBudgetRequest* request,
                                          v1::SessionInfo* response) {
  return Finish("UpdateBudget", GuardMemory("UpdateBudget", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(const auto session,
                                   app_->UpdateBudget(CallerOf(context), request->session_id(),
                                                      request->budget()));
                  FillSessionInfo(*session, response);
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::RegisterBuffers(grpc::ServerContext* context,
                                             const v1::RegisterBuffersRequest* request,
                                             v1::RegisterBuffersResponse*) {
  return Finish("RegisterBuffers", GuardMemory("RegisterBuffers", [&] {
                  return app_->RegisterBuffers(CallerOf(context), request->session_id(),
                                               request->buffers());
                }));
}

grpc::Status SidecarService::Compress(grpc::ServerContext* context,
                                      const v1::CompressRequest* request,
                                      v1::CompressResponse* response) {
  const auto t0 = std::chrono::steady_clock::now();
  return Finish("Compress", GuardMemory("Compress", [&]() -> absl::Status {
                  CompressCall call = CompressCallFromProto(*request);
                  call.cancelled = [context] { return context->IsCancelled(); };
                  call.answer = WireAnswerSink(*request, response, options_.max_message_bytes);
                  ASSIGN_OR_RETURN(const EventOutcome outcome,
                                   app_->Compress(CallerOf(context), call, t0));
                  CompressOutcomeToProto(call, outcome, response);
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::CompressStream(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::CompressBatchResult, v1::CompressBatch>* stream) {
  v1::CompressBatch batch;
  while (!context->IsCancelled() && stream->Read(&batch)) {
    v1::CompressBatchResult out;
    const size_t n = static_cast<size_t>(batch.requests_size());
    std::vector<absl::Status> status(n);
    std::vector<CompressCall> calls;
    std::vector<size_t> request_of;  // request index of each call
    // What the batch result is sure to need: a reserve per item, plus each accepted inline
    // answer (WireAnswerSink). A message whose reserves alone exceed the limit runs nothing.
    uint64_t answer_bytes = n * kStreamItemReserve;
    if (answer_bytes > options_.max_message_bytes) {
      return Finish("CompressStream",
                    absl::ResourceExhaustedError(absl::StrCat(
                        "a CompressBatch of ", n, " requests may need ", answer_bytes,
                        " bytes to answer, above max_message_bytes ", options_.max_message_bytes,
                        "; send at most ", options_.max_message_bytes / kStreamItemReserve,
                        " requests per batch (no event of this batch ran)")));
    }
    // Memory exhaustion while converting refuses the whole message before any event runs; once
    // events have run, each keeps its own outcome (CompressMany).
    const absl::Status converted = GuardMemory("CompressStream", [&]() -> absl::Status {
      for (int i = 0; i < batch.requests_size(); ++i) {
        v1::CompressResult* result = out.add_results();
        CompressCall call = CompressCallFromProto(batch.requests(i));
        call.cancelled = [context] { return context->IsCancelled(); };
        call.answer = WireAnswerSink(batch.requests(i), result->mutable_response(),
                                     options_.max_message_bytes, &answer_bytes);
        calls.push_back(std::move(call));
        request_of.push_back(static_cast<size_t>(i));
      }
      return absl::OkStatus();
    });
    if (!converted.ok()) return Finish("CompressStream", converted);
    // Events of sessions sharing a CUDA engine decide together; everything else as Compress would.
    const std::vector<absl::StatusOr<EventOutcome>> outcomes =
        app_->CompressMany(CallerOf(context), calls);
    for (size_t k = 0; k < calls.size(); ++k) {
      const int i = static_cast<int>(request_of[k]);
      status[request_of[k]] = outcomes[k].status();
      if (outcomes[k].ok()) {
        // The event is committed: an answer that cannot be built is its item's error.
        status[request_of[k]] = GuardMemory("CompressStream", [&] {
          CompressOutcomeToProto(calls[k], *outcomes[k],
                                 out.mutable_results(i)->mutable_response());
          return absl::OkStatus();
        });
      }
    }
    for (int i = 0; i < batch.requests_size(); ++i) {
      const absl::Status& s = status[static_cast<size_t>(i)];
      metrics_->CountRequest("CompressStream.item", static_cast<int>(s.code()));
      if (!s.ok()) StreamItemError(s, out.mutable_results(i));
    }
    // Every event of the batch is committed by now, and the reserves make this result fit; should
    // it not, a result that cannot be delivered must end the stream with an error, never look like
    // a clean end.
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
  return Finish("StartCalibration", GuardMemory("StartCalibration", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(const std::vector<int64_t> samples,
                                   app_->StartCalibration(CallerOf(context), request->session_id(),
                                                          request->rho(), request->stride()));
                  response->set_session_id(request->session_id());
                  response->mutable_samples()->Assign(samples.begin(), samples.end());
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::FinishCalibration(grpc::ServerContext* context,
                                               const v1::FinishCalibrationRequest* request,
                                               v1::LayerProfile* response) {
  return Finish("FinishCalibration", GuardMemory("FinishCalibration", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(
                      *response, app_->FinishCalibration(CallerOf(context), request->session_id(),
                                                         request->profile_name(), request->save()));
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::GetProfile(grpc::ServerContext* context,
                                        const v1::GetProfileRequest* request,
                                        v1::LayerProfile* response) {
  return Finish("GetProfile", GuardMemory("GetProfile", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(*response, app_->GetProfile(CallerOf(context), request->name()));
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::PutProfile(grpc::ServerContext* context,
                                        const v1::PutProfileRequest* request,
                                        v1::PutProfileResponse*) {
  return Finish("PutProfile", GuardMemory("PutProfile", [&] {
                  return app_->PutProfile(CallerOf(context), request->profile(),
                                          request->overwrite(), request->save());
                }));
}

grpc::Status SidecarService::ListProfiles(grpc::ServerContext* context,
                                          const v1::ListProfilesRequest*,
                                          v1::ListProfilesResponse* response) {
  return Finish("ListProfiles", GuardMemory("ListProfiles", [&]() -> absl::Status {
                  ASSIGN_OR_RETURN(std::vector<v1::LayerProfile> profiles,
                                   app_->ListProfiles(CallerOf(context)));
                  for (auto& p : profiles) *response->add_profiles() = std::move(p);
                  return absl::OkStatus();
                }));
}

grpc::Status SidecarService::WatchMetrics(grpc::ServerContext* context,
                                          const v1::WatchMetricsRequest* request,
                                          grpc::ServerWriter<v1::MetricsEvent>* writer) {
  return Finish("WatchMetrics", GuardMemory("WatchMetrics", [&]() -> absl::Status {
                  return DoWatch(context, *request, writer);
                }));
}

absl::Status SidecarService::DoWatch(grpc::ServerContext* context,
                                     const v1::WatchMetricsRequest& request,
                                     grpc::ServerWriter<v1::MetricsEvent>* writer) {
  WatchSpec spec;
  spec.session_ids.assign(request.session_ids().begin(), request.session_ids().end());
  spec.model_name = request.model_name();
  spec.pool_interval_seconds = request.pool_interval_seconds();
  const double interval = spec.pool_interval_seconds;
  ASSIGN_OR_RETURN(const std::shared_ptr<EventHub::Watcher> watcher,
                   app_->Watch(CallerOf(context), spec));
  struct Unsubscribe {
    Sidecar* app;
    std::shared_ptr<EventHub::Watcher> w;
    ~Unsubscribe() { app->Unwatch(w); }
  } unsubscribe{app_, watcher};
  // Cancellation is polled (a check costs ~100 µs), events and pool ticks are waited for.
  constexpr absl::Duration kPoll = absl::Milliseconds(100);
  constexpr absl::Duration kBatch = absl::Milliseconds(20);
  absl::Time next_pool = absl::Now();
  while (true) {
    if (context->IsCancelled()) return absl::CancelledError("the watcher went away");
    if (watcher->closed()) return absl::OkStatus();  // drain: the stream ends cleanly
    absl::Time now = absl::Now();
    if (interval > 0 && now >= next_pool) {
      v1::MetricsEvent m;
      v1::PoolGauges* pool = m.mutable_pool();
      const PoolState state = app_->Pool();
      pool->set_sessions(state.sessions);
      pool->set_arena_capacity_bytes(state.capacity_bytes);
      pool->set_arena_reserved_bytes(state.reserved_bytes);
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
    for (; sent < 256 && watcher->Next(deadline, &event, &dropped); ++sent) {
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
