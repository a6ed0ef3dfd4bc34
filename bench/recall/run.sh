#!/usr/bin/env bash
# The long-range recall benchmark end to end: writes the evaluation tasks (seed 1), starts a
# sidecar with the calibrated profiles on a private socket, runs bench/recall (the full cache, then
# every policy × budget on the tasks the full cache answers) and writes recall.md, recall.png and
# the CSV files into bench/results/ (or OUT).
#   bench/recall/run.sh [BUILD_DIR] [extra recall flags...]
# Needs scripts/setup and a build (cmake --build BUILD_DIR --target recall reasonalloc-server).
# Quick rerun: --max_tasks 12 --budgets 64 (about a tenth of the default grid).
# EXTRA_PROFILES: layer profile JSON files (space-separated) the sidecar loads beside
# deploy/profiles, e.g. a sensitivity profile a policy report measured.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${1:-$root/build}
shift || true
out=${OUT:-$root/bench/results}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/reasonalloc-recall-XXXXXX")
cleanup() {
  if [[ -n ${pid:-} ]] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
"$root/.venv/bin/python" "$root/bench/recall/tasks.py" --seed "${RECALL_SEED:-1}" \
  --count "${RECALL_TASKS:-48}" --out "$work/tasks.tsv"
. "$root/bench/stage_profiles.sh"
stage_profiles "$work/profiles"
"$build/server/reasonalloc-server" --listen "unix://$work/s.sock" --metrics_address 127.0.0.1:0 \
  --profile_dir "$work/profiles" --max_arena_bytes $((8 << 30)) 2>"$work/server.log" &
pid=$!
for _ in $(seq 200); do
  "$build/client/reasonalloc" health --target "unix://$work/s.sock" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "the sidecar exited:" >&2; cat "$work/server.log" >&2; exit 1; }
  sleep 0.05
done
start=$(date +%s)
(cd "$root" && "$build/bench/recall" --target "unix://$work/s.sock" --tasks "$work/tasks.tsv" \
  --out_dir "$out" "$@")
echo "recall: $(($(date +%s) - start)) s in all"
"$root/.venv/bin/python" "$root/bench/recall/report.py" "$out"
