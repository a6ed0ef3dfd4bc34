#include "server/sidecar.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_join.h"
#include "core/api_defaults.h"
#include "core/build_info.h"
#include "core/policy.h"
#include "core/status_macros.h"
#include "server/external_buffers.h"
#include "server/proto_convert.h"
#include "spdlog/spdlog.h"

namespace reasonalloc {

Sidecar::Sidecar(Options options, SessionRegistry* registry, Metrics* metrics,
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

absl::Status Sidecar::Admit(const Caller& caller) const {
  if (caller.peer.local && !options_.allow_uids.empty() && caller.peer.uid != ::geteuid() &&
      std::find(options_.allow_uids.begin(), options_.allow_uids.end(), caller.peer.uid) ==
          options_.allow_uids.end()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "peer uid ", caller.peer.uid, " may not call this server (--allow_uid ",
        absl::StrJoin(options_.allow_uids, ","), " and the server's own uid ", ::geteuid(), ")"));
  }
  return absl::OkStatus();
}

absl::Status Sidecar::AcceptingSessions(const Caller& caller) const {
  RETURN_IF_ERROR(Admit(caller));
  if (draining_.load()) return absl::UnavailableError("the server is draining");
  return absl::OkStatus();
}

void Sidecar::SetDraining() {
  draining_.store(true);
  events_.Close();
}

PoolState Sidecar::Pool() const {
  return {registry_->size(), registry_->capacity_bytes(), registry_->reserved_bytes()};
}

absl::StatusOr<std::shared_ptr<Session>> Sidecar::Use(const Caller& caller, const std::string& id,
                                                      SessionRegistry::Renew renew) {
  RETURN_IF_ERROR(Admit(caller));
  return registry_->Get(id, renew, [&caller](const Session& session) {
    return session.Authorize(caller.peer, caller.tokens);
  });
}

void Sidecar::UpdatePoolGauges() {
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

void Sidecar::OnSessionReleased(Session& session, const char* why) {
  metrics_->CountSessionEnd(why);
  metrics_->AddKeptTokens(-session.Release());
  UpdatePoolGauges();
  spdlog::info("session {} {} (released {} arena bytes)", session.id(), why,
               session.reserved_bytes());
}

absl::StatusOr<CreatedSession> Sidecar::CreateSession(const Caller& caller,
                                                      const SessionSpec& spec) {
  RETURN_IF_ERROR(AcceptingSessions(caller));
  const SessionConfig& config = spec.config;
  const bool cuda_ipc = spec.memory == MemoryKind::kCudaIpc;
  const bool arena = spec.memory != MemoryKind::kInline;
  if (cuda_ipc && options_.cuda_device < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "memory = ", MemoryKindName(MemoryKind::kCudaIpc),
        " needs a server started with --device cuda:N; this one computes on ", options_.backend));
  }
  if (spec.client_tag.size() > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("client_tag is ", spec.client_tag.size(), " bytes long; at most 256 allowed"));
  }
  ASSIGN_OR_RETURN(const absl::Duration lease,
                   registry_->LeaseFor(spec.lease_seconds, "lease_seconds"));
  if (arena && int64_t{config.budget.budget} + config.budget.buffer > config.model.max_context) {
    // A head's arena region holds budget + buffer rows, and positions end at max_context.
    return absl::InvalidArgumentError(absl::StrCat(
        "budget.budget + budget.buffer = ", config.budget.budget, " + ", config.budget.buffer,
        " exceeds model.max_context = ", config.model.max_context,
        "; an arena session's heads hold budget + buffer rows, so lower budget.buffer or raise "
        "model.max_context"));
  }
  // What the scorer supports on this data plane (core/policy.cc).
  const ScorerPolicy& scorer = PolicyOf(config.scorer.kind);
  const uint32_t planes = config.managed ? scorer.managed_planes : scorer.advisory_planes;
  if ((planes & PlaneBit(spec.memory)) == 0) {
    std::string supported;
    for (MemoryKind m : kMemoryKinds) {
      if ((planes & PlaneBit(m)) != 0) {
        absl::StrAppend(&supported, supported.empty() ? "" : ", ", MemoryKindName(m));
      }
    }
    return absl::UnimplementedError(absl::StrCat(
        "scorer.name \"", scorer.name, "\" with mode = ", SessionModeName(config.managed),
        " and memory = ", MemoryKindName(spec.memory),
        " is not implemented in this build yet; with this mode it runs on: ", supported));
  }
  // ReasonAlloc's layer level follows the model's profile (or the one named); without one the
  // layers are uniform and the answer says so.
  ProfileDemand demand;
  std::string profile_name;
  CreatedSession created;
  if (AllocatorOf(config.allocator.kind).UsesLayerProfile(config.allocator)) {
    const bool named = !config.allocator.profile.empty();
    const std::string name = named ? config.allocator.profile : config.model.name;
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
        profile->owner() != ProfileStore::OwnerOf(&caller.peer)) {
      created.warnings.push_back(
          absl::StrCat("the layer profile \"", name, "\" belongs to ", profile->owner(),
                       ", not to the server or the caller: uniform layer budgets (name it "
                       "in allocator.profile to use it)"));
      profile = absl::NotFoundError("not usable");
    }
    if (profile.ok()) {
      RETURN_IF_ERROR(ProfileStore::CheckGeometry(*profile, config.model));
      demand.layers.assign(profile->demand().begin(), profile->demand().end());
      // Only the static mode reads the head demand (and it keys the CUDA engines).
      if (AllocatorOf(config.allocator.kind).UsesHeadProfile(config.allocator)) {
        demand.heads.assign(profile->head_demand().begin(), profile->head_demand().end());
      }
      profile_name = name;
    } else if (named) {
      return absl::FailedPreconditionError(
          absl::StrCat("allocator.profile \"", name.substr(0, 128), "\" is not loaded"));
    } else if (AllocatorOf(config.allocator.kind).UsesHeadProfile(config.allocator)) {
      // The static mode has no uniform fallback: its head split is the profile's.
      return absl::FailedPreconditionError(
          absl::StrCat("allocator.reasonalloc_mode static needs a layer profile with head_demand; "
                       "no usable profile for model \"",
                       name.substr(0, 128), "\" (name one in allocator.profile)"));
    } else if (created.warnings.empty()) {
      created.warnings.push_back(
          absl::StrCat("no layer profile for model \"", name,
                       "\": uniform layer budgets (PutProfile or --profile-dir adds one)"));
    }
  }
  const ProfileDemand profile_demand = demand;
  ASSIGN_OR_RETURN(created.session,
                   registry_->Create(config, spec.client_tag, lease, std::move(demand),
                                     profile_name, caller.peer));
  Session& session = *created.session;
  // A session whose memory cannot be set up leaves the registry again.
  auto attach = [&]() -> absl::Status {
    if (cuda_ipc) {
      ASSIGN_OR_RETURN(auto engine, gpu_engines_.Get(options_.cuda_device, config, profile_demand));
      ASSIGN_OR_RETURN(auto arenas, CudaSessionArenas::Create(config, std::move(engine)));
      session.AttachCudaArenas(std::move(arenas));
    } else if (spec.memory == MemoryKind::kHostShm) {
      ASSIGN_OR_RETURN(auto arenas, SessionArenas::Create(config));
      session.AttachArenas(std::move(arenas));
    }
    return absl::OkStatus();
  };
  if (absl::Status s = attach(); !s.ok()) {
    (void)registry_->Close(session.id());
    return s;
  }
  for (const std::string& w : created.warnings) spdlog::warn("session {}: {}", session.id(), w);
  UpdatePoolGauges();
  spdlog::info(
      "session {} created: model {} L={} Hq={} Hkv={} d={} B={} scorer={} allocator={} "
      "({} arena bytes), owner {}",
      session.id(), config.model.name, config.model.num_layers, config.model.num_q_heads,
      config.model.num_kv_heads, config.model.head_dim, config.budget.budget,
      std::string(NameOf(config.scorer.kind)), std::string(NameOf(config.allocator.kind)),
      session.reserved_bytes(), caller.peer.Describe());
  return created;
}

absl::StatusOr<std::shared_ptr<Session>> Sidecar::GetSession(const Caller& caller,
                                                             const std::string& id) {
  return Use(caller, id, SessionRegistry::Renew::kNo);
}

absl::StatusOr<std::vector<std::shared_ptr<Session>>> Sidecar::ListSessions(
    const Caller& caller, const std::string& model_name) {
  RETURN_IF_ERROR(Admit(caller));
  // A Unix-socket peer sees its own uid's sessions; root, the server's uid and credential-less
  // (TCP) peers see all (without their tokens, which are never listed).
  const bool sees_all =
      !caller.peer.local || caller.peer.uid == 0 || caller.peer.uid == ::geteuid();
  std::vector<std::shared_ptr<Session>> out;
  for (auto& s : registry_->List()) {
    if (!model_name.empty() && s->model().name != model_name) continue;
    if (!sees_all && !s->OwnedBy(caller.peer)) continue;
    out.push_back(std::move(s));
  }
  return out;
}

absl::StatusOr<uint64_t> Sidecar::CloseSession(const Caller& caller, const std::string& id) {
  // Closing an unknown session is OK (idempotent); closing another's is not.
  if (auto s = Use(caller, id, SessionRegistry::Renew::kNo);
      !s.ok() && s.status().code() != absl::StatusCode::kNotFound) {
    return s.status();
  }
  return registry_->Close(id);
}

absl::StatusOr<absl::Time> Sidecar::KeepAlive(const Caller& caller, const std::string& id,
                                              double lease_seconds) {
  RETURN_IF_ERROR(Admit(caller));
  absl::Duration lease = absl::ZeroDuration();
  if (lease_seconds != 0) {
    ASSIGN_OR_RETURN(lease, registry_->LeaseFor(lease_seconds, "lease_seconds"));
  }
  ASSIGN_OR_RETURN(auto session, Use(caller, id, SessionRegistry::Renew::kYes));
  return session->Renew(lease);
}

absl::StatusOr<std::shared_ptr<Session>> Sidecar::UpdateBudget(const Caller& caller,
                                                               const std::string& id, int budget) {
  ASSIGN_OR_RETURN(auto current, Use(caller, id, SessionRegistry::Renew::kNo));
  if (current->arenas() != nullptr || current->cuda_arenas() != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("budget cannot change on a ", MemoryKindName(MemoryKind::kHostShm), " or ",
                     MemoryKindName(MemoryKind::kCudaIpc),
                     " session (its arenas are sized by it); create a new session"));
  }
  ASSIGN_OR_RETURN(auto session, registry_->UpdateBudget(id, budget));
  UpdatePoolGauges();
  return session;
}

absl::Status Sidecar::RegisterBuffers(
    const Caller& caller, const std::string& id,
    const google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>& buffers) {
  ASSIGN_OR_RETURN(auto session, Use(caller, id, SessionRegistry::Renew::kYes));
  SessionArenas* arenas = session->arenas();
  if (arenas == nullptr || !arenas->advisory()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session_id ", id, " is not an advisory ", MemoryKindName(MemoryKind::kHostShm),
        " session; only those register the worker's buffers (managed sessions get the server's "
        "arenas, inline ones send tensors)"));
  }
  // Buffers never change under a running event.
  ASSIGN_OR_RETURN(const Session::CompressGuard guard, session->BeginCompress());
  auto opened = ExternalBuffers::Open(buffers, session->engine()->config(), caller.peer);
  if (!opened.ok()) {
    const absl::StatusCode code = opened.status().code();
    metrics_->CountIpcImportFailure(code == absl::StatusCode::kUnimplemented ? "unsupported"
                                    : code == absl::StatusCode::kNotFound ||
                                            code == absl::StatusCode::kPermissionDenied
                                        ? "open_failed"
                                        : "bad_handle");
    return opened.status();
  }
  arenas->Register(std::move(opened).value());
  spdlog::info("session {}: buffers registered", id);
  return absl::OkStatus();
}

absl::StatusOr<Sidecar::Job> Sidecar::MakeJob(const Caller& caller, const CompressCall& call) {
  Job job;
  ASSIGN_OR_RETURN(job.session, Use(caller, call.session_id, SessionRegistry::Renew::kYes));
  Session& session = *job.session;
  PlaneLimits limits;
  limits.max_event_bytes = options_.max_event_bytes;
  limits.testing_delay = options_.testing_compress_delay;
  limits.on_device_batch = [this](int events) { metrics_->ObserveDeviceBatch(events); };
  // The memory kind decides the plane; the transaction's order is the same for all of them.
  if (SessionArenas* arenas = session.arenas(); arenas != nullptr) {
    job.plane = std::make_unique<HostShmPlane>(call, *arenas, std::move(limits));
  } else if (CudaSessionArenas* cuda = session.cuda_arenas(); cuda != nullptr) {
    job.plane = std::make_unique<CudaPlane>(call, *cuda, std::move(limits));
  } else {
    job.plane = std::make_unique<InlinePlane>(call, std::move(limits));
  }
  const int64_t step = call.step;
  Session* s = job.session.get();
  job.record = [this, s, step](const EventOutcome& outcome) {
    RecordEvent(*s, step, outcome.committed, outcome.decision);
  };
  return job;
}

absl::StatusOr<EventOutcome> Sidecar::Compress(const Caller& caller, const CompressCall& call,
                                               std::chrono::steady_clock::time_point t0) {
  // No placeholder status on the hot path: the outcome exists once the event ran.
  std::optional<absl::StatusOr<EventOutcome>> out;
  const absl::Status guarded = GuardMemory("Compress", [&]() -> absl::Status {
    ASSIGN_OR_RETURN(Job job, MakeJob(caller, call));
    out.emplace(RunCompressEvent(*job.session, call.step, *job.plane, t0, job.record));
    return absl::OkStatus();
  });
  if (!guarded.ok()) return guarded;
  return *std::move(out);
}

std::vector<absl::StatusOr<EventOutcome>> Sidecar::CompressMany(
    const Caller& caller, std::span<const CompressCall> calls) {
  std::vector<absl::StatusOr<EventOutcome>> out(calls.size(), EventJob::NotRun());
  std::vector<Job> prepared;
  std::vector<EventJob> jobs;
  std::vector<size_t> call_of;  // call index of each job
  for (size_t i = 0; i < calls.size(); ++i) {
    const absl::Status made = GuardMemory("CompressStream", [&]() -> absl::Status {
      ASSIGN_OR_RETURN(Job job, MakeJob(caller, calls[i]));
      prepared.push_back(std::move(job));
      call_of.push_back(i);
      return absl::OkStatus();
    });
    if (!made.ok()) out[i] = made;
  }
  for (size_t k = 0; k < prepared.size(); ++k) {
    EventJob j;
    j.session = prepared[k].session.get();
    j.step = calls[call_of[k]].step;
    j.plane = prepared[k].plane.get();
    // t0 stays unset: each event's time starts when it starts, as for Compress.
    j.record = prepared[k].record;
    jobs.push_back(std::move(j));
  }
  const absl::Status run = GuardMemory("CompressStream", [&] {
    RunCompressEvents(jobs);
    return absl::OkStatus();
  });
  for (size_t k = 0; k < jobs.size(); ++k) {
    // Out of memory part-way: the events that ran keep their own outcome (some are committed);
    // only those it never reached report it.
    if (!run.ok() && IsNotRun(jobs[k].outcome)) {
      out[call_of[k]] = run;
    } else {
      out[call_of[k]] = std::move(jobs[k].outcome);
    }
  }
  return out;
}

void Sidecar::RecordEvent(const Session& session, int64_t step,
                          const Session::CommitResult& committed, const Decision& decision) {
  const auto engine = session.engine();  // held: UpdateBudget may replace the session's engine
  const SessionConfig& config = engine->config();
  metrics_->ObserveCompress(decision.seconds);
  metrics_->ObserveEvent(NameOf(config.scorer.kind), NameOf(config.allocator.kind),
                         config.model.name, decision);
  metrics_->AddKeptTokens(committed.kept_delta);
  if (events_.active()) {
    events_.Publish(CompressEventToProto(session.id(), session.model().name, step, committed.epoch,
                                         decision, absl::Now()));
  }
}

absl::StatusOr<std::vector<int64_t>> Sidecar::StartCalibration(const Caller& caller,
                                                               const std::string& id, double rho,
                                                               int stride) {
  ASSIGN_OR_RETURN(auto session, Use(caller, id, SessionRegistry::Renew::kYes));
  if (rho == 0) rho = kDefaultCalibrationRho;
  if (stride == 0) stride = kDefaultCalibrationStride;
  if (session->arenas() != nullptr || session->cuda_arenas() != nullptr) {
    return absl::UnimplementedError(absl::StrCat(
        "calibration of a ", MemoryKindName(MemoryKind::kHostShm), " or ",
        MemoryKindName(MemoryKind::kCudaIpc),
        " session is not implemented in this build yet (the full cache outgrows its arenas); "
        "calibrate with a ",
        MemoryKindName(MemoryKind::kInline), " session"));
  }
  RETURN_IF_ERROR(session->StartCalibration(rho, stride));
  return session->CalibrationSamples();
}

absl::StatusOr<v1::LayerProfile> Sidecar::FinishCalibration(const Caller& caller,
                                                            const std::string& id,
                                                            const std::string& profile_name,
                                                            bool save) {
  ASSIGN_OR_RETURN(auto session, Use(caller, id, SessionRegistry::Renew::kYes));
  const std::string name = profile_name.empty() ? session->model().name : profile_name;
  if (!ProfileStore::ValidName(name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        profile_name.empty() ? "profile_name (empty: the session's model.name) \""
                             : "profile_name \"",
        name.substr(0, 64),
        "\" must be 1-128 characters of letters, digits, '-', '_' and '.' (not starting with "
        "'.'); the calibration is kept, retry with a valid name"));
  }
  const auto engine = session->engine();
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
                                  ") in session ", session->id(), " at ",
                                  absl::FormatTime(absl::Now(), absl::UTCTimeZone())));
    return profiles_->Put(p, /*overwrite=*/true, save, &caller.peer);
  };
  RETURN_IF_ERROR(session->FinishCalibration(keep));
  ASSIGN_OR_RETURN(v1::LayerProfile stored, profiles_->Get(name));
  spdlog::info("layer profile \"{}\" calibrated ({} layers)", name, p.demand_size());
  return stored;
}

absl::StatusOr<v1::LayerProfile> Sidecar::GetProfile(const Caller& caller,
                                                     const std::string& name) {
  RETURN_IF_ERROR(Admit(caller));
  return profiles_->Get(name);
}

absl::Status Sidecar::PutProfile(const Caller& caller, const v1::LayerProfile& profile,
                                 bool overwrite, bool save) {
  RETURN_IF_ERROR(Admit(caller));
  return profiles_->Put(profile, overwrite, save, &caller.peer);
}

absl::StatusOr<std::vector<v1::LayerProfile>> Sidecar::ListProfiles(const Caller& caller) {
  RETURN_IF_ERROR(Admit(caller));
  return profiles_->List();
}

absl::StatusOr<std::shared_ptr<EventHub::Watcher>> Sidecar::Watch(const Caller& caller,
                                                                  const WatchSpec& spec) {
  RETURN_IF_ERROR(Admit(caller));
  if (draining_.load()) return absl::UnavailableError("the server is draining");
  const double interval = spec.pool_interval_seconds;
  if (!std::isfinite(interval) || (interval != 0 && (interval < 0.05 || interval > 3600))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pool_interval_seconds = ", interval, " must be 0 (no pool gauges) or in [0.05, 3600]"));
  }
  std::set<std::string> sessions;
  for (size_t i = 0; i < spec.session_ids.size(); ++i) {
    if (auto s = CheckSessionId(spec.session_ids[i]); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("session_ids[", i, "]: ", s.message()));
    }
    sessions.insert(spec.session_ids[i]);
  }
  if (spec.model_name.size() > 256) {
    return absl::InvalidArgumentError("model_name is longer than 256 bytes");
  }
  ASSIGN_OR_RETURN(auto watcher, events_.Subscribe(std::move(sessions), spec.model_name));
  metrics_->SetWatchers(events_.watchers());
  return watcher;
}

void Sidecar::Unwatch(const std::shared_ptr<EventHub::Watcher>& watcher) {
  events_.Unsubscribe(watcher);
  metrics_->SetWatchers(events_.watchers());
}

}  // namespace reasonalloc
