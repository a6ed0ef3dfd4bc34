#include "server/external_buffers.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/host_arena.h"
#include "server/proto_convert.h"

namespace reasonalloc {
namespace {

__extension__ using u128 = unsigned __int128;

}  // namespace

absl::StatusOr<std::unique_ptr<ExternalBuffers>> ExternalBuffers::Open(
    const google::protobuf::RepeatedPtrField<v1::ArenaDescriptor>& buffers,
    const SessionConfig& config, const PeerIdentity& caller) {
  const ModelGeometry& m = config.model;
  if (buffers.size() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("buffers has ", buffers.size(),
                     " entries; an advisory session registers exactly two: kind \"keys\" (array "
                     "\"k\" [L, Hkv, N, d]) and kind \"query_window\" (array \"q\" [L, Hq, window, "
                     "d])"));
  }
  std::unique_ptr<ExternalBuffers> out(new ExternalBuffers());
  bool have_keys = false;
  bool have_queries = false;
  for (int i = 0; i < buffers.size(); ++i) {
    const v1::ArenaDescriptor& b = buffers[i];
    const std::string field = absl::StrCat("buffers[", i, "]");
    const bool is_keys = b.kind() == "keys";
    if (!is_keys && b.kind() != "query_window") {
      return absl::InvalidArgumentError(absl::StrCat(field, ".kind \"", b.kind().substr(0, 64),
                                                     "\" is not \"keys\" or \"query_window\""));
    }
    if ((is_keys && have_keys) || (!is_keys && have_queries)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".kind \"", b.kind(), "\" is registered twice"));
    }
    (is_keys ? have_keys : have_queries) = true;
    if (b.memory() == v1::MEMORY_KIND_CUDA_IPC) {
      return absl::UnimplementedError(absl::StrCat(
          field, ".memory = ", v1::MemoryKind_Name(v1::MEMORY_KIND_CUDA_IPC),
          " needs the CUDA backend (--device cuda:N), which this server does not run; register ",
          v1::MemoryKind_Name(v1::MEMORY_KIND_HOST_SHM), " buffers"));
    }
    if (b.memory() != v1::MEMORY_KIND_HOST_SHM) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".memory must be ", v1::MemoryKind_Name(v1::MEMORY_KIND_HOST_SHM)));
    }
    if (b.layout_version() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".layout_version = ", b.layout_version(), "; this server reads 1"));
    }
    const std::string& name = b.shm_name();
    if (name.size() < 2 || name.size() > 255 || name[0] != '/' ||
        name.find('/', 1) != std::string::npos || name.find('\0') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ".shm_name \"", name.substr(0, 64),
          "\" is not a shared-memory object name (\"/name\", one slash, at most 255 bytes)"));
    }
    if (absl::StartsWith(name, HostArena::kNamePrefix)) {
      return absl::PermissionDeniedError(absl::StrCat(
          field, ".shm_name \"", name, "\" names a server arena; register the worker's own"));
    }
    if (!caller.local) {
      return absl::FailedPreconditionError(
          absl::StrCat(field,
                       ": shared-memory buffers can only be registered over the Unix socket, whose "
                       "peer uid the server checks against the buffer's owner"));
    }
    if (b.arrays_size() != 1) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".arrays has ", b.arrays_size(),
                                                     " entries; exactly one (\"",
                                                     is_keys ? "k" : "q", "\") is expected"));
    }
    const v1::ArrayDescriptor& a = b.arrays(0);
    const std::string af = absl::StrCat(field, ".arrays[0]");
    if (a.name() != (is_keys ? "k" : "q")) {
      return absl::InvalidArgumentError(absl::StrCat(af, ".name \"", a.name().substr(0, 64),
                                                     "\" must be \"", is_keys ? "k" : "q", "\""));
    }
    Array& arr = is_keys ? out->keys_ : out->queries_;
    auto dtype = DTypeFromProto(a.dtype(), absl::StrCat(af, ".dtype"));
    if (!dtype.ok()) return dtype.status();
    if (is_keys && *dtype != m.dtype) {
      return absl::InvalidArgumentError(absl::StrCat(af, ".dtype = ", v1::DType_Name(a.dtype()),
                                                     "; keys must have the session's model.dtype ",
                                                     v1::DType_Name(DTypeToProto(m.dtype))));
    }
    arr.dtype = *dtype;
    const std::array<int64_t, 4> want =
        is_keys
            ? std::array<int64_t, 4>{m.num_layers, m.num_kv_heads, -1, m.head_dim}
            : std::array<int64_t, 4>{m.num_layers, m.num_q_heads, config.budget.window, m.head_dim};
    const std::string want_text =
        is_keys ? absl::StrCat("[", m.num_layers, ", ", m.num_kv_heads, ", N, ", m.head_dim, "]")
                : absl::StrCat("[", absl::StrJoin(want, ", "), "]");
    if (a.shape_size() != 4 || a.strides_size() != 4) {
      return absl::InvalidArgumentError(
          absl::StrCat(af, ".shape and .strides must have 4 entries (", want_text, "); got ",
                       a.shape_size(), " and ", a.strides_size()));
    }
    for (int k = 0; k < 4; ++k) {
      arr.shape[static_cast<size_t>(k)] = a.shape(k);
      arr.strides[static_cast<size_t>(k)] = a.strides(k);
      const bool shape_ok = want[static_cast<size_t>(k)] < 0
                                ? a.shape(k) >= 1 && a.shape(k) <= m.max_context
                                : a.shape(k) == want[static_cast<size_t>(k)];
      if (!shape_ok) {
        return absl::InvalidArgumentError(absl::StrCat(
            af, ".shape = [", absl::StrJoin(a.shape(), ", "), "] must be ", want_text,
            is_keys ? absl::StrCat(" with 1 <= N <= model.max_context ", m.max_context) : ""));
      }
      if (a.strides(k) < 1 || a.strides(k) > (int64_t{1} << 40)) {
        return absl::InvalidArgumentError(absl::StrCat(af, ".strides[", k, "] = ", a.strides(k),
                                                       " must be in [1, 2^40] elements"));
      }
    }
    if (a.strides(3) != 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          af, ".strides[3] = ", a.strides(3), " must be 1 (each row of d elements contiguous)"));
    }
    // The farthest byte the description reaches, in 128 bits so that no value can wrap.
    const uint64_t item = DTypeSize(arr.dtype);
    u128 last = 0;
    for (int k = 0; k < 4; ++k) {
      last += static_cast<u128>(a.shape(k) - 1) * static_cast<u128>(a.strides(k));
    }
    const u128 end = static_cast<u128>(a.byte_offset()) + (last + 1) * item;
    if (end > a.byte_offset() + static_cast<u128>(a.byte_length()) ||
        static_cast<u128>(a.byte_offset()) + a.byte_length() > b.byte_length()) {
      return absl::InvalidArgumentError(absl::StrCat(
          af, ": byte_offset ", a.byte_offset(), " + the extent of shape [",
          absl::StrJoin(a.shape(), ", "), "] with strides [", absl::StrJoin(a.strides(), ", "),
          "] reaches byte ", static_cast<uint64_t>(std::min<u128>(end, UINT64_MAX)),
          ", outside the array's byte_length ", a.byte_length(), " or the buffer's byte_length ",
          b.byte_length()));
    }
    arr.byte_offset = a.byte_offset();
    arr.shm_name = name;
    // O_NONBLOCK: a FIFO (or a device) planted under the name must not block the open; anything
    // but a regular file is refused below, before a byte is read.
    arr.fd = ::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0);
    if (arr.fd < 0) {
      const int e = errno;
      const std::string msg = absl::StrCat(field, ".shm_name \"", name, "\": ", std::strerror(e));
      if (e == ENOENT) return absl::NotFoundError(msg);
      if (e == EACCES || e == EPERM) return absl::PermissionDeniedError(msg);
      return absl::InvalidArgumentError(msg);
    }
    struct stat st {};
    if (::fstat(arr.fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".shm_name \"", name,
                       "\" is not a regular shared-memory object (a FIFO, socket or device?)"));
    }
    if (st.st_uid != caller.uid) {
      return absl::PermissionDeniedError(absl::StrCat(field, ".shm_name \"", name,
                                                      "\" is owned by uid ", st.st_uid,
                                                      ", not by the caller's uid ", caller.uid));
    }
    if (static_cast<uint64_t>(st.st_size) < b.byte_length()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".byte_length = ", b.byte_length(),
                                                     " but the object \"", name, "\" holds only ",
                                                     st.st_size, " bytes"));
    }
  }
  return out;
}

ExternalBuffers::~ExternalBuffers() {
  for (Array* a : {&keys_, &queries_}) {
    if (a->fd >= 0) ::close(a->fd);
  }
}

absl::Status ExternalBuffers::ReadRun(const Array& a, int64_t first, int64_t count, float* out,
                                      const char* what) const {
  const size_t item = DTypeSize(a.dtype);
  const size_t bytes = static_cast<size_t>(count) * item;
  if (staging_.size() < bytes) staging_.resize(bytes);
  const off_t at = static_cast<off_t>(a.byte_offset + static_cast<uint64_t>(first) * item);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t r =
        ::pread(a.fd, staging_.data() + done, bytes - done, at + static_cast<off_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("registered buffer ", what, " (\"", a.shm_name, "\") ended at byte ",
                       static_cast<uint64_t>(at) + done,
                       r < 0 ? absl::StrCat(": ", std::strerror(errno)) : std::string(),
                       "; it shrank after RegisterBuffers: register it again"));
    }
    done += static_cast<size_t>(r);
  }
  const int64_t bad = ConvertToFloat32(a.dtype, staging_.data(), count, out);
  return bad < 0 ? absl::OkStatus()
                 : absl::InvalidArgumentError(absl::StrCat("element ", bad, " is NaN or Inf"));
}

absl::Status ExternalBuffers::ReadKeys(int layer, int head, int64_t n, float* out) const {
  const Array& a = keys_;
  const int64_t d = a.shape[3];
  const int64_t base = layer * a.strides[0] + head * a.strides[1];
  auto name = [&](int64_t row) {
    return absl::StrCat("registered keys: layer ", layer, ", kv head ", head, ", row ", row);
  };
  if (a.strides[2] == d) {  // the head's rows are one contiguous run
    if (auto s = ReadRun(a, base, n * d, out, "keys"); !s.ok()) {
      if (s.code() != absl::StatusCode::kInvalidArgument) return s;
      int64_t bad = 0;
      for (int64_t j = 0; j < n * d; ++j) {
        if (!std::isfinite(out[j])) {
          bad = j / d;
          break;
        }
      }
      return absl::InvalidArgumentError(absl::StrCat(name(bad), " holds NaN or Inf"));
    }
    return absl::OkStatus();
  }
  for (int64_t j = 0; j < n; ++j) {
    if (auto s = ReadRun(a, base + j * a.strides[2], d, out + j * d, "keys"); !s.ok()) {
      return s.code() == absl::StatusCode::kInvalidArgument
                 ? absl::InvalidArgumentError(absl::StrCat(name(j), " holds NaN or Inf"))
                 : s;
    }
  }
  return absl::OkStatus();
}

absl::Status ExternalBuffers::ReadQueries(int64_t step, float* out) const {
  const Array& a = queries_;
  const int64_t window = a.shape[2];
  const int64_t d = a.shape[3];
  const bool contiguous = a.strides[2] == d;  // a head's α slots are one run
  std::vector<float> ring(contiguous ? static_cast<size_t>(window * d) : 0);
  for (int64_t l = 0; l < a.shape[0]; ++l) {
    for (int64_t q = 0; q < a.shape[1]; ++q) {
      const int64_t base = l * a.strides[0] + q * a.strides[1];
      auto bad = [&](int64_t slot) {
        return absl::InvalidArgumentError(absl::StrCat("registered query_window: layer ", l,
                                                       ", query head ", q, ", slot ", slot,
                                                       " holds NaN or Inf"));
      };
      if (contiguous) {
        if (auto st = ReadRun(a, base, window * d, ring.data(), "query_window"); !st.ok()) {
          if (st.code() != absl::StatusCode::kInvalidArgument) return st;
          for (int64_t j = 0; j < window * d; ++j) {
            if (!std::isfinite(ring[static_cast<size_t>(j)])) return bad(j / d);
          }
        }
      }
      for (int64_t i = 0; i < window; ++i) {
        const int64_t s = step - window + 1 + i;
        const int64_t slot = ((s % window) + window) % window;
        float* dst = out + ((l * a.shape[1] + q) * window + i) * d;
        if (contiguous) {
          std::memcpy(dst, ring.data() + slot * d, static_cast<size_t>(d) * sizeof(float));
          continue;
        }
        if (auto st = ReadRun(a, base + slot * a.strides[2], d, dst, "query_window"); !st.ok()) {
          return st.code() == absl::StatusCode::kInvalidArgument ? bad(slot) : st;
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace reasonalloc
