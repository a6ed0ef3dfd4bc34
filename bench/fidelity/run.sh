#!/usr/bin/env bash
# The fidelity benchmark end to end: starts a sidecar with the calibrated profiles on a private
# socket, runs bench/fidelity (every policy × budget against the full cache, teacher-forced and
# free-running) and writes the table, CSV files and plots into bench/results/.
#   bench/fidelity/run.sh [BUILD_DIR] [extra fidelity flags...]
# Needs scripts/setup and a build (cmake --build BUILD_DIR --target fidelity reasonalloc-server).
# Another model: pass --model FILE (and --model_name if its file name is not its profile's name),
# OUT=folder for the results (default: bench/results, the reference model's published results),
# and REASONALLOC_FIDELITY_PROFILE=the profile drawn in the report if not the model's own.
# EXTRA_PROFILES: layer profile JSON files (space-separated) the sidecar loads beside
# deploy/profiles (one of the same name replaces the shipped one).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$root/build}
shift || true
out=${OUT:-$root/bench/results}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/reasonalloc-fidelity-XXXXXX")
cleanup() {
  if [[ -n ${pid:-} ]] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
. "$root/bench/stage_profiles.sh"
stage_profiles "$work/profiles"
"$build/server/reasonalloc-server" --listen "unix://$work/s.sock" --metrics_address 127.0.0.1:0 \
  --profile_dir "$work/profiles" --max_arena_bytes $((8 << 30)) 2>"$work/server.log" &
pid=$!
for _ in $(seq 200); do
  "$build/client/reasonalloc" health --target "unix://$work/s.sock" >/dev/null 2>&1 && break
  sleep 0.05
done
start=$(date +%s)
(cd "$root" && "$build/bench/fidelity" --target "unix://$work/s.sock" --out_dir "$out" "$@")
echo "fidelity: $(($(date +%s) - start)) s in all"
# The wave drawn is the profile of the model that ran (the name the sidecar was given), unless
# REASONALLOC_FIDELITY_PROFILE names another.
model=$("$root/.venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' \
  "$out/fidelity_meta.json")
"$root/.venv/bin/python" "$root/bench/fidelity/report.py" "$out" \
  "$root/deploy/profiles/${REASONALLOC_FIDELITY_PROFILE:-$model}.json"
