"""Faults around the shared-memory data plane: a worker killed with SIGKILL, a server killed with
SIGKILL and restarted, 64 sessions from 8 worker processes at once, CloseSession during a Compress."""
import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest

from reasonalloc import Client, SidecarError

MODEL = dict(name="faults", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
             dtype="float16")
HERE = os.path.dirname(os.path.abspath(__file__))


def start_server(sock, *flags):
    proc = subprocess.Popen([os.environ["REASONALLOC_SERVER_BINARY"], f"--listen=unix://{sock}",
                             "--metrics_address=", "--log_level=warn", *flags])
    c = Client(f"unix://{sock}", timeout=10)
    deadline = time.time() + 20
    while True:
        try:
            c.info()
            return proc, c
        except SidecarError:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)


def own_arenas(pid):
    return glob.glob(f"/dev/shm/reasonalloc-{pid}-*")


def worker_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    return env


def test_killed_worker_leaves_nothing_after_its_lease():
    tmp = tempfile.mkdtemp(prefix="reasonalloc-faults-")
    sock = os.path.join(tmp, "s.sock")
    proc, client = start_server(sock)
    try:
        capacity = client.info().arena_capacity_bytes
        script = textwrap.dedent(f"""
            import sys, time, numpy as np
            from reasonalloc import Client
            c = Client("unix://{sock}")
            s = c.session({MODEL!r}, 16, window=4, buffer=8, lease_seconds=1)
            for step in range(6):
                s.append(step, np.ones((2, 2, 8)), np.ones((2, 2, 8)), np.ones((2, 4, 8)))
            print(s.id, flush=True)
            time.sleep(600)
        """)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 env=worker_env(), text=True)
        sid = child.stdout.readline().strip()
        assert len(sid) == 32
        assert len(own_arenas(proc.pid)) == 3
        assert client.info().arena_free_bytes < capacity
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.time() + 15
        while own_arenas(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert own_arenas(proc.pid) == []
        assert client.info().arena_free_bytes == capacity
        with pytest.raises(grpc.RpcError) as e:
            client.stub.GetSession(_get(sid), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)


def _get(sid):
    from reasonalloc.client import sidecar_pb2
    return sidecar_pb2.GetSessionRequest(session_id=sid)


def test_killed_server_is_unavailable_then_not_found_after_restart():
    tmp = tempfile.mkdtemp(prefix="reasonalloc-faults-")
    sock = os.path.join(tmp, "s.sock")
    proc, client = start_server(sock)
    s = client.session(MODEL, 16, window=4, buffer=8)
    old_pid = proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(SidecarError) as e:
        s.compress(1)
    assert e.value.code.name == "UNAVAILABLE"
    assert len(own_arenas(old_pid)) == 3  # left behind by the crash...
    proc, client2 = start_server(sock)
    try:
        assert own_arenas(old_pid) == []  # ...and removed by the next server
        with pytest.raises(SidecarError) as e:
            s.compress(1)
        assert e.value.code.name == "NOT_FOUND"
        # The worker recreates its session and goes on.
        with client2.session(MODEL, 16, window=4, buffer=8) as again:
            again.append(0, np.ones((2, 2, 8)), np.ones((2, 2, 8)), np.ones((2, 4, 8)))
            assert again.compress(0).epoch == 1
    finally:
        client.close()
        client2.close()
        proc.terminate()
        proc.wait(timeout=20)


def test_64_sessions_from_8_processes_without_cross_talk():
    tmp = tempfile.mkdtemp(prefix="reasonalloc-faults-")
    sock = os.path.join(tmp, "s.sock")
    proc, client = start_server(sock)
    # Each worker runs 8 sessions; each session writes tokens whose values encode (process,
    # session, step), and after every event checks that its kept rows are its own.
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from reasonalloc import Client
        p = int(sys.argv[1])
        c = Client("unix://{sock}")
        sessions = [c.session({MODEL!r}, 16, window=4, buffer=8) for _ in range(8)]
        for step in range(120):
            for j, s in enumerate(sessions):
                tag = np.float16(p * 8 + j)
                k = np.full((2, 2, 8), tag, np.float16)
                k[..., 0] = np.float16(step % 64)
                s.append(step, k, k, np.full((2, 4, 8), 0.01 * (step % 7), np.float16))
                if step % 8 == 7:
                    s.compress(step)
                    for l in range(2):
                        for h in range(2):
                            rows = s.keys(l, h)
                            assert 0 < rows.shape[0] <= 16
                            assert np.all(rows[:, 1:] == tag), (p, j, step)
        for s in sessions:
            s.close()
        print("ok", flush=True)
    """)
    try:
        children = [subprocess.Popen([sys.executable, "-c", script, str(p)], env=worker_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    for p in range(8)]
        outputs = [c.communicate(timeout=300)[0] for c in children]
        for p, (c, out) in enumerate(zip(children, outputs)):
            assert c.returncode == 0 and out.strip().endswith("ok"), f"worker {p}: {out}"
        assert own_arenas(proc.pid) == []
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)


def test_close_during_compress():
    tmp = tempfile.mkdtemp(prefix="reasonalloc-faults-")
    sock = os.path.join(tmp, "s.sock")
    proc, client = start_server(sock, "--testing_compress_delay_ms=500")
    try:
        s = client.session(MODEL, 16, window=4, buffer=8)
        for step in range(20):
            s.append(step, np.ones((2, 2, 8)), np.ones((2, 2, 8)), np.ones((2, 4, 8)))
        result = {}

        def run():
            try:
                result["epoch"] = s.compress(20).epoch
            except SidecarError as e:
                result["error"] = e.code.name

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.2)
        client.stub.CloseSession(_close(s.id), timeout=5)
        t.join()
        # The in-flight event finishes on arenas that live until it is done; then they are gone.
        assert result.get("epoch") == 1 or result.get("error") == "NOT_FOUND", result
        deadline = time.time() + 5
        while own_arenas(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert own_arenas(proc.pid) == []
        assert proc.poll() is None
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=20)


def _close(sid):
    from reasonalloc.client import sidecar_pb2
    return sidecar_pb2.CloseSessionRequest(session_id=sid)
