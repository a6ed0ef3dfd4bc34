#!/usr/bin/env bash
# bench/arena_bench against a private server: bench/arena_bench.sh [build dir] [arena_bench flags]
exec "$(dirname "${BASH_SOURCE[0]}")/with_server.sh" arena_bench "$@"
