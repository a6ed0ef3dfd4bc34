"""A picture of what deploy/grafana/reasonalloc.json shows, drawn from live data.

Starts two real sidecars (one with the test workload of tests/integration/prom_stack.py: two
12-layer policies, one NOT_FOUND per round, a WatchMetrics stream; one with its 1 MiB arena pool
filled by managed shared-memory sessions), a real Prometheus scraping both with the Prometheus
Operator's relabelings for deploy/k8s's PodMonitor, lets it run, then evaluates every panel's
queries like Grafana (variables: all sidecars and models; each panel's transformations applied)
and draws each panel at its gridPos with matplotlib.

  REASONALLOC_SERVER_BINARY=build/server/reasonalloc-server REASONALLOC_PROTO_DIR=proto \\
    .venv/bin/python bench/dashboard_snapshot.py --seconds 120 --out bench/results/dashboard.png
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import grafana_panels  # noqa: E402
import operator_podmonitor  # noqa: E402
import prom_stack  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402


def unit_formatter(unit):
    if unit == "percentunit":
        return PercentFormatter(1.0)
    if unit == "bytes":
        return FuncFormatter(lambda v, _: f"{v / 2**20:.1f} MiB" if abs(v) >= 2**20 else f"{v / 1024:.0f} KiB")
    if unit == "s":
        return FuncFormatter(lambda v, _: f"{v * 1e3:.2f} ms")
    if unit == "reqps":
        return FuncFormatter(lambda v, _: f"{v:.1f}/s")
    return None


def draw(ax, panel, frames, start):
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    ax.set_title(panel["title"], fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    fmt = unit_formatter(unit)
    if panel["type"] == "barchart":
        frame = frames[0]
        x_name = panel.get("options", {}).get("xField")
        xs = grafana_panels.column(frame, x_name)
        value_field = next(f for f in frame["fields"] if f["name"] != x_name and f["type"] == "number")
        ax.bar([str(x if not isinstance(x, float) else int(x)) for x in xs], value_field["values"],
               color="#5794F2")
        ax.set_xlabel(x_name, fontsize=7)
        if fmt:
            ax.yaxis.set_major_formatter(fmt)
        return
    if panel["type"] == "gauge":
        # One gauge per series, drawn as a bar filled to the value.
        for i, f in enumerate(frames):
            value = f["fields"][1]["values"][-1]
            ax.barh([i], [1.0], color="#eeeeee")
            ax.barh([i], [value], color="#F2495C" if value > 0.9 else "#73BF69")
            ax.text(0.5, i, f"{value * 100:.1f}%", ha="center", va="center", fontsize=11)
        ax.set_yticks(range(len(frames)), [f["name"] for f in frames], fontsize=7)
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        return
    for f in frames:
        ts = [(t / 1000 - start) for t in f["fields"][0]["values"]]
        ax.plot(ts, f["fields"][1]["values"], label=f["name"], linewidth=1.2)
    ax.set_xlabel("seconds since the first scrape", fontsize=7)
    if fmt:
        ax.yaxis.set_major_formatter(fmt)
    if frames:
        ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=90, help="workload time before the snapshot")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "dashboard.png"))
    args = ap.parse_args()
    binary = os.environ.get("REASONALLOC_SERVER_BINARY", os.path.join(ROOT, "build", "server", "reasonalloc-server"))
    proto = os.environ.get("REASONALLOC_PROTO_DIR", os.path.join(ROOT, "proto"))
    tmp = tempfile.mkdtemp(prefix="reasonalloc-dashboard-")
    sidecars, prom, workload = [], None, None
    try:
        pb, grpc_mod, types_pb2 = prom_stack.compile_stubs(proto, os.path.join(tmp, "stubs"))
        profiles = os.path.join(tmp, "profiles")
        prom_stack.write_profile(profiles)
        healthy = prom_stack.Sidecar(binary, tmp, "healthy", pb, grpc_mod,
                                     [f"--profile_dir={profiles}", "--max_arena_bytes=1073741824"])
        sidecars.append(healthy)
        full = prom_stack.Sidecar(binary, tmp, "full", pb, grpc_mod, ["--max_arena_bytes=1048576"])
        sidecars.append(full)
        prom_stack.fill_arena(full, types_pb2)
        workload = prom_stack.Workload(healthy, types_pb2).start()
        podmonitor, template = operator_podmonitor.load_manifests()
        pods = {"reasonalloc-worker-5c9d7b8f6d-hl7qz": healthy.metrics_port,
                "reasonalloc-worker-5c9d7b8f6d-fz2mk": full.metrics_port}
        prom = prom_stack.Prometheus(os.path.join(tmp, "prom"), prom_stack.operator_jobs(podmonitor, template, pods))
        start = time.time()
        print(f"running the workload for {args.seconds:.0f} s ...", flush=True)
        time.sleep(args.seconds)
        end = time.time()

        dash = grafana_panels.load_dashboard()
        variables = {"instance": ".*", "model": ".*"}
        rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"])
        fig = plt.figure(figsize=(18, rows * 0.42))
        grid = fig.add_gridspec(rows, 24, hspace=1.6, wspace=1.2, top=0.96, bottom=0.03)
        for panel in dash["panels"]:
            g = panel["gridPos"]
            ax = fig.add_subplot(grid[g["y"]:g["y"] + g["h"] - 1, g["x"]:g["x"] + g["w"]])
            frames = grafana_panels.evaluate_panel(prom, panel, variables, time_range=(start, end), step=2)
            draw(ax, panel, frames, start)
        fig.suptitle(f"{dash['title']}: live data from two sidecars ({datetime.now():%Y-%m-%d %H:%M}), "
                     "\\$instance = All, \\$model = All; rates over [1m]", fontsize=11, y=0.985)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        fig.savefig(args.out, dpi=80, bbox_inches="tight")
        print(f"wrote {args.out}")
    finally:
        if workload:
            workload.stop()
        if prom:
            prom.stop()
        for s in sidecars:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
