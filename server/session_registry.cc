#include "server/session_registry.h"

#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"

namespace reasonalloc {

std::string NewSessionId() {
  static Mutex* mu = new Mutex();
  static std::random_device* device = new std::random_device();
  MutexLock lock(mu);
  std::string id;
  for (int i = 0; i < 4; ++i) absl::StrAppend(&id, absl::StrFormat("%08x", (*device)()));
  return id;
}

bool Session::OwnedBy(const PeerIdentity& caller) const {
  return owner_.local && caller.local && owner_.uid == caller.uid;
}

absl::Status Session::Authorize(const PeerIdentity& caller,
                                const std::vector<std::string>& tokens) const {
  if (OwnedBy(caller)) return absl::OkStatus();
  for (const std::string& t : tokens) {
    // Constant time over the token's length: no timing hint about how much of a guess matched.
    if (t.size() != token_.size()) continue;
    unsigned char diff = 0;
    for (size_t i = 0; i < t.size(); ++i) {
      diff |= static_cast<unsigned char>(t[i] ^ token_[i]);
    }
    if (diff == 0) return absl::OkStatus();
  }
  return absl::PermissionDeniedError(absl::StrCat(
      "session_id ", id_, " belongs to ",
      owner_.local ? absl::StrCat("uid ", owner_.uid) : "a TCP peer", "; this call comes from ",
      caller.Describe(), " and carries ", tokens.empty() ? "no" : "no matching", " ",
      kSessionTokenKey, " metadata (the token CreateSession returned)"));
}

void Session::AttachArenas(std::unique_ptr<SessionArenas> arenas) {
  MutexLock lock(&mu_);
  arenas_ = std::move(arenas);
}

SessionArenas* Session::arenas() const {
  MutexLock lock(&mu_);
  return arenas_.get();
}

void Session::AttachCudaArenas(std::unique_ptr<CudaSessionArenas> arenas) {
  MutexLock lock(&mu_);
  cuda_arenas_ = std::move(arenas);
}

CudaSessionArenas* Session::cuda_arenas() const {
  MutexLock lock(&mu_);
  return cuda_arenas_.get();
}

Session::Session(std::string id, std::shared_ptr<const Engine> engine, uint64_t reserved,
                 std::string client_tag, absl::Duration lease, std::string profile,
                 PeerIdentity owner)
    : id_(std::move(id)),
      model_(engine->config().model),
      client_tag_(std::move(client_tag)),
      profile_(std::move(profile)),
      owner_(owner),
      token_(NewSessionId()),
      created_(absl::Now()),
      engine_(std::move(engine)),
      reserved_(reserved) {
  const int64_t heads = model_.num_heads_total();
  state_.budgets.assign(static_cast<size_t>(heads), engine_->config().budget.budget);
  state_.kept_lengths.assign(static_cast<size_t>(heads), 0);
  state_.lease = lease;
  state_.lease_deadline = created_ + lease;
  if (PolicyOf(engine_->config().scorer.kind).needs_accumulator) {
    h2o_ = std::make_unique<H2oAccumulator>(model_, engine_->config().budget.window);
  }
}

std::shared_ptr<const Engine> Session::engine() const {
  MutexLock lock(&mu_);
  return engine_;
}

uint64_t Session::reserved_bytes() const {
  MutexLock lock(&mu_);
  return reserved_;
}

Session::State Session::Snapshot() const {
  MutexLock lock(&mu_);
  return state_;
}

absl::Time Session::Renew(absl::Duration lease) {
  MutexLock lock(&mu_);
  if (lease > absl::ZeroDuration()) state_.lease = lease;
  state_.lease_deadline = absl::Now() + state_.lease;
  return state_.lease_deadline;
}

absl::Status Session::CheckStep(int64_t step) const {
  if (step < 0) return absl::InvalidArgumentError(absl::StrCat("step = ", step, " is negative"));
  MutexLock lock(&mu_);
  if (step <= state_.last_step) {
    return absl::FailedPreconditionError(absl::StrCat(
        "step = ", step, " does not follow the session's last step ", state_.last_step));
  }
  return absl::OkStatus();
}

namespace {
int64_t Sum(const std::vector<int32_t>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{0});
}
}  // namespace

Session::CommitResult Session::Commit(int64_t step, const Decision& d) {
  MutexLock lock(&mu_);
  CommitResult r;
  if (!released_) r.kept_delta = Sum(d.kept_lengths) - Sum(state_.kept_lengths);
  state_.last_step = step;
  state_.budgets = d.budgets;
  state_.kept_lengths = d.kept_lengths;
  state_.evicted_total += static_cast<uint64_t>(d.evicted_tokens);
  r.epoch = ++state_.epoch;
  return r;
}

int64_t Session::Release() {
  MutexLock lock(&mu_);
  released_ = true;
  return Sum(state_.kept_lengths);
}

absl::StatusOr<Session::CompressGuard> Session::BeginCompress() {
  if (busy_.exchange(true, std::memory_order_acq_rel)) {
    return absl::FailedPreconditionError(
        absl::StrCat("session_id \"", id_,
                     "\" already has a Compress in progress; calls on one session are not "
                     "queued"));
  }
  return CompressGuard(this);
}

absl::Status Session::StartCalibration(double rho, int stride) {
  if (!(rho > 0 && rho <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("rho = ", rho, " is outside (0, 1]"));
  }
  if (stride < 1 || stride > 1 << 20) {
    return absl::InvalidArgumentError(absl::StrCat("stride = ", stride, " is out of range"));
  }
  MutexLock lock(&calib_mu_);
  if (calibration_ != nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("session_id \"", id_, "\" is already calibrating"));
  }
  calibration_ =
      std::make_unique<CalibrationAccumulator>(model_, engine()->config().budget.window, rho);
  calibration_stride_ = stride;
  return absl::OkStatus();
}

bool Session::calibrating() const {
  MutexLock lock(&calib_mu_);
  return calibration_ != nullptr;
}

absl::Status Session::ObserveCalibration(int64_t step, const CompressInputs& in) {
  MutexLock lock(&calib_mu_);
  if (calibration_ != nullptr && step % calibration_stride_ == 0 && !calibration_->Observe(in)) {
    return absl::CancelledError("the calibration event was cancelled (caller gone or drain)");
  }
  return absl::OkStatus();
}

std::vector<int64_t> Session::CalibrationSamples() const {
  MutexLock lock(&calib_mu_);
  return calibration_ ? calibration_->samples() : std::vector<int64_t>{};
}

absl::Status Session::FinishCalibration(
    const std::function<absl::Status(const Calibration&)>& keep) {
  MutexLock lock(&calib_mu_);
  if (calibration_ == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("session_id \"", id_, "\" is not calibrating: call StartCalibration first"));
  }
  auto demand = calibration_->Demand();
  if (!demand.ok()) return demand.status();
  const Calibration out{calibration_->rho(), *std::move(demand), calibration_->samples()};
  if (auto s = keep(out); !s.ok()) return s;
  calibration_.reset();
  return absl::OkStatus();
}

bool Session::Expired(absl::Time now) const {
  MutexLock lock(&mu_);
  return state_.lease_deadline < now;
}

SessionRegistry::SessionRegistry(Options options, ReleaseCallback on_release)
    : options_(options), on_release_(std::move(on_release)) {
  reaper_ = std::thread([this] { ReaperLoop(); });
}

SessionRegistry::~SessionRegistry() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  reaper_.join();
}

absl::StatusOr<absl::Duration> SessionRegistry::LeaseFor(double seconds,
                                                         absl::string_view field) const {
  if (seconds == 0) return options_.default_lease;
  const double max = absl::ToDoubleSeconds(options_.max_lease);
  if (!std::isfinite(seconds) || seconds < 0 || seconds > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " = ", seconds, " is out of range (0, ", max, "]"));
  }
  return absl::Seconds(seconds);
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Create(
    const SessionConfig& config, std::string client_tag, absl::Duration lease, ProfileDemand demand,
    std::string profile, PeerIdentity owner) {
  auto engine = Engine::Create(config, std::move(demand));
  if (!engine.ok()) return engine.status();
  const uint64_t bytes = ComputeArenaBytes(config).total();
  auto session = std::make_shared<Session>(NewSessionId(), std::move(engine).value(), bytes,
                                           std::move(client_tag), lease, std::move(profile), owner);
  MutexLock lock(&mu_);
  if (static_cast<int>(sessions_.size()) >= options_.max_sessions) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the server holds its maximum of ", options_.max_sessions, " sessions"));
  }
  if (bytes > options_.capacity_bytes - reserved_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the session needs ", bytes, " arena bytes but only ",
                     options_.capacity_bytes - reserved_, " of ", options_.capacity_bytes,
                     " are free (budget.budget, budget.buffer and the model "
                     "geometry decide the size)"));
  }
  reserved_ += bytes;
  sessions_.emplace(session->id(), session);
  return session;
}

absl::Status CheckSessionId(const std::string& id) {
  if (id.empty()) return absl::InvalidArgumentError("session_id is empty");
  if (id.size() > kMaxSessionIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("session_id is ", id.size(),
                                                   " bytes long; session ids have ",
                                                   kMaxSessionIdBytes, " at most"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Get(const std::string& id, Renew renew,
                                                              const Authorizer& authorize) {
  if (auto s = CheckSessionId(id); !s.ok()) return s;
  std::shared_ptr<Session> s;
  {
    MutexLock lock(&mu_);
    auto it = sessions_.find(id);
    if (it != sessions_.end() && !it->second->Expired(absl::Now())) {
      if (authorize) {
        if (auto denied = authorize(*it->second); !denied.ok()) return denied;
      }
      s = it->second;
      // Renewed under the registry's lock, so the reaper cannot take it between check and renewal.
      if (renew == Renew::kYes) s->Renew();
    }
  }
  if (s == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("session_id \"", id, "\" is unknown, closed or expired"));
  }
  return s;
}

absl::StatusOr<uint64_t> SessionRegistry::Close(const std::string& id) {
  if (auto status = CheckSessionId(id); !status.ok()) return status;
  std::shared_ptr<Session> s;
  uint64_t released = 0;
  {
    MutexLock lock(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return uint64_t{0};
    s = std::move(it->second);
    sessions_.erase(it);
    released = s->reserved_bytes();
    reserved_ -= released;
  }
  if (on_release_) on_release_(*s, "closed");
  return released;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::UpdateBudget(const std::string& id,
                                                                       int budget) {
  auto s = Get(id);
  if (!s.ok()) return s.status();
  Session& session = **s;
  SessionConfig config = session.engine()->config();
  // The request's field is `budget`; the rest of the configuration was validated at creation.
  RETURN_IF_ERROR(CheckBudgetValue(budget, config.budget, config.model, "budget"));
  config.budget.budget = budget;
  ASSIGN_OR_RETURN(std::shared_ptr<Engine> engine,
                   Engine::Create(config, session.engine()->demand()));
  const uint64_t bytes = ComputeArenaBytes(config).total();
  MutexLock lock(&mu_);
  if (sessions_.find(id) == sessions_.end()) {
    return absl::NotFoundError(
        absl::StrCat("session_id \"", id, "\" is unknown, closed or expired"));
  }
  MutexLock session_lock(&session.mu_);
  const uint64_t free_after_release = options_.capacity_bytes - reserved_ + session.reserved_;
  if (bytes > free_after_release) {
    return absl::ResourceExhaustedError(absl::StrCat("budget = ", budget, " needs ", bytes,
                                                     " arena bytes but only ", free_after_release,
                                                     " are available to this session"));
  }
  reserved_ = reserved_ - session.reserved_ + bytes;
  session.reserved_ = bytes;
  session.engine_ = std::move(engine);
  return s;
}

std::vector<std::shared_ptr<Session>> SessionRegistry::List() const {
  MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Session>> out;
  out.reserve(sessions_.size());
  for (const auto& [id, s] : sessions_) out.push_back(s);
  return out;
}

int SessionRegistry::ReapExpired(absl::Time now) {
  std::vector<std::shared_ptr<Session>> expired;
  {
    MutexLock lock(&mu_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      if (it->second->Expired(now)) {
        reserved_ -= it->second->reserved_bytes();
        expired.push_back(std::move(it->second));
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (on_release_) {
    for (const auto& s : expired) on_release_(*s, "expired");
  }
  return static_cast<int>(expired.size());
}

uint64_t SessionRegistry::reserved_bytes() const {
  MutexLock lock(&mu_);
  return reserved_;
}

int SessionRegistry::size() const {
  MutexLock lock(&mu_);
  return static_cast<int>(sessions_.size());
}

void SessionRegistry::ReaperLoop() {
  MutexLock lock(&mu_);
  while (!stop_) {
    mu_.AwaitWithTimeout([this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_; },
                         options_.reap_interval);
    if (stop_) break;
    mu_.Unlock();
    ReapExpired(absl::Now());
    mu_.Lock();
  }
}

}  // namespace reasonalloc
