"""Peak and retained RSS of the server around one rkv event, per N.

  .venv/bin/python bench/event_memory.py SERVER_BINARY [--n 4096 16384 65536] [--reps 3]

For each N a fresh server is started (so that VmHWM, the process's peak resident set, is this
event's), one inline advisory rkv session is created (L 1, Hq 1, Hkv 1, d 8, budget 16, window 8)
and one Compress of N tokens is sent. Printed per N: the RSS before the event, the peak during it
(VmHWM), the RSS after it, and the event's wall time; medians over --reps fresh servers. Run it with
two binaries (before and after a change) to compare them on the same machine.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client", "python"))
from reasonalloc.client import Client  # noqa: E402


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def one_event(binary, n, rng):
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "s.sock")
        server = subprocess.Popen([binary, f"--listen=unix://{sock}", "--metrics_address=",
                                   "--log_level=warn"], stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            client = Client(f"unix://{sock}", timeout=600)
            model = dict(name="mem", num_layers=1, num_q_heads=1, num_kv_heads=1, head_dim=8,
                         dtype="float16", max_context=1 << 20)
            session = client.session(model, budget=16, scorer="rkv", window=8, buffer=16,
                                     memory="inline", managed=False)
            q = rng.standard_normal((1, 1, 8, 8)).astype(np.float16)
            k = rng.standard_normal((1, 1, n, 8)).astype(np.float16)
            before = status_kib(server.pid, "VmRSS")
            t0 = time.perf_counter()
            try:
                session.compress_inline(1, q, k)
                ok = "ok"
            except Exception as e:  # noqa: BLE001  (a refusal or a dead server is the figure)
                ok = type(e).__name__ + ": " + str(e)[:80]
            seconds = time.perf_counter() - t0
            alive = server.poll() is None
            peak = status_kib(server.pid, "VmHWM") if alive else -1
            time.sleep(0.2)
            after = status_kib(server.pid, "VmRSS") if alive else -1
            client.close()
            return before, peak, after, seconds, ok if alive else f"server died ({ok})"
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binary")
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{args.binary} on {cpu_model()}, {os.cpu_count()} CPUs")
    print(f"{'N':>7} {'before MiB':>11} {'peak MiB':>9} {'after MiB':>10} {'event s':>8}  result")
    for n in args.n:
        runs = [one_event(args.binary, n, rng) for _ in range(args.reps)]
        med = [statistics.median(r[i] for r in runs) for i in range(4)]
        print(f"{n:>7} {med[0] / 1024:>11.1f} {med[1] / 1024:>9.1f} {med[2] / 1024:>10.1f} "
              f"{med[3]:>8.2f}  {runs[-1][4]}")


if __name__ == "__main__":
    main()
