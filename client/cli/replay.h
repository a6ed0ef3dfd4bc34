// `reasonalloc replay`: offline comparison of policies on a dumped trace, in process, no server.
#ifndef REASONALLOC_CLIENT_CLI_REPLAY_H_
#define REASONALLOC_CLIENT_CLI_REPLAY_H_

namespace reasonalloc {

// Returns the process exit code (0 ok, 2 bad usage or input).
int ReplayCommand();

}  // namespace reasonalloc

#endif  // REASONALLOC_CLIENT_CLI_REPLAY_H_
