#include "server/peer.h"

#include <grpcpp/server_posix.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "spdlog/spdlog.h"

namespace reasonalloc {

std::string PeerIdentity::Describe() const {
  if (!local) return "a peer without credentials (TCP)";
  return absl::StrCat("uid ", uid, " (pid ", pid, ")");
}

void PeerTable::Set(int fd, const PeerIdentity& peer) {
  MutexLock lock(&mu_);
  peers_[fd] = peer;
}

PeerIdentity PeerTable::Lookup(absl::string_view grpc_peer) const {
  int fd = -1;
  if (!absl::ConsumePrefix(&grpc_peer, "fd:") || !absl::SimpleAtoi(grpc_peer, &fd)) return {};
  MutexLock lock(&mu_);
  const auto it = peers_.find(fd);
  return it == peers_.end() ? PeerIdentity{} : it->second;
}

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Bind(const std::string& path,
                                                                 unsigned mode) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("listen path \"", path, "\" is too long"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  const mode_t old_umask = ::umask(static_cast<mode_t>(~mode & 0777));
  const int bound = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  const int bind_errno = errno;
  ::umask(old_umask);
  if (bound != 0) {
    ::close(fd);
    return absl::UnavailableError(
        absl::StrCat("could not listen on \"unix://", path, "\": ", std::strerror(bind_errno)));
  }
  if (::chmod(path.c_str(), static_cast<mode_t>(mode)) != 0 || ::listen(fd, SOMAXCONN) != 0) {
    const int e = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("listen on ", path, ": ", std::strerror(e)));
  }
  const int wake = ::eventfd(0, EFD_CLOEXEC);
  if (wake < 0) {
    const int e = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(e)));
  }
  return std::unique_ptr<UnixListener>(new UnixListener(fd, wake));
}

UnixListener::~UnixListener() {
  Stop();
  ::close(wake_fd_);
}

void UnixListener::Start(grpc::Server* server, PeerTable* peers, Admission admission) {
  thread_ = std::thread(
      [this, server, peers, admission = std::move(admission)] { Loop(server, peers, admission); });
}

int UnixListener::AbortConnections() {
  int cut = 0;
  for (const Open& o : open_) {
    struct stat st {};
    // Only a descriptor that still is the accepted socket (not a number reused since).
    if (::fstat(o.fd, &st) == 0 && st.st_dev == o.dev && st.st_ino == o.ino &&
        ::shutdown(o.fd, SHUT_RDWR) == 0) {
      ++cut;
    }
  }
  return cut;
}

int UnixListener::OpenConnections(uint32_t uid) {
  // gRPC closes a connection's descriptor when the connection ends; a number reused since then
  // names another file (or another socket), which the inode tells apart.
  int count = 0;
  for (auto it = open_.begin(); it != open_.end();) {
    struct stat st {};
    if (::fstat(it->fd, &st) != 0 || st.st_dev != it->dev || st.st_ino != it->ino) {
      it = open_.erase(it);
      continue;
    }
    count += it->uid == uid ? 1 : 0;
    ++it;
  }
  return count;
}

void UnixListener::Stop() {
  if (fd_ < 0) return;
  const uint64_t one = 1;
  if (::write(wake_fd_, &one, sizeof(one)) < 0) {
    spdlog::warn("unix listener: could not wake the accept loop: {}", std::strerror(errno));
  }
  if (thread_.joinable()) thread_.join();
  ::close(fd_);
  fd_ = -1;
}

void UnixListener::Loop(grpc::Server* server, PeerTable* peers, const Admission& admission) {
  pollfd fds[2] = {{fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  for (;;) {
    const int ready = ::poll(fds, 2, -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      spdlog::error("unix listener: poll: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    const int conn = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (conn < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      // Out of descriptors or memory: back off instead of spinning on the ready socket.
      spdlog::warn("unix listener: accept: {}", std::strerror(errno));
      ::poll(nullptr, 0, 100);
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    PeerIdentity peer;
    if (::getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && len == sizeof(cred)) {
      peer.local = true;
      peer.uid = cred.uid;
      peer.gid = cred.gid;
      peer.pid = cred.pid;
    } else {
      spdlog::warn("unix listener: SO_PEERCRED: {}", std::strerror(errno));
    }
    if (peer.local) {
      const auto& allowed = admission.allow_uids;
      if (!allowed.empty() && peer.uid != ::geteuid() &&
          std::find(allowed.begin(), allowed.end(), peer.uid) == allowed.end()) {
        spdlog::debug("unix listener: uid {} is not in --allow_uid: connection closed", peer.uid);
        ::close(conn);
        refused_.fetch_add(1);
        continue;
      }
      if (OpenConnections(peer.uid) >= admission.max_per_uid) {
        spdlog::warn(
            "unix listener: uid {} already holds {} connections (--max_connections_per_uid): "
            "connection closed",
            peer.uid, admission.max_per_uid);
        ::close(conn);
        refused_.fetch_add(1);
        continue;
      }
      struct stat st {};
      if (::fstat(conn, &st) == 0) open_.push_back({conn, peer.uid, st.st_dev, st.st_ino});
    }
    peers->Set(conn, peer);
    accepted_.fetch_add(1);
    grpc::AddInsecureChannelFromFd(server, conn);
  }
}

}  // namespace reasonalloc
