"""The calibrated layer profiles ("Reasoning Waves") side by side: each profile's per-layer demand
(k_rho relative to the mean over layers) against the layer's relative depth, so that models with
different layer counts share one axis.

  .venv/bin/python bench/profiles_plot.py [--out bench/results/profiles.png] [PROFILE.json ...]
      [--layers_csv CSV] [--title TEXT]

Without files it draws every profile in deploy/profiles. --layers_csv adds the per-layer costs a
sensitivity calibration wrote (`calibrate --layers_csv`): the KL cost and, when measured, the
recall cost, each relative to its mean over layers (dashed). Prints each profile's summary (layers,
rho, largest and smallest demand, and the provenance line).
"""
import argparse
import csv
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="*")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "profiles.png"))
    ap.add_argument("--layers_csv", default="")
    ap.add_argument("--title", default="Calibrated layer profiles (k_rho at rho, full cache, "
                                       "probe prompts)")
    a = ap.parse_args()
    files = a.profiles or sorted(glob.glob(os.path.join(ROOT, "deploy", "profiles", "*.json")))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for path in files:
        p = json.load(open(path))
        demand = p["demand"]
        L = len(demand)
        depth = [l / max(L - 1, 1) for l in range(L)]
        m = p["model"]
        label = (f"{p['name']} (L {L}, {m['num_q_heads']} q / {m['num_kv_heads']} kv heads of "
                 f"{m['head_dim']})")
        ax.plot(depth, demand, marker="o", markersize=3, label=label)
        top = max(range(L), key=lambda l: demand[l])
        low = min(range(L), key=lambda l: demand[l])
        print(f"{p['name']}: {L} layers, rho {p['rho']}, max {demand[top]:.2f}x at layer {top}, "
              f"min {demand[low]:.2f}x at layer {low}; {p.get('provenance', '')}")
    if a.layers_csv:
        try:
            rows = list(csv.DictReader(open(a.layers_csv)))
        except OSError as e:
            ap.error(f"--layers_csv: {e}")
        if not rows or not {"kl_per_token", "recall_kl_per_token"} <= set(rows[0]):
            ap.error(f"--layers_csv {a.layers_csv}: not a layers CSV of calibrate (no rows, or "
                     "no kl_per_token and recall_kl_per_token columns)")
        L = len(rows)
        depth = [l / max(L - 1, 1) for l in range(L)]
        for column, label in (("kl_per_token", "KL cost alone"),
                              ("recall_kl_per_token", "recall cost alone")):
            values = [float(r[column]) for r in rows if r[column]]
            if len(values) == L and sum(values) > 0:
                mean = sum(values) / L
                ax.plot(depth, [v / mean for v in values], linestyle="--", marker="^",
                        markersize=3, label=f"{label} ({os.path.basename(a.layers_csv)})")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("relative layer depth (layer / (L - 1))")
    ax.set_ylabel("demand (relative to the mean over layers)")
    ax.set_title(a.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
