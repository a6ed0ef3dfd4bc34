"""Real sidecars, a steady workload and a real Prometheus scraping them with the labels the
Prometheus Operator gives deploy/k8s's PodMonitor (see operator_podmonitor.py).

Used by test_prometheus.py and bench/dashboard_snapshot.py."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import yaml
from grpc_tools import protoc

import operator_podmonitor

NAMESPACE = "inference"
# Geometry of the workload's models: 12 layers, so that a string sort of the layer label
# (0, 1, 10, 11, 2, ...) differs from the numeric one.
LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, KEYS, QUERIES, BUDGET = 12, 4, 2, 16, 64, 8, 24
# "prom-rkv" gets a layer profile whose demand grows with depth: ReasonAlloc gives deeper layers
# more of the budget.
PROFILED_MODEL = "prom-rkv"
POLICIES = (("prom-snapkv", "snapkv", "uniform"), (PROFILED_MODEL, "rkv", "reasonalloc"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def compile_stubs(proto_dir, dest):
    os.makedirs(dest, exist_ok=True)
    for f in ("reasonalloc/v1/types.proto", "reasonalloc/v1/sidecar.proto"):
        assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={dest}",
                            f"--grpc_python_out={dest}", f"{proto_dir}/{f}"]) == 0
    if dest not in sys.path:
        sys.path.insert(0, dest)
    from reasonalloc.v1 import sidecar_pb2, sidecar_pb2_grpc, types_pb2
    return sidecar_pb2, sidecar_pb2_grpc, types_pb2


def write_profile(profile_dir):
    """A layer profile for PROFILED_MODEL (the server's --profile_dir format)."""
    os.makedirs(profile_dir, exist_ok=True)
    with open(os.path.join(profile_dir, PROFILED_MODEL + ".json"), "w") as f:
        json.dump({"name": PROFILED_MODEL,
                   "model": {"name": PROFILED_MODEL, "num_layers": LAYERS, "num_q_heads": Q_HEADS,
                             "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                             "dtype": "DTYPE_FLOAT32", "max_context": 4096},
                   "rho": 0.9, "demand": [0.3 + 0.15 * layer for layer in range(LAYERS)],
                   "samples": ["100"] * LAYERS,
                   "provenance": "synthetic: demand rising with depth, for the metrics tests"}, f)


class Sidecar:
    """One reasonalloc-server on a Unix socket with its metrics on a free 127.0.0.1 port."""

    def __init__(self, binary, workdir, name, pb, grpc_mod, flags=()):
        self.name, self.pb = name, pb
        sock = os.path.join(workdir, f"{name}.sock")
        self.proc = subprocess.Popen([binary, f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
                                      "--log_level=warn", *flags])
        deadline = time.time() + 20
        # A channel made before the socket exists would wait out gRPC's reconnect backoff.
        while not os.path.exists(sock) and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        self.stub = grpc_mod.KvSidecarStub(self.channel)
        while True:
            try:
                self.info = self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=1)
                break
            except grpc.RpcError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"sidecar {name} did not start")
                time.sleep(0.05)
        self.metrics_port = int(self.info.metrics_address.rsplit(":", 1)[1])

    def sessions(self):
        listed = self.stub.ListSessions(self.pb.ListSessionsRequest()).sessions
        return [self.stub.GetSession(self.pb.GetSessionRequest(session_id=s.session_id)) for s in listed]

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            return self.proc.wait(timeout=30)
        return self.proc.returncode


def fill_arena(sidecar, types_pb2):
    """Managed host-shared-memory sessions until the pool refuses one (RESOURCE_EXHAUSTED)."""
    pb = sidecar.pb
    geometry = types_pb2.ModelGeometry(name="prom-arena", num_layers=2, num_q_heads=2, num_kv_heads=1,
                                       head_dim=16, dtype=types_pb2.DTYPE_FLOAT32, max_context=1024)
    created = []
    while True:
        try:
            r = sidecar.stub.CreateSession(pb.CreateSessionRequest(
                model=geometry, budget=types_pb2.BudgetConfig(budget=64),
                scorer=types_pb2.ScorerConfig(name="snapkv"),
                allocator=types_pb2.AllocatorConfig(name="uniform"),
                mode=types_pb2.SESSION_MODE_MANAGED, memory=types_pb2.MEMORY_KIND_HOST_SHM,
                lease_seconds=3600))
            created.append(r.session)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return created
        assert len(created) < 1000, "the arena pool never filled"


class Workload:
    """Per round: one Compress for each of POLICIES' sessions (advisory, inline tensors) and one
    Compress of an unknown session (NOT_FOUND). A WatchMetrics stream stays open throughout."""

    def __init__(self, sidecar, types_pb2, pause=0.05):
        self.sidecar, self.t, self.pause = sidecar, types_pb2, pause
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.rounds = []        # wall time of each completed round
        self.events = []        # (wall time, model, response)
        self.sessions = {}      # model -> session id
        pb, t = sidecar.pb, types_pb2
        for model, scorer, allocator in POLICIES:
            geometry = t.ModelGeometry(name=model, num_layers=LAYERS, num_q_heads=Q_HEADS,
                                       num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                       dtype=t.DTYPE_FLOAT32, max_context=4096)
            self.sessions[model] = sidecar.stub.CreateSession(pb.CreateSessionRequest(
                model=geometry, budget=t.BudgetConfig(budget=BUDGET),
                scorer=t.ScorerConfig(name=scorer), allocator=t.AllocatorConfig(name=allocator),
                mode=t.SESSION_MODE_ADVISORY, lease_seconds=3600)).session.session_id
        self.threads = [threading.Thread(target=self._run, daemon=True),
                        threading.Thread(target=self._watch, daemon=True)]
        self.watch_events = 0

    def start(self):
        for th in self.threads:
            th.start()
        return self

    def _tensor(self, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        return self.t.Tensor(dtype=self.t.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())

    def _run(self):
        pb, stub = self.sidecar.pb, self.sidecar.stub
        rng = np.random.default_rng(0)
        step = 0
        while not self.stop_event.is_set():
            step += 1
            for model, sid in self.sessions.items():
                r = stub.Compress(pb.CompressRequest(session_id=sid, step=step, inline_tensors=pb.InlineTensors(
                    query_window=self._tensor(rng.standard_normal((LAYERS, Q_HEADS, QUERIES, HEAD_DIM))),
                    keys=self._tensor(rng.standard_normal((LAYERS, KV_HEADS, KEYS, HEAD_DIM))))))
                with self.lock:
                    self.events.append((time.time(), model, r))
            try:
                stub.Compress(pb.CompressRequest(session_id="0" * 32, step=step))
                raise AssertionError("Compress of an unknown session succeeded")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
            with self.lock:
                self.rounds.append(time.time())
            time.sleep(self.pause)

    def _watch(self):
        try:
            for _ in self.sidecar.stub.WatchMetrics(self.sidecar.pb.WatchMetricsRequest(pool_interval_seconds=1.0)):
                self.watch_events += 1
                if self.stop_event.is_set():
                    return
        except grpc.RpcError:
            pass

    def events_since(self, since, model=None):
        with self.lock:
            return [r for t, m, r in self.events if t >= since and (model is None or m == model)]

    def stop(self):
        self.stop_event.set()
        self.threads[0].join(timeout=30)


class Prometheus:
    """A real Prometheus (Debian's `prometheus`) with the given scrape jobs and rule files."""

    def __init__(self, workdir, scrape_jobs, rule_files=(), interval="1s"):
        os.makedirs(workdir, exist_ok=True)
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                  "rule_files": list(rule_files), "scrape_configs": scrape_jobs}
        self.config_path = os.path.join(workdir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        port = free_port()
        self.proc = subprocess.Popen(["prometheus", f"--config.file={self.config_path}",
                                      f"--storage.tsdb.path={workdir}/data",
                                      f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/-/ready", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("prometheus exited; config:\n" + open(self.config_path).read())
                if time.time() > deadline:
                    raise RuntimeError("prometheus not ready")
                time.sleep(0.2)
        self.ready = time.time()

    def api(self, path, **params):
        r = http_json(self.base + path + ("?" + urllib.parse.urlencode(params) if params else ""))
        assert r["status"] == "success", r
        return r["data"]

    def query(self, expr, time_=None):
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        return self.api("/api/v1/query", **params)["result"]

    def query_range(self, expr, start, end, step):
        return self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                        step=str(step))["result"]

    def wait_for(self, expr, pred=lambda result: bool(result), timeout=40):
        deadline = time.time() + timeout
        while True:
            result = self.query(expr)
            if pred(result) or time.time() > deadline:
                return result
            time.sleep(0.5)

    def alerts(self):
        return self.api("/api/v1/alerts")["alerts"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


def operator_jobs(podmonitor, template, pods, interval="1s"):
    """The operator's scrape jobs for `podmonitor` over `pods` ({pod name: metrics port}), all on
    127.0.0.1 in NAMESPACE. The scrape interval is shortened for tests (the PodMonitor's 15s/10s
    would make every check wait minutes); the relabelings are the operator's."""
    targets = []
    for name, port in pods.items():
        targets += operator_podmonitor.pod_targets(template, namespace=NAMESPACE, pod_name=name,
                                                   pod_ip="127.0.0.1", port_numbers={"metrics": port})
    jobs = operator_podmonitor.scrape_configs(podmonitor, NAMESPACE, targets)
    for job in jobs:
        job["scrape_interval"] = interval
        job["scrape_timeout"] = interval
    return jobs
