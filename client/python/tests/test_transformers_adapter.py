"""reasonalloc.transformers from the installed wheel: the wheel (built from a copy of the tree, as
in test_installed_wheel.py) goes into the torch venv of scripts/torch-venv, and
transformers_checks.py runs there, outside the source tree, against a real server (with the
shipped layer profiles) and the reference worker, on the GGUF file scripts/setup fetched.

Environment: REASONALLOC_TORCH_VENV (default ~/.cache/reasonalloc/torch-venv),
REASONALLOC_SERVER_BINARY, REASONALLOC_WORKER_BINARY (default: the build folder's)."""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import built_binary as binary
from test_installed_wheel import REPO, clone, pip_wheel, wheel  # noqa: F401  (fixtures)

HERE = Path(__file__).resolve().parent


def torch_python():
    venv = Path(os.environ.get("REASONALLOC_TORCH_VENV") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") /
                "reasonalloc" / "torch-venv")
    python = venv / "bin" / "python"
    if not os.access(python, os.X_OK):
        reason = f"no torch venv at {venv} (scripts/torch-venv creates it; scripts/test does)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return python


@pytest.fixture(scope="module")
def server_with_profiles():
    server = binary("REASONALLOC_SERVER_BINARY", "server/reasonalloc-server")
    tmp = tempfile.mkdtemp(prefix="reasonalloc-hf-")
    shutil.copytree(REPO / "deploy" / "profiles", os.path.join(tmp, "profiles"))
    sock = os.path.join(tmp, "s.sock")
    proc = subprocess.Popen([server, f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
                             f"--profile_dir={tmp}/profiles", "--log_level=error"])
    deadline = time.time() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        assert time.time() < deadline, "the server did not listen within 20 s"
        time.sleep(0.02)
    time.sleep(0.2)
    try:
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        shutil.rmtree(tmp, ignore_errors=True)


def test_transformers_adapter_from_the_installed_wheel(wheel, server_with_profiles, tmp_path):  # noqa: F811
    python = torch_python()
    worker = binary("REASONALLOC_WORKER_BINARY", "worker/reasonalloc-worker")
    located = subprocess.run([worker, "locate"], capture_output=True, text=True)
    if located.returncode != 0:
        reason = f"no model file: {located.stderr.strip()} (scripts/setup fetches it)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                        wheel], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(HERE / "transformers_checks.py", work / "transformers_checks.py")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # nothing from a user's Hugging Face cache
    r = subprocess.run([python, "transformers_checks.py", f"--target={server_with_profiles}",
                        f"--worker={worker}", f"--model={located.stdout.strip()}"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
