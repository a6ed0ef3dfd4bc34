#!/usr/bin/env bash
# Compares the sidecar's snapkv / pyramid decisions with NVIDIA kvpress's (peer_kvpress.py), in
# the torch venv of scripts/torch-venv (pinned torch, transformers and kvpress from PyPI, created
# once outside the repository; about 7.5 GB), against the given build.
#
#   bench/peer_kvpress/run.sh [build dir] [peer_kvpress.py options]
#
# The same venv runs bench/torch_event.py and reasonalloc.transformers' tests.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=$repo/build
if [[ $# -gt 0 && $1 != -* ]]; then build=$(realpath "$1"); shift; fi
for bin in "$build/client/reasonalloc" "$build/server/reasonalloc-server"; do
  [[ -x $bin ]] || { echo "run.sh: $bin not found; build first" >&2; exit 2; }
done

venv=$("$repo/scripts/torch-venv")

cd "$repo"
exec "$venv/bin/python" "$here/peer_kvpress.py" --build "$build" "$@"
