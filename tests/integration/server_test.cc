// The real server binary driven through the C++ client: sessions, inline Compress, bad input,
// health, draining, limits and metrics.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <thread>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/sync.h"
#include "tests/integration/server_process.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;
using testing::ServerProcess;
using Health = grpc::health::v1::HealthCheckResponse;

// Geometry used throughout: L=2, Hq=4, Hkv=2, d=8, window 4.
constexpr int kL = 2, kHq = 4, kHkv = 2, kD = 8, kWindow = 4;

v1::CreateSessionRequest SessionRequest(const std::string& scorer = "snapkv", int budget = 12,
                                        v1::DType dtype = v1::DTYPE_FLOAT32) {
  v1::CreateSessionRequest r;
  auto* m = r.mutable_model();
  m->set_name("test-model");
  m->set_num_layers(kL);
  m->set_num_q_heads(kHq);
  m->set_num_kv_heads(kHkv);
  m->set_head_dim(kD);
  m->set_dtype(dtype);
  m->set_max_context(4096);
  r.mutable_budget()->set_budget(budget);
  r.mutable_budget()->set_window(kWindow);
  r.mutable_budget()->set_buffer(16);
  r.mutable_scorer()->set_name(scorer);
  r.set_client_tag("integration");
  return r;
}

v1::Tensor F32Tensor(std::vector<int64_t> shape, const std::vector<float>& values) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_FLOAT32);
  for (int64_t d : shape) t.add_shape(d);
  t.set_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
  return t;
}

// Deterministic inputs: value depends on the flat index only.
std::vector<float> Pattern(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * std::sin(0.37f * static_cast<float>(i) + 0.1f);
  return v;
}

v1::CompressRequest CompressRequest(const std::string& session, int64_t step, int n,
                                    bool with_values = true) {
  v1::CompressRequest r;
  r.set_session_id(session);
  r.set_step(step);
  auto* in = r.mutable_inline_tensors();
  *in->mutable_query_window() =
      F32Tensor({kL, kHq, kWindow, kD}, Pattern(kL * kHq * kWindow * kD, 1));
  *in->mutable_keys() = F32Tensor({kL, kHkv, n, kD}, Pattern(size_t{kL} * kHkv * n * kD, 2));
  if (with_values) {
    std::vector<float> v(size_t{kL} * kHkv * n * kD);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i / kD);  // row id
    *in->mutable_values() = F32Tensor({kL, kHkv, n, kD}, v);
  }
  return r;
}

std::unique_ptr<ServerProcess> MustStart(std::vector<std::string> args = {}) {
  auto p = ServerProcess::Start(std::move(args));
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(p).value() : nullptr;
}

std::string CreateOrDie(ServerProcess& server, const v1::CreateSessionRequest& r) {
  auto created = server.client().CreateSession(r);
  EXPECT_TRUE(created.ok()) << created.status();
  return created.ok() ? created->session().session_id() : "";
}

void ExpectStatus(const absl::Status& s, absl::StatusCode code, const std::string& needle,
                  const std::string& what) {
  EXPECT_EQ(s.code(), code) << what << ": " << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(needle)) << what;
}

TEST(Server, HealthAndSocketPermissions) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(*server->client().CheckHealth(""), Health::SERVING);
  EXPECT_EQ(*server->client().CheckHealth("reasonalloc.v1.KvSidecar"), Health::SERVING);
  EXPECT_EQ(server->client().CheckHealth("no.such.Service").status().code(),
            absl::StatusCode::kNotFound);
  struct stat st {};
  ASSERT_EQ(stat(server->socket_path().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(Server, SocketModeFlag) {
  auto server = MustStart({"--socket_mode=0660"});
  ASSERT_NE(server, nullptr);
  struct stat st {};
  ASSERT_EQ(stat(server->socket_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
}

TEST(Server, ServerInfo) {
  auto server = MustStart({"--max_arena_bytes=123456789", "--tcp_listen=127.0.0.1:0"});
  ASSERT_NE(server, nullptr);
  auto info = server->client().GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->backend(), "cpu");
  EXPECT_EQ(info->arena_capacity_bytes(), 123456789u);
  EXPECT_EQ(info->arena_free_bytes(), 123456789u);
  EXPECT_THAT(std::vector<std::string>(info->scorers().begin(), info->scorers().end()),
              ::testing::IsSupersetOf({"snapkv", "streaming"}));
  EXPECT_FALSE(info->metrics_address().empty());
  ASSERT_EQ(info->listen_addresses_size(), 2);
  EXPECT_EQ(info->listen_addresses(0), server->target());
  // The TCP listener serves the same API.
  Client::Options o;
  o.target = info->listen_addresses(1);
  EXPECT_THAT(o.target, HasSubstr("127.0.0.1:"));
  auto tcp = Client::Connect(o);
  ASSERT_TRUE(tcp.ok());
  EXPECT_TRUE((*tcp)->GetServerInfo().ok());
}

TEST(Server, SessionLifecycle) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  auto created = c.CreateSession(SessionRequest());
  ASSERT_TRUE(created.ok()) << created.status();
  const v1::SessionInfo& s = created->session();
  EXPECT_EQ(s.session_id().size(), 32u);
  EXPECT_EQ(s.budget().buffer(), 16);
  // Defaults are made explicit: no sinks for snapkv (streaming's default is 4), recent = window.
  EXPECT_EQ(s.budget().sinks(), 0);
  EXPECT_EQ(s.budget().recent(), s.budget().window());
  EXPECT_EQ(s.scorer().pool_kernel(), 7);
  EXPECT_EQ(s.allocator().name(), "uniform");
  EXPECT_EQ(s.mode(), v1::SESSION_MODE_MANAGED);
  EXPECT_EQ(s.memory(), v1::MEMORY_KIND_INLINE);
  EXPECT_EQ(s.last_step(), -1);
  EXPECT_EQ(s.layer_budgets_size(), kL);
  EXPECT_GT(s.reserved_bytes(), 0u);

  auto info = c.GetServerInfo();
  EXPECT_EQ(info->arena_capacity_bytes() - info->arena_free_bytes(), s.reserved_bytes());
  auto got = c.GetSession(s.session_id());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->client_tag(), "integration");
  auto list = c.ListSessions();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_TRUE(c.ListSessions("other-model")->empty());
  auto ka = c.KeepAlive(s.session_id(), 120);
  ASSERT_TRUE(ka.ok());
  EXPECT_GT(ka->lease_expires_unix_ms(), absl::ToUnixMillis(absl::Now() + absl::Seconds(100)));

  auto closed = c.CloseSession(s.session_id());
  ASSERT_TRUE(closed.ok());
  EXPECT_TRUE(closed->existed());
  EXPECT_EQ(closed->released_bytes(), s.reserved_bytes());
  auto again = c.CloseSession(s.session_id());
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->existed());
  ExpectStatus(c.GetSession(s.session_id()).status(), absl::StatusCode::kNotFound, s.session_id(),
               "get after close");
  ExpectStatus(c.Compress(CompressRequest(s.session_id(), 0, 20)).status(),
               absl::StatusCode::kNotFound, "session_id", "compress after close");
  ExpectStatus(c.KeepAlive(s.session_id()).status(), absl::StatusCode::kNotFound, "session_id",
               "keepalive after close");
  EXPECT_EQ(c.GetServerInfo()->arena_free_bytes(), info->arena_capacity_bytes());
}

TEST(Server, LapsedLeaseReclaimsTheSession) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  auto r = SessionRequest();
  r.set_lease_seconds(0.3);
  const std::string id = CreateOrDie(*server, r);
  EXPECT_LT(c.GetServerInfo()->arena_free_bytes(), c.GetServerInfo()->arena_capacity_bytes());
  absl::SleepFor(absl::Seconds(1));
  ExpectStatus(c.GetSession(id).status(), absl::StatusCode::kNotFound, "expired", "lapsed lease");
  auto info = c.GetServerInfo();
  EXPECT_EQ(info->arena_free_bytes(), info->arena_capacity_bytes());
  EXPECT_EQ(info->sessions(), 0);
}

TEST(Server, FullPoolRefusesWithoutDisturbingAdmittedSessions) {
  auto probe = MustStart();
  ASSERT_NE(probe, nullptr);
  auto created = probe->client().CreateSession(SessionRequest());
  ASSERT_TRUE(created.ok());
  const uint64_t one = created->session().reserved_bytes();
  probe.reset();

  auto server = MustStart({absl::StrCat("--max_arena_bytes=", one + one / 2)});
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  const std::string first = CreateOrDie(*server, SessionRequest());
  ExpectStatus(c.CreateSession(SessionRequest()).status(), absl::StatusCode::kResourceExhausted,
               "arena bytes", "second session");
  auto compressed = c.Compress(CompressRequest(first, 0, 30));
  EXPECT_TRUE(compressed.ok()) << compressed.status();
  EXPECT_EQ(c.ListSessions()->size(), 1u);
}

TEST(Server, StreamingKeepsSinksAndRecentTokens) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest("streaming", 10));
  // 30 tokens, budget 10, window 4, sinks 4: keep 0..3 and the 6 most recent, 24..29.
  auto r = CompressRequest(id, 0, 30);
  auto got = server->client().Compress(r);
  ASSERT_TRUE(got.ok()) << got.status();
  const v1::Decision& d = got->decision();
  EXPECT_EQ(got->epoch(), 1u);
  ASSERT_EQ(d.kept_lengths_size(), kL * kHkv);
  const std::vector<int32_t> expected = {0, 1, 2, 3, 24, 25, 26, 27, 28, 29};
  for (int h = 0; h < kL * kHkv; ++h) {
    EXPECT_EQ(d.kept_lengths(h), 10);
    EXPECT_EQ(d.budgets(h), 10);
    std::vector<int32_t> kept(d.kept_indices().begin() + h * 10,
                              d.kept_indices().begin() + (h + 1) * 10);
    EXPECT_EQ(kept, expected) << "head " << h;
  }
  EXPECT_EQ(d.evicted_tokens(), kL * kHkv * 20);
  // Mask: one 64-bit word per head with exactly the kept bits.
  ASSERT_EQ(d.words_per_head(), 1);
  uint64_t word;
  std::memcpy(&word, d.keep_mask().data(), 8);
  EXPECT_EQ(word, 0xfull | (0x3full << 24));
  // Compacted values: row r of head h holds the value row id of the kept token.
  const v1::Tensor& cv = got->compacted_values();
  ASSERT_EQ(cv.shape_size(), 4);
  EXPECT_EQ(cv.shape(2), 10);
  std::vector<float> values(cv.data().size() / 4);
  std::memcpy(values.data(), cv.data().data(), cv.data().size());
  for (int h = 0; h < kL * kHkv; ++h) {
    for (int r2 = 0; r2 < 10; ++r2) {
      EXPECT_EQ(values[static_cast<size_t>((h * 10 + r2) * kD)],
                static_cast<float>(h * 30 + expected[static_cast<size_t>(r2)]));
    }
  }
  auto info = server->client().GetSession(id);
  EXPECT_EQ(info->epoch(), 1u);
  EXPECT_EQ(info->last_step(), 0);
  EXPECT_EQ(info->evicted_tokens_total(), uint64_t{kL * kHkv * 20});
}

TEST(Server, SnapKvKeepsAttendedKeysInFp16) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  auto req = SessionRequest("snapkv", 6, v1::DTYPE_FLOAT16);
  req.mutable_scorer()->set_pool_kernel(1);
  req.set_mode(v1::SESSION_MODE_ADVISORY);
  const std::string id = CreateOrDie(*server, req);
  // Every window query is +x; keys 5 and 11 point along +x, the rest along +y. Budget 6 - window 4
  // = 2 candidates kept: 5 and 11, plus the window 16..19.
  const int n = 20;
  v1::CompressRequest r;
  r.set_session_id(id);
  r.set_step(128);
  std::vector<uint16_t> q(size_t{kL} * kHq * kWindow * kD, FloatToHalf(0.0f));
  for (size_t i = 0; i < q.size(); i += kD) q[i] = FloatToHalf(4.0f);
  std::vector<uint16_t> k(size_t{kL} * kHkv * n * kD, FloatToHalf(0.0f));
  for (int head = 0; head < kL * kHkv; ++head) {
    for (int j = 0; j < n; ++j) {
      const size_t row = (static_cast<size_t>(head) * n + j) * kD;
      k[row + ((j == 5 || j == 11) ? 0 : 1)] = FloatToHalf(2.0f);
    }
  }
  auto* in = r.mutable_inline_tensors();
  in->mutable_query_window()->set_dtype(v1::DTYPE_FLOAT16);
  for (int d : {kL, kHq, kWindow, kD}) in->mutable_query_window()->add_shape(d);
  in->mutable_query_window()->set_data(
      std::string(reinterpret_cast<char*>(q.data()), q.size() * 2));
  in->mutable_keys()->set_dtype(v1::DTYPE_FLOAT16);
  for (int d : {kL, kHkv, n, kD}) in->mutable_keys()->add_shape(d);
  in->mutable_keys()->set_data(std::string(reinterpret_cast<char*>(k.data()), k.size() * 2));
  auto got = server->client().Compress(r);
  ASSERT_TRUE(got.ok()) << got.status();
  const std::vector<int32_t> expected = {5, 11, 16, 17, 18, 19};
  for (int h = 0; h < kL * kHkv; ++h) {
    std::vector<int32_t> kept(got->decision().kept_indices().begin() + h * 6,
                              got->decision().kept_indices().begin() + (h + 1) * 6);
    EXPECT_EQ(kept, expected) << "head " << h;
  }
  EXPECT_EQ(got->compacted_keys().shape_size(), 0);  // advisory: no KV comes back
}

TEST(Server, RaggedHeadsAndOmittedMask) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest("streaming", 10));
  auto r = CompressRequest(id, 3, 30);
  for (int len : {30, 5, 12, 0}) r.mutable_inline_tensors()->add_lengths(len);
  r.set_omit_keep_mask(true);
  auto got = server->client().Compress(r);
  ASSERT_TRUE(got.ok()) << got.status();
  const auto& d = got->decision();
  EXPECT_EQ(std::vector<int32_t>(d.kept_lengths().begin(), d.kept_lengths().end()),
            (std::vector<int32_t>{10, 5, 10, 0}));
  EXPECT_TRUE(d.keep_mask().empty());
  EXPECT_EQ(d.evicted_tokens(), 20 + 0 + 2 + 0);
}

struct BadCreate {
  const char* name;
  std::function<void(v1::CreateSessionRequest&)> mutate;
  absl::StatusCode code;
  const char* needle;
};

TEST(Server, BadCreateSessionRequestsNameTheField) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  const BadCreate cases[] = {
      {"zero layers", [](auto& r) { r.mutable_model()->set_num_layers(0); },
       absl::StatusCode::kInvalidArgument, "model.num_layers"},
      {"negative kv heads", [](auto& r) { r.mutable_model()->set_num_kv_heads(-2); },
       absl::StatusCode::kInvalidArgument, "model.num_kv_heads"},
      {"negative q heads", [](auto& r) { r.mutable_model()->set_num_q_heads(-4); },
       absl::StatusCode::kInvalidArgument, "model.num_q_heads"},
      {"zero head dim", [](auto& r) { r.mutable_model()->set_head_dim(0); },
       absl::StatusCode::kInvalidArgument, "model.head_dim"},
      {"hq not a multiple", [](auto& r) { r.mutable_model()->set_num_q_heads(5); },
       absl::StatusCode::kInvalidArgument, "multiple of model.num_kv_heads"},
      {"unspecified dtype", [](auto& r) { r.mutable_model()->set_dtype(v1::DTYPE_UNSPECIFIED); },
       absl::StatusCode::kInvalidArgument, "model.dtype"},
      {"unknown dtype", [](auto& r) { r.mutable_model()->set_dtype(static_cast<v1::DType>(42)); },
       absl::StatusCode::kInvalidArgument, "model.dtype = 42"},
      {"unknown scorer", [](auto& r) { r.mutable_scorer()->set_name("oracle"); },
       absl::StatusCode::kInvalidArgument, "scorer.name \"oracle\""},
      {"unknown allocator", [](auto& r) { r.mutable_allocator()->set_name("random"); },
       absl::StatusCode::kInvalidArgument, "allocator.name \"random\""},
      {"budget below window + 1", [](auto& r) { r.mutable_budget()->set_budget(4); },
       absl::StatusCode::kInvalidArgument, "budget.budget = 4"},
      {"budget above max_context", [](auto& r) { r.mutable_budget()->set_budget(5000); },
       absl::StatusCode::kInvalidArgument, "model.max_context"},
      {"negative lease", [](auto& r) { r.set_lease_seconds(-1); },
       absl::StatusCode::kInvalidArgument, "lease_seconds"},
      {"unknown mode", [](auto& r) { r.set_mode(static_cast<v1::SessionMode>(9)); },
       absl::StatusCode::kInvalidArgument, "mode"},
      {"CUDA IPC on a cpu server", [](auto& r) { r.set_memory(v1::MEMORY_KIND_CUDA_IPC); },
       absl::StatusCode::kFailedPrecondition, "--device cuda:N"},
  };
  for (const BadCreate& bad : cases) {
    auto r = SessionRequest();
    bad.mutate(r);
    ExpectStatus(server->client().CreateSession(r).status(), bad.code, bad.needle, bad.name);
  }
  EXPECT_EQ(server->client().GetServerInfo()->sessions(), 0);
}

struct BadCompress {
  const char* name;
  std::function<void(v1::CompressRequest&)> mutate;
  absl::StatusCode code;
  const char* needle;
};

TEST(Server, BadCompressRequestsNameTheTensor) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest());
  const float nan = std::nanf("");
  const BadCompress cases[] = {
      {"keys byte length",
       [](auto& r) { r.mutable_inline_tensors()->mutable_keys()->mutable_data()->resize(100); },
       absl::StatusCode::kInvalidArgument, "inline_tensors.keys holds 100 bytes"},
      {"query shape",
       [](auto& r) { r.mutable_inline_tensors()->mutable_query_window()->set_shape(1, 3); },
       absl::StatusCode::kInvalidArgument, "inline_tensors.query_window has shape"},
      {"keys rank",
       [](auto& r) { r.mutable_inline_tensors()->mutable_keys()->mutable_shape()->RemoveLast(); },
       absl::StatusCode::kInvalidArgument, "inline_tensors.keys has shape"},
      {"keys dtype",
       [](auto& r) {
         r.mutable_inline_tensors()->mutable_keys()->set_dtype(v1::DTYPE_UNSPECIFIED);
       },
       absl::StatusCode::kInvalidArgument, "inline_tensors.keys.dtype"},
      {"nan query",
       [nan](auto& r) {
         std::memcpy(r.mutable_inline_tensors()->mutable_query_window()->mutable_data()->data() + 8,
                     &nan, 4);
       },
       absl::StatusCode::kInvalidArgument,
       "inline_tensors.query_window holds a NaN or Inf at flat index 2"},
      {"inf key",
       [](auto& r) {
         const float inf = INFINITY;
         std::memcpy(r.mutable_inline_tensors()->mutable_keys()->mutable_data()->data() + 4, &inf,
                     4);
       },
       absl::StatusCode::kInvalidArgument, "inline_tensors.keys holds a NaN or Inf"},
      {"nan value",
       [nan](auto& r) {
         std::memcpy(r.mutable_inline_tensors()->mutable_values()->mutable_data()->data(), &nan, 4);
       },
       absl::StatusCode::kInvalidArgument, "inline_tensors.values holds a NaN or Inf"},
      {"missing values (managed)", [](auto& r) { r.mutable_inline_tensors()->clear_values(); },
       absl::StatusCode::kFailedPrecondition, "inline_tensors.values is required"},
      {"cuda event on an inline session", [](auto& r) { r.set_cuda_event_handle("x"); },
       absl::StatusCode::kFailedPrecondition, "cuda_event_handle"},
      {"keys in another dtype",
       [](auto& r) {
         auto* k = r.mutable_inline_tensors()->mutable_keys();
         k->set_dtype(v1::DTYPE_FLOAT16);
         k->mutable_data()->resize(k->data().size() / 2);
       },
       absl::StatusCode::kInvalidArgument, "inline_tensors.keys has dtype float16"},
      {"oversized session id", [](auto& r) { r.set_session_id(std::string(100000, 'a')); },
       absl::StatusCode::kInvalidArgument, "session_id is 100000 bytes long"},
      {"missing tensors", [](auto& r) { r.clear_inline_tensors(); },
       absl::StatusCode::kInvalidArgument, "inline_tensors is required"},
      {"lengths count", [](auto& r) { r.mutable_inline_tensors()->add_lengths(3); },
       absl::StatusCode::kInvalidArgument, "inline_tensors.lengths"},
      {"negative step", [](auto& r) { r.set_step(-5); }, absl::StatusCode::kInvalidArgument,
       "step = -5"},
      {"unknown session", [](auto& r) { r.set_session_id("0123"); }, absl::StatusCode::kNotFound,
       "session_id \"0123\""},
      // The session is checked before the tensors: an unknown dtype for a session that does not
      // exist is NOT_FOUND.
      {"unknown dtype for an unknown session",
       [](auto& r) {
         r.set_session_id("0123");
         r.mutable_inline_tensors()->mutable_keys()->set_dtype(static_cast<v1::DType>(99));
       },
       absl::StatusCode::kNotFound, "session_id \"0123\""},
  };
  for (const BadCompress& bad : cases) {
    auto r = CompressRequest(id, 10, 24);
    bad.mutate(r);
    ExpectStatus(server->client().Compress(r).status(), bad.code, bad.needle, bad.name);
  }
  // None of the failures advanced the session; the step rule holds afterwards.
  EXPECT_EQ(server->client().GetSession(id)->epoch(), 0u);
  ASSERT_TRUE(server->client().Compress(CompressRequest(id, 10, 24)).ok());
  ExpectStatus(server->client().Compress(CompressRequest(id, 10, 24)).status(),
               absl::StatusCode::kFailedPrecondition, "does not follow", "repeated step");
}

TEST(Server, RacingCompressOnOneSessionIsRefused) {
  auto server = MustStart({"--testing_compress_delay_ms=400"});
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest());
  auto first = std::async(std::launch::async, [&] {
    return server->client().Compress(CompressRequest(id, 1, 24)).status();
  });
  absl::SleepFor(absl::Milliseconds(150));
  const absl::Status second = server->client().Compress(CompressRequest(id, 2, 24)).status();
  ExpectStatus(second, absl::StatusCode::kFailedPrecondition, "already has a Compress in progress",
               "racing call");
  EXPECT_TRUE(first.get().ok());
  // Other sessions are not blocked by it.
  const std::string other = CreateOrDie(*server, SessionRequest());
  EXPECT_TRUE(server->client().Compress(CompressRequest(other, 1, 24)).ok());
}

TEST(Server, OversizedMessagesAreRefused) {
  auto server = MustStart({"--max_message_bytes=65536"});
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(server->client().GetServerInfo()->max_message_bytes(), 65536u);
  const std::string id = CreateOrDie(*server, SessionRequest());
  // 2 x 2 x 600 x 8 fp32 keys and values: ~150 KiB.
  ExpectStatus(server->client().Compress(CompressRequest(id, 0, 600)).status(),
               absl::StatusCode::kResourceExhausted, "", "oversized request");
  EXPECT_TRUE(server->client().Compress(CompressRequest(id, 1, 50)).ok());
}

TEST(Server, CompressStreamAnswersEachItem) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  const std::string a = CreateOrDie(*server, SessionRequest());
  const std::string b = CreateOrDie(*server, SessionRequest("streaming"));
  grpc::ClientContext ctx;
  auto stream = server->client().stub().CompressStream(&ctx);
  v1::CompressBatch batch;
  *batch.add_requests() = CompressRequest(a, 0, 24);
  *batch.add_requests() = CompressRequest("missing", 0, 24);
  *batch.add_requests() = CompressRequest(b, 0, 24);
  // An unknown dtype for a session that does not exist: the session is checked first.
  v1::CompressRequest undecodable = CompressRequest("missing", 0, 24);
  undecodable.mutable_inline_tensors()->mutable_keys()->set_dtype(static_cast<v1::DType>(99));
  *batch.add_requests() = undecodable;
  ASSERT_TRUE(stream->Write(batch));
  v1::CompressBatchResult result;
  ASSERT_TRUE(stream->Read(&result));
  ASSERT_EQ(result.results_size(), 4);
  EXPECT_TRUE(result.results(0).has_response());
  ASSERT_TRUE(result.results(1).has_error());
  EXPECT_EQ(result.results(1).error().code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(result.results(2).has_response());
  EXPECT_EQ(result.results(2).response().session_id(), b);
  ASSERT_TRUE(result.results(3).has_error());
  EXPECT_EQ(result.results(3).error().code(), grpc::StatusCode::NOT_FOUND)
      << result.results(3).error().message();
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST(Server, CompressStreamRefusesABatchItCouldNotAnswer) {
  // Each item keeps 1 KiB of the result for its answer or its error: 65 items cannot be answered
  // within 64 KiB, so none of them runs.
  auto server = MustStart({"--max_message_bytes=65536"});
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest());
  grpc::ClientContext ctx;
  auto stream = server->client().stub().CompressStream(&ctx);
  v1::CompressBatch batch;
  for (int i = 0; i < 65; ++i) {
    v1::CompressRequest* r = batch.add_requests();
    r->set_session_id(i == 0 ? id : "missing");
  }
  ASSERT_TRUE(stream->Write(batch));
  stream->WritesDone();
  v1::CompressBatchResult result;
  EXPECT_FALSE(stream->Read(&result));
  const grpc::Status s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("send at most 64 requests per batch"), std::string::npos)
      << s.error_message();
  EXPECT_EQ(server->client().GetSession(id)->epoch(), 0u);
}

// Reads a WatchMetrics stream on its own thread until it ends, keeping every compress event and
// the drops it was told about.
struct Watch {
  explicit Watch(ServerProcess& server, v1::WatchMetricsRequest request, bool start_reading = true)
      : Watch(server.client().stub(), std::move(request), start_reading) {}
  Watch(v1::KvSidecar::StubInterface& stub, v1::WatchMetricsRequest request, bool start_reading)
      : stream(stub.WatchMetrics(&ctx, request)) {
    if (start_reading) Start();
  }
  void Start() {
    reader = std::thread([this] {
      v1::MetricsEvent e;
      while (stream->Read(&e)) {
        MutexLock lock(&mu);
        dropped += e.dropped_before();
        if (e.has_compress()) events.push_back(e.compress());
        if (e.has_pool()) pools.push_back(e.pool());
      }
    });
  }
  int Count() {
    MutexLock lock(&mu);
    return static_cast<int>(events.size());
  }
  uint64_t Dropped() {
    MutexLock lock(&mu);
    return dropped;
  }
  // Events kept plus events the server said it dropped.
  int Seen() {
    MutexLock lock(&mu);
    return static_cast<int>(events.size()) + static_cast<int>(dropped);
  }
  std::vector<v1::CompressEvent> Events() {
    MutexLock lock(&mu);
    return events;
  }
  std::vector<v1::PoolGauges> Pools() {
    MutexLock lock(&mu);
    return pools;
  }
  // Cancels the stream (a watcher leaving) and returns its final status.
  grpc::Status Stop() {
    ctx.TryCancel();
    return Finish();
  }
  // Waits for the server to end the stream.
  grpc::Status Finish() {
    if (!reader.joinable()) Start();
    reader.join();
    return stream->Finish();
  }
  ~Watch() {
    if (reader.joinable()) {
      ctx.TryCancel();
      reader.join();
    }
  }
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderInterface<v1::MetricsEvent>> stream;
  std::thread reader;
  Mutex mu;
  std::vector<v1::CompressEvent> events ABSL_GUARDED_BY(mu);
  std::vector<v1::PoolGauges> pools ABSL_GUARDED_BY(mu);
  uint64_t dropped ABSL_GUARDED_BY(mu) = 0;
};

bool WaitFor(const std::function<bool()>& done, absl::Duration timeout = absl::Seconds(20)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

TEST(Server, WatchMetricsFansOutWithFiltersAndNeverBlocksOnAStalledWatcher) {
  auto server = MustStart({"--max_watchers=5", "--watch_queue=256"});
  ASSERT_NE(server, nullptr);
  const std::string a = CreateOrDie(*server, SessionRequest());
  auto other = SessionRequest("rkv");
  other.mutable_model()->set_name("other-model");
  const std::string b = CreateOrDie(*server, other);

  v1::WatchMetricsRequest all;
  Watch everything(*server, all);
  v1::WatchMetricsRequest only_a;
  only_a.add_session_ids(a);
  Watch session_a(*server, only_a);
  v1::WatchMetricsRequest only_other;
  only_other.set_model_name("other-model");
  only_other.set_pool_interval_seconds(0.1);
  Watch model_other(*server, only_other);
  // The stalled reader's own channel: a small fixed HTTP/2 window, so that the transport stops
  // taking its events early and the server-side queue overflows.
  grpc::ChannelArguments small_window;
  small_window.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  small_window.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 4096);
  auto stalled_stub = v1::KvSidecar::NewStub(grpc::CreateCustomChannel(
      server->target(), grpc::InsecureChannelCredentials(), small_window));
  Watch stalled(*stalled_stub, all, /*start_reading=*/false);
  ASSERT_TRUE(WaitFor([&] {
    auto body = testing::HttpGet(server->client().GetServerInfo()->metrics_address(), "/metrics");
    return body.ok() && body->find("reasonalloc_watchers 4") != std::string::npos;
  }));
  // A sixth stream is over --max_watchers (the fifth is still free). The fifth must be subscribed
  // before the sixth arrives: two streams started together may be served in either order.
  Watch fifth(*server, all);
  ASSERT_TRUE(WaitFor([&] {
    auto body = testing::HttpGet(server->client().GetServerInfo()->metrics_address(), "/metrics");
    return body.ok() && body->find("reasonalloc_watchers 5") != std::string::npos;
  }));
  Watch sixth(*server, all);
  EXPECT_EQ(sixth.Finish().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  fifth.Stop();

  // Far more events than the stalled stream's queue and transport window hold: every Compress still
  // answers promptly.
  constexpr int kA = 1500;
  constexpr int kB = 100;
  const absl::Time t0 = absl::Now();
  for (int step = 0; step < kA; ++step) {
    ASSERT_TRUE(server->client().Compress(CompressRequest(a, step, 20)).ok());
    if (step < kB) {
      ASSERT_TRUE(server->client().Compress(CompressRequest(b, step, 20)).ok());
    }
  }
  EXPECT_LT(absl::Now() - t0, absl::Seconds(60));
  ASSERT_TRUE(WaitFor([&] { return everything.Seen() >= kA + kB; }));
  ASSERT_TRUE(WaitFor([&] { return session_a.Seen() >= kA; }));
  ASSERT_TRUE(WaitFor([&] { return model_other.Seen() >= kB; }));

  // The stalled watcher resumes: it gets what was buffered, then new events that carry the count of
  // those it lost, and nothing is lost without being counted.
  stalled.Start();
  for (int step = kA; step < kA + 20; ++step) {
    ASSERT_TRUE(server->client().Compress(CompressRequest(a, step, 20)).ok());
  }
  ASSERT_TRUE(WaitFor([&] { return stalled.Seen() >= kA + kB + 20; }));
  EXPECT_GT(stalled.Dropped(), 0u);
  auto body = testing::HttpGet(server->client().GetServerInfo()->metrics_address(), "/metrics");
  ASSERT_TRUE(body.ok());
  EXPECT_EQ(body->find("reasonalloc_watch_events_dropped_total 0\n"), std::string::npos);
  // Watchers receive in batches: let the last events of the others arrive before leaving.
  EXPECT_TRUE(WaitFor([&] { return everything.Seen() >= kA + kB + 20; }));
  EXPECT_TRUE(WaitFor([&] { return session_a.Seen() >= kA + 20; }));

  everything.Stop();
  session_a.Stop();
  model_other.Stop();
  stalled.Stop();
  // Exact accounting and no cross-talk.
  EXPECT_EQ(everything.Seen(), kA + kB + 20);
  EXPECT_EQ(session_a.Seen(), kA + 20);
  for (const auto& e : session_a.Events()) ASSERT_EQ(e.session_id(), a);
  EXPECT_EQ(model_other.Seen(), kB);
  int64_t last_step = -1;
  for (const auto& e : model_other.Events()) {
    ASSERT_EQ(e.session_id(), b);
    ASSERT_EQ(e.model_name(), "other-model");
    ASSERT_GT(e.step(), last_step);
    last_step = e.step();
    ASSERT_EQ(e.layer_budgets_size(), kL);
    EXPECT_GT(e.timings().total_seconds(), 0.0);
  }
  const auto pools = model_other.Pools();
  ASSERT_FALSE(pools.empty());
  EXPECT_EQ(pools.back().sessions(), 2);
  EXPECT_GT(pools.back().arena_reserved_bytes(), 0u);
}

TEST(Server, WatchMetricsBadRequestsNameTheField) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  struct Bad {
    std::function<void(v1::WatchMetricsRequest&)> mutate;
    std::string needle;
  };
  const std::vector<Bad> cases = {
      {[](auto& r) { r.set_pool_interval_seconds(0.001); }, "pool_interval_seconds"},
      {[](auto& r) { r.set_pool_interval_seconds(-1); }, "pool_interval_seconds"},
      {[](auto& r) { r.add_session_ids(std::string(100, 'x')); }, "session_ids[0]"},
      {[](auto& r) { r.set_model_name(std::string(300, 'm')); }, "model_name"},
  };
  for (const Bad& bad : cases) {
    v1::WatchMetricsRequest r;
    bad.mutate(r);
    Watch w(*server, r);
    const grpc::Status s = w.Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad.needle;
    EXPECT_THAT(s.error_message(), HasSubstr(bad.needle));
  }
}

TEST(Server, WatchMetricsStreamsEndCleanlyOnDrain) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  grpc::ClientContext ctx;
  v1::WatchMetricsRequest r;
  r.set_pool_interval_seconds(0.05);
  auto stream = server->client().stub().WatchMetrics(&ctx, r);
  v1::MetricsEvent e;
  ASSERT_TRUE(stream->Read(&e));  // the first pool gauges
  ASSERT_EQ(kill(server->pid(), SIGTERM), 0);
  while (stream->Read(&e)) {
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(server->WaitExit(absl::Seconds(20)).value_or(-1), 0) << server->Log();
}

TEST(Server, DrainFinishesInFlightCallsThenExitsZero) {
  auto server = MustStart({"--testing_compress_delay_ms=1500", "--drain_timeout_seconds=10"});
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest());
  // A watcher sees SERVING, then NOT_SERVING when draining starts, then the stream ends.
  grpc::ClientContext watch_ctx;
  grpc::health::v1::HealthCheckRequest watch_req;
  auto watch = server->client().health_stub().Watch(&watch_ctx, watch_req);
  grpc::health::v1::HealthCheckResponse update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), Health::SERVING);

  auto in_flight = std::async(
      std::launch::async, [&] { return server->client().Compress(CompressRequest(id, 0, 24)); });
  absl::SleepFor(absl::Milliseconds(400));
  ASSERT_EQ(kill(server->pid(), SIGTERM), 0);
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), Health::NOT_SERVING);
  EXPECT_FALSE(watch->Read(&update));
  auto result = in_flight.get();
  EXPECT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(server->WaitExit(absl::Seconds(20)).value_or(-1), 0) << server->Log();
  EXPECT_THAT(server->Log(), HasSubstr("drained"));
  // The socket is gone and new calls fail.
  EXPECT_EQ(server->client().GetServerInfo().status().code(), absl::StatusCode::kUnavailable);
}

TEST(Server, DrainDeadlineCancelsStragglers) {
  auto server = MustStart({"--testing_compress_delay_ms=5000", "--drain_timeout_seconds=0.5"});
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest());
  auto in_flight = std::async(std::launch::async, [&] {
    return server->client().Compress(CompressRequest(id, 0, 24)).status();
  });
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time t0 = absl::Now();
  kill(server->pid(), SIGINT);
  EXPECT_FALSE(in_flight.get().ok());
  EXPECT_LT(absl::Now() - t0, absl::Seconds(3));
  EXPECT_EQ(server->WaitExit(absl::Seconds(20)).value_or(-1), 0) << server->Log();
}

TEST(Server, MetricsEndpoint) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  Client& c = server->client();
  const std::string id = CreateOrDie(*server, SessionRequest());
  ASSERT_TRUE(c.Compress(CompressRequest(id, 0, 40)).ok());
  (void)c.GetSession("nope");
  auto body = testing::HttpGet(c.GetServerInfo()->metrics_address(), "/metrics");
  ASSERT_TRUE(body.ok()) << body.status();
  for (const char* needle :
       {"reasonalloc_requests_total{code=\"OK\",method=\"Compress\"} 1",
        "reasonalloc_requests_total{code=\"NOT_FOUND\",method=\"GetSession\"} 1",
        "reasonalloc_requests_total{code=\"OK\",method=\"CreateSession\"} 1",
        "reasonalloc_compress_duration_seconds_bucket{stage=\"score\",le=\"1e-06\"}",
        "reasonalloc_compress_duration_seconds_count{stage=\"total\"} 1", "reasonalloc_sessions 1",
        "reasonalloc_arena_bytes{state=\"reserved\"}", "reasonalloc_arena_bytes{state=\"free\"}",
        "reasonalloc_tokens_evicted_total{allocator=\"uniform\",model=\"test-model\",scorer="
        "\"snapkv\"} 112",
        "reasonalloc_kv_tokens{state=\"kept\"} 48", "reasonalloc_build_info{"}) {
    EXPECT_THAT(*body, HasSubstr(needle));
  }
  ASSERT_TRUE(c.CloseSession(id).ok());
  body = testing::HttpGet(c.GetServerInfo()->metrics_address(), "/metrics");
  EXPECT_THAT(*body, HasSubstr("reasonalloc_sessions 0"));
  EXPECT_THAT(*body, HasSubstr("reasonalloc_kv_tokens{state=\"kept\"} 0"));
  EXPECT_THAT(*body, HasSubstr("reasonalloc_sessions_ended_total{reason=\"closed\"} 1"));
}

TEST(Server, EnvironmentConfiguresFlags) {
  ServerProcess::Options o;
  o.pass_listen = false;
  o.env["REASONALLOC_MAX_ARENA_BYTES"] = "777777";
  // The socket path comes from the environment; the helper's temp dir name is only known after
  // start, so use a fixed name under a fresh directory.
  char tmpl[] = "/tmp/reasonalloc-env-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string sock = std::string(tmpl) + "/env.sock";
  o.env["REASONALLOC_LISTEN"] = "unix://" + sock;
  o.wait_ready = false;
  auto p = ServerProcess::Start(o);
  ASSERT_TRUE(p.ok());
  for (int i = 0; i < 1000 && !std::filesystem::exists(sock); ++i)
    absl::SleepFor(absl::Milliseconds(5));
  Client::Options co;
  co.target = "unix://" + sock;
  auto client = Client::Connect(co);
  absl::StatusOr<v1::ServerInfo> info;
  for (int i = 0; i < 500; ++i) {
    info = (*client)->GetServerInfo();
    if (info.ok()) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(info.ok()) << info.status() << (*p)->Log();
  EXPECT_EQ(info->arena_capacity_bytes(), 777777u);
  EXPECT_EQ((*p)->Stop(), 0);
  std::filesystem::remove_all(tmpl);

  ServerProcess::Options bad;
  bad.env["REASONALLOC_MAX_SESSIONS"] = "many";
  bad.wait_ready = false;
  auto q = ServerProcess::Start(bad);
  ASSERT_TRUE(q.ok());
  EXPECT_EQ((*q)->WaitExit(absl::Seconds(10)).value_or(-1), 2);
  EXPECT_THAT((*q)->Log(), HasSubstr("REASONALLOC_MAX_SESSIONS"));
}

TEST(Server, StartupErrorsAreClear) {
  struct Case {
    std::vector<std::string> args;
    const char* needle;
  };
  const Case cases[] = {
      {{"--device=tpu:0"}, "device \"tpu:0\""},
      {{"--device=cuda:7"}, "cuda:7"},
      {{"--profile_dir=/nonexistent/profiles"}, "profile_dir"},
      {{"--metrics_address=256.1.1.1:99999"}, "metrics_address"},
      {{"--listen=tcp://0.0.0.0:1"}, "listen"},
      {{"--max_message_bytes=10"}, "max_message_bytes"},
  };
  for (const Case& c : cases) {
    ServerProcess::Options o;
    o.args = c.args;
    o.wait_ready = false;
    auto p = ServerProcess::Start(o);
    ASSERT_TRUE(p.ok());
    EXPECT_EQ((*p)->WaitExit(absl::Seconds(10)).value_or(-1), 1) << c.needle;
    EXPECT_THAT((*p)->Log(), HasSubstr(c.needle));
  }
}

TEST(Server, RefusesToStealALiveSocket) {
  auto first = MustStart();
  ASSERT_NE(first, nullptr);
  ServerProcess::Options o;
  o.pass_listen = false;
  o.args = {"--listen=" + first->target()};
  o.wait_ready = false;
  auto second = ServerProcess::Start(o);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ((*second)->WaitExit(absl::Seconds(10)).value_or(-1), 1);
  EXPECT_THAT((*second)->Log(), HasSubstr("another server"));
  EXPECT_EQ(*first->client().CheckHealth(), Health::SERVING);
}

}  // namespace
}  // namespace reasonalloc

namespace reasonalloc {
namespace {

TEST(Server, RefusesToReplaceAFileThatIsNotASocket) {
  char tmpl[] = "/tmp/reasonalloc-file-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string path = std::string(tmpl) + "/notes.txt";
  { std::ofstream(path) << "keep me"; }
  ServerProcess::Options o;
  o.pass_listen = false;
  o.args = {"--listen=unix://" + path};
  o.wait_ready = false;
  auto p = ServerProcess::Start(o);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ((*p)->WaitExit(absl::Seconds(10)).value_or(-1), 1);
  EXPECT_THAT((*p)->Log(), HasSubstr("not a socket"));
  EXPECT_TRUE(std::filesystem::is_regular_file(path));
  std::filesystem::remove_all(tmpl);
}

TEST(Server, DashedFlagSpellingsWork) {
  auto server = MustStart({"--max-arena-bytes=4242424", "--log-level=warn"});
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(server->client().GetServerInfo()->arena_capacity_bytes(), 4242424u);
}

TEST(Server, SecondSignalWhileDrainingExitsAtOnce) {
  auto server = MustStart({"--testing_compress_delay_ms=20000", "--drain_timeout_seconds=60"});
  ASSERT_NE(server, nullptr);
  const std::string id = CreateOrDie(*server, SessionRequest());
  auto in_flight = std::async(std::launch::async, [&] {
    return server->client().Compress(CompressRequest(id, 0, 24)).status();
  });
  absl::SleepFor(absl::Milliseconds(300));
  kill(server->pid(), SIGTERM);
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time t0 = absl::Now();
  kill(server->pid(), SIGTERM);
  EXPECT_EQ(server->WaitExit(absl::Seconds(10)).value_or(-1), 1) << server->Log();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(3));
  EXPECT_THAT(server->Log(), HasSubstr("while draining"));
  EXPECT_FALSE(in_flight.get().ok());
}

TEST(Server, GetSessionDoesNotRenewTheLease) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  auto r = SessionRequest();
  r.set_lease_seconds(0.6);
  const std::string id = CreateOrDie(*server, r);
  for (int i = 0; i < 4; ++i) {
    (void)server->client().GetSession(id);
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_EQ(server->client().GetSession(id).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace reasonalloc

namespace reasonalloc {
namespace {

TEST(Server, EveryScorerAndAllocatorComposes) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  auto info = server->client().GetServerInfo();
  ASSERT_TRUE(info.ok());
  for (const std::string& scorer : info->scorers()) {
    for (const std::string& allocator : info->allocators()) {
      auto r = SessionRequest(scorer, 12);
      r.mutable_allocator()->set_name(allocator);
      auto created = server->client().CreateSession(r);
      ASSERT_TRUE(created.ok()) << scorer << " x " << allocator << ": " << created.status();
      EXPECT_EQ(created->warnings_size(), allocator == "reasonalloc" ? 1 : 0);
      const std::string id = created->session().session_id();
      auto got = server->client().Compress(CompressRequest(id, 0, 40));
      ASSERT_TRUE(got.ok()) << scorer << " x " << allocator << ": " << got.status();
      int64_t budget_sum = 0;
      for (int32_t b : got->decision().budgets()) budget_sum += b;
      EXPECT_EQ(budget_sum, kL * kHkv * 12) << scorer << " x " << allocator;
      ASSERT_TRUE(server->client().CloseSession(id).ok());
    }
  }
}

TEST(Server, PyramidLayerBudgetsAreReported) {
  auto server = MustStart();
  ASSERT_NE(server, nullptr);
  auto r = SessionRequest("rkv", 28);
  r.mutable_budget()->set_window(8);
  r.mutable_model()->set_num_layers(4);
  r.mutable_allocator()->set_name("pyramid");
  auto created = server->client().CreateSession(r);
  ASSERT_TRUE(created.ok()) << created.status();
  // base 20, β 20: x = 39, 26.33, 13.67, 1 -> 39, 26, 14, 1 (docs/algorithms.md §3.2) + window 8.
  EXPECT_EQ(std::vector<int32_t>(created->session().layer_budgets().begin(),
                                 created->session().layer_budgets().end()),
            (std::vector<int32_t>{47, 34, 22, 9}));
}

}  // namespace
}  // namespace reasonalloc

namespace reasonalloc {
namespace {

// Calibrate a profile through the API, save it, and have a fresh server load it for reasonalloc.
TEST(Server, CalibrationProducesAProfileThatSessionsUse) {
  char tmpl[] = "/tmp/reasonalloc-profiles-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  {
    auto server = MustStart({"--profile-dir=" + dir});
    ASSERT_NE(server, nullptr);
    Client& c = server->client();
    const std::string id = CreateOrDie(*server, SessionRequest());
    grpc::ClientContext ctx;
    v1::StartCalibrationRequest start;
    start.set_session_id(id);
    start.set_stride(1);
    v1::CalibrationStatus status;
    ASSERT_TRUE(c.stub().StartCalibration(&ctx, start, &status).ok());
    for (int step = 0; step < 3; ++step) {
      auto got = c.Compress(CompressRequest(id, step, 40));
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->decision().evicted_tokens(), 0);  // calibration keeps the full cache
    }
    grpc::ClientContext ctx2;
    v1::FinishCalibrationRequest finish;
    finish.set_session_id(id);
    finish.set_save(true);
    v1::LayerProfile profile;
    const grpc::Status s = c.stub().FinishCalibration(&ctx2, finish, &profile);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(profile.name(), "test-model");
    ASSERT_EQ(profile.demand_size(), kL);
    EXPECT_NEAR(profile.demand(0) + profile.demand(1), 2.0, 1e-9);
    EXPECT_EQ(profile.samples(0), 3 * kHkv);
    EXPECT_TRUE(std::filesystem::exists(dir + "/test-model.json"));
    // Finishing twice is a precondition error.
    grpc::ClientContext ctx3;
    EXPECT_EQ(c.stub().FinishCalibration(&ctx3, finish, &profile).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
  }
  // Rewrite the saved profile with a known wave, then a new server loads it.
  {
    std::ofstream(dir + "/test-model.json")
        << R"({"name": "test-model", "model": {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2,
              "head_dim": 8}, "rho": 0.93, "demand": [1, 9]})";
  }
  auto server = MustStart({"--profile_dir=" + dir});
  ASSERT_NE(server, nullptr);
  auto r = SessionRequest("rkv", 20);
  r.mutable_allocator()->set_name("reasonalloc");
  r.mutable_allocator()->set_reasonalloc_mode(v1::AllocatorConfig::REASONALLOC_MODE_LAYER);
  auto created = server->client().CreateSession(r);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(created->warnings_size(), 0);
  EXPECT_EQ(created->session().profile(), "test-model");
  // base 16, total 32, clip [4, 32], demand [0.2, 1.8] -> w ∝ [1, 3]: λ = 8 -> 8 and 24 selectable.
  EXPECT_EQ(std::vector<int32_t>(created->session().layer_budgets().begin(),
                                 created->session().layer_budgets().end()),
            (std::vector<int32_t>{12, 28}));
  auto got = server->client().Compress(CompressRequest(created->session().session_id(), 0, 40));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->decision().budgets(0), 12);
  EXPECT_EQ(got->decision().budgets(2), 28);
  // A profile of another geometry is refused, naming the field.
  auto other = r;
  other.mutable_model()->set_head_dim(16);
  auto refused = server->client().CreateSession(other);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("model.head_dim"));
  // A named profile that is not loaded is refused too.
  auto named = r;
  named.mutable_allocator()->set_profile("missing");
  EXPECT_EQ(server->client().CreateSession(named).status().code(),
            absl::StatusCode::kFailedPrecondition);
  std::filesystem::remove_all(dir);
}

TEST(Server, CorruptProfileDirectoryStopsStartup) {
  char tmpl[] = "/tmp/reasonalloc-badprofiles-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  { std::ofstream(std::string(tmpl) + "/broken.json") << "{\"name\": 3"; }
  ServerProcess::Options o;
  o.args = {std::string("--profile-dir=") + tmpl};
  o.wait_ready = false;
  auto p = ServerProcess::Start(o);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ((*p)->WaitExit(absl::Seconds(10)).value_or(-1), 1);
  EXPECT_THAT((*p)->Log(), HasSubstr("broken.json"));
  std::filesystem::remove_all(tmpl);
}

}  // namespace
}  // namespace reasonalloc
