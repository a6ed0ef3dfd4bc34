// The compression event's transaction (server/event_transaction.h), in process: the order of its
// stages for a scripted plane and for the real inline and host shared-memory planes (managed and
// advisory, the latter over a worker's registered buffers), and that a
// failure anywhere between deciding and applying commits nothing, so the same step can be retried.
// (The CUDA plane runs the same transaction; tests/gpu covers it where a GPU exists.)
#include "server/event_transaction.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/arena_layout.h"
#include "core/compute_backend.h"
#include "core/dtype.h"
#include "core/engine.h"
#include "server/event_planes.h"
#include "server/external_buffers.h"
#include "server/proto_convert.h"
#include "server/session_arenas.h"
#include "server/session_registry.h"
#include "tests/unit/small_session.h"

namespace reasonalloc {
namespace {

using namespace small_session;  // NOLINT: the shared geometry

std::shared_ptr<Session> MakeSession(const SessionConfig& config) {
  auto engine = Engine::Create(config);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return std::make_shared<Session>("s1", std::shared_ptr<const Engine>(std::move(*engine)), 0,
                                   "test", absl::Minutes(1), "");
}

// A plane whose stages are scripted: it records the order it is called in and can fail at any
// stage.
class ScriptedPlane : public EventPlane {
 public:
  explicit ScriptedPlane(std::vector<std::string>* log, std::string fail_at = "")
      : log_(log), fail_at_(std::move(fail_at)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& session, int64_t) override {
    log_->push_back(absl::StrCat("decide@", session.Snapshot().epoch));
    if (fail_at_ == "decide") return absl::InvalidArgumentError("decide failed");
    PlannedEvent e;
    e.decision = KeepAll(kL, kHkv, std::vector<int32_t>(kL * kHkv, 3));
    return e;
  }
  absl::Status CheckFits(const PlannedEvent&) override {
    log_->push_back("fits");
    return fail_at_ == "fits" ? absl::ResourceExhaustedError("does not fit") : absl::OkStatus();
  }
  absl::Status Apply(PlannedEvent&) override {
    log_->push_back("apply");
    return fail_at_ == "apply" ? absl::ResourceExhaustedError("apply failed") : absl::OkStatus();
  }
  absl::Status Publish(const PlannedEvent&, uint64_t epoch) override {
    log_->push_back(absl::StrCat("publish@", epoch));
    return absl::OkStatus();
  }

 private:
  std::vector<std::string>* log_;
  std::string fail_at_;
};

// Wraps a real plane and fails once at `fail_at` ("fits" or "apply": before the real stage runs).
class FailOnce : public EventPlane {
 public:
  FailOnce(EventPlane* inner, std::string fail_at) : inner_(inner), fail_at_(std::move(fail_at)) {}
  absl::StatusOr<PlannedEvent> Decide(Session& s, int64_t step) override {
    return inner_->Decide(s, step);
  }
  absl::Status CheckFits(const PlannedEvent& e) override {
    if (fail_at_ == "fits") return absl::ResourceExhaustedError("injected: fits");
    return inner_->CheckFits(e);
  }
  absl::Status Apply(PlannedEvent& e) override {
    if (fail_at_ == "apply") return absl::InternalError("injected: apply");
    return inner_->Apply(e);
  }
  absl::Status Publish(const PlannedEvent& e, uint64_t epoch) override {
    return inner_->Publish(e, epoch);
  }

 private:
  EventPlane* inner_;
  std::string fail_at_;
};

const auto kT0 = std::chrono::steady_clock::now();

// The inline plane as the gRPC adapter drives it: the call converted from `request`, its answer
// written into `response` and refused above `max_message_bytes` (server/proto_convert.h).
struct WireInline {
  WireInline(const v1::CompressRequest& request, v1::CompressResponse* response,
             uint64_t max_message_bytes)
      : call(Convert(request, response, max_message_bytes)), plane(call, {}) {}
  static CompressCall Convert(const v1::CompressRequest& request, v1::CompressResponse* response,
                              uint64_t max_message_bytes) {
    CompressCall call = CompressCallFromProto(request);
    call.answer = WireAnswerSink(request, response, max_message_bytes);
    return call;
  }
  CompressCall call;
  InlinePlane plane;
};

TEST(EventTransaction, RunsDecideFitsApplyCommitPublishInOrder) {
  auto session = MakeSession(Config());
  std::vector<std::string> log;
  ScriptedPlane plane(&log);
  auto out = RunCompressEvent(*session, 5, plane, kT0);
  ASSERT_TRUE(out.ok()) << out.status();
  // Decided before the commit (epoch 0), published after it with the new epoch.
  EXPECT_EQ(log, (std::vector<std::string>{"decide@0", "fits", "apply", "publish@1"}));
  EXPECT_EQ(out->committed.epoch, 1u);
  EXPECT_EQ(session->Snapshot().last_step, 5);
  EXPECT_GT(out->decision.seconds.total, 0.0);
}

TEST(EventTransaction, AFailureBeforeTheCommitLeavesTheStepRetryable) {
  for (const std::string stage : {"decide", "fits", "apply"}) {
    SCOPED_TRACE(stage);
    auto session = MakeSession(Config());
    std::vector<std::string> log;
    ScriptedPlane failing(&log, stage);
    auto out = RunCompressEvent(*session, 7, failing, kT0);
    ASSERT_FALSE(out.ok());
    EXPECT_EQ(log.back().rfind("publish", 0), std::string::npos) << "published after a failure";
    EXPECT_EQ(session->Snapshot().last_step, -1);
    EXPECT_EQ(session->Snapshot().epoch, 0u);
    ScriptedPlane ok(&log);
    auto retry = RunCompressEvent(*session, 7, ok, kT0);
    ASSERT_TRUE(retry.ok()) << retry.status();
    EXPECT_EQ(retry->committed.epoch, 1u);
  }
}

TEST(EventTransaction, StepAndGuardAreCheckedBeforeAnythingIsRead) {
  auto session = MakeSession(Config());
  std::vector<std::string> log;
  ScriptedPlane plane(&log);
  ASSERT_TRUE(RunCompressEvent(*session, 3, plane, kT0).ok());
  log.clear();
  auto again = RunCompressEvent(*session, 3, plane, kT0);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(log.empty());
  auto guard = session->BeginCompress();
  ASSERT_TRUE(guard.ok());
  auto busy = RunCompressEvent(*session, 4, plane, kT0);
  EXPECT_EQ(busy.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(busy.status().message().find("in progress"), std::string::npos) << busy.status();
  EXPECT_TRUE(log.empty());
}

// An inline request of N rows per head, every value finite.
v1::CompressRequest InlineRequest(int64_t step, int n) {
  v1::CompressRequest r;
  r.set_session_id("s1");
  r.set_step(step);
  auto tensor = [](v1::Tensor* t, std::vector<int64_t> shape, float base) {
    t->set_dtype(v1::DTYPE_FLOAT32);
    int64_t count = 1;
    for (int64_t s : shape) {
      t->add_shape(s);
      count *= s;
    }
    std::vector<float> v(static_cast<size_t>(count));
    for (size_t i = 0; i < v.size(); ++i) v[i] = base + 0.01f * static_cast<float>(i % 97);
    t->set_data(std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float)));
  };
  auto* in = r.mutable_inline_tensors();
  tensor(in->mutable_query_window(), {kL, kHkv * kG, kWindow, kD}, 0.5f);
  tensor(in->mutable_keys(), {kL, kHkv, n, kD}, 0.1f);
  tensor(in->mutable_values(), {kL, kHkv, n, kD}, 0.2f);
  return r;
}

TEST(EventTransaction, InlinePlaneCommitsNothingWhenTheAnswerDoesNotFit) {
  auto session = MakeSession(Config());
  const v1::CompressRequest request = InlineRequest(0, 12);
  for (const std::string fail_at : {"fits", "apply"}) {
    SCOPED_TRACE(fail_at);
    v1::CompressResponse response;
    WireInline inline_plane(request, &response, 1 << 20);
    FailOnce plane(&inline_plane.plane, fail_at);
    ASSERT_FALSE(RunCompressEvent(*session, 0, plane, kT0).ok());
    EXPECT_EQ(session->Snapshot().epoch, 0u);
  }
  // The real plane's own refusal: an answer above max_message_bytes.
  v1::CompressResponse small;
  WireInline too_small(request, &small, 64);
  auto refused = RunCompressEvent(*session, 0, too_small.plane, kT0);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("max_message_bytes"), std::string::npos);
  EXPECT_EQ(small.ByteSizeLong(), 0u) << "a refused answer must not carry a partial response";
  EXPECT_EQ(session->Snapshot().last_step, -1);
  // The same step, retried with room: committed, compacted rows returned.
  v1::CompressResponse response;
  WireInline plane(request, &response, 1 << 20);
  auto out = RunCompressEvent(*session, 0, plane.plane, kT0);
  ASSERT_TRUE(out.ok()) << out.status();
  CompressOutcomeToProto(plane.call, *out, &response);
  EXPECT_EQ(response.epoch(), 1u);
  EXPECT_EQ(response.decision().num_layers(), kL);
  EXPECT_EQ(response.compacted_keys().shape(2), out->decision.max_kept());
  EXPECT_GT(response.timings().total_seconds(), 0.0);
}

TEST(EventTransaction, AMessagesAnswersAreRefusedBeforeTheCommitOnceTheyWouldOverflowIt) {
  // Two sessions' events in one CompressStream message whose answers share one limit: the first
  // fits, the second would take the batch result past it and is refused uncommitted.
  auto first = MakeSession(Config());
  auto second = MakeSession(Config());
  const v1::CompressRequest request = InlineRequest(0, 12);
  v1::CompressResponse alone;
  WireInline probe(request, &alone, 1 << 20);
  ASSERT_TRUE(RunCompressEvent(*MakeSession(Config()), 0, probe.plane, kT0).ok());
  const uint64_t one = alone.ByteSizeLong();
  const uint64_t limit = one * 3 / 2 + 200;  // room for one answer, not two
  uint64_t used = 0;
  v1::CompressResponse r1, r2;
  CompressCall c1 = CompressCallFromProto(request);
  c1.answer = WireAnswerSink(request, &r1, limit, &used);
  CompressCall c2 = CompressCallFromProto(request);
  c2.answer = WireAnswerSink(request, &r2, limit, &used);
  InlinePlane p1(c1, {}), p2(c2, {});
  ASSERT_TRUE(RunCompressEvent(*first, 0, p1, kT0).ok());
  auto refused = RunCompressEvent(*second, 0, p2, kT0);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("batch result"), std::string::npos) << refused.status();
  EXPECT_EQ(second->Snapshot().last_step, -1) << "an answer that could not be sent committed";
  EXPECT_EQ(r2.ByteSizeLong(), 0u);
  EXPECT_EQ(first->Snapshot().last_step, 0);
}

TEST(EventTransaction, ACalibrationSampleIsTakenOnlyWhenTheEventCommits) {
  auto session = MakeSession(Config());
  ASSERT_TRUE(session->StartCalibration(0.9, 1).ok());
  auto samples = [&] {
    int64_t total = 0;
    for (int64_t s : session->CalibrationSamples()) total += s;
    return total;
  };
  const v1::CompressRequest request = InlineRequest(0, 12);
  v1::CompressResponse small;
  WireInline refused(request, &small, 64);
  ASSERT_FALSE(RunCompressEvent(*session, 0, refused.plane, kT0).ok());
  EXPECT_EQ(samples(), 0) << "a refused event recorded a sample";
  v1::CompressResponse response;
  WireInline plane(request, &response, 1 << 20);
  auto out = RunCompressEvent(*session, 0, plane.plane, kT0);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->decision.evicted_tokens, 0);
  const int64_t one_event = samples();
  EXPECT_GT(one_event, 0) << "the committed step was not measured";
  // The next step refused again: still only the committed step's samples.
  const v1::CompressRequest next = InlineRequest(1, 12);
  v1::CompressResponse next_small;
  WireInline next_refused(next, &next_small, 64);
  ASSERT_FALSE(RunCompressEvent(*session, 1, next_refused.plane, kT0).ok());
  EXPECT_EQ(samples(), one_event);
}

TEST(EventTransaction, TheRecordCallbackRunsOnceAfterPublishUnderTheGuard) {
  auto session = MakeSession(Config());
  std::vector<std::string> log;
  ScriptedPlane plane(&log);
  int recorded = 0;
  auto out = RunCompressEvent(*session, 0, plane, kT0, [&](const EventOutcome& o) {
    ++recorded;
    EXPECT_EQ(log.back(), "publish@1");
    EXPECT_EQ(o.committed.epoch, 1u);
    EXPECT_FALSE(session->BeginCompress().ok()) << "the guard was released before recording";
  });
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(recorded, 1);
  std::vector<std::string> failing_log;
  ScriptedPlane failing(&failing_log, "apply");
  ASSERT_FALSE(
      RunCompressEvent(*session, 1, failing, kT0, [&](const EventOutcome&) { ++recorded; }).ok());
  EXPECT_EQ(recorded, 1) << "a failed event was recorded";
}

// A host session's event failed at fits and at apply (each before the real stage), then run:
// nothing is committed or published until it succeeds, then the epoch and every head's length.
// `unchanged` checks the worker-visible memory after each failure.
EventOutcome FailTwiceThenCommit(Session& session, SessionArenas& arenas, const WorkerView& view,
                                 int32_t rows_before, const std::function<void()>& unchanged) {
  CompressCall call;
  call.session_id = "s1";
  call.step = kWindow;
  for (const std::string fail_at : {"fits", "apply"}) {
    SCOPED_TRACE(fail_at);
    HostShmPlane host(call, arenas, {});
    FailOnce plane(&host, fail_at);
    EXPECT_FALSE(RunCompressEvent(session, kWindow, plane, kT0).ok());
    EXPECT_EQ(session.Snapshot().epoch, 0u);
    EXPECT_EQ(*view.epoch, 0u);
    EXPECT_EQ(view.len[0], rows_before) << "the result block changed before the commit";
    if (unchanged) unchanged();
  }
  HostShmPlane plane(call, arenas, {});
  auto out = RunCompressEvent(session, kWindow, plane, kT0);
  EXPECT_TRUE(out.ok()) << out.status();
  if (!out.ok()) return {};
  EXPECT_EQ(out->committed.epoch, 1u);
  EXPECT_EQ(*view.epoch, 1u);
  for (int i = 0; i < kL * kHkv; ++i) EXPECT_EQ(view.len[i], out->decision.kept_lengths[i]);
  EXPECT_LE(view.len[0], kBudget);
  return *std::move(out);
}

TEST(EventTransaction, HostShmPlaneCommitsNothingBeforeApplyAndPublishesTheEpochLast) {
  const SessionConfig config = Config();
  auto session = MakeSession(config);
  auto arenas_or = SessionArenas::Create(config);
  ASSERT_TRUE(arenas_or.ok()) << arenas_or.status();
  SessionArenas& arenas = **arenas_or;
  const SessionLayout layout = MakeSessionLayout(config);
  const WorkerView worker = FillManagedArenas(arenas, config);
  const std::vector<unsigned char> kv_before(worker.kv, worker.kv + layout.kv.bytes);
  FailTwiceThenCommit(*session, arenas, worker, kBudget + kDelta, [&] {
    EXPECT_EQ(std::memcmp(worker.kv, kv_before.data(), kv_before.size()), 0) << "rows moved";
  });
}

// A POSIX shared-memory object of fp32 values, as a worker owns one; unlinked at the end.
struct WorkerShm {
  WorkerShm(const std::string& tag, size_t floats, float base)
      : name(absl::StrCat("/txn-test-worker-", ::getpid(), "-", tag)),
        bytes(floats * sizeof(float)) {
    ::shm_unlink(name.c_str());
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0) << name;
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes)), 0);
    std::vector<float> v(floats);
    for (size_t i = 0; i < floats; ++i) v[i] = base + 0.01f * static_cast<float>(i % 89);
    EXPECT_EQ(::pwrite(fd, v.data(), bytes, 0), static_cast<ssize_t>(bytes));
    ::close(fd);
  }
  ~WorkerShm() { ::shm_unlink(name.c_str()); }
  // One contiguous fp32 array of `shape` filling the object.
  v1::ArenaDescriptor Describe(const char* kind, const char* array,
                               std::vector<int64_t> shape) const {
    v1::ArenaDescriptor d;
    d.set_kind(kind);
    d.set_memory(v1::MEMORY_KIND_HOST_SHM);
    d.set_shm_name(name);
    d.set_byte_length(bytes);
    d.set_layout_version(1);
    auto* a = d.add_arrays();
    a->set_name(array);
    a->set_dtype(v1::DTYPE_FLOAT32);
    int64_t stride = 1;
    std::vector<int64_t> strides(shape.size());
    for (size_t i = shape.size(); i-- > 0;) {
      strides[i] = stride;
      stride *= shape[i];
    }
    for (int64_t x : shape) a->add_shape(x);
    for (int64_t x : strides) a->add_strides(x);
    a->set_byte_offset(0);
    a->set_byte_length(bytes);
    return d;
  }
  std::string name;
  size_t bytes;
};

TEST(EventTransaction, AdvisoryHostShmPlaneCommitsNothingBeforeApply) {
  const SessionConfig config = Config(/*managed=*/false);
  auto session = MakeSession(config);
  auto arenas_or = SessionArenas::Create(config);
  ASSERT_TRUE(arenas_or.ok()) << arenas_or.status();
  SessionArenas& arenas = **arenas_or;
  ASSERT_TRUE(arenas.advisory());
  // The worker's own keys and query window, registered as RegisterBuffers would.
  constexpr int kRows = kBudget + kDelta;
  const WorkerShm keys("k", size_t{kL} * kHkv * kRows * kD, 0.1f);
  const WorkerShm queries("q", size_t{kL} * kHkv * kG * kWindow * kD, 0.5f);
  google::protobuf::RepeatedPtrField<v1::ArenaDescriptor> buffers;
  *buffers.Add() = keys.Describe("keys", "k", {kL, kHkv, kRows, kD});
  *buffers.Add() = queries.Describe("query_window", "q", {kL, kHkv * kG, kWindow, kD});
  PeerIdentity worker;
  worker.local = true;
  worker.uid = ::geteuid();
  auto opened = ExternalBuffers::Open(buffers, config, worker);
  ASSERT_TRUE(opened.ok()) << opened.status();
  arenas.Register(std::move(opened).value());
  const WorkerView view = ViewOf(arenas, config);
  for (int i = 0; i < kL * kHkv; ++i) view.len[i] = kRows;
  const EventOutcome out = FailTwiceThenCommit(*session, arenas, view, kRows, nullptr);
  EXPECT_GT(out.decision.evicted_tokens, 0);
}

// A compactor that refuses, as a device fault or a failed scratch reservation would.
class RefusingCompactor final : public Compactor {
 public:
  absl::Status CompactInPlace(const Decision&, std::span<const int64_t>, std::span<const int64_t>,
                              size_t, void*, void*) override {
    ++calls;
    return absl::ResourceExhaustedError("no scratch (test)");
  }
  int calls = 0;
};

TEST(EventTransaction, CompactionSwapsTheHeadRegionsOnlyWhenTheRowsMoved) {
  Decision d = KeepAll(kL, kHkv, std::vector<int32_t>(kL * kHkv, 3));
  d.budgets.assign(kL * kHkv, 3);
  std::vector<int64_t> offsets = {0, 10, 20, 30};
  std::vector<int32_t> capacities = {10, 10, 10, 10};
  std::vector<float> k(40 * kD), v(40 * kD);
  RefusingCompactor refusing;
  EXPECT_FALSE(CompactIntoRegions(d, kDelta, kD * sizeof(float), &refusing, k.data(), v.data(),
                                  &offsets, &capacities)
                   .ok());
  EXPECT_EQ(refusing.calls, 1);
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 10, 20, 30})) << "regions changed after a refusal";
  EXPECT_EQ(capacities, (std::vector<int32_t>{10, 10, 10, 10}));
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<float>(i);
  HostCompactor host;
  ASSERT_TRUE(CompactIntoRegions(d, kDelta, kD * sizeof(float), &host, k.data(), v.data(), &offsets,
                                 &capacities)
                  .ok());
  // Budget 3 + buffer 4 per head: regions of 7 rows; head 1's rows 0-2 came from rows 10-12.
  EXPECT_EQ(offsets, (std::vector<int64_t>{0, 7, 14, 21}));
  EXPECT_EQ(capacities, (std::vector<int32_t>{7, 7, 7, 7}));
  EXPECT_EQ(k[7 * kD], static_cast<float>(10 * kD));
}

// A plane that batches with the others of its `key` (as CUDA sessions sharing an engine do): it
// logs its stages with its name, and DecideTogether logs the names it decides together.
class BatchedPlane : public ScriptedPlane {
 public:
  BatchedPlane(std::vector<std::string>* log, std::string name, const void* key,
               std::string fail_at = "")
      : ScriptedPlane(log, fail_at),
        log_(log),
        name_(std::move(name)),
        key_(key),
        fail_at_(std::move(fail_at)) {}
  const void* batch_key() const override { return key_; }
  absl::Status Prepare(Session&, int64_t) override {
    log_->push_back("prepare " + name_);
    return fail_at_ == "prepare" ? absl::InvalidArgumentError("prepare failed " + name_)
                                 : absl::OkStatus();
  }
  void DecideTogether(std::span<EventPlane* const> planes,
                      std::span<absl::StatusOr<PlannedEvent>> out) override {
    std::string names;
    for (EventPlane* p : planes) names += " " + static_cast<BatchedPlane*>(p)->name_;
    log_->push_back("together" + names);
    for (size_t i = 0; i < planes.size(); ++i) {
      if (static_cast<BatchedPlane*>(planes[i])->fail_at_ == "decide") {
        out[i] = absl::InvalidArgumentError("bad keys");
        continue;
      }
      PlannedEvent e;
      e.decision = KeepAll(kL, kHkv, std::vector<int32_t>(kL * kHkv, 3));
      out[i] = std::move(e);
    }
  }

 private:
  std::vector<std::string>* log_;
  std::string name_;
  const void* key_;
  std::string fail_at_;
};

std::shared_ptr<Session> NamedSession(const std::string& id) {
  auto engine = Engine::Create(Config());
  EXPECT_TRUE(engine.ok()) << engine.status();
  return std::make_shared<Session>(id, std::shared_ptr<const Engine>(std::move(*engine)), 0, "test",
                                   absl::Minutes(1), "");
}

TEST(EventTransaction, PlanesSharingABatchKeyDecideTogetherAndFailAlone) {
  std::vector<std::string> log;
  const int engine_a = 0, engine_b = 0;
  auto s1 = NamedSession("s1"), s2 = NamedSession("s2"), s3 = NamedSession("s3"),
       s4 = NamedSession("s4"), s5 = NamedSession("s5");
  BatchedPlane p1(&log, "a1", &engine_a), p2(&log, "a2", &engine_a, "decide"),
      p3(&log, "b1", &engine_b), p4(&log, "a3", &engine_a), p5(&log, "a4", &engine_a, "prepare");
  std::vector<EventJob> jobs(5);
  Session* sessions[] = {s1.get(), s2.get(), s3.get(), s4.get(), s5.get()};
  EventPlane* planes[] = {&p1, &p2, &p3, &p4, &p5};
  int recorded = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    jobs[i].session = sessions[i];
    jobs[i].step = 0;
    jobs[i].plane = planes[i];
    jobs[i].record = [&recorded](const EventOutcome&) { ++recorded; };
  }
  RunCompressEvents(jobs);
  // One decision per key, with every prepared plane of that key; a1 and a3 commit, a2 fails alone
  // (its session stays at step 0, retryable), a4 never got past its own prepare.
  const std::vector<std::string> want = {
      "prepare a1",  "prepare a2", "prepare b1", "prepare a3", "prepare a4", "together a1 a2 a3",
      "fits",        "apply",      "publish@1",  "fits",       "apply",      "publish@1",
      "together b1", "fits",       "apply",      "publish@1"};
  EXPECT_EQ(log, want);
  EXPECT_TRUE(jobs[0].outcome.ok()) << jobs[0].outcome.status();
  EXPECT_EQ(jobs[1].outcome.status().message(), "bad keys");
  EXPECT_TRUE(jobs[2].outcome.ok());
  EXPECT_TRUE(jobs[3].outcome.ok());
  EXPECT_EQ(jobs[4].outcome.status().message(), "prepare failed a4");
  EXPECT_EQ(recorded, 3);
  EXPECT_EQ(s2->Snapshot().epoch, 0u);
  EXPECT_EQ(s1->Snapshot().epoch, 1u);
  // Every guard is released: each session takes its next event.
  for (Session* s : sessions) EXPECT_TRUE(s->BeginCompress().ok()) << s->id();
}

TEST(EventTransaction, ASessionsSecondEventInOneMessageRunsAfterItsFirst) {
  std::vector<std::string> log;
  const int engine = 0;
  auto s1 = NamedSession("s1"), s2 = NamedSession("s2");
  BatchedPlane first(&log, "s1@0", &engine), other(&log, "s2@0", &engine),
      second(&log, "s1@4", &engine);
  std::vector<EventJob> jobs(3);
  jobs[0] = {s1.get(), 0, &first, {}, nullptr, absl::UnknownError("")};
  jobs[1] = {s2.get(), 0, &other, {}, nullptr, absl::UnknownError("")};
  jobs[2] = {s1.get(), kDelta, &second, {}, nullptr, absl::UnknownError("")};
  RunCompressEvents(jobs);
  for (const EventJob& j : jobs) EXPECT_TRUE(j.outcome.ok()) << j.outcome.status();
  EXPECT_EQ(log[0], "prepare s1@0");
  EXPECT_EQ(log[2], "together s1@0 s2@0");
  EXPECT_NE(std::find(log.begin(), log.end(), "together s1@4"), log.end());
  EXPECT_EQ(s1->Snapshot().epoch, 2u);
}

}  // namespace
}  // namespace reasonalloc
