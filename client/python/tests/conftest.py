"""Shared by the client's tests: the package from this source tree on sys.path, and a server."""
import os
import subprocess
import sys
import tempfile
import time

import grpc
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)  # client/python
REPO = os.path.dirname(os.path.dirname(PROJECT))
if PROJECT not in sys.path:
    sys.path.insert(0, PROJECT)
pytest.register_assert_rewrite("api_checks")


def built_binary(env, relative):
    """$env, else the default build's build/<relative>; skips the test when it is absent."""
    path = os.environ.get(env, os.path.join(REPO, "build", relative))
    if not os.access(path, os.X_OK):
        reason = f"no binary at {path} (build it, or set {env})"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


def server_binary():
    """$REASONALLOC_SERVER_BINARY, else the default build's; skips the test when it is absent."""
    return built_binary("REASONALLOC_SERVER_BINARY", os.path.join("server", "reasonalloc-server"))


@pytest.fixture(scope="module")
def sidecar():
    """The target of a reasonalloc-server on a Unix socket, metrics on a free local port."""
    binary = server_binary()
    tmp = tempfile.mkdtemp(prefix="reasonalloc-py-")
    sock = os.path.join(tmp, "s.sock")
    proc = subprocess.Popen([binary, f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
                             "--log_level=error"])
    target = f"unix://{sock}"
    deadline = time.time() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        assert time.time() < deadline, "the server did not listen within 20 s"
        time.sleep(0.02)
    with grpc.insecure_channel(target) as channel:
        info = channel.unary_unary("/reasonalloc.v1.KvSidecar/GetServerInfo")  # bytes in and out
        info(b"", timeout=20, wait_for_ready=True)
    try:
        yield target
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
