#!/usr/bin/env python3
"""Which eviction policy to run for a model: measured on probe prompts, checked on held-out ones.

  .venv/bin/python bench/policy_report.py BUILD_DIR [--model FILE] [--budgets 32,64] [--out DIR]

1. Calibrates a sensitivity profile (`reasonalloc-worker calibrate --objective sensitivity`) on
   the probe prompts (named MODEL.sensitivity; OUT/sensitivity_profile.json), beside the model's
   shipped k_ρ profile (if deploy/profiles has one).
2. Runs the fidelity grid on the probe prompts: every scorer with the uniform allocator, with
   reasonalloc (full) on the k_ρ profile, and with reasonalloc (full) on the sensitivity profile;
   picks, per budget, the policy of lowest teacher-forced KL and the best uniform-budget policy.
3. Runs those choices on the held-out prompts (disjoint from the probes) and reports the paired
   KL difference of the choice against the best uniform policy, with a 95 % bootstrap interval.

Everything runs against a private sidecar; the report goes to OUT/policy_report.md (and the
grids' CSV files beside it).
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paired_interval(a, b, reps=4000, seed=3):
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(reps, len(d)))].mean(axis=1)
    return d.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def run(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def grid(a, target, out_dir, prompts, max_prompts, tokens, policies, budgets):
    os.makedirs(out_dir, exist_ok=True)
    cmd = [os.path.join(a.build, "bench/fidelity"), f"--target={target}", f"--out_dir={out_dir}",
           f"--prompts={prompts}", f"--max_prompts={max_prompts}", f"--max_tokens={tokens}",
           "--policies=" + ",".join(policies), "--budgets=" + ",".join(map(str, budgets)),
           "--free_running_budgets=", "--sweep_policy=", f"--group={a.group}",
           *([f"--model={a.model}"] if a.model else [])]
    t0 = time.time()
    run(cmd, cwd=ROOT)
    kl = defaultdict(dict)  # (policy, budget) -> prompt -> KL
    for r in csv.DictReader(open(os.path.join(out_dir, "fidelity_runs.csv"))):
        if r["run"] == "forced":
            kl[(r["policy"], int(r["budget"]))][int(r["prompt"])] = float(r["kl_mean"])
    meta = json.load(open(os.path.join(out_dir, "fidelity_meta.json")))
    return kl, meta, time.time() - t0


def mean(d):
    return float(np.mean(list(d.values())))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build")
    ap.add_argument("--model", default="", help="GGUF file (default: the worker's)")
    ap.add_argument("--budgets", default="32,64")
    ap.add_argument("--scorers", default="streaming,snapkv,h2o,rkv")
    ap.add_argument("--probe_prompts", default="worker/prompts/calibration.txt")
    ap.add_argument("--probe_tokens", type=int, default=256)
    ap.add_argument("--heldout_prompts", default="bench/fidelity/prompts.txt")
    ap.add_argument("--heldout_tokens", type=int, default=384)
    ap.add_argument("--max_heldout", type=int, default=16)
    ap.add_argument("--sensitivity_budget", type=int, default=32)
    ap.add_argument("--sensitivity_scorer", default="rkv")
    ap.add_argument("--group", type=int, default=4, help="configurations decoded together")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/policy_report"))
    a = ap.parse_args()
    a.build = os.path.abspath(a.build)
    budgets = [int(b) for b in a.budgets.split(",") if b]
    scorers = [s for s in a.scorers.split(",") if s]
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="reasonalloc-policy-") as tmp:
        profiles = os.path.join(tmp, "profiles")
        shutil.copytree(os.path.join(ROOT, "deploy/profiles"), profiles)
        sock = os.path.join(tmp, "s.sock")
        target = f"unix://{sock}"
        server = subprocess.Popen([os.path.join(a.build, "server/reasonalloc-server"),
                                   f"--listen={target}", "--metrics_address=127.0.0.1:0",
                                   f"--profile_dir={profiles}", f"--max_arena_bytes={8 << 30}",
                                   "--log_level=error"])
        try:
            while not os.path.exists(sock):
                time.sleep(0.05)
            time.sleep(0.2)
            # 1. The sensitivity profile.
            sens_json = os.path.join(a.out, "sensitivity_profile.json")
            t0 = time.time()
            out = subprocess.run(
                [os.path.join(a.build, "worker/reasonalloc-worker"), "calibrate",
                 "--objective=sensitivity", f"--target={target}",
                 f"--prompts={os.path.join(ROOT, a.probe_prompts)}",
                 f"--max_tokens={a.probe_tokens}", f"--budget={a.sensitivity_budget}",
                 f"--scorer={a.sensitivity_scorer}", "--batch=32", f"--out={sens_json}",
                 *([f"--model={a.model}"] if a.model else [])],
                check=True, capture_output=True, text=True, cwd=ROOT).stdout
            sens_s = time.time() - t0
            print(out)
            # Named MODEL.sensitivity, beside the model's k_ρ profile (named MODEL).
            profile = json.load(open(sens_json))
            model = profile["model"]["name"]
            sensitivity = profile["name"] = f"{model}.sensitivity"
            with open(sens_json, "w") as f:
                json.dump(profile, f, indent=1)
            run([os.path.join(a.build, "client/reasonalloc"), "put-profile", f"--target={target}",
                 sens_json])
            has_wave = os.path.exists(os.path.join(profiles, f"{model}.json"))
            # 2. The probe grid.
            candidates = []
            for s in scorers:
                candidates.append(f"{s}/uniform")
                if has_wave:
                    candidates.append(f"{s}/reasonalloc-full")
                candidates.append(f"{s}/reasonalloc-full@{sensitivity}")
            probe_kl, probe_meta, probe_s = grid(
                a, target, os.path.join(a.out, "probe"), os.path.join(ROOT, a.probe_prompts), 0,
                a.probe_tokens, candidates, budgets)
            choice, best_uniform = {}, {}
            for b in budgets:
                ranked = sorted((p for p in candidates if (p, b) in probe_kl),
                                key=lambda p: mean(probe_kl[(p, b)]))
                choice[b] = ranked[0]
                best_uniform[b] = next(p for p in ranked if p.endswith("/uniform"))
            # 3. The held-out check.
            check = sorted(set(choice.values()) | set(best_uniform.values()))
            held_kl, held_meta, held_s = grid(
                a, target, os.path.join(a.out, "heldout"), os.path.join(ROOT, a.heldout_prompts),
                a.max_heldout, a.heldout_tokens, check, budgets)
        finally:
            server.terminate()
            server.wait()

    lines = [f"# Policy report: {model}\n",
             f"Probe prompts `{a.probe_prompts}` ({probe_meta['prompts']} prompts × "
             f"{a.probe_tokens} tokens) choose; held-out prompts `{a.heldout_prompts}` "
             f"({held_meta['prompts']} prompts × {a.heldout_tokens} tokens) check. Sensitivity "
             f"profile: {a.sensitivity_scorer} at budget {a.sensitivity_budget} "
             f"({sens_s / 60:.1f} min); probe grid {len(candidates)} policies × {len(budgets)} "
             f"budgets ({probe_s / 60:.1f} min); held-out grid ({held_s / 60:.1f} min); "
             f"{(time.time() - t_start) / 60:.1f} min in all. KL: teacher-forced KL(full ‖ "
             f"compressed), nats per token.\n",
             "Probe KL of every candidate:\n",
             "| policy | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for p in candidates:
        lines.append(f"| {p} | " + " | ".join(
            f"{mean(probe_kl[(p, b)]):.4f}" if (p, b) in probe_kl else "–" for b in budgets) + " |")
    lines += ["\nThe choice, checked on the held-out prompts (difference = choice − best "
              "uniform, paired over prompts, 95 % interval):\n",
              "| budget | choice (probe) | best uniform (probe) | held-out KL choice | held-out KL "
              "uniform | difference |", "|---|---|---|---|---|---|"]
    for b in budgets:
        c, u = choice[b], best_uniform[b]
        kc, ku = held_kl[(c, b)], held_kl[(u, b)]
        prompts = sorted(kc)
        if c == u:
            lines.append(f"| {b} | {c} | {u} | {mean(kc):.4f} | {mean(ku):.4f} | the same policy |")
            continue
        d, lo, hi = paired_interval([kc[i] for i in prompts], [ku[i] for i in prompts])
        lines.append(f"| {b} | {c} | {u} | {mean(kc):.4f} | {mean(ku):.4f} | "
                     f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    text = "\n".join(lines) + "\n"
    open(os.path.join(a.out, "policy_report.md"), "w").write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
