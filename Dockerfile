# ReasonAlloc sidecar image (CPU backend): reasonalloc-server plus the reasonalloc CLI (health probe).
#   docker build -t reasonalloc/reasonalloc-server:0.1.0 .
#   docker run --rm -p 127.0.0.1:9464:9464 -v /run/reasonalloc:/run/reasonalloc reasonalloc/reasonalloc-server:0.1.0
#   (the host directory must be writable by uid 65532; clients there use unix:///run/reasonalloc/sidecar.sock)
# Kubernetes manifests: deploy/k8s (README there). The CUDA backend needs a build stage with nvcc;
# this image is built with the "cpu" preset (REASONALLOC_CUDA=OFF).

# ---- build: the repository's own setup and build scripts on Debian 12 ---------------------------
FROM debian:12 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
# scripts/setup installs the Debian build dependencies (and the project's .venv, which the build
# does not need but which keeps this the same command as everywhere else); copied first so that
# this layer is reused until the dependency lists change.
COPY scripts/setup scripts/requirements.txt scripts/
RUN scripts/setup
COPY . .
# The "cpu" preset (CMakePresets.json): RelWithDebInfo, Ninja, REASONALLOC_CUDA=OFF, into build-cpu/.
# Only the two shipped programs are built; debug info is stripped (symbols stay for stack traces).
RUN scripts/build cpu --target reasonalloc-server reasonalloc \
    && mkdir -p /out \
    && cp build-cpu/server/reasonalloc-server build-cpu/client/reasonalloc /out/ \
    && strip --strip-debug /out/reasonalloc-server /out/reasonalloc \
    && /out/reasonalloc-server --version >/dev/null

# ---- runtime: the shared libraries the two binaries link, nothing else ----------------------------
FROM debian:12-slim
# Packages = `ldd` of both binaries mapped with `dpkg -S` (see deploy/k8s/README.md), plus
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
