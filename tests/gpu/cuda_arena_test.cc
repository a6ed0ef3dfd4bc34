// CUDA arenas: export with CUDA IPC and a second process that maps, reads and writes the arena.
// Runs on a GPU machine; elsewhere the tests check that the reason is reported, then skip.
#include "gpu/cuda_arena.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gpu/device_probe.h"

namespace reasonalloc::gpu {
namespace {

constexpr uint64_t kBytes = uint64_t{1} << 20;
constexpr const char* kChildEnv = "REASONALLOC_TEST_CUDA_IPC";

std::vector<unsigned char> Pattern(size_t n, unsigned seed) {
  std::vector<unsigned char> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<unsigned char>((i * 131 + seed) & 0xff);
  return v;
}

TEST(CudaArena, ExplainsWhyWithoutAGpu) {
  const ProbeResult probe = ProbeDevices();
  if (!probe.devices.empty()) GTEST_SKIP() << "a GPU is visible: covered by the tests below";
  auto arena = CudaArena::Create(0, kBytes);
  ASSERT_FALSE(arena.ok());
  EXPECT_FALSE(arena.status().message().empty());
  std::cout << "no GPU (" << probe.reason << "): CudaArena::Create says " << arena.status() << "\n";
  auto mapping = CudaArenaMapping::Open(std::string(kIpcHandleBytes, '\0'), 0, "GPU-none", kBytes);
  EXPECT_FALSE(mapping.ok());
}

TEST(CudaArena, ExportsAHandleAndCopiesWithinBounds) {
  const ProbeResult probe = ProbeDevices();
  if (probe.devices.empty()) GTEST_SKIP() << "no GPU: " << probe.reason;
  auto arena = CudaArena::Create(0, kBytes);
  ASSERT_TRUE(arena.ok()) << arena.status();
  EXPECT_EQ((*arena)->ipc_handle().size(), kIpcHandleBytes);
  EXPECT_EQ((*arena)->device_uuid(), probe.devices[0].uuid);
  std::vector<unsigned char> zeros(4096, 1);
  ASSERT_TRUE((*arena)->CopyToHost(kBytes - 4096, zeros.data(), 4096).ok());
  EXPECT_EQ(std::accumulate(zeros.begin(), zeros.end(), 0), 0);  // zeroed at creation
  const auto p = Pattern(8192, 3);
  ASSERT_TRUE((*arena)->CopyFromHost(100, p.data(), p.size()).ok());
  std::vector<unsigned char> back(p.size());
  ASSERT_TRUE((*arena)->CopyToHost(100, back.data(), back.size()).ok());
  EXPECT_EQ(back, p);
  EXPECT_EQ((*arena)->CopyToHost(kBytes - 10, back.data(), 11).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ((*arena)->CopyFromHost(kBytes + 1, p.data(), 0).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(CudaArenaMapping::Open("short", 0, (*arena)->device_uuid(), kBytes).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      CudaArenaMapping::Open((*arena)->ipc_handle(), 0, "GPU-not-a-device", kBytes).status().code(),
      absl::StatusCode::kNotFound);
}

// The server's side: export, let a second process map, check and write the arena.
TEST(CudaArena, AnotherProcessMapsReadsAndWritesTheArena) {
  const ProbeResult probe = ProbeDevices();
  if (probe.devices.empty()) GTEST_SKIP() << "no GPU: " << probe.reason;
  auto arena = CudaArena::Create(0, kBytes);
  ASSERT_TRUE(arena.ok()) << arena.status();
  const auto p = Pattern(kBytes / 2, 7);
  ASSERT_TRUE((*arena)->CopyFromHost(0, p.data(), p.size()).ok());
  const std::string spec = absl::StrCat(absl::BytesToHexString((*arena)->ipc_handle()), ":",
                                        (*arena)->device_uuid(), ":", kBytes);
  const std::string cmd = absl::StrCat(kChildEnv, "=", spec, " /proc/", ::getpid(),
                                       "/exe --gtest_filter=CudaArenaIpcChild.* --gtest_brief=1");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::vector<unsigned char> written(kBytes / 2);
  ASSERT_TRUE((*arena)->CopyToHost(kBytes / 2, written.data(), written.size()).ok());
  EXPECT_EQ(written, Pattern(kBytes / 2, 9));
}

// The worker's side, run only as the child of the test above.
TEST(CudaArenaIpcChild, MapsChecksAndWrites) {
  const char* spec = std::getenv(kChildEnv);
  if (spec == nullptr) GTEST_SKIP() << "runs only as the child process of the IPC test";
  const std::vector<std::string> parts = absl::StrSplit(spec, ':');
  ASSERT_EQ(parts.size(), 3u);
  uint64_t bytes = 0;
  ASSERT_TRUE(absl::SimpleAtoi(parts[2], &bytes));
  auto mapping = CudaArenaMapping::Open(absl::HexStringToBytes(parts[0]), 0, parts[1], bytes);
  ASSERT_TRUE(mapping.ok()) << mapping.status();
  std::vector<unsigned char> got(bytes / 2);
  ASSERT_TRUE((*mapping)->CopyToHost(0, got.data(), got.size()).ok());
  EXPECT_EQ(got, Pattern(bytes / 2, 7));
  const auto mine = Pattern(bytes / 2, 9);
  ASSERT_TRUE((*mapping)->CopyFromHost(bytes / 2, mine.data(), mine.size()).ok());
  EXPECT_EQ((*mapping)->CopyToHost(bytes - 1, got.data(), 2).code(), absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace reasonalloc::gpu
