#!/usr/bin/env python3
"""Soak of the server's session lifecycle: resource drift over thousands of sessions, and how long a
drain takes with a stopped WatchMetrics reader.

  .venv/bin/python bench/soak.py build [--cycles 5000] [--sample-every 500]
  .venv/bin/python bench/soak.py build --stopped-watcher [--events 5000]

The first argument is the build directory (build/server/reasonalloc-server is used) or the server
binary itself.

Default mode: N cycles of CreateSession (managed MEMORY_KIND_HOST_SHM sessions, mixed with inline
managed and advisory ones) -> one to three Compress events -> CloseSession. For host-shm sessions
this process plays the worker: it maps the session's arenas, sets each head's "len", writes random
fp16 K/V rows into the head regions and the query ring, then calls Compress. The server's RSS,
open descriptors, threads and /dev/shm arenas (count and bytes) are sampled before, every
--sample-every cycles and after all sessions are closed; the table goes to stdout and to
bench/results/soak.csv, followed by the drift (after - baseline).

--stopped-watcher: a child process opens a WatchMetrics stream and is stopped (SIGSTOP); this
process then generates --events compression events (CompressStream batches), enough to fill the
stream's flow-control window and the watcher's queue, sends SIGTERM to the server (started with
--drain_timeout_seconds 1) and reports the time from SIGTERM to exit, or "hung" (SIGKILL) after
30 s.
"""
import argparse
import csv
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "client", "python"))
from reasonalloc import _proto  # noqa: E402
from reasonalloc.client import _Arena  # noqa: E402

import grpc  # noqa: E402

types_pb2, pb, sidecar_grpc = _proto.load()
SHM_PREFIX = "reasonalloc-"  # HostArena::kNamePrefix without its slash
MODEL = types_pb2.ModelGeometry(name="soak", num_layers=4, num_q_heads=8, num_kv_heads=2,
                                head_dim=64, dtype=types_pb2.DTYPE_FLOAT16, max_context=4096)
SCORERS = ("snapkv", "rkv", "streaming", "h2o")
ALLOCATORS = ("uniform", "pyramid", "adakv", "reasonalloc")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def server_binary(arg):
    if os.path.isdir(arg):
        return os.path.join(arg, "server", "reasonalloc-server")
    return arg


def usage(pid):
    out = {"rss_kib": 0, "hwm_kib": 0, "threads": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_kib"] = int(value.split()[0])
            elif key == "VmHWM":
                out["hwm_kib"] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    files = glob.glob(f"/dev/shm/{SHM_PREFIX}{pid}-*")
    out["shm_files"] = len(files)
    total = 0
    for path in files:
        try:
            total += os.path.getsize(path)
        except FileNotFoundError:
            pass
    out["shm_bytes"] = total
    return out


class Server:
    def __init__(self, binary, *flags):
        self.tmp = tempfile.mkdtemp(prefix="reasonalloc-soak-")
        self.sock = os.path.join(self.tmp, "s.sock")
        self.log_path = os.path.join(self.tmp, "server.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([binary, f"--listen=unix://{self.sock}",
                                      "--metrics_address=127.0.0.1:0", "--log_level=warn", *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"unix://{self.sock}", options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = sidecar_grpc.KvSidecarStub(self.channel)
        deadline = time.time() + 30
        while True:
            try:
                self.info = self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=1)
                break
            except grpc.RpcError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start; log:\n{self.log_tail()}")
                time.sleep(0.05)

    def log_tail(self, n=20):
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def metric(self, name):
        if not self.info.metrics_address:
            return None
        text = urllib.request.urlopen(f"http://{self.info.metrics_address}/metrics",
                                      timeout=5).read().decode()
        total = None
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total = (total or 0) + float(line.rsplit(" ", 1)[1])
        return total

    def put_profile(self):
        """A layer profile for MODEL, so that reasonalloc sessions use a non-uniform layer level."""
        self.stub.PutProfile(pb.PutProfileRequest(overwrite=True, profile=pb.LayerProfile(
            name=MODEL.name, model=MODEL, rho=0.93, demand=[0.6, 1.4, 1.2, 0.8],
            provenance="bench/soak.py")), timeout=10)

    def stop(self):
        """SIGTERM; returns the seconds to exit (None: killed after 30 s)."""
        self.channel.close()
        took = None
        if self.proc.poll() is None:
            t0 = time.time()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
                took = time.time() - t0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return took


def header(binary, server):
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cpus)")
    print(f"server: {binary} {server.info.version} ({server.info.build}), backend "
          f"{server.info.backend}, arena pool {server.info.arena_capacity_bytes >> 20} MiB")


def tensor(a):
    a = np.ascontiguousarray(a, dtype=np.float16)
    return types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT16, shape=list(a.shape), data=a.tobytes())


class Arenas:
    """The worker's mapping of a host-shm session's arenas, through the Python client's own
    mapping (reasonalloc.client._Arena): NumPy views by array name."""

    def __init__(self, info):
        self.arenas = [_Arena(d) for d in info.arenas]

    def view(self, name):
        for arena in self.arenas:
            if name in arena.arrays:
                return arena.arrays[name]
        raise KeyError(name)

    def fill(self, rng, step_queries):
        """Each head gets between its kept rows and its capacity of live rows, random K/V rows
        behind the kept ones, and fresh queries in the ring."""
        length, offset, capacity = self.view("len"), self.view("offset"), self.view("capacity")
        k, v, q = self.view("k"), self.view("v"), self.view("q")
        for i in range(len(length)):
            kept = int(length[i])
            n = int(rng.integers(kept, int(capacity[i]) + 1))
            rows = slice(int(offset[i]) + kept, int(offset[i]) + n)
            k[rows] = rng.standard_normal((n - kept, k.shape[1])).astype(np.float16)
            v[rows] = rng.standard_normal((n - kept, v.shape[1])).astype(np.float16)
            length[i] = n
        if step_queries:
            q[...] = rng.standard_normal(q.shape).astype(np.float16)

    def close(self):
        for arena in self.arenas:
            arena.close()


def create(stub, rng, cycle, memory, managed):
    scorer = SCORERS[cycle % len(SCORERS)]
    if memory == types_pb2.MEMORY_KIND_HOST_SHM and scorer == "h2o" and not managed:
        scorer = "snapkv"
    return stub.CreateSession(pb.CreateSessionRequest(
        model=MODEL, budget=types_pb2.BudgetConfig(budget=64, window=8, buffer=64),
        scorer=types_pb2.ScorerConfig(name=scorer),
        allocator=types_pb2.AllocatorConfig(name=ALLOCATORS[(cycle // 4) % len(ALLOCATORS)]),
        mode=types_pb2.SESSION_MODE_MANAGED if managed else types_pb2.SESSION_MODE_ADVISORY,
        memory=memory, lease_seconds=120, client_tag=f"soak {cycle}"), timeout=30)


def one_cycle(stub, rng, cycle):
    """CreateSession -> 1..3 Compress -> CloseSession; returns the kind of session."""
    shm = rng.random() < 0.7
    managed = True if shm else rng.random() < 0.5
    memory = types_pb2.MEMORY_KIND_HOST_SHM if shm else types_pb2.MEMORY_KIND_INLINE
    created = create(stub, rng, cycle, memory, managed)
    sid = created.session.session_id
    events = int(rng.integers(1, 4))
    L, hq, hkv, d = MODEL.num_layers, MODEL.num_q_heads, MODEL.num_kv_heads, MODEL.head_dim
    try:
        if shm:
            arenas = Arenas(created.session)
            try:
                for e in range(events):
                    arenas.fill(rng, step_queries=True)
                    stub.Compress(pb.CompressRequest(session_id=sid, step=64 * (e + 1)),
                                  timeout=30)
            finally:
                arenas.close()
        else:
            window = created.session.budget.window
            for e in range(events):
                # More tokens than the last event kept (an h2o session's heads keep their rows).
                n = 128 * (e + 1) + int(rng.integers(0, 64))
                it = pb.InlineTensors(query_window=tensor(rng.standard_normal((L, hq, window, d))),
                                      keys=tensor(rng.standard_normal((L, hkv, n, d))))
                if managed:
                    it.values.CopyFrom(tensor(rng.standard_normal((L, hkv, n, d))))
                stub.Compress(pb.CompressRequest(session_id=sid, step=64 * (e + 1),
                                                 inline_tensors=it, omit_keep_mask=True),
                              timeout=30)
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30)
    return ("shm-" if shm else "inline-") + ("managed" if managed else "advisory")


COLUMNS = ("label", "cycles", "seconds", "sessions", "rss_kib", "hwm_kib", "threads", "fds",
           "shm_files", "shm_bytes")


def soak(args):
    binary = server_binary(args.build)
    server = Server(binary)
    header(binary, server)
    server.put_profile()
    stub, pid = server.stub, server.proc.pid
    rng = np.random.default_rng(args.seed)
    rows = []
    t0 = time.time()

    def sample(label, cycles):
        row = {"label": label, "cycles": cycles, "seconds": round(time.time() - t0, 1),
               "sessions": stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).sessions,
               **usage(pid)}
        rows.append(row)
        print(" ".join(f"{row[c]!s:>{max(len(c), 9)}}" for c in COLUMNS), flush=True)

    print(f"{args.cycles} cycles (seed {args.seed}): CreateSession -> 1..3 Compress -> "
          "CloseSession, 70% managed host-shm, 30% inline (managed or advisory)")
    print(" ".join(f"{c:>{max(len(c), 9)}}" for c in COLUMNS))
    sample("before", 0)
    kinds = {}
    try:
        for cycle in range(1, args.cycles + 1):
            kind = one_cycle(stub, rng, cycle)
            kinds[kind] = kinds.get(kind, 0) + 1
            if cycle % args.sample_every == 0 and cycle != args.cycles:
                sample("cycles", cycle)
    except grpc.RpcError as e:
        print(f"cycle {cycle}: {e.code().name}: {e.details()}\nserver log:\n{server.log_tail()}")
        server.stop()
        return 1
    time.sleep(1.0)  # closes are synchronous; give the reaper and the allocator a moment
    sample("after", args.cycles)
    elapsed = time.time() - t0
    shutdown = server.stop()

    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    base, mid, end = rows[0], rows[1] if len(rows) > 2 else rows[0], rows[-1]
    print(f"{args.cycles} cycles in {elapsed:.1f} s ({args.cycles / elapsed:.0f}/s); sessions by "
          "kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"drift (after - before): RSS {(end['rss_kib'] - base['rss_kib']) / 1024:+.1f} MiB, "
          f"fds {end['fds'] - base['fds']:+d}, threads {end['threads'] - base['threads']:+d}, "
          f"shm files {end['shm_files'] - base['shm_files']:+d}, shm bytes "
          f"{end['shm_bytes'] - base['shm_bytes']:+d}, "
          f"sessions {end['sessions'] - base['sessions']:+d}")
    if mid is not base:
        print(f"drift (after - cycle {mid['cycles']}): RSS "
              f"{(end['rss_kib'] - mid['rss_kib']) / 1024:+.1f} MiB, "
              f"fds {end['fds'] - mid['fds']:+d}")
    print("SIGTERM -> exit (no call in flight): " +
          (f"{shutdown:.2f} s" if shutdown is not None else "hung (killed after 30 s)"))
    print(f"csv: {os.path.relpath(args.csv)}")
    return 0


WATCHER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {client!r})
    from reasonalloc import _proto
    import grpc
    _, pb, sidecar_grpc = _proto.load()
    stub = sidecar_grpc.KvSidecarStub(grpc.insecure_channel({target!r}))
    # Pool gauges once a second: the first comes at once, so the stream is known to be up.
    for i, event in enumerate(stub.WatchMetrics(pb.WatchMetricsRequest(pool_interval_seconds=1))):
        if i == 0:
            print("first event", flush=True)
""")


def stopped_watcher(args):
    binary = server_binary(args.build)
    server = Server(binary, "--drain_timeout_seconds=1", "--log_level=info")
    header(binary, server)
    stub, pid = server.stub, server.proc.pid
    rng = np.random.default_rng(args.seed)
    child = subprocess.Popen([sys.executable, "-c", WATCHER.format(
        client=os.path.join(REPO, "client", "python"), target=f"unix://{server.sock}")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    L, hq, hkv, d = MODEL.num_layers, MODEL.num_q_heads, MODEL.num_kv_heads, MODEL.head_dim
    sessions = [create(stub, rng, c, types_pb2.MEMORY_KIND_INLINE, False).session
                for c in range(8)]
    q = tensor(rng.standard_normal((L, hq, 8, d)))
    k = tensor(rng.standard_normal((L, hkv, 32, d)))

    def batch(step):
        return pb.CompressBatch(requests=[pb.CompressRequest(
            session_id=s.session_id, step=step, omit_keep_mask=True,
            inline_tensors=pb.InlineTensors(query_window=q, keys=k)) for s in sessions])

    # The watcher has its stream and has read from it; then it stops.
    import select
    ready, _, _ = select.select([child.stdout], [], [], 30)
    line = child.stdout.readline() if ready else ""
    if "first event" not in line:
        print(f"the watcher did not start within 30 s: {line!r}")
        child.kill()
        server.stop()
        return 1
    list(stub.CompressStream(iter([batch(1)]), timeout=30))
    child.send_signal(signal.SIGSTOP)
    print(f"watcher pid {child.pid} stopped after its first event; server pid {pid}")
    t0 = time.time()
    steps = (args.events + len(sessions) - 1) // len(sessions)
    results = stub.CompressStream(iter([batch(s) for s in range(2, steps + 2)]), timeout=600)
    done = sum(len(r.results) for r in results)
    gen = time.time() - t0
    dropped = server.metric("reasonalloc_watch_events_dropped_total")
    watchers = server.metric("reasonalloc_watchers")
    print(f"{done} compression events in {gen:.1f} s ({done / gen:.0f}/s); watchers {watchers}, "
          f"events dropped for slow watchers {dropped}")
    print(f"server before SIGTERM: {usage(pid)}")
    server.channel.close()
    t1 = time.time()
    server.proc.send_signal(signal.SIGTERM)
    try:
        status = server.proc.wait(timeout=30)
        took = time.time() - t1
        print(f"SIGTERM -> exit: {took:.2f} s, exit status {status} "
              f"(--drain_timeout_seconds 1)")
        result = 0
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        print("SIGTERM -> exit: hung (no exit within 30 s; killed with SIGKILL)")
        result = 1
    child.kill()  # SIGKILL works on a stopped process
    child.wait()
    server.log.close()
    with open(server.log_path, errors="replace") as f:
        lines = f.readlines()
    shutil.rmtree(server.tmp, ignore_errors=True)
    since = next((i for i, l in enumerate(lines) if "received SIGTERM" in l), len(lines) - 8)
    print("server log from SIGTERM on:\n" + textwrap.indent("".join(lines[since:since + 12]), "  "))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build", help="build directory (or the reasonalloc-server binary)")
    ap.add_argument("--cycles", type=int, default=5000)
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--csv", default=os.path.join(REPO, "bench", "results", "soak.csv"))
    ap.add_argument("--stopped-watcher", action="store_true",
                    help="drain time with a SIGSTOPped WatchMetrics reader instead of the soak")
    ap.add_argument("--events", type=int, default=5000,
                    help="--stopped-watcher: compression events to generate")
    args = ap.parse_args()
    return stopped_watcher(args) if args.stopped_watcher else soak(args)


if __name__ == "__main__":
    sys.exit(main())
