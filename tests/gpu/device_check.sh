#!/usr/bin/env bash
# The device check, run on a machine with an NVIDIA GPU: builds the gpu preset (sm_90), runs every
# GPU test (device probe, CUDA arenas including the two-process IPC test, the CUDA arena backend of
# the server) and prints what it ran on. No GPU benchmarks exist yet; the CUDA compute backend adds
# them here. Budget: under 8 minutes on 16 cores. Usage: tests/gpu/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
echo "== device"
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "nvidia-smi: not available"
nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$nvcc_bin" --version | tail -1
echo "== build (gpu preset)"
for tool in cmake ninja protoc grpc_cpp_plugin; do
  command -v "$tool" >/dev/null || { echo "device_check: $tool is missing; run scripts/setup first" >&2; exit 2; }
done
cmake --preset gpu -DCMAKE_CUDA_COMPILER="$nvcc_bin" >/dev/null
cmake --build build-gpu --target gpu_tests server_unit_tests -j "$(nproc)"
echo "== GPU tests"
build-gpu/tests/gpu_tests --gtest_brief=0
build-gpu/tests/server_unit_tests --gtest_filter='ArenaBackends.*'
echo "== done in $(( $(date +%s) - start )) s"
