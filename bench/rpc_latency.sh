#!/usr/bin/env bash
# bench/rpc_latency against a private server: bench/rpc_latency.sh [build dir] [rpc_latency flags]
exec "$(dirname "${BASH_SOURCE[0]}")/with_server.sh" rpc_latency "$@"
