// Who may use a session: the Unix-socket peer credentials recorded at creation, the session token,
// --allow_uid, and ListSessions' view per uid. Tests that need a second uid run the CLI under
// setpriv as uid 65534 and skip, printing why, when this process is not root.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "tests/integration/server_process.h"

namespace reasonalloc {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::RunCommand;
using testing::ServerProcess;

constexpr uint32_t kForeignUid = 65534;

v1::CreateSessionRequest SmallSession() {
  v1::CreateSessionRequest r;
  auto* m = r.mutable_model();
  m->set_name("security-model");
  m->set_num_layers(2);
  m->set_num_q_heads(4);
  m->set_num_kv_heads(2);
  m->set_head_dim(8);
  m->set_dtype(v1::DTYPE_FLOAT32);
  m->set_max_context(4096);
  r.mutable_budget()->set_budget(12);
  r.mutable_budget()->set_window(4);
  r.mutable_budget()->set_buffer(16);
  r.mutable_scorer()->set_name("snapkv");
  return r;
}

std::unique_ptr<ServerProcess> MustStart(std::vector<std::string> args) {
  auto p = ServerProcess::Start(std::move(args));
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(p).value() : nullptr;
}

std::unique_ptr<Client> MustConnect(const std::string& target) {
  Client::Options o;
  o.target = target;
  o.timeout = absl::Seconds(10);
  auto c = Client::Connect(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(c).value() : nullptr;
}

std::string TcpTarget(Client& client) {
  auto info = client.GetServerInfo();
  EXPECT_TRUE(info.ok()) << info.status();
  for (const auto& a : info->listen_addresses()) {
    if (a.rfind("unix:", 0) != 0) return a;
  }
  ADD_FAILURE() << "no TCP address in " << info->DebugString();
  return "";
}

TEST(Security, OwnerCredentialsAreRecordedAndTheTokenIsNeverListed) {
  auto server = MustStart({});
  ASSERT_NE(server, nullptr);
  auto created = server->client().CreateSession(SmallSession());
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string id = created->session().session_id();
  const std::string token = created->session_token();
  EXPECT_EQ(token.size(), 32u);
  EXPECT_NE(token, id);
  const auto& owner = created->session().owner();
  EXPECT_TRUE(owner.local());
  EXPECT_EQ(owner.uid(), ::geteuid());
  EXPECT_EQ(owner.gid(), ::getegid());
  EXPECT_EQ(owner.pid(), ::getpid());
  auto info = server->client().GetSession(id);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->owner().pid(), ::getpid());
  EXPECT_THAT(info->DebugString(), Not(HasSubstr(token)));
  auto listed = server->client().ListSessions();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_THAT((*listed)[0].DebugString(), Not(HasSubstr(token)));
  EXPECT_THAT(server->Log(), Not(HasSubstr(token)));
}

// A TCP peer has no credentials: it may use a session only with its token, and a session created
// over TCP belongs to its token only.
TEST(Security, SessionTokenGatesPeersWithoutCredentials) {
  auto server = MustStart({"--tcp_listen=127.0.0.1:0"});
  ASSERT_NE(server, nullptr);
  auto created = server->client().CreateSession(SmallSession());
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string id = created->session().session_id();
  auto tcp = MustConnect(TcpTarget(server->client()));
  ASSERT_NE(tcp, nullptr);

  const std::string needle = absl::StrCat("session_id ", id, " belongs to uid ", ::geteuid());
  for (const absl::Status& s :
       {tcp->GetSession(id).status(), tcp->KeepAlive(id).status(), tcp->CloseSession(id).status(),
        tcp->UpdateBudget(id, 20).status(), [&] {
          v1::CompressRequest r;
          r.set_session_id(id);
          r.set_step(1);
          return tcp->Compress(r).status();
        }()}) {
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(needle));
    EXPECT_THAT(std::string(s.message()), HasSubstr("reasonalloc-session-token"));
  }
  // A wrong token is refused the same way and named as such.
  tcp->AddSessionToken(id, std::string(32, '0'));
  auto wrong = tcp->GetSession(id);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("no matching"));
  // The session is untouched by the refused calls.
  auto still = server->client().GetSession(id);
  ASSERT_TRUE(still.ok()) << still.status();
  EXPECT_EQ(still->budget().budget(), 12);

  tcp->AddSessionToken(id, created->session_token());
  EXPECT_TRUE(tcp->GetSession(id).ok());
  EXPECT_TRUE(tcp->KeepAlive(id).ok());
  auto closed = tcp->CloseSession(id);
  ASSERT_TRUE(closed.ok()) << closed.status();
  EXPECT_TRUE(closed->existed());

  // Created over TCP: no credentials recorded, so even the server's own uid needs the token.
  auto over_tcp = tcp->CreateSession(SmallSession());
  ASSERT_TRUE(over_tcp.ok()) << over_tcp.status();
  EXPECT_FALSE(over_tcp->session().owner().local());
  const std::string tcp_id = over_tcp->session().session_id();
  auto unix_peer = MustConnect(server->target());
  auto denied = unix_peer->GetSession(tcp_id);
  EXPECT_EQ(denied.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(denied.status().message()), HasSubstr("belongs to a TCP peer"));
  EXPECT_TRUE(tcp->GetSession(tcp_id).ok());  // its creator keeps the token
  // Closing an unknown session stays OK whoever asks.
  auto unknown = unix_peer->CloseSession(std::string(32, 'a'));
  ASSERT_TRUE(unknown.ok()) << unknown.status();
  EXPECT_FALSE(unknown->existed());
}

// Runs the CLI as uid 65534 against `server`; empty optional when that is impossible here.
class ForeignUid : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) {
      GTEST_SKIP() << "needs root to run a client as uid " << kForeignUid
                   << " (setpriv); this process is uid " << ::geteuid();
    }
    if (RunCommand("setpriv --reuid=65534 --regid=65534 --clear-groups -- test -x " +
                   std::string(REASONALLOC_CLI_BINARY))
            .exit_code != 0) {
      GTEST_SKIP() << "uid " << kForeignUid << " cannot execute " << REASONALLOC_CLI_BINARY
                   << " (a parent directory is not searchable by it)";
    }
  }

  // The server's directory and socket open to every uid, so that only the server's own checks
  // stand between uid 65534 and the sessions.
  std::unique_ptr<ServerProcess> StartOpen(std::vector<std::string> extra = {}) {
    extra.push_back("--socket_mode=0666");
    auto server = MustStart(std::move(extra));
    if (server != nullptr) ::chmod(server->dir().c_str(), 0755);
    return server;
  }

  testing::CommandResult AsForeign(ServerProcess& server, const std::string& args) {
    return RunCommand(absl::StrCat("setpriv --reuid=65534 --regid=65534 --clear-groups -- ",
                                   REASONALLOC_CLI_BINARY, " ", args,
                                   " --timeout_seconds=10 --target=", server.target()));
  }
};

TEST_F(ForeignUid, CannotSeeOrUseAnotherUidsSession) {
  auto server = StartOpen();
  ASSERT_NE(server, nullptr);
  auto created = server->client().CreateSession(SmallSession());
  ASSERT_TRUE(created.ok()) << created.status();
  const std::string id = created->session().session_id();

  // It can connect (socket 0666) and ask about the server, but does not see the session...
  const auto info = AsForeign(*server, "info");
  EXPECT_EQ(info.exit_code, 0) << info.output;
  const auto sessions = AsForeign(*server, "sessions");
  EXPECT_EQ(sessions.exit_code, 0) << sessions.output;
  EXPECT_THAT(sessions.output, Not(HasSubstr(id)));
  // ...cannot close it...
  const auto close = AsForeign(*server, "close " + id);
  EXPECT_NE(close.exit_code, 0) << close.output;
  EXPECT_THAT(close.output, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(close.output, HasSubstr(absl::StrCat("this call comes from uid ", kForeignUid)));
  ASSERT_TRUE(server->client().GetSession(id).ok());
  // ...while the owner sees it; with the token the foreign uid may close it.
  auto listed = server->client().ListSessions();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 1u);
  const auto with_token =
      AsForeign(*server, absl::StrCat("close ", id, " --session_token=", created->session_token()));
  EXPECT_EQ(with_token.exit_code, 0) << with_token.output;
  EXPECT_THAT(with_token.output, HasSubstr(id + " closed"));
  EXPECT_EQ(server->client().GetSession(id).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ForeignUid, AllowUidRefusesOtherPeers) {
  auto server = StartOpen({"--allow_uid=12345"});
  ASSERT_NE(server, nullptr);
  // Refused at accept (the connection is closed before gRPC reads a byte), so a refused uid
  // cannot hold connections open either.
  const auto refused = AsForeign(*server, "info");
  EXPECT_NE(refused.exit_code, 0) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(server->Log(), Not(HasSubstr("uid 65534 (pid")));  // no call was ever served
  // The server's own uid is always allowed.
  EXPECT_TRUE(server->client().GetServerInfo().ok());

  auto allowed = StartOpen({"--allow_uid=12345,65534"});
  ASSERT_NE(allowed, nullptr);
  const auto ok = AsForeign(*allowed, "info");
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
}

// A neighbour on a shared sidecar cannot replace the profiles other uids' sessions follow.
TEST_F(ForeignUid, CannotReplaceAnotherUidsProfile) {
  auto server = StartOpen();
  ASSERT_NE(server, nullptr);
  const std::string file = server->dir() + "/profile.json";
  auto write = [&](const std::string& name, const char* demand) {
    std::ofstream out(file, std::ios::trunc);
    out << R"({"name": ")" << name
        << R"(", "model": {"num_layers": 2, "num_q_heads": 2, "num_kv_heads": 2, "head_dim": 8},)"
        << R"( "rho": 0.9, "demand": )" << demand << "}";
    out.close();
    ::chmod(file.c_str(), 0644);
  };
  write("shared", "[1, 3]");
  const auto own = RunCommand(
      absl::StrCat(REASONALLOC_CLI_BINARY, " put-profile ", file, " --target=", server->target()));
  ASSERT_EQ(own.exit_code, 0) << own.output;

  write("shared", "[3, 1]");
  const auto overwrite = AsForeign(*server, "put-profile " + file + " --overwrite");
  EXPECT_NE(overwrite.exit_code, 0) << overwrite.output;
  EXPECT_THAT(overwrite.output, HasSubstr("PERMISSION_DENIED"));
  EXPECT_THAT(overwrite.output, HasSubstr("\"shared\" belongs to server"));
  const auto save = AsForeign(*server, "put-profile " + file + " --save");
  EXPECT_NE(save.exit_code, 0) << save.output;

  write("mine", "[2, 2]");
  const auto mine = AsForeign(*server, "put-profile " + file);
  EXPECT_EQ(mine.exit_code, 0) << mine.output;
  const auto again = AsForeign(*server, "put-profile " + file + " --overwrite");
  EXPECT_EQ(again.exit_code, 0) << again.output;  // its own: replaceable by it
  const auto listed =
      RunCommand(absl::StrCat(REASONALLOC_CLI_BINARY, " profiles --target=", server->target()));
  ASSERT_EQ(listed.exit_code, 0) << listed.output;
  EXPECT_THAT(listed.output, HasSubstr("uid 65534"));
  // A profile named after root's model but put by uid 65534 does not steer root's sessions.
  v1::CreateSessionRequest r;
  r.mutable_model()->set_name("mine");
  r.mutable_model()->set_num_layers(2);
  r.mutable_model()->set_num_q_heads(2);
  r.mutable_model()->set_num_kv_heads(2);
  r.mutable_model()->set_head_dim(8);
  r.mutable_model()->set_dtype(v1::DTYPE_FLOAT16);
  r.mutable_model()->set_max_context(4096);
  r.mutable_budget()->set_budget(32);
  r.mutable_budget()->set_window(4);
  r.mutable_allocator()->set_name("reasonalloc");
  auto squatted = server->client().CreateSession(r);
  ASSERT_TRUE(squatted.ok()) << squatted.status();
  ASSERT_EQ(squatted->warnings_size(), 1);
  EXPECT_THAT(squatted->warnings(0), HasSubstr("belongs to uid 65534"));
  EXPECT_EQ(squatted->session().profile(), "");
  // The wave root's sessions use is unchanged.
  const auto json = RunCommand(
      absl::StrCat(REASONALLOC_CLI_BINARY, " profiles --json --target=", server->target()));
  EXPECT_THAT(json.output, HasSubstr("0.5"));  // [1, 3] normalised: 0.5, 1.5
}

}  // namespace
}  // namespace reasonalloc
