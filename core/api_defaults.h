// Defaults the server, the client library, the CLI and the worker share. Each is declared once,
// here; flags and option structs take their defaults from these names (the server's own defaults,
// lease and watcher limits among them, live in ServerOptions, server/server.h).
#ifndef REASONALLOC_CORE_API_DEFAULTS_H_
#define REASONALLOC_CORE_API_DEFAULTS_H_

#include <cstdint>

namespace reasonalloc {

// Largest gRPC message either side sends or receives (the inline data path carries whole tensors).
inline constexpr uint64_t kDefaultMaxMessageBytes = uint64_t{64} << 20;

// k_ρ calibration (StartCalibration): the attention-mass fraction ρ and the step stride when the
// request leaves them 0.
inline constexpr double kDefaultCalibrationRho = 0.93;
inline constexpr int kDefaultCalibrationStride = 16;

}  // namespace reasonalloc

#endif  // REASONALLOC_CORE_API_DEFAULTS_H_
