// Runs on a GPU machine; on a host without one every test skips and says why.
#include "gpu/device_probe.h"

#include <gtest/gtest.h>

namespace reasonalloc::gpu {
namespace {

TEST(DeviceProbe, NeverCrashesAndExplainsAnEmptyList) {
  const ProbeResult r = ProbeDevices();
  if (r.devices.empty()) {
    EXPECT_FALSE(r.reason.empty());
  } else {
    EXPECT_TRUE(r.reason.empty());
  }
}

TEST(DeviceProbe, ReportsEveryVisibleGpu) {
  const ProbeResult r = ProbeDevices();
  if (r.devices.empty()) GTEST_SKIP() << "no GPU: " << r.reason;
  for (const DeviceInfo& d : r.devices) {
    EXPECT_FALSE(d.name.empty());
    EXPECT_EQ(d.uuid.rfind("GPU-", 0), 0u) << d.uuid;
    EXPECT_EQ(d.uuid.size(), 40u);
    EXPECT_GE(d.compute_major, 7);
    EXPECT_GT(d.total_memory_bytes, 0u);
  }
  EXPECT_GT(r.driver_version, 0);
  EXPECT_FALSE(FormatDriverVersion(r.driver_version).empty());
}

TEST(DeviceProbe, FormatsDriverVersions) {
  EXPECT_EQ(FormatDriverVersion(13000), "13.0");
  EXPECT_EQ(FormatDriverVersion(12040), "12.4");
  EXPECT_EQ(FormatDriverVersion(0), "");
}

}  // namespace
}  // namespace reasonalloc::gpu
