#include "server/host_arena.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace reasonalloc {
namespace {

std::string RandomHex(int bytes) {
  static thread_local std::random_device rd;
  std::string out;
  for (int i = 0; i < bytes; i += 4) {
    absl::StrAppend(&out, absl::Hex(rd(), absl::kZeroPad8));
  }
  return out;
}

}  // namespace

void HostArena::DescribeMemory(v1::ArenaDescriptor* out) const {
  out->set_memory(v1::MEMORY_KIND_HOST_SHM);
  out->set_byte_length(size_);
  out->set_shm_name(name_);
}

absl::StatusOr<std::unique_ptr<HostArena>> HostArena::Create(uint64_t bytes) {
  if (bytes == 0) bytes = 64;
  // Name: prefix, server pid (for stale cleanup), 128 random bits.
  const std::string name = absl::StrCat(kNamePrefix, getpid(), "-", RandomHex(16));
  const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("shm_open of a ", bytes, "-byte arena failed: ", std::strerror(errno)));
  }
  auto fail = [&](const char* what) {
    const int e = errno;
    close(fd);
    shm_unlink(name.c_str());
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " of a ", bytes, "-byte arena failed: ", std::strerror(e)));
  };
  // The umask may have narrowed the mode; widen nothing beyond the owner.
  if (fchmod(fd, 0600) != 0) return fail("fchmod");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) return fail("ftruncate");
  // Reserve the pages now: a full /dev/shm fails here, not with SIGBUS at the first write.
  if (int e = posix_fallocate(fd, 0, static_cast<off_t>(bytes)); e != 0) {
    errno = e;
    return fail("posix_fallocate");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail("mmap");
  close(fd);
  return std::unique_ptr<HostArena>(new HostArena(name, static_cast<unsigned char*>(p), bytes));
}

HostArena::~HostArena() {
  munmap(data_, size_);
  shm_unlink(name_.c_str());
}

int HostArena::RemoveOwn() {
  int removed = 0;
  std::error_code ec;
  const std::string mine = absl::StrCat(std::string(kNamePrefix).substr(1), getpid(), "-");
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string file = entry.path().filename().string();
    if (file.rfind(mine, 0) == 0 && shm_unlink(("/" + file).c_str()) == 0) ++removed;
  }
  return removed;
}

int HostArena::RemoveStale() {
  int removed = 0;
  std::error_code ec;
  const std::string prefix = std::string(kNamePrefix).substr(1);
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    const std::string file = entry.path().filename().string();
    if (file.rfind(prefix, 0) != 0) continue;
    std::vector<std::string> parts = absl::StrSplit(file.substr(prefix.size()), '-');
    int pid = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &pid) || pid <= 0) continue;
    struct stat st;
    if (stat(entry.path().c_str(), &st) != 0 || st.st_uid != geteuid()) continue;
    if (pid == getpid() || kill(pid, 0) == 0 || errno == EPERM) continue;  // owner alive
    if (shm_unlink(("/" + file).c_str()) == 0) ++removed;
  }
  return removed;
}

}  // namespace reasonalloc
