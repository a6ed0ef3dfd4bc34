#!/usr/bin/env python3
"""Does a per-head profile have anything to add to the measured layer profile?

  .venv/bin/python bench/head_sensitivity.py HEADS.csv [--routing DIR/fidelity_heads.csv
      --policy NAME --budget B] [--out DIR]
      [--profile_out PROFILE.json --base_profile LAYER_PROFILE.json [--name NAME]]

HEADS.csv is `reasonalloc-worker calibrate --objective head_sensitivity`'s output: each KV head's
KL cost per token when it alone is compressed. This reports
- how unequal the heads of one layer are: per layer, the top head's share of the layer's summed
  head KL (1/H when the heads are alike) and max/min;
- how much of the spread across all heads lies between layers (what the layer profile already
  allocates by) and how much within layers (what only a per-head share could use): the variance
  of log KL split into its between-layer and within-layer parts;
- with --routing (a fidelity grid's fidelity_heads.csv): how the online head routing of one
  policy shares each layer's budget among its heads (its spread from an equal share) and whether
  it gives more to the heads whose compression costs more (rank correlation of the within-layer
  shares over every head).
Writes OUT/head_sensitivity.md and OUT/head_sensitivity.png (per-head KL by layer).
With --profile_out it also writes a layer profile for reasonalloc's static mode: the base
profile's layer demand and geometry, with each KV head's measured KL as its head_demand (the
sidecar normalises it per layer).
"""
import argparse
import csv
import os
import sys
from collections import defaultdict

import numpy as np


def spearman(x, y):
    rx = np.argsort(np.argsort(x)).astype(np.float64)
    ry = np.argsort(np.argsort(y)).astype(np.float64)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def write_profile(a, m):
    """The base profile with head_demand = the measured per-head KL (layer-major)."""
    import json
    base = json.load(open(a.base_profile))
    geometry = base.get("model", {})
    L, H = m.shape
    if int(geometry.get("num_layers", 0)) != L or int(geometry.get("num_kv_heads", 0)) != H:
        sys.exit(f"--base_profile {a.base_profile}: model has {geometry.get('num_layers')} layers "
                 f"x {geometry.get('num_kv_heads')} KV heads; {a.heads} has {L} x {H}")
    profile = dict(base)
    profile.pop("owner", None)
    profile["name"] = a.name or base["name"] + ".heads"
    profile["head_demand"] = [float(v) for v in m.reshape(-1)]
    note = (f"head_demand: per-KV-head KL of {os.path.basename(a.heads)} "
            f"(bench/head_sensitivity.py); layer demand: {base['name']}")
    profile["provenance"] = (note + "; " + base.get("provenance", ""))[:4096]
    tmp = a.profile_out + ".partial"
    with open(tmp, "w") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
    os.replace(tmp, a.profile_out)
    print(f"wrote {a.profile_out} (profile \"{profile['name']}\")")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("heads")
    ap.add_argument("--routing", default="", help="a fidelity grid's fidelity_heads.csv")
    ap.add_argument("--policy", default="",
                    help="the routing policies' names in that file (comma-separated; one section "
                         "each)")
    ap.add_argument("--budget", type=int, default=0,
                    help="its budget in that file (0: every budget the policy ran at, pooled)")
    ap.add_argument("--out", default="")
    ap.add_argument("--profile_out", default="",
                    help="also write a layer profile with these heads' KL as its head_demand")
    ap.add_argument("--base_profile", default="",
                    help="the layer profile JSON whose layer demand and geometry --profile_out "
                         "keeps (e.g. the model's sensitivity profile)")
    ap.add_argument("--name", default="",
                    help="the written profile's name (default: the base profile's + '.heads')")
    a = ap.parse_args()
    if a.routing and not a.policy:
        ap.error("--routing needs --policy (the routing policy's name in that file)")
    if bool(a.profile_out) != bool(a.base_profile):
        ap.error("--profile_out and --base_profile go together")
    out = a.out or os.path.dirname(os.path.abspath(a.heads))
    os.makedirs(out, exist_ok=True)

    kl = {}
    for r in csv.DictReader(open(a.heads)):
        kl[(int(r["layer"]), int(r["head"]))] = float(r["kl_per_token"])
    if not kl:
        sys.exit(f"{a.heads}: no rows")
    L = max(l for l, _ in kl) + 1
    H = max(h for _, h in kl) + 1
    if len(kl) != L * H:
        sys.exit(f"{a.heads}: {len(kl)} rows, expected {L} layers x {H} heads")
    m = np.array([[kl[(l, h)] for h in range(H)] for l in range(L)])
    if (m < 0).any() or not np.isfinite(m).all():
        sys.exit(f"{a.heads}: a head's KL is negative or not finite")
    if not (m.sum(axis=1) > 0).any():
        sys.exit(f"{a.heads}: no head loses anything (no eviction at this budget?)")

    if a.profile_out:
        write_profile(a, m)

    # Layers whose heads all lost nothing have no shares; a head that lost nothing has no log.
    live = m.sum(axis=1) > 0
    share = np.where(live[:, None], m / np.where(live, m.sum(axis=1), 1)[:, None], 1 / H)
    top = share[live].max(axis=1)
    positive = (m > 0).all(axis=1)
    left_out = L - int(positive.sum())
    if positive.any():
        ratio = m[positive].max(axis=1) / m[positive].min(axis=1)
        logm = np.log(m[positive])
        total = ((logm - logm.mean()) ** 2).sum()
        within = ((logm - logm.mean(axis=1, keepdims=True)) ** 2).sum()
        split = (f"Variance of log KL over the {int(positive.sum()) * H} heads of the layers "
                 f"where every head lost something"
                 + (f" ({left_out} layers left out)" if left_out else "") + ": " +
                 (f"{100 * (1 - within / total):.0f} % between layers (the layer profile "
                  f"allocates by it), {100 * within / total:.0f} % within layers (only a per-head "
                  f"share could use it)" if total > 0 else "none (every such head alike)") +
                 f". Max/min within a layer: median {np.median(ratio):.1f}, max "
                 f"{ratio.max():.1f}. ")
    else:
        split = "Every layer has a head that lost nothing: no variance split. "
    lines = [f"# Per-head sensitivity: {os.path.basename(a.heads)}\n",
             f"{L} layers x {H} KV heads, each head compressed alone. " + split +
             f"Top head's share of its layer's summed head KL: median "
             f"{np.median(top):.2f}, max {top.max():.2f} (equal heads: {1 / H:.2f}).\n",
             "| layer | " + " | ".join(f"KL head {h}" for h in range(H)) +
             " | top share | max/min |",
             "|---" * (H + 3) + "|"]
    for l in range(L):
        lines.append(f"| {l} | " + " | ".join(f"{v:.5f}" for v in m[l]) +
                     f" | {share[l].max():.2f} | " +
                     (f"{m[l].max() / m[l].min():.1f}" if positive[l] else "–") + " |")

    at = f"budget {a.budget}" if a.budget else "every budget it ran at, pooled"
    routing_rows = list(csv.DictReader(open(a.routing))) if a.routing else []
    for policy in [p for p in a.policy.split(",") if p] if a.routing else []:
        budgets = defaultdict(list)
        for r in routing_rows:
            if r["policy"] == policy and (not a.budget or int(r["budget"]) == a.budget):
                budgets[(int(r["layer"]), int(r["head"]))].append(float(r["mean_budget"]))
        if len(budgets) != L * H:
            sys.exit(f"{a.routing}: {policy} at {at}: {len(budgets)} heads with routing rows, "
                     f"expected {L * H}")
        b = np.array([[np.mean(budgets[(l, h)]) for h in range(H)] for l in range(L)])
        bshare = b / b.sum(axis=1, keepdims=True)
        spread = np.abs(bshare - 1 / H).mean()
        rho = spearman((bshare - 1 / H).ravel(), (share - 1 / H).ravel())
        prompts = len(next(iter(budgets.values())))
        lines += [f"\n## Online head routing: {policy} at {at}\n",
                  f"Each head's budget averaged over the events and over the {prompts} rows "
                  f"(sequence × budget) whose heads the routing set apart (`{os.path.basename(a.routing)}` holds only "
                  f"those). Mean distance of a head's share of its "
                  f"layer's budget from an equal share: {spread:.3f} (sensitivity shares: "
                  f"{np.abs(share - 1 / H).mean():.3f}). Rank correlation between the routing "
                  f"share and the sensitivity share over the {L * H} heads: {rho:+.2f}.\n",
                  "| layer | " + " | ".join(f"budget share head {h}" for h in range(H)) + " | " +
                  " | ".join(f"KL share head {h}" for h in range(H)) + " |",
                  "|---" * (2 * H + 1) + "|"]
        for l in range(L):
            lines.append(f"| {l} | " + " | ".join(f"{v:.2f}" for v in bshare[l]) + " | " +
                         " | ".join(f"{v:.2f}" for v in share[l]) + " |")

    text = "\n".join(lines) + "\n"
    open(os.path.join(out, "head_sensitivity.md"), "w").write(text)
    print(text)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(L)
    w = 0.8 / H
    for h in range(H):
        ax.bar(x + (h - (H - 1) / 2) * w, m[:, h], w, label=f"KV head {h}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("KL per token, this head alone compressed")
    ax.set_title("Per-head sensitivity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "head_sensitivity.png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
