// Who is on the other end of a call.
//
// gRPC's C++ API does not expose a Unix socket's peer credentials, so the server accepts its Unix
// socket itself: UnixListener accepts each connection, reads SO_PEERCRED, records it in a PeerTable
// under the connection's descriptor and hands the descriptor to gRPC (AddInsecureChannelFromFd),
// whose calls then report the peer as "fd:<n>". A descriptor stays open, and so keeps its entry,
// while any call on its connection is running; a later connection that reuses the number replaces
// the entry when it is accepted. Peers of the TCP listener carry no credentials.
#ifndef REASONALLOC_SERVER_PEER_H_
#define REASONALLOC_SERVER_PEER_H_

#include <grpcpp/server.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/sync.h"

namespace reasonalloc {

struct PeerIdentity {
  bool local = false;  // a Unix-socket peer whose credentials the kernel reported
  uint32_t uid = 0;
  uint32_t gid = 0;
  int32_t pid = 0;
  // "uid 1000 (pid 42)" or "a peer without credentials (TCP)".
  std::string Describe() const;
};

class PeerTable {
 public:
  void Set(int fd, const PeerIdentity& peer) ABSL_LOCKS_EXCLUDED(mu_);
  // The identity behind a gRPC peer string; a non-local identity for anything but "fd:<n>" of an
  // accepted connection.
  PeerIdentity Lookup(absl::string_view grpc_peer) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable Mutex mu_;
  absl::flat_hash_map<int, PeerIdentity> peers_ ABSL_GUARDED_BY(mu_);
};

// Who may connect to the Unix socket: a uid outside `allow_uids` (when not empty; the server's own
// uid is always allowed) is closed at accept, before gRPC sees a byte, and so is a uid already
// holding `max_per_uid` open connections.
struct UnixAdmission {
  std::vector<uint32_t> allow_uids;
  int max_per_uid = 64;
};

class UnixListener {
 public:
  // Creates the socket at `path` with `mode` (never looser for a moment: the umask is set while it
  // is bound) and listens; nothing is accepted before Start.
  static absl::StatusOr<std::unique_ptr<UnixListener>> Bind(const std::string& path, unsigned mode);
  ~UnixListener();
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  using Admission = UnixAdmission;
  // Accepts on a thread of its own until Stop, handing every admitted connection to `server`.
  void Start(grpc::Server* server, PeerTable* peers, Admission admission = {});
  uint64_t refused() const { return refused_.load(); }
  // Stops accepting and closes the listening socket (idempotent).
  void Stop();
  // After Stop: shuts down (SHUT_RDWR) every accepted connection gRPC still holds open, so that
  // writes pending towards a peer that stopped reading fail instead of waiting forever. For the
  // end of a drain; returns how many connections it cut.
  int AbortConnections();
  uint64_t accepted() const { return accepted_.load(); }

 private:
  UnixListener(int fd, int wake_fd) : fd_(fd), wake_fd_(wake_fd) {}
  void Loop(grpc::Server* server, PeerTable* peers, const Admission& admission);
  // Open connections per uid, pruned of those gRPC has closed since (by descriptor and inode).
  int OpenConnections(uint32_t uid);

  struct Open {
    int fd;
    uint32_t uid;
    dev_t dev;
    ino_t ino;
  };
  std::vector<Open> open_;  // the accept thread's only
  std::atomic<uint64_t> refused_{0};

  int fd_;
  int wake_fd_;  // eventfd that ends the accept loop
  std::thread thread_;
  std::atomic<uint64_t> accepted_{0};
};

}  // namespace reasonalloc

#endif  // REASONALLOC_SERVER_PEER_H_
