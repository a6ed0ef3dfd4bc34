// An advisory session's view of the worker's own buffers (RegisterBuffers): the keys
// [L, Hkv, N, d] and the query window ring [L, Hq, α, d], each a strided array inside a POSIX
// shared-memory object the worker created.
//
// Every descriptor is checked when registered (kind, memory kind, name, owner uid, dtype, shape,
// strides, that the described extent lies inside byte_length and byte_length inside the object).
// The objects are then read with pread, never mapped: a worker that shrinks its object afterwards
// makes the next Compress fail with a message, not the sidecar fault; nothing of the worker's is
// ever written.
#ifndef REASONALLOC_SERVER_EXTERNAL_BUFFERS_H_
#define REASONALLOC_SERVER_EXTERNAL_BUFFERS_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/session_config.h"
#include "google/protobuf/repeated_ptr_field.h"
#include "reasonalloc/v1/types.pb.h"
#include "server/peer.h"

namespace reasonalloc {

class ExternalBuffers {
 public:
  // Opens and checks the buffers of RegisterBuffersRequest.buffers for `config` on behalf of
  // `caller`; errors name buffers[i] and the field at fault.
  static absl::StatusOr<std::unique_ptr<ExternalBuffers>> Open(
      const google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>& buffers,
      const SessionConfig& config, const PeerIdentity& caller);
  ~ExternalBuffers();
  ExternalBuffers(const ExternalBuffers&) = delete;
  ExternalBuffers& operator=(const ExternalBuffers&) = delete;

  // Rows each kv head can hold in the worker's keys buffer (shape[2]).
  int64_t key_rows() const { return keys_.shape[2]; }
  // Rows [0, n) of kv head (layer, head) as fp32 into out [n, d]; a NaN/Inf is an error naming
  // layer, head and row.
  absl::Status ReadKeys(int layer, int head, int64_t n, float* out) const;
  // The α queries of every query head, oldest (step − α + 1) first, as fp32 [L, Hq, α, d].
  absl::Status ReadQueries(int64_t step, float* out) const;

 private:
  struct Array {
    std::string shm_name;
    int fd = -1;
    DType dtype = DType::kFloat32;
    std::array<int64_t, 4> shape{};
    std::array<int64_t, 4> strides{};  // elements
    uint64_t byte_offset = 0;
  };
  ExternalBuffers() = default;
  // Reads `count` elements of `a` from element index `first` (contiguous) as fp32.
  absl::Status ReadRun(const Array& a, int64_t first, int64_t count, float* out,
                       const char* what) const;

  Array keys_, queries_;
  mutable std::vector<unsigned char> staging_;  // used by the compress-guard holder only
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_EXTERNAL_BUFFERS_H_
