// The two arena backends behind server/arena.h describe themselves the same way.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <memory>

#include "gpu/device_probe.h"
#include "server/device_arena.h"
#include "server/host_arena.h"

namespace reasonalloc {
namespace {

TEST(ArenaBackends, HostArenaIsPrivateDescribedAndUnlinked) {
  auto host = HostArena::Create(1000);
  ASSERT_TRUE(host.ok()) << host.status();
  std::unique_ptr<Arena> arena = std::move(host).value();
  v1::ArenaDescriptor d;
  arena->DescribeMemory(&d);
  EXPECT_EQ(d.memory(), v1::MEMORY_KIND_HOST_SHM);
  EXPECT_EQ(d.byte_length(), 1000u);
  ASSERT_EQ(d.shm_name().rfind(HostArena::kNamePrefix, 0), 0u);
  EXPECT_EQ(d.shm_name().size(),
            std::string(HostArena::kNamePrefix).size() + 33 + std::to_string(::getpid()).size());
  const int fd = shm_open(d.shm_name().c_str(), O_RDONLY, 0);
  ASSERT_GE(fd, 0);
  struct stat st {};
  ASSERT_EQ(fstat(fd, &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 1000u);
  close(fd);
  arena.reset();
  errno = 0;
  EXPECT_LT(shm_open(d.shm_name().c_str(), O_RDONLY, 0), 0);
  EXPECT_EQ(errno, ENOENT);
}

TEST(ArenaBackends, DeviceArenaDescribesItsIpcHandleOrSaysWhyNot) {
  const gpu::ProbeResult probe = gpu::ProbeDevices();
  auto device = DeviceArena::Create(0, 4096);
  if (probe.devices.empty()) {
    ASSERT_FALSE(device.ok());
    EXPECT_FALSE(device.status().message().empty());
    GTEST_SKIP() << "no GPU (" << probe.reason << "); DeviceArena::Create says " << device.status();
  }
  ASSERT_TRUE(device.ok()) << device.status();
  std::unique_ptr<Arena> arena = std::move(device).value();
  v1::ArenaDescriptor d;
  arena->DescribeMemory(&d);
  EXPECT_EQ(d.memory(), v1::MEMORY_KIND_CUDA_IPC);
  EXPECT_EQ(d.byte_length(), 4096u);
  EXPECT_EQ(d.cuda_ipc_handle().size(), gpu::kIpcHandleBytes);
  EXPECT_EQ(d.cuda_byte_offset(), 0u);
  EXPECT_EQ(d.device_uuid(), probe.devices[0].uuid);
  EXPECT_TRUE(d.shm_name().empty());
}

}  // namespace
}  // namespace reasonalloc
