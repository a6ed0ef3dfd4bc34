// The application layer (server/sidecar.h) in process, on domain types only: sessions, callers,
// compression events of inline and host shared-memory sessions (CUDA ones need a GPU:
// tests/gpu), a refused answer
// between deciding and committing, messages of several events, calibration, watchers and
// draining. No gRPC, no server process.
#include "server/sidecar.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "server/metrics.h"
#include "server/profile_store.h"
#include "server/session_arenas.h"
#include "server/session_registry.h"
#include "tests/unit/small_session.h"

namespace reasonalloc {
namespace {

using namespace small_session;  // NOLINT: the shared geometry

SessionSpec Spec(MemoryKind memory = MemoryKind::kInline, bool managed = true) {
  SessionSpec spec;
  spec.config = Config(managed, "test-model");
  spec.memory = memory;
  spec.client_tag = "sidecar_test";
  return spec;
}

Caller Local(uint32_t uid) {
  Caller c;
  c.peer.local = true;
  c.peer.uid = uid;
  return c;
}

// An inline event's tensors (N rows per head, all finite) and the call that views them.
struct InlineEvent {
  std::vector<float> q, k, v;
  CompressCall call;
  InlineEvent(const std::string& session, int64_t step, int n) {
    auto fill = [](std::vector<float>& x, size_t count, float base) {
      x.resize(count);
      for (size_t i = 0; i < count; ++i) x[i] = base + 0.01f * static_cast<float>(i % 97);
    };
    fill(q, size_t{kL} * kHkv * kG * kWindow * kD, 0.5f);
    fill(k, size_t{kL} * kHkv * static_cast<size_t>(n) * kD, 0.1f);
    fill(v, k.size(), 0.2f);
    auto view = [](const std::vector<float>& x, std::vector<int64_t> shape) {
      RawTensor t;
      t.present = true;
      t.dtype = DType::kFloat32;
      t.shape = std::move(shape);
      t.data = absl::string_view(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float));
      return t;
    };
    call.session_id = session;
    call.step = step;
    InlineTensorsIn& in = call.inline_tensors.emplace();
    in.query_window = view(q, {kL, kHkv * kG, kWindow, kD});
    in.keys = view(k, {kL, kHkv, n, kD});
    in.values = view(v, {kL, kHkv, n, kD});
  }
};

class SidecarTest : public ::testing::Test {
 protected:
  SidecarTest()
      : registry_(SessionRegistry::Options(),
                  [this](Session& s, const char* why) {
                    if (app_) app_->OnSessionReleased(s, why);
                  }),
        metrics_("cpu") {
    profiles_ = *ProfileStore::Open("");
    Sidecar::Options options;
    options.allow_uids = {4242};
    app_ = std::make_unique<Sidecar>(options, &registry_, &metrics_, profiles_.get());
  }
  // The registry outlives the layer (it releases what is left without it).
  ~SidecarTest() override { app_.reset(); }

  std::shared_ptr<Session> Create(const Caller& caller, const SessionSpec& spec = Spec()) {
    auto created = app_->CreateSession(caller, spec);
    EXPECT_TRUE(created.ok()) << created.status();
    return created.ok() ? created->session : nullptr;
  }

  SessionRegistry registry_;
  Metrics metrics_;
  std::unique_ptr<ProfileStore> profiles_;
  std::unique_ptr<Sidecar> app_;
  const Caller owner_ = Local(4242);
};

TEST_F(SidecarTest, AnInlineEventAnswersThroughItsSinkAndCommits) {
  auto session = Create(owner_);
  ASSERT_NE(session, nullptr);
  InlineEvent event(session->id(), 0, 12);
  int answered = 0;
  std::vector<int64_t> keys_shape;
  event.call.answer = [&](const InlineAnswerView& a) {
    ++answered;
    EXPECT_EQ(a.n_max, 12);
    EXPECT_TRUE(a.keep_mask);
    EXPECT_NE(a.keys, nullptr);
    EXPECT_NE(a.values, nullptr);
    keys_shape = a.keys->shape;
    EXPECT_EQ(a.keys->bytes.size(),
              size_t{kL} * kHkv * static_cast<size_t>(a.decision.max_kept()) * kD * 4);
    return absl::OkStatus();
  };
  auto out = app_->Compress(owner_, event.call);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(answered, 1);
  EXPECT_EQ(out->committed.epoch, 1u);
  EXPECT_EQ(keys_shape, (std::vector<int64_t>{kL, kHkv, out->decision.max_kept(), kD}));
  for (int32_t kept : out->decision.kept_lengths) EXPECT_LE(kept, kBudget);
  EXPECT_GT(out->decision.seconds.total, 0.0);
  EXPECT_EQ(session->Snapshot().last_step, 0);
  // The same step again is refused by the session, and says so.
  auto again = app_->Compress(owner_, event.call);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition) << again.status();
}

TEST_F(SidecarTest, ARefusedAnswerCommitsNothingAndTheStepCanBeRetried) {
  auto session = Create(owner_);
  ASSERT_NE(session, nullptr);
  InlineEvent event(session->id(), 4, 12);
  event.call.answer = [](const InlineAnswerView&) {
    return absl::ResourceExhaustedError("answer too large (test)");
  };
  auto refused = app_->Compress(owner_, event.call);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(session->Snapshot().last_step, -1);
  EXPECT_EQ(session->Snapshot().epoch, 0u);
  event.call.answer = nullptr;  // discarded
  auto retried = app_->Compress(owner_, event.call);
  ASSERT_TRUE(retried.ok()) << retried.status();
  EXPECT_EQ(retried->committed.epoch, 1u);
}

TEST_F(SidecarTest, AHostSharedMemoryEventCompactsTheArenasAndPublishesTheEpoch) {
  const SessionSpec spec = Spec(MemoryKind::kHostShm);
  auto session = Create(owner_, spec);
  ASSERT_NE(session, nullptr);
  SessionArenas* arenas = session->arenas();
  ASSERT_NE(arenas, nullptr);
  const WorkerView worker = FillManagedArenas(*arenas, spec.config);
  int32_t* len = worker.len;
  uint64_t* epoch = worker.epoch;
  CompressCall call;
  call.session_id = session->id();
  call.step = kWindow;
  auto out = app_->Compress(owner_, call);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->committed.epoch, 1u);
  EXPECT_EQ(*epoch, 1u);
  for (int i = 0; i < kL * kHkv; ++i) EXPECT_EQ(len[i], out->decision.kept_lengths[i]);
  EXPECT_EQ(out->decision.evicted_tokens, int64_t{kL} * kHkv * kDelta);
}

TEST_F(SidecarTest, BadInputIsRefusedNamingTheField) {
  // Creation.
  SessionSpec tag = Spec();
  tag.client_tag.assign(300, 'x');
  EXPECT_NE(app_->CreateSession(owner_, tag).status().message().find("client_tag"),
            std::string::npos);
  auto cuda = app_->CreateSession(owner_, Spec(MemoryKind::kCudaIpc));
  EXPECT_EQ(cuda.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(cuda.status().message().find("memory = MEMORY_KIND_CUDA_IPC"), std::string::npos);
  SessionSpec lease = Spec();
  lease.lease_seconds = -1;
  EXPECT_NE(app_->CreateSession(owner_, lease).status().message().find("lease_seconds"),
            std::string::npos);
  SessionSpec arena = Spec(MemoryKind::kHostShm);
  arena.config.budget.buffer = 300;
  EXPECT_NE(app_->CreateSession(owner_, arena).status().message().find("budget.buffer"),
            std::string::npos);
  // Compression: each memory kind names what it expects.
  auto inline_session = Create(owner_);
  ASSERT_NE(inline_session, nullptr);
  CompressCall bare;
  bare.session_id = inline_session->id();
  auto missing = app_->Compress(owner_, bare);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("inline_tensors is required"), std::string::npos);
  InlineEvent wrong_shape(inline_session->id(), 0, 12);
  wrong_shape.call.inline_tensors->keys.shape[3] = kD + 1;
  auto shape = app_->Compress(owner_, wrong_shape.call);
  EXPECT_NE(shape.status().message().find("inline_tensors.keys"), std::string::npos)
      << shape.status();
  InlineEvent attention(inline_session->id(), 0, 12);
  attention.call.inline_tensors->attention.present = true;
  attention.call.inline_tensors->attention_error = absl::InvalidArgumentError("never reported");
  auto not_h2o = app_->Compress(owner_, attention.call);
  EXPECT_NE(not_h2o.status().message().find("inline_tensors.attention is only for h2o sessions"),
            std::string::npos)
      << not_h2o.status();
  auto shm = Create(owner_, Spec(MemoryKind::kHostShm));
  ASSERT_NE(shm, nullptr);
  InlineEvent to_shm(shm->id(), 0, 12);
  auto refused = app_->Compress(owner_, to_shm.call);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("inline_tensors must be empty"), std::string::npos);
  EXPECT_EQ(inline_session->Snapshot().epoch, 0u);
  EXPECT_EQ(shm->Snapshot().epoch, 0u);
}

TEST_F(SidecarTest, CallersReachOnlyTheirOwnSessions) {
  auto session = Create(owner_);
  ASSERT_NE(session, nullptr);
  // A uid the server does not admit is refused by every method before anything else.
  const Caller stranger = Local(777);
  EXPECT_EQ(app_->GetSession(stranger, session->id()).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(app_->CreateSession(stranger, Spec()).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(app_->ListProfiles(stranger).status().code(), absl::StatusCode::kPermissionDenied);
  // An admitted peer that does not own the session needs its token.
  Caller other;  // credential-less (TCP): admitted, owns nothing
  EXPECT_EQ(app_->GetSession(other, session->id()).status().code(),
            absl::StatusCode::kPermissionDenied);
  InlineEvent event(session->id(), 0, 12);
  EXPECT_EQ(app_->Compress(other, event.call).status().code(), absl::StatusCode::kPermissionDenied);
  // The caller is checked before the request's own fields: a tensor the adapter could not
  // convert tells an outsider nothing about the session.
  InlineEvent undecodable(session->id(), 0, 12);
  undecodable.call.inline_tensors->decode_error =
      absl::InvalidArgumentError("inline_tensors.keys.dtype = 99 is not a known DType");
  EXPECT_EQ(app_->Compress(other, undecodable.call).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(app_->Compress(stranger, undecodable.call).status().code(),
            absl::StatusCode::kPermissionDenied);
  auto owners = app_->Compress(owner_, undecodable.call);
  EXPECT_EQ(owners.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(owners.status().message().find("inline_tensors.keys.dtype"), std::string::npos);
  EXPECT_EQ(session->Snapshot().epoch, 0u);
  EXPECT_EQ(app_->CloseSession(other, session->id()).status().code(),
            absl::StatusCode::kPermissionDenied);
  other.tokens = {session->token()};
  EXPECT_TRUE(app_->GetSession(other, session->id()).ok());
  // Only the owner's uid lists it.
  auto listed = app_->ListSessions(Local(4242), "");
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 1u);
  auto closed = app_->CloseSession(owner_, session->id());
  ASSERT_TRUE(closed.ok());
  EXPECT_EQ(*app_->CloseSession(owner_, session->id()), 0u) << "closing twice is idempotent";
}

TEST_F(SidecarTest, AMessageOfSeveralEventsRunsEachInOrderAndFailsThemAlone) {
  auto a = Create(owner_);
  auto b = Create(owner_);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  InlineEvent a0(a->id(), 0, 12), a1(a->id(), 1, 12), b0(b->id(), 0, 12);
  CompressCall unknown;
  unknown.session_id = "no-such-session";
  const std::vector<CompressCall> calls = {a0.call, b0.call, unknown, a1.call};
  const auto out = app_->CompressMany(owner_, calls);
  ASSERT_EQ(out.size(), 4u);
  ASSERT_TRUE(out[0].ok()) << out[0].status();
  ASSERT_TRUE(out[1].ok()) << out[1].status();
  EXPECT_EQ(out[2].status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(out[3].ok()) << out[3].status();
  EXPECT_EQ(out[0]->committed.epoch, 1u);
  EXPECT_EQ(out[3]->committed.epoch, 2u) << "a session's second event ran after its first";
  EXPECT_EQ(a->Snapshot().last_step, 1);
  EXPECT_EQ(b->Snapshot().last_step, 0);
}

TEST_F(SidecarTest, CalibrationStoresTheMeasuredProfile) {
  auto session = Create(owner_);
  ASSERT_NE(session, nullptr);
  auto started = app_->StartCalibration(owner_, session->id(), 0, 0);
  ASSERT_TRUE(started.ok()) << started.status();
  for (int step = 0; step < 3; ++step) {
    InlineEvent event(session->id(), step, 12 + step);
    auto out = app_->Compress(owner_, event.call);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->decision.evicted_tokens, 0) << "calibration keeps the full cache";
  }
  auto bad_name = app_->FinishCalibration(owner_, session->id(), "../x", false);
  EXPECT_NE(bad_name.status().message().find("profile_name"), std::string::npos);
  auto profile = app_->FinishCalibration(owner_, session->id(), "", false);
  ASSERT_TRUE(profile.ok()) << profile.status();
  EXPECT_EQ(profile->name(), "test-model");
  EXPECT_EQ(profile->demand_size(), kL);
  EXPECT_TRUE(app_->GetProfile(owner_, "test-model").ok());
}

TEST_F(SidecarTest, WatchersSeeCommittedEventsAndDrainingEndsThem) {
  auto session = Create(owner_);
  ASSERT_NE(session, nullptr);
  WatchSpec bad;
  bad.pool_interval_seconds = 0.001;
  EXPECT_NE(app_->Watch(owner_, bad).status().message().find("pool_interval_seconds"),
            std::string::npos);
  auto watcher = app_->Watch(owner_, WatchSpec());
  ASSERT_TRUE(watcher.ok()) << watcher.status();
  InlineEvent event(session->id(), 0, 12);
  ASSERT_TRUE(app_->Compress(owner_, event.call).ok());
  v1::CompressEvent seen;
  uint64_t dropped = 0;
  ASSERT_TRUE((*watcher)->Next(absl::Now() + absl::Seconds(5), &seen, &dropped));
  EXPECT_EQ(seen.session_id(), session->id());
  EXPECT_EQ(seen.epoch(), 1u);
  app_->SetDraining();
  EXPECT_TRUE((*watcher)->closed());
  EXPECT_EQ(app_->CreateSession(owner_, Spec()).status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(app_->Watch(owner_, WatchSpec()).status().code(), absl::StatusCode::kUnavailable);
  app_->Unwatch(*watcher);
}

}  // namespace
}  // namespace reasonalloc
