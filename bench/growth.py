"""Fits how one event's time grows with N and with Hkv from engine_bench's BM_Growth runs.

  .venv/bin/python bench/growth.py [build dir]
"""
import json
import subprocess
import sys

import numpy as np


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    out = subprocess.run([f"{build}/bench/engine_bench", "--benchmark_filter=BM_Growth",
                          "--benchmark_repetitions=3", "--benchmark_report_aggregates_only=true",
                          "--benchmark_format=json"], check=True, capture_output=True, text=True)
    rows = {}
    for b in json.loads(out.stdout)["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        # name: BM_Growth/<scorer>/<N>/<Hkv>/real_time_median
        parts = b["run_name"].split("/")
        rows.setdefault(parts[1], []).append((int(parts[2]), int(parts[3]), b["real_time"]))
    for scorer, runs in rows.items():
        by_n = sorted({(n, t) for n, h, t in runs if h == 8})
        by_h = sorted({(h, t) for n, h, t in runs if n == 1024})
        en = np.polyfit(np.log([n for n, _ in by_n]), np.log([t for _, t in by_n]), 1)[0]
        eh = np.polyfit(np.log([h for h, _ in by_h]), np.log([t for _, t in by_h]), 1)[0]
        print(f"{scorer}: time ~ N^{en:.2f} (N {by_n[0][0]}..{by_n[-1][0]}: "
              + ", ".join(f"{t:.1f}" for _, t in by_n) + " ms), ~ Hkv^" + f"{eh:.2f} (Hkv "
              + ", ".join(f"{h}:{t:.1f}" for h, t in by_h) + " ms)")


if __name__ == "__main__":
    main()
