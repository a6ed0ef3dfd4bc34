"""Summarises bench/recall's output: recall accuracy of every policy relative to the full cache,
per budget, with 95 % bootstrap intervals over tasks, a paired comparison of each policy with the
best uniform-budget policy at the same budget, a summary CSV and a plot.

  report.py RESULTS_DIR

Reads RESULTS_DIR/recall_runs.csv and recall_meta.json; writes recall.md, recall_summary.csv and
recall.png (recall vs budget per policy).
"""
import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tasks import answer_matches  # noqa: E402


def bootstrap(values, reps=4000, seed=0):
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    return v.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def paired_interval(a, b, reps=4000, seed=1):
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    return d.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def main():
    out = sys.argv[1]
    rows = list(csv.DictReader(open(os.path.join(out, "recall_runs.csv"), encoding="utf-8",
                                   errors="replace")))
    meta = json.load(open(os.path.join(out, "recall_meta.json")))
    for r in rows:  # the C++ program's verdict, checked with the generator's own rule
        want = answer_matches(r["answer"], r["text"].replace("\\n", "\n"))
        if want != (r["correct"] == "1"):
            raise SystemExit(f"recall_runs.csv: task {r['task']} {r['policy']}: verdict differs")
    full = {r["task"]: r for r in rows if r["policy"] == "full"}
    kept = sorted(t for t, r in full.items() if r["correct"] == "1")
    grid = defaultdict(dict)  # (policy, budget) -> task -> correct
    for r in rows:
        if r["policy"] != "full":
            grid[(r["policy"], int(r["budget"]))][r["task"]] = int(r["correct"])
    budgets = sorted(set(b for _, b in grid))
    policies = []
    for p, _ in grid:
        if p not in policies:
            policies.append(p)
    if not kept:
        text = (f"# Long-range recall against the full cache\n\nModel {meta['model']}: the full "
                f"cache answers none of the {meta['tasks']} tasks, so no policy can be measured "
                f"against it.\n")
        with open(os.path.join(out, "recall.md"), "w") as f:
            f.write(text)
        print(text)
        return
    dist = [int(full[t]["distance"]) for t in kept]
    kinds = defaultdict(int)
    for t in kept:
        kinds[full[t]["kind"]] += 1

    lines = ["# Long-range recall against the full cache\n"]
    lines.append(
        f"Model {meta['model']}: the full cache answers {len(kept)} of {meta['tasks']} tasks "
        f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); only those count. The fact "
        f"sits {min(dist)}–{max(dist)} tokens (median {int(np.median(dist))}) before the end of the "
        f"prompt; {meta['answer_tokens']} tokens decoded greedily. Recall = share of those tasks "
        f"still answered; 95 % bootstrap intervals over tasks. Grid {meta['grid_seconds']:.0f} s, "
        f"full cache {meta['full_cache_seconds']:.0f} s.\n")
    header = "| policy | " + " | ".join(f"B={b}" for b in budgets) + " |"
    lines += [header, "|---" * (len(budgets) + 1) + "|"]
    summary = []
    for p in policies:
        cells = []
        for b in budgets:
            tasks = grid.get((p, b), {})
            v = [tasks[t] for t in kept if t in tasks]
            if len(v) != len(kept):
                cells.append("–")
                continue
            m, lo, hi = bootstrap(v)
            cells.append(f"{m:.2f} [{lo:.2f}, {hi:.2f}]")
            summary.append({"policy": p, "budget": b, "recall": m, "lo": lo, "hi": hi,
                            "tasks": len(v)})
        lines.append(f"| {p} | " + " | ".join(cells) + " |")

    # Each policy against the best uniform-budget policy at the same budget (paired over tasks);
    # the section only where a uniform policy ran.
    paired = []
    for b in budgets:
        uniform = [s for s in summary if s["budget"] == b and s["policy"].split("+")[0].endswith(
            "/uniform")]
        if not uniform:
            continue
        best = max(uniform, key=lambda s: s["recall"])["policy"]
        base = [grid[(best, b)][t] for t in kept]
        for s in summary:
            if s["budget"] != b or s["policy"] == best:
                continue
            v = [grid[(s["policy"], b)][t] for t in kept]
            d, lo, hi = paired_interval(v, base)
            paired.append(f"| {b} | {best} | {s['policy']} | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    if paired:
        lines.append("\nPaired against the best uniform-budget policy at each budget (difference "
                     "in recall, 95 % interval; an interval that excludes 0 separates the two):\n")
        lines += ["| budget | best uniform | policy | difference |", "|---|---|---|---|"] + paired

    # Each hierarchical policy against the uniform allocator with its own scorer, and its own
    # knobs (+sN, +rN, +lX) where that policy ran, else the scorer's plain uniform policy.
    same = []
    for s_ in summary:
        scorer, rest = s_["policy"].split("@")[0].split("/", 1)
        knobs = rest[rest.index("+"):] if "+" in rest else ""
        base_name = f"{scorer}/uniform{knobs}"
        label = base_name
        if (base_name, s_["budget"]) not in grid:
            base_name = f"{scorer}/uniform"
            label = f"{base_name} (no {scorer}/uniform{knobs} run)"
        if rest.startswith("uniform") or (base_name, s_["budget"]) not in grid:
            continue
        base_v = grid[(base_name, s_["budget"])]
        if not all(t in base_v for t in kept):
            continue
        d, lo, hi = paired_interval([grid[(s_["policy"], s_["budget"])][t] for t in kept],
                                    [base_v[t] for t in kept])
        same.append(f"| {s_['budget']} | {s_['policy']} | {label} | "
                    f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    if same:
        lines.append("\nAgainst the uniform allocator with the same scorer and knobs, or the "
                     "scorer's plain uniform policy where that did not run (paired over tasks):\n")
        lines += ["| budget | policy | uniform | difference |", "|---|---|---|---|", *same]

    with open(os.path.join(out, "recall.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "recall_summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["policy", "budget", "recall", "lo", "hi", "tasks"])
        w.writeheader()
        for s in summary:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in s.items()})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in policies:
        pts = [s for s in summary if s["policy"] == p]
        if not pts:
            continue
        x = [s["budget"] for s in pts]
        ax.errorbar(x, [s["recall"] for s in pts],
                    yerr=[[s["recall"] - s["lo"] for s in pts], [s["hi"] - s["recall"] for s in pts]],
                    marker="o", capsize=3, label=p)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("budget (tokens per KV head)")
    ax.set_ylabel("recall relative to the full cache")
    ax.set_title(f"Long-range recall, {meta['model']} ({len(kept)} tasks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recall.png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
