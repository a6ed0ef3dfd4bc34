// Runs the real reasonalloc-server binary for a test: a private temporary directory holds its Unix
// socket, the metrics endpoint binds port 0, stderr goes to a log file the test can read.
#ifndef REASONALLOC_TESTS_INTEGRATION_SERVER_PROCESS_H_
#define REASONALLOC_TESTS_INTEGRATION_SERVER_PROCESS_H_

#include <sys/types.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"

namespace reasonalloc::testing {

class ServerProcess {
 public:
  struct Options {
    std::vector<std::string> args;           // extra flags
    std::map<std::string, std::string> env;  // extra environment
    bool pass_listen = true;                 // add --listen <private socket>
    bool wait_ready = true;                  // wait for health SERVING
  };
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(const Options& options);
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(std::vector<std::string> args = {}) {
    Options o;
    o.args = std::move(args);
    return Start(o);
  }
  ~ServerProcess();

  const std::string& dir() const { return dir_; }
  const std::string& socket_path() const { return socket_path_; }
  std::string target() const { return "unix://" + socket_path_; }
  pid_t pid() const { return pid_; }
  Client& client() { return *client_; }
  std::string Log() const;
  // Sends `sig` and waits for exit; returns the exit code, or 128 + signal if killed by one.
  int Stop(int sig = 15, absl::Duration timeout = absl::Seconds(30));
  // Waits for the process to exit on its own (e.g. a startup error).
  absl::StatusOr<int> WaitExit(absl::Duration timeout);
  bool Running();

 private:
  ServerProcess() = default;

  std::string dir_;
  std::string socket_path_;
  std::string log_path_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
  std::unique_ptr<Client> client_;
};

// Minimal HTTP/1.0 GET against host:port; returns the body.
absl::StatusOr<std::string> HttpGet(const std::string& host_port, const std::string& path);

// Runs a command line, returning its exit code and combined stdout+stderr.
struct CommandResult {
  int exit_code = -1;
  std::string output;
};
CommandResult RunCommand(const std::string& command_line);

}  // namespace reasonalloc::testing

#endif  // REASONALLOC_TESTS_INTEGRATION_SERVER_PROCESS_H_
