#include "tests/integration/server_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace reasonalloc::testing {

absl::StatusOr<std::unique_ptr<ServerProcess>> ServerProcess::Start(const Options& options) {
  std::unique_ptr<ServerProcess> p(new ServerProcess());
  char tmpl[] = "/tmp/reasonalloc-test-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  p->dir_ = tmpl;
  p->socket_path_ = p->dir_ + "/sidecar.sock";
  p->log_path_ = p->dir_ + "/server.log";

  // REASONALLOC_TEST_SERVER_BINARY overrides the build tree's binary (tests/gpu/device_check.sh
  // runs prebuilt tests from a bundle elsewhere).
  const char* binary = std::getenv("REASONALLOC_TEST_SERVER_BINARY");
  std::vector<std::string> argv = {
      binary != nullptr && *binary != '\0' ? binary : REASONALLOC_SERVER_BINARY};
  if (options.pass_listen) argv.push_back("--listen=" + p->target());
  argv.push_back("--metrics_address=127.0.0.1:0");
  for (const auto& a : options.args) argv.push_back(a);
  // Everything the child needs is built before fork: between fork and exec a multi-threaded
  // parent's child may only make async-signal-safe calls (no malloc, no setenv).
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string key = entry.substr(0, entry.find('='));
    if (options.env.count(key) == 0) env.push_back(entry);
  }
  for (const auto& [k, v] : options.env) env.push_back(k + "=" + v);
  std::vector<char*> cargv, cenv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  for (auto& e : env) cenv.push_back(e.data());
  cenv.push_back(nullptr);
  const int log_fd = open(p->log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (log_fd < 0) return absl::InternalError("cannot create " + p->log_path_);

  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    dup2(log_fd, 2);
    dup2(log_fd, 1);
    execve(cargv[0], cargv.data(), cenv.data());
    _exit(127);
  }
  close(log_fd);
  p->pid_ = pid;
  Client::Options co;
  co.target = p->target();
  co.timeout = absl::Seconds(30);
  p->client_ = *Client::Connect(co);
  if (!options.wait_ready) return p;
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  // A channel that fails its first connection backs off for a second or more, so wait for the
  // socket file before the first call.
  while (absl::Now() < deadline && !std::filesystem::exists(p->socket_path_) && p->Running()) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  while (absl::Now() < deadline) {
    if (!p->Running()) {
      return absl::InternalError(
          absl::StrCat("server exited with ", p->exit_code_, ":\n", p->Log()));
    }
    auto health = p->client_->CheckHealth();
    if (health.ok() && *health == grpc::health::v1::HealthCheckResponse::SERVING) return p;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("server not ready:\n", p->Log()));
}

ServerProcess::~ServerProcess() {
  if (Running()) Stop(SIGKILL);
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

std::string ServerProcess::Log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool ServerProcess::Running() {
  if (exit_code_ >= 0) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == 0) return true;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return false;
}

absl::StatusOr<int> ServerProcess::WaitExit(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (Running()) {
    if (absl::Now() > deadline) return absl::DeadlineExceededError("server did not exit");
    absl::SleepFor(absl::Milliseconds(10));
  }
  return exit_code_;
}

int ServerProcess::Stop(int sig, absl::Duration timeout) {
  if (!Running()) return exit_code_;
  kill(pid_, sig);
  auto code = WaitExit(timeout);
  if (!code.ok()) {
    kill(pid_, SIGKILL);
    return WaitExit(absl::Seconds(5)).value_or(-1);
  }
  return *code;
}

absl::StatusOr<std::string> HttpGet(const std::string& host_port, const std::string& path) {
  const size_t colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port)) {
    return absl::InvalidArgumentError("bad host:port " + host_port);
  }
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError("connect " + host_port);
  }
  const std::string req = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ", host_port, "\r\n\r\n");
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return absl::UnavailableError("write");
  }
  std::string response;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) response.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (body == std::string::npos) return absl::DataLossError("no HTTP body");
  return response.substr(body + 4);
}

CommandResult RunCommand(const std::string& command_line) {
  CommandResult r;
  FILE* pipe = popen((command_line + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace reasonalloc::testing
