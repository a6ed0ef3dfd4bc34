#!/usr/bin/env bash
# Starts a server on a private socket, runs one benchmark program of the build against it with
# --target set, stops the server.
#   bench/with_server.sh PROGRAM [build dir] [program flags]    e.g. bench/with_server.sh rpc_latency
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
program=$1
shift
build=${1:-$root/build}
shift || true
dir=$(mktemp -d /tmp/reasonalloc-bench-XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
"$build/server/reasonalloc-server" --listen "unix://$dir/s.sock" --metrics_address 127.0.0.1:0 \
  --log_level warn --max_message_bytes 268435456 &
pid=$!
for _ in $(seq 200); do [[ -S $dir/s.sock ]] && break; sleep 0.05; done
"$build/client/reasonalloc" health --target "unix://$dir/s.sock" >/dev/null
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$build/bench/$program" --target "unix://$dir/s.sock" "$@"
