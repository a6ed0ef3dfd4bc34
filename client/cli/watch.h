// `reasonalloc watch`: renders the WatchMetrics stream live.
#ifndef REASONALLOC_CLIENT_CLI_WATCH_H_
#define REASONALLOC_CLIENT_CLI_WATCH_H_

#include "client/client.h"

namespace reasonalloc {

// Exit codes as the other subcommands: 0 the stream ended cleanly or --count events arrived,
// 1 the server answered with an error, 2 bad usage.
int WatchCommand(Client& client);

}  // namespace reasonalloc

#endif  // REASONALLOC_CLIENT_CLI_WATCH_H_
