"""Summarises bench/fidelity's output: a Markdown table with bootstrap confidence intervals over
prompts, a summary CSV, and two plots.

  report.py RESULTS_DIR PROFILE.json   (a profile file that does not exist: no wave is drawn)

Reads RESULTS_DIR/fidelity_runs.csv, fidelity_layers.csv and fidelity_meta.json; writes
fidelity.md, fidelity_summary.csv, fidelity_kl.png (KL vs budget per policy) and
fidelity_layers.png (reasonalloc's per-layer budgets against the Reasoning Wave).
"""
import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np

ORDER = ["streaming/uniform", "snapkv/uniform", "h2o/uniform", "rkv/uniform", "rkv/pyramid",
         "rkv/adakv", "rkv/reasonalloc-layer", "rkv/reasonalloc-head", "rkv/reasonalloc-full"]


def bootstrap(values, reps=2000, seed=0):
    """Mean and 95% percentile-bootstrap interval over prompts."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    return v.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def paired(a, b, reps=2000, seed=1):
    """Mean of a − b over prompts and the share of bootstrap means below zero."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    return d.mean(), float((means < 0).mean())


def paired_interval(a, b, reps=4000, seed=2):
    """Mean of a − b over prompts and its 95% percentile-bootstrap interval."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    return d.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def main():
    out, profile_path = sys.argv[1], sys.argv[2]
    rows = list(csv.DictReader(open(os.path.join(out, "fidelity_runs.csv"))))
    meta = json.load(open(os.path.join(out, "fidelity_meta.json")))
    # The model's own layer profile, when there is one (the wave drawn under reasonalloc's budgets).
    wave = json.load(open(profile_path))["demand"] if os.path.exists(profile_path) else None
    forced = defaultdict(dict)   # (policy, budget, delta) -> prompt -> row
    free = defaultdict(dict)
    for r in rows:
        key = (r["policy"], int(r["budget"]), int(r["delta"]))
        (forced if r["run"] == "forced" else free)[key][int(r["prompt"])] = r
    delta_main = max(set(k[2] for k in forced), key=lambda d: sum(1 for k in forced if k[2] == d))
    budgets = sorted(set(k[1] for k in forced if k[2] == delta_main))
    policies = [p for p in ORDER if any(k[0] == p for k in forced)] + sorted(
        set(k[0] for k in forced) - set(ORDER))

    def col(key, name, table=forced):
        prompts = sorted(table[key])
        return [float(table[key][p][name]) for p in prompts]

    lines = []
    lines.append(f"# Fidelity of every policy against the full cache\n")
    lines.append(f"Model {meta['model']} (reference worker), {meta['prompts']} prompts, "
                 f"{meta['generated_tokens']} generated tokens each (greedy, full cache), "
                 f"Δ = {delta_main}, window 8. Mean over prompts with a 95% bootstrap interval. "
                 f"KL: teacher-forced KL(full ‖ compressed) in nats per token along the full-cache "
                 f"trajectory; top-1: share of positions where the compressed model's greedy token "
                 f"is the full cache's; first div.: generated tokens before the first disagreement "
                 f"(teacher-forced and free-running greedy decodes diverge at the same token); "
                 f"free agr.: share of positions where a free-running greedy decode has the full "
                 f"cache's token; KV: peak KV bytes held / the full cache's at the end.\n")
    lines.append("| policy | budget | KL | top-1 | first div. | free agr. | KV |")
    lines.append("|---|---|---|---|---|---|---|")
    summary = []
    for budget in budgets:
        for p in policies:
            key = (p, budget, delta_main)
            if key not in forced:
                continue
            kl = bootstrap(col(key, "kl_mean"))
            top = bootstrap(col(key, "top1"))
            fd = bootstrap(col(key, "first_divergence"))
            kv = np.mean([float(r["peak_kv_bytes"]) / float(r["full_kv_bytes"])
                          for r in forced[key].values()])
            fa = bootstrap(col(key, "free_agreement", free)) if key in free else None
            fa_txt = f"{fa[0]:.3f} [{fa[1]:.3f}, {fa[2]:.3f}]" if fa else ""
            lines.append(f"| {p} | {budget} | {kl[0]:.3f} [{kl[1]:.3f}, {kl[2]:.3f}] | "
                         f"{top[0]:.3f} [{top[1]:.3f}, {top[2]:.3f}] | {fd[0]:.0f} [{fd[1]:.0f}, {fd[2]:.0f}] | "
                         f"{fa_txt} | {kv:.3f} |")
            summary.append(dict(policy=p, budget=budget, delta=delta_main, kl=kl[0], kl_lo=kl[1],
                                kl_hi=kl[2], top1=top[0], top1_lo=top[1], top1_hi=top[2],
                                first_divergence=fd[0], free_agreement=fa[0] if fa else "",
                                kv_fraction=kv))
    sweep = sorted(k for k in forced if k[2] != delta_main)
    if sweep:
        lines.append("\nΔ sweep (how often the sidecar is called):\n")
        lines.append("| policy | budget | Δ | KL | top-1 | first div. | KV | events per prompt |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for key in sorted(sweep + [k for k in forced if k[2] == delta_main and
                                   (k[0], k[1]) in {(s[0], s[1]) for s in sweep}],
                          key=lambda k: k[2]):
            kl = bootstrap(col(key, "kl_mean"))
            top = bootstrap(col(key, "top1"))
            fd = np.mean(col(key, "first_divergence"))
            kv = np.mean([float(r["peak_kv_bytes"]) / float(r["full_kv_bytes"])
                          for r in forced[key].values()])
            ev = np.mean(col(key, "events"))
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {kl[0]:.3f} [{kl[1]:.3f}, {kl[2]:.3f}] | "
                         f"{top[0]:.3f} [{top[1]:.3f}, {top[2]:.3f}] | {fd:.0f} | {kv:.3f} | {ev:.1f} |")
            if key[2] != delta_main:  # the Δ of the grid is already in the summary
                summary.append(dict(policy=key[0], budget=key[1], delta=key[2], kl=kl[0],
                                    kl_lo=kl[1], kl_hi=kl[2], top1=top[0], top1_lo=top[1],
                                    top1_hi=top[2], first_divergence=fd, free_agreement="",
                                    kv_fraction=kv))
    # The paper's claim at the two smallest budgets, paired over prompts.
    lines.append("\nPaired comparisons of KL over prompts (mean difference; share of bootstrap "
                 "means below zero, i.e. the first policy lower):\n")
    for budget in budgets[:2]:
        for a, b in [("rkv/reasonalloc-full", "rkv/uniform"), ("rkv/reasonalloc-full", "snapkv/uniform"),
                     ("rkv/reasonalloc-full", "streaming/uniform"), ("rkv/uniform", "snapkv/uniform"),
                     ("rkv/uniform", "streaming/uniform")]:
            ka, kb = (a, budget, delta_main), (b, budget, delta_main)
            if ka in forced and kb in forced:
                d, share = paired(col(ka, "kl_mean"), col(kb, "kl_mean"))
                lines.append(f"- budget {budget}: {a} − {b}: {d:+.4f} nats/token "
                             f"(lower in {100 * share:.0f}% of bootstrap means)")
    # The headline question at every budget: the best policy with a hierarchical (non-uniform)
    # allocation against the best uniform-budget policy, and every reasonalloc policy against
    # uniform with its own scorer; paired over prompts, 95 % intervals of the mean difference.
    def allocator(p):
        return p.split("+")[0].split("@")[0].split("/")[1]

    def scorer(p):
        return p.split("/")[0]

    # A knob away from its default (+sN, +rN, +lX) against the same policy without knobs.
    knob_rows = []
    for budget in budgets:
        for k in sorted(k for k in forced if k[1] == budget and k[2] == delta_main):
            base_name = k[0].split("+")[0] + ("@" + k[0].split("@")[1] if "@" in k[0] else "")
            base = (base_name, budget, delta_main)
            if "+" in k[0] and base in forced:
                d, lo, hi = paired_interval(col(k, "kl_mean"), col(base, "kl_mean"))
                knob_rows.append(f"| {budget} | {k[0]} | {base_name} | "
                                 f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    if knob_rows:
        lines.append("\nKnobs against their defaults (KL difference, paired over prompts, 95 % "
                     "interval; negative = the knob lowers KL):\n")
        lines += ["| budget | policy | default | KL difference |", "|---|---|---|---|",
                  *knob_rows]
    pair_rows = []
    for budget in budgets:
        keys = [k for k in forced if k[1] == budget and k[2] == delta_main]
        uni = [k for k in keys if allocator(k[0]) == "uniform"]
        hier = [k for k in keys if allocator(k[0]) != "uniform"]
        if not uni or not hier:
            continue
        mean_kl = lambda k: np.mean(col(k, "kl_mean"))
        best_u, best_h = min(uni, key=mean_kl), min(hier, key=mean_kl)
        pairs = [(best_h, best_u)]
        for k in hier:
            same = (scorer(k[0]) + "/uniform", budget, delta_main)
            if k[0].split("/")[1].startswith("reasonalloc") and same in forced and \
                    (k, same) not in pairs:
                pairs.append((k, same))
        for a, b in pairs:
            d, lo, hi = paired_interval(col(a, "kl_mean"), col(b, "kl_mean"))
            tag = " (best of each)" if (a, b) == (best_h, best_u) else ""
            pair_rows.append(f"| {budget} | {a[0]}{tag} | {b[0]} | "
                             f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    if pair_rows:  # only when the grid has both kinds at some budget
        lines.append("\nHierarchical against uniform (KL difference, paired over prompts, 95 % "
                     "interval; negative = the first lower; the best of each kind is picked on "
                     "these same prompts):\n")
        lines += ["| budget | first | second | KL difference |", "|---|---|---|---|", *pair_rows]
    if any(r.get("kl_top5_share") for r in rows):
        lines.append("\nThe tail: share of each trajectory's KL carried by its worst 5 % of "
                     "positions (mean over prompts):\n")
        lines.append("| policy | " + " | ".join(f"B={b}" for b in budgets) + " |")
        lines.append("|---" * (len(budgets) + 1) + "|")
        for p in policies:
            cells = []
            for b in budgets:
                key = (p, b, delta_main)
                v = [float(r["kl_top5_share"]) for r in forced.get(key, {}).values()
                     if r.get("kl_top5_share")]
                cells.append(f"{np.mean(v):.2f}" if v else "–")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append(f"\nFull-cache reference: {meta['full_cache_tokens_per_second']:.1f} tokens/s at "
                 f"batch {meta['prompts']}; the grid ({meta['configurations']} configurations) took "
                 f"{meta['grid_seconds'] / 60:.1f} min.")
    open(os.path.join(out, "fidelity.md"), "w").write("\n".join(lines) + "\n")
    with open(os.path.join(out, "fidelity_summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0].keys()))
        w.writeheader()
        w.writerows(summary)
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for p in policies:
        xs, ys, lo, hi = [], [], [], []
        for budget in budgets:
            key = (p, budget, delta_main)
            if key in forced:
                m, l, h = bootstrap(col(key, "kl_mean"))
                xs.append(budget), ys.append(m), lo.append(m - l), hi.append(h - m)
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=p,
                    linewidth=2.5 if "reasonalloc-full" in p else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("budget (tokens per head)")
    ax.set_ylabel("teacher-forced KL(full ‖ compressed), nats/token")
    ax.set_title(f"{meta['model']}: KL vs budget (Δ = {delta_main}, {meta['prompts']} prompts, 95% CI)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fidelity_kl.png"), dpi=120)

    layers = list(csv.DictReader(open(os.path.join(out, "fidelity_layers.csv"))))
    fig, ax = plt.subplots(figsize=(9, 5))
    L = len(wave) if wave else 1 + max((int(r["layer"]) for r in layers), default=0)
    # Every reasonalloc policy's layer budgets, averaged per (profile, budget) over its scorers
    # and modes (the layer profile sets them; head routing and the scorer move them a little).
    per = defaultdict(lambda: defaultdict(list))  # (profile, budget) -> layer -> budgets
    names = defaultdict(set)
    for r in layers:
        if "/reasonalloc" in r["policy"] and int(r["delta"]) == delta_main:
            profile = r["policy"].partition("@")[2] or "the model's k_ρ wave"
            key = (profile, int(r["budget"]))
            per[key][int(r["layer"])].append(float(r["layer_budget"]))
            names[key].add(r["policy"])
    for (profile, budget), by_layer in sorted(per.items()):
        ax.plot(range(L), [np.mean(by_layer[l]) / budget for l in range(L)], marker=".",
                label=f"reasonalloc on {profile}, budget {budget}: layer budget / B "
                      f"({len(names[(profile, budget)])} policies)")
    if wave:
        ax.plot(range(L), wave, "k--", linewidth=2, label="Reasoning Wave: demand D (mean 1)")
    if not per and not wave:
        plt.close(fig)
        return
    ax.set_xlabel("layer")
    ax.set_ylabel("relative to the mean")
    ax.set_title("Per-layer budgets of reasonalloc (after the last event)" +
                 (" against the calibrated wave" if wave else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fidelity_layers.png"), dpi=120)


if __name__ == "__main__":
    main()
