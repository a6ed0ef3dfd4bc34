# Third-party dependencies, all from Debian 12 packages (see scripts/setup).
find_package(Threads REQUIRED)
# Debian's protobuf 3.21 ships no CMake config: use CMake's FindProtobuf module.
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)
find_package(absl CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)
if(REASONALLOC_TESTS)
  find_package(GTest CONFIG REQUIRED)
endif()
if(REASONALLOC_BENCHMARKS)
  find_package(benchmark CONFIG REQUIRED)
endif()
