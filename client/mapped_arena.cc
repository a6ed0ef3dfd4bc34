#include "client/mapped_arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace reasonalloc {

absl::StatusOr<std::unique_ptr<MappedArena>> MappedArena::Map(const v1::ArenaDescriptor& d) {
  if (d.memory() != v1::MEMORY_KIND_HOST_SHM) {
    return absl::InvalidArgumentError(absl::StrCat("arena \"", d.kind(), "\" is ",
                                                   v1::MemoryKind_Name(d.memory()),
                                                   "; only MEMORY_KIND_HOST_SHM maps here"));
  }
  if (d.layout_version() != 1) {
    return absl::FailedPreconditionError(absl::StrCat("arena \"", d.kind(),
                                                      "\" has layout_version ", d.layout_version(),
                                                      "; this client knows 1"));
  }
  for (const auto& a : d.arrays()) {
    if (a.byte_offset() > d.byte_length() || a.byte_length() > d.byte_length() - a.byte_offset()) {
      return absl::InvalidArgumentError(
          absl::StrCat("arena \"", d.kind(), "\" array \"", a.name(), "\" lies outside the arena"));
    }
  }
  const int fd = shm_open(d.shm_name().c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) {
    return absl::NotFoundError(
        absl::StrCat("shm_open(\"", d.shm_name(), "\"): ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < d.byte_length() ||
      d.byte_length() == 0) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("arena \"", d.kind(), "\" (", d.shm_name(),
                                                   ") is smaller than its byte_length ",
                                                   d.byte_length()));
  }
  void* p = mmap(nullptr, d.byte_length(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int e = errno;
  close(fd);
  if (p == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("mmap(\"", d.shm_name(), "\"): ", std::strerror(e)));
  }
  return std::unique_ptr<MappedArena>(new MappedArena(d, static_cast<unsigned char*>(p)));
}

MappedArena::~MappedArena() { munmap(data_, descriptor_.byte_length()); }

absl::StatusOr<unsigned char*> MappedArena::Array(const std::string& name) const {
  for (const auto& a : descriptor_.arrays()) {
    if (a.name() == name) return data_ + a.byte_offset();
  }
  return absl::NotFoundError(
      absl::StrCat("arena \"", descriptor_.kind(), "\" has no array \"", name, "\""));
}

}  // namespace reasonalloc
