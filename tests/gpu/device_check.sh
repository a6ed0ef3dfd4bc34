#!/usr/bin/env bash
# The GPU check of the CUDA backend, in one run of under 8 minutes: finds the GPU, builds for it,
# runs the GPU tests (GPU vs CPU on 240 configurations, the Llama-8B geometry, CUDA IPC between
# two processes, the server's CUDA arena backend), the event benchmark and the same event in plain PyTorch, and prints a summary
# with the ratios. Output also goes to ${OUT:-build-gpu}/device_check.log and the benchmark JSON.
#
#   tests/gpu/device_check.sh                 build here (needs scripts/setup's dependencies);
#                                             CMAKE_CUDA_ARCHITECTURES = the GPU's capability
#   REASONALLOC_GPU_BUNDLE=.gpu-bundle \
#     tests/gpu/device_check.sh               run binaries packed by scripts/gpu-bundle on a
#                                             machine that has the dependencies (sm_80 + sm_90)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
out=${OUT:-$root/build-gpu}
mkdir -p "$out"
log="$out/device_check.log"
exec > >(tee "$log") 2>&1
start=$(date +%s)
status=0

echo "== GPU"
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "device_check: no NVIDIA GPU visible (nvidia-smi); nothing to check"
  exit 1
fi
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
echo "compute capability: sm_$cap"

if [[ -n ${REASONALLOC_GPU_BUNDLE:-} ]]; then
  bundle=$(cd "$REASONALLOC_GPU_BUNDLE" && pwd)
  echo "== prebuilt bundle $bundle (revision $(cat "$bundle/REVISION" 2>/dev/null), sm_80 + sm_90)"
  if [[ $cap != 80 && $cap != 90 ]]; then
    echo "device_check: the bundle holds sm_80 and sm_90 code; this GPU is sm_$cap (PTX JIT)"
  fi
  export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  bin_tests=$bundle/bin/gpu_tests
  bin_bench=$bundle/bin/gpu_event_bench
  bin_server_unit=$bundle/bin/server_unit_tests
  export REASONALLOC_TEST_SERVER_BINARY=$bundle/bin/reasonalloc-server
else
  echo "== build (preset gpu, CMAKE_CUDA_ARCHITECTURES=$cap)"
  for tool in cmake ninja protoc grpc_cpp_plugin; do
    command -v "$tool" >/dev/null || {
      echo "device_check: $tool is missing; run scripts/setup, or use a bundle (scripts/gpu-bundle)"
      exit 2
    }
  done
  cmake --preset gpu -DCMAKE_CUDA_ARCHITECTURES="$cap" >/dev/null || exit 1
  cmake --build build-gpu -j "$(nproc)" \
    --target gpu_tests gpu_event_bench reasonalloc-server server_unit_tests || exit 1
  bin_tests=build-gpu/tests/gpu_tests
  bin_bench=build-gpu/bench/gpu_event_bench
  bin_server_unit=build-gpu/tests/server_unit_tests
fi
echo "build or unpack: $(($(date +%s) - start)) s"

echo "== GPU tests"
"$bin_tests" --gtest_color=no 2>&1 | tee "$out/gpu_tests.log" | grep -E '^\[ +(OK|FAILED|SKIPPED|PASSED) |GPU vs CPU|Llama-8B|no GPU'
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
if grep -q 'SKIPPED \] \(GpuEngineTest\|CudaIpcDecodeLoop\)' "$out/gpu_tests.log"; then
  echo "device_check: nvidia-smi sees a GPU but the GPU tests skipped (see above)"
  status=1
fi
"$bin_server_unit" --gtest_color=no --gtest_filter='ArenaBackends.*' 2>&1 | tail -3
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

echo "== event benchmark (CUDA backend)"
rm -f "$out/gpu_event.json"
timeout 240 "$bin_bench" --batches 1,64 --reps 20 --json "$out/gpu_event.json" || status=1
[[ -s $out/gpu_event.json ]] || status=1

echo "== the same event in plain PyTorch"
PYTHONUNBUFFERED=1 timeout 150 python3 bench/torch_gpu_event.py --batches 1,64 --reps 20 \
  --json "$out/torch_event.json" || echo "(PyTorch baseline unavailable)"

echo "== summary"
python3 - "$out/gpu_event.json" "$out/torch_event.json" <<'PY' || true
import json, sys
ours = {(r["scorer"], r["allocator"], r["batch"]): r for r in json.load(open(sys.argv[1]))}
try:
    torch = {(r["scorer"], r["allocator"], r["batch"]): r for r in json.load(open(sys.argv[2]))}
except OSError:
    torch = {}
print(f"{'event':22s} {'batch':>5s} {'ours us':>10s} {'torch us':>10s} {'torch/ours':>10s} {'goal':>8s}")
for (s, a, b), r in sorted(ours.items(), key=lambda x: (x[0][2], x[0][0], x[0][1])):
    t = torch.get((s, a, b))
    goal = "150 us" if b == 1 else "4 ms" if b == 64 else ""
    ratio = f"{t['median_us'] / r['median_us']:.2f}x" if t else ""
    tt = f"{t['median_us']:.1f}" if t else ""
    print(f"{s + '/' + a:22s} {b:5d} {r['median_us']:10.1f} {tt:>10s} {ratio:>10s} {goal:>8s}")
PY
echo "device_check: $([[ $status -eq 0 ]] && echo PASS || echo FAIL) in $(($(date +%s) - start)) s (log $log)"
exit $status
