"""The Grafana dashboard and the alert rules of deploy/ against a real Prometheus scraping a real
server: every expression must return data, and promtool must accept the rules and the config.

Needs Debian's `prometheus` package (scripts/setup installs it)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "reasonalloc.json")
ALERTS = os.path.join(REPO, "deploy", "prometheus", "alerts.yml")
CONFIG = os.path.join(REPO, "deploy", "prometheus", "prometheus.yml")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def dashboard_expressions():
    dash = json.load(open(DASHBOARD))
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            out.append((panel["title"], target["expr"]))
    return out


def alert_queries():
    """The query part of each alert: the rule files write "<query> <op> <number>"."""
    out = []
    text = open(ALERTS).read()
    for name, expr in re.findall(r"- alert: (\S+)\n(?:\s+#.*\n)*\s+expr: (.+)", text):
        m = re.match(r"^(.*\S)\s*(==|!=|>=|<=|>|<)\s*[-+0-9.eE]+\s*$", expr.strip())
        assert m, f"{name}: expression is not '<query> <op> <number>': {expr}"
        out.append((name, m.group(1)))
    return out


def instantiate(expr):
    """Grafana's variables for a direct Prometheus query."""
    return (expr.replace("$__rate_interval", "1m").replace("$model", ".*")
            .replace("$instance", ".*"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.fail("prometheus/promtool not installed: run scripts/setup")
    proto_dir = os.environ["REASONALLOC_PROTO_DIR"]
    stubs = str(tmp_path_factory.mktemp("stubs"))
    for f in ("reasonalloc/v1/types.proto", "reasonalloc/v1/sidecar.proto"):
        assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={stubs}",
                            f"--grpc_python_out={stubs}", f"{proto_dir}/{f}"]) == 0
    sys.path.insert(0, stubs)
    from reasonalloc.v1 import sidecar_pb2 as pb, sidecar_pb2_grpc, types_pb2  # noqa: E402

    tmp = tempfile.mkdtemp(prefix="reasonalloc-prom-")
    sock = os.path.join(tmp, "s.sock")
    server = subprocess.Popen([os.environ["REASONALLOC_SERVER_BINARY"], f"--listen=unix://{sock}",
                               "--metrics_address=127.0.0.1:0", "--log_level=warn"])
    channel = grpc.insecure_channel(f"unix://{sock}")
    stub = sidecar_pb2_grpc.KvSidecarStub(channel)
    deadline = time.time() + 20
    while True:
        try:
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=1)
            break
        except grpc.RpcError:
            assert time.time() < deadline
            time.sleep(0.05)

    # A small steady workload for the whole test: two policies, one error per round, one watcher.
    stop = threading.Event()

    def tensor(a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        return types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())

    def workload():
        rng = np.random.default_rng(0)
        sessions = []
        for scorer, allocator in (("snapkv", "uniform"), ("rkv", "reasonalloc")):
            geometry = types_pb2.ModelGeometry(name=f"prom-{scorer}", num_layers=4, num_q_heads=4,
                                               num_kv_heads=2, head_dim=16,
                                               dtype=types_pb2.DTYPE_FLOAT32, max_context=4096)
            sessions.append(stub.CreateSession(pb.CreateSessionRequest(
                model=geometry, budget=types_pb2.BudgetConfig(budget=24),
                scorer=types_pb2.ScorerConfig(name=scorer),
                allocator=types_pb2.AllocatorConfig(name=allocator),
                mode=types_pb2.SESSION_MODE_ADVISORY, lease_seconds=600)).session.session_id)
        step = 0
        while not stop.is_set():
            step += 1
            for sid in sessions:
                stub.Compress(pb.CompressRequest(session_id=sid, step=step, inline_tensors=pb.InlineTensors(
                    query_window=tensor(rng.standard_normal((4, 4, 8, 16))),
                    keys=tensor(rng.standard_normal((4, 2, 64, 16))))))
            try:
                stub.Compress(pb.CompressRequest(session_id="0" * 32, step=step))
            except grpc.RpcError:
                pass
            time.sleep(0.05)

    def watcher():
        try:
            for _ in stub.WatchMetrics(pb.WatchMetricsRequest(pool_interval_seconds=1.0)):
                if stop.is_set():
                    return
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=workload), threading.Thread(target=watcher, daemon=True)]
    for t in threads:
        t.start()

    port = free_port()
    shutil.copy(ALERTS, os.path.join(tmp, "alerts.yml"))
    with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
        f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
scrape_configs:
  - job_name: reasonalloc
    static_configs:
      - targets: ["{info.metrics_address}"]
""")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp}/prometheus.yml",
                             f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(base + "/-/ready", timeout=1)
            break
        except OSError:
            assert prom.poll() is None, "prometheus exited"
            assert time.time() < deadline, "prometheus not ready"
            time.sleep(0.2)
    yield base
    stop.set()
    threads[0].join(timeout=20)
    prom.terminate()
    prom.wait(timeout=20)
    channel.close()
    server.terminate()
    assert server.wait(timeout=20) == 0
    shutil.rmtree(tmp, ignore_errors=True)


def query_until_data(base, expr, timeout=40):
    deadline = time.time() + timeout
    while True:
        r = http_json(base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert r["status"] == "success", r
        if r["data"]["result"]:
            return r["data"]["result"]
        if time.time() > deadline:
            return []
        time.sleep(1)


def test_promtool_accepts_rules_and_config():
    subprocess.run(["promtool", "check", "rules", ALERTS], check=True)
    subprocess.run(["promtool", "check", "config", CONFIG], check=True)


def test_every_dashboard_and_alert_expression_returns_data(stack):
    exprs = [("dashboard", t, e) for t, e in dashboard_expressions()] + \
            [("alert", n, e) for n, e in alert_queries()]
    assert len(exprs) >= 18
    empty = []
    for kind, name, expr in exprs:
        if not query_until_data(stack, instantiate(expr)):
            empty.append(f"{kind} {name}: {expr}")
    assert not empty, "expressions without data:\n" + "\n".join(empty)


def test_alert_rules_load_and_evaluate(stack):
    rules = http_json(stack + "/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert set(loaded) == {n for n, _ in alert_queries()}
    deadline = time.time() + 20
    while any(r.get("health") != "ok" for r in loaded.values()) and time.time() < deadline:
        time.sleep(1)
        loaded = {r["name"]: r for g in http_json(stack + "/api/v1/rules")["data"]["groups"]
                  for r in g["rules"]}
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    # A healthy server fires none of them.
    assert not [r["name"] for r in loaded.values() if r["state"] == "firing"]


def test_dashboard_variables_and_metric_names(stack):
    dash = json.load(open(DASHBOARD))
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model", "instance"} <= names
    models = http_json(stack + "/api/v1/label/model/values")["data"]
    assert {"prom-snapkv", "prom-rkv"} <= set(models)
