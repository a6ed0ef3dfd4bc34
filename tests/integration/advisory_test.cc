// Advisory sessions over host shared memory: the worker keeps its KV in its own shared-memory
// objects, registers keys and query window with RegisterBuffers, and gets keep masks back in the
// result arena. A 1,000-step decode loop must decide, bit for bit, what the inline advisory path
// decides for the same tensors; every malformed descriptor is refused with the field named and
// nothing read out of bounds (this suite runs under ASan in CI).
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/mapped_arena.h"
#include "core/dtype.h"
#include "tests/integration/server_process.h"
#include "tests/integration/shm_test_common.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;
using testing::ServerProcess;
using namespace shm_test;  // NOLINT: the shared geometry and helpers

v1::CreateSessionRequest Request(const std::string& scorer, const std::string& allocator,
                                 v1::MemoryKind memory) {
  return ShmTestRequest("advisory-test", scorer, allocator, memory, v1::SESSION_MODE_ADVISORY);
}

constexpr int kRows = 40;  // rows per head in the worker's keys buffer (≥ B + Δ)
constexpr int kHeadStride = kRows * kD + 16;  // padded: the described strides are honoured

// A shared-memory object the worker owns, unlinked at the end.
struct WorkerBuffer {
  explicit WorkerBuffer(const std::string& tag, size_t bytes)
      : name(absl::StrCat("/advisory-test-", ::getpid(), "-", tag)), size(bytes) {
    ::shm_unlink(name.c_str());
    fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0) << name;
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(bytes)), 0);
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    EXPECT_NE(p, MAP_FAILED);
    data = static_cast<uint16_t*>(p);
  }
  ~WorkerBuffer() {
    ::munmap(data, size);
    ::close(fd);
    ::shm_unlink(name.c_str());
  }
  std::string name;
  size_t size;
  int fd = -1;
  uint16_t* data = nullptr;
};

constexpr size_t kKeyBytes = size_t{kL} * kHkv * kHeadStride * 2;
constexpr size_t kQueryBytes = size_t{kL} * kHq * kWindow * kD * 2;

// One worker buffer holding one fp16 array.
v1::ArenaDescriptor Describe(const WorkerBuffer& b, const char* kind, const char* array,
                             std::vector<int64_t> shape, std::vector<int64_t> strides,
                             uint64_t bytes) {
  v1::ArenaDescriptor d;
  d.set_kind(kind);
  d.set_memory(v1::MEMORY_KIND_HOST_SHM);
  d.set_shm_name(b.name);
  d.set_byte_length(bytes);
  d.set_layout_version(1);
  auto* a = d.add_arrays();
  a->set_name(array);
  a->set_dtype(v1::DTYPE_FLOAT16);
  for (int64_t s : shape) a->add_shape(s);
  for (int64_t s : strides) a->add_strides(s);
  a->set_byte_offset(0);
  a->set_byte_length(bytes);
  return d;
}

v1::ArenaDescriptor KeysDescriptor(const WorkerBuffer& b) {
  return Describe(b, "keys", "k", {kL, kHkv, kRows, kD},
                  {int64_t{kHkv} * kHeadStride, int64_t{kHeadStride}, int64_t{kD}, int64_t{1}},
                  kKeyBytes);
}

v1::ArenaDescriptor QueriesDescriptor(const WorkerBuffer& b) {
  return Describe(b, "query_window", "q", {kL, kHq, kWindow, kD},
                  {kHq * kWindow * kD, kWindow * kD, kD, 1}, kQueryBytes);
}

absl::Status Register(Client& c, const std::string& id, const v1::ArenaDescriptor& keys,
                      const v1::ArenaDescriptor& queries) {
  v1::RegisterBuffersRequest r;
  r.set_session_id(id);
  *r.add_buffers() = keys;
  *r.add_buffers() = queries;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  c.AttachSessionTokens(&ctx, {id});
  v1::RegisterBuffersResponse out;
  const grpc::Status s = c.stub().RegisterBuffers(&ctx, r, &out);
  return s.ok() ? absl::OkStatus()
                : absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

void RunAdvisoryLoop(const std::string& scorer, const std::string& allocator, int steps,
                     int* events_out) {
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  auto shm = c.CreateSession(Request(scorer, allocator, v1::MEMORY_KIND_HOST_SHM));
  ASSERT_TRUE(shm.ok()) << shm.status();
  auto inl = c.CreateSession(Request(scorer, allocator, v1::MEMORY_KIND_INLINE));
  ASSERT_TRUE(inl.ok()) << inl.status();
  // Only the result block is the server's.
  ASSERT_EQ(shm->session().arenas_size(), 1);
  ASSERT_EQ(shm->session().arenas(0).kind(), "result");
  auto result = MappedArena::Map(shm->session().arenas(0));
  ASSERT_TRUE(result.ok()) << result.status();
  int32_t* len = (*result)->As<int32_t>("len");
  const int32_t* budget = (*result)->As<int32_t>("budget");
  const uint64_t* mask = (*result)->As<uint64_t>("keep_mask");
  const uint64_t* epoch = (*result)->As<uint64_t>("epoch");
  int words = 0;
  for (const auto& arr : (*result)->descriptor().arrays()) {
    if (arr.name() == "keep_mask") words = static_cast<int>(arr.shape(1));
  }

  WorkerBuffer keys("keys", kKeyBytes), queries("q", kQueryBytes);
  const std::string id = shm->session().session_id();
  v1::CompressRequest request;
  request.set_session_id(id);
  request.set_step(0);
  auto early = c.Compress(request);
  EXPECT_EQ(early.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(early.status().message()), HasSubstr("RegisterBuffers"));
  ASSERT_TRUE(Register(c, id, KeysDescriptor(keys), QueriesDescriptor(queries)).ok());

  std::vector<std::vector<uint16_t>> k(kHeads);  // the worker's logical view, per head
  std::deque<std::vector<uint16_t>> history;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  int events = 0;
  auto key_row = [&](int i, int row) {
    return keys.data + (i / kHkv) * kHkv * kHeadStride + (i % kHkv) * kHeadStride + row * kD;
  };
  for (int step = 1; step < steps; ++step) {
    for (int i = 0; i < kHeads; ++i) {
      std::vector<uint16_t> kr(kD);
      for (auto& x : kr) x = FloatToHalf(normal(rng));
      if (step % 5 == 4 && !k[static_cast<size_t>(i)].empty()) {
        std::copy_n(k[static_cast<size_t>(i)].begin(), kD, kr.begin());
      }
      const int row = static_cast<int>(k[static_cast<size_t>(i)].size() / kD);
      ASSERT_LT(row, kRows);
      std::copy(kr.begin(), kr.end(), key_row(i, row));
      k[static_cast<size_t>(i)].insert(k[static_cast<size_t>(i)].end(), kr.begin(), kr.end());
      len[i] = row + 1;
    }
    std::vector<uint16_t> q(size_t{kL} * kHq * kD);
    for (auto& x : q) x = FloatToHalf(normal(rng));
    for (int lq = 0; lq < kL * kHq; ++lq) {
      std::copy_n(q.begin() + lq * kD, kD, queries.data + (lq * kWindow + step % kWindow) * kD);
    }
    history.push_back(q);
    if (history.size() > kWindow) history.pop_front();
    // Events at step ≡ 2 (mod Δ): the ring's slots are rotated against the window's order.
    if (step % kDelta != 2 || step < kDelta) continue;

    request.set_step(step);
    auto got = c.Compress(request);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_LT(request.ByteSizeLong() + got->ByteSizeLong(), 1024u);
    ASSERT_EQ(std::atomic_ref<const uint64_t>(*epoch).load(std::memory_order_acquire),
              got->epoch());

    auto want =
        c.Compress(shm_test::InlineEvent(inl->session().session_id(), step, k, {}, history));
    ASSERT_TRUE(want.ok()) << want.status();
    const v1::Decision& dw = want->decision();
    EXPECT_EQ(got->decision().evicted_tokens(), dw.evicted_tokens());
    int64_t at = 0;
    for (int i = 0; i < kHeads; ++i) {
      ASSERT_EQ(budget[i], dw.budgets(i)) << "step " << step << " head " << i;
      ASSERT_EQ(len[i], dw.kept_lengths(i)) << "step " << step << " head " << i;
      std::vector<uint64_t> want_mask(static_cast<size_t>(words), 0);
      std::vector<uint16_t> kept;
      for (int r = 0; r < dw.kept_lengths(i); ++r) {
        const int j = dw.kept_indices(static_cast<int>(at + r));
        want_mask[static_cast<size_t>(j / 64)] |= uint64_t{1} << (j % 64);
        kept.insert(kept.end(), k[static_cast<size_t>(i)].begin() + j * kD,
                    k[static_cast<size_t>(i)].begin() + (j + 1) * kD);
      }
      at += dw.kept_lengths(i);
      ASSERT_TRUE(std::equal(want_mask.begin(), want_mask.end(), mask + i * words))
          << "step " << step << " head " << i;
      // The worker compacts its own buffer by the mask (the sidecar never writes it).
      k[static_cast<size_t>(i)] = kept;
      std::copy(kept.begin(), kept.end(), key_row(i, 0));
    }
    ++events;
  }
  *events_out = events;
}

TEST(Advisory, SnapKvDecodeLoopMatchesInlineBitForBit) {
  int events = 0;
  RunAdvisoryLoop("snapkv", "uniform", 1000, &events);
  EXPECT_GT(events, 100);
}

TEST(Advisory, RkvAdaKvDecodeLoopMatchesInlineBitForBit) {
  int events = 0;
  RunAdvisoryLoop("rkv", "adakv", 1000, &events);
  EXPECT_GT(events, 100);
}

TEST(Advisory, BadDescriptorsAreRefusedWithTheFieldNamed) {
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  Client& c = (*server)->client();
  auto shm = c.CreateSession(Request("snapkv", "uniform", v1::MEMORY_KIND_HOST_SHM));
  ASSERT_TRUE(shm.ok()) << shm.status();
  const std::string id = shm->session().session_id();
  WorkerBuffer keys("bad-keys", kKeyBytes), queries("bad-q", kQueryBytes);
  const v1::ArenaDescriptor good_k = KeysDescriptor(keys);
  const v1::ArenaDescriptor good_q = QueriesDescriptor(queries);
  const std::string fifo_name = absl::StrCat("/advisory-test-fifo-", ::getpid());
  ASSERT_EQ(::mkfifo(("/dev/shm" + fifo_name).c_str(), 0600), 0) << std::strerror(errno);
  struct RemoveFifo {
    std::string path;
    ~RemoveFifo() { ::unlink(path.c_str()); }
  } remove_fifo{"/dev/shm" + fifo_name};

  struct Case {
    const char* what;
    std::function<void(v1::ArenaDescriptor*)> forge;
    absl::StatusCode code;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {"offset outside", [](auto* d) { d->mutable_arrays(0)->set_byte_offset(kKeyBytes - 64); },
       absl::StatusCode::kInvalidArgument, "buffers[0].arrays[0]: byte_offset"},
      {"stride outside",
       [](auto* d) { d->mutable_arrays(0)->set_strides(1, int64_t{kHeadStride} * 4); },
       absl::StatusCode::kInvalidArgument, "outside the array's byte_length"},
      {"huge stride", [](auto* d) { d->mutable_arrays(0)->set_strides(0, int64_t{1} << 50); },
       absl::StatusCode::kInvalidArgument, "buffers[0].arrays[0].strides[0]"},
      {"row stride", [](auto* d) { d->mutable_arrays(0)->set_strides(3, 2); },
       absl::StatusCode::kInvalidArgument, "strides[3] = 2 must be 1"},
      {"wrong dtype", [](auto* d) { d->mutable_arrays(0)->set_dtype(v1::DTYPE_FLOAT32); },
       absl::StatusCode::kInvalidArgument, "buffers[0].arrays[0].dtype = DTYPE_FLOAT32"},
      {"wrong shape", [](auto* d) { d->mutable_arrays(0)->set_shape(1, kHkv + 1); },
       absl::StatusCode::kInvalidArgument, "buffers[0].arrays[0].shape"},
      {"larger than the object",
       [](auto* d) {
         d->set_byte_length(kKeyBytes * 2);
         d->mutable_arrays(0)->set_byte_length(kKeyBytes * 2);
       },
       absl::StatusCode::kInvalidArgument, "holds only"},
      {"missing object", [](auto* d) { d->set_shm_name("/advisory-test-no-such-object"); },
       absl::StatusCode::kNotFound, "buffers[0].shm_name"},
      {"bad name", [](auto* d) { d->set_shm_name("/../../etc/passwd"); },
       absl::StatusCode::kInvalidArgument, "buffers[0].shm_name"},
      {"server arena", [&](auto* d) { d->set_shm_name(shm->session().arenas(0).shm_name()); },
       absl::StatusCode::kPermissionDenied, "names a server arena"},
      {"wrong kind", [](auto* d) { d->set_kind("values"); }, absl::StatusCode::kInvalidArgument,
       "buffers[0].kind"},
      {"cuda", [](auto* d) { d->set_memory(v1::MEMORY_KIND_CUDA_IPC); },
       absl::StatusCode::kUnimplemented, "buffers[0].memory"},
      // A FIFO under the name: opening it must not block (the session would stay wedged with its
      // compress guard held); it is refused as not a regular object.
      {"fifo", [&](auto* d) { d->set_shm_name(fifo_name); }, absl::StatusCode::kInvalidArgument,
       "is not a regular shared-memory object"},
  };
  for (const Case& k : cases) {
    v1::ArenaDescriptor d = good_k;
    k.forge(&d);
    const absl::Status s = Register(c, id, d, good_q);
    EXPECT_EQ(s.code(), k.code) << k.what << ": " << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(k.needle)) << k.what;
  }
  EXPECT_EQ(Register(c, id, good_k, good_k).code(), absl::StatusCode::kInvalidArgument);

  // A registered buffer that shrinks afterwards: the next Compress fails with a message and the
  // server keeps serving (pread, no mapping that could fault).
  ASSERT_TRUE(Register(c, id, good_k, good_q).ok());
  auto result = MappedArena::Map(shm->session().arenas(0));
  ASSERT_TRUE(result.ok());
  int32_t* len = (*result)->As<int32_t>("len");
  for (int i = 0; i < kHeads; ++i) len[i] = 20;
  v1::CompressRequest r;
  r.set_session_id(id);
  r.set_step(10);
  ASSERT_TRUE(c.Compress(r).ok());
  for (int i = 0; i < kHeads; ++i) len[i] = kRows;  // more than B + Δ: refused, named
  r.set_step(11);
  auto over = c.Compress(r);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(over.status().message()), HasSubstr("\"len\"[0]"));
  for (int i = 0; i < kHeads; ++i) len[i] = 20;
  ASSERT_EQ(::ftruncate(keys.fd, 1000), 0);  // heads 1-3 now lie past the end
  auto shrunk = c.Compress(r);
  EXPECT_EQ(shrunk.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(shrunk.status().message()), HasSubstr("shrank after RegisterBuffers"));
  EXPECT_TRUE(c.GetServerInfo().ok());

  // A buffer of another uid (root can hand one over with fchown).
  if (::geteuid() == 0) {
    WorkerBuffer foreign("foreign", kKeyBytes);
    ASSERT_EQ(::fchown(foreign.fd, 65534, 65534), 0);
    const absl::Status s = Register(c, id, KeysDescriptor(foreign), good_q);
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
    EXPECT_THAT(std::string(s.message()),
                HasSubstr("owned by uid 65534, not by the caller's uid 0"));
  } else {
    std::cout << "foreign-uid buffer case skipped: needs root to fchown a buffer\n";
  }

  // Managed sessions do not register buffers.
  auto managed = Request("snapkv", "uniform", v1::MEMORY_KIND_HOST_SHM);
  managed.set_mode(v1::SESSION_MODE_MANAGED);
  auto m = c.CreateSession(managed);
  ASSERT_TRUE(m.ok());
  const absl::Status not_advisory = Register(c, m->session().session_id(), good_k, good_q);
  EXPECT_EQ(not_advisory.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(not_advisory.message()), HasSubstr("not an advisory"));

  auto metrics = testing::HttpGet(c.GetServerInfo()->metrics_address(), "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_THAT(*metrics, HasSubstr("reasonalloc_ipc_import_failures_total{reason=\"bad_handle\"}"));
  EXPECT_EQ(metrics->find("reasonalloc_ipc_import_failures_total{reason=\"open_failed\"} 0"),
            std::string::npos);
}

}  // namespace
}  // namespace reasonalloc
