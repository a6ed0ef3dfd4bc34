#!/usr/bin/env bash
# The sidecar inside Hugging Face transformers against kvpress (bench/transformers_compare.py):
# builds the reasonalloc wheel, installs it into the torch venv of scripts/torch-venv and runs the
# comparison against BUILD_DIR's server and worker. Writes bench/results/transformers/ (or --out).
#   bench/transformers_compare.sh [BUILD_DIR] [transformers_compare.py flags]
# Quick rerun: --batches 8 --reps 1 --new_tokens 128 (a few minutes).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$root/build
if [[ $# -gt 0 && $1 != -* ]]; then build=$(realpath "$1"); shift; fi
for bin in "$build/server/reasonalloc-server" "$build/worker/reasonalloc-worker"; do
  [[ -x $bin ]] || { echo "transformers_compare.sh: $bin not found; build first" >&2; exit 2; }
done
venv=$("$root/scripts/torch-venv")
dist=$(mktemp -d "${TMPDIR:-/tmp}/reasonalloc-wheel-XXXXXX")
trap 'rm -rf "$dist"' EXIT
"$root/.venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps --no-index \
  "$root/client/python" -w "$dist"
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$dist"/reasonalloc-*.whl
cd "$root"
"$venv/bin/python" "$root/bench/transformers_compare.py" "$build" "$@"
