#!/usr/bin/env bash
# Compares the sidecar's snapkv / pyramid decisions with NVIDIA kvpress's (peer_kvpress.py). Outside
# CI: creates (once) a throwaway venv outside the repository with pinned torch, transformers and
# kvpress from PyPI, then runs the comparison against the given build.
#
#   bench/peer_kvpress/run.sh [build dir] [peer_kvpress.py options]
#
# Venv: $REASONALLOC_PEER_VENV, else ${TMPDIR:-/tmp}/reasonalloc-peer-venv. PyPI's Linux torch wheel
# pulls the CUDA libraries: about 7.5 GB installed and under 3 minutes here; only PyPI is reachable, so
# the CPU-only wheel index is not an option. The same venv runs bench/torch_event.py.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${REASONALLOC_PEER_VENV:-${TMPDIR:-/tmp}/reasonalloc-peer-venv}
pins=(torch==2.10.0 transformers==5.2.0 kvpress==0.5.5 numpy==2.4.6)

case "$(realpath -m "$venv")/" in
  "$repo"/*) echo "run.sh: the venv ($venv) must be outside the repository" >&2; exit 2 ;;
esac

build=$repo/build
if [[ $# -gt 0 && $1 != -* ]]; then build=$(realpath "$1"); shift; fi
for bin in "$build/client/reasonalloc" "$build/server/reasonalloc-server"; do
  [[ -x $bin ]] || { echo "run.sh: $bin not found; build first" >&2; exit 2; }
done

stamp=$venv/.reasonalloc-pins
if [[ ! -f $stamp || $(cat "$stamp") != "${pins[*]}" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --no-cache-dir --progress-bar off "${pins[@]}"
  echo "${pins[*]}" >"$stamp"
fi

cd "$repo"
exec "$venv/bin/python" "$here/peer_kvpress.py" --build "$build" "$@"
