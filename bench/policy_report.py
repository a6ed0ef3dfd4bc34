#!/usr/bin/env python3
"""Which eviction policy to run for a model: measured on probe prompts, checked on held-out ones.

  .venv/bin/python bench/policy_report.py BUILD_DIR [--model FILE] [--budgets 32,64] [--out DIR]
  (--quick: 2 scorers, uniform and reasonalloc-full only, no recency variants, 8 held-out
  prompts, 24 recall tasks)

1. Calibrates a sensitivity profile (`reasonalloc-worker calibrate --objective sensitivity`) on
   the probe prompts (named MODEL.sensitivity; OUT/sensitivity_profile.json, each layer's costs in
   OUT/sensitivity_layers.csv), beside the model's shipped k_ρ profile (if --profiles, default
   deploy/profiles, has one). With --recall_probe_tasks N, the calibration also measures each
   layer's recall cost on N recall tasks of seed 2 (the evaluation's are seed 1) and the profile's
   demand mixes both costs (--recall_weight).
2. Runs the fidelity grid on the probe prompts: every scorer with every allocator (uniform, adakv,
   reasonalloc with and without head routing, the latter two on the k_ρ profile and on the
   sensitivity profile), each also with the last --recent tokens always kept (`+rN`); picks, per
   budget, the policy of lowest teacher-forced KL, the best uniform-budget policy and the best
   hierarchical (reasonalloc) policy.
3. Runs the candidates on the held-out prompts (disjoint from the probes; --heldout picks, the
   default: the picks, and for every scorer its plain uniform policy, its best reasonalloc policy
   on the probes and the uniform policy with that one's knobs; all: every candidate; choices:
   only the picks) and reports, paired over prompts with 95 % bootstrap intervals, the best
   hierarchical policy against the best uniform one and every reasonalloc policy against the
   uniform allocator with the same scorer and knobs.
4. Runs the long-range recall tasks (bench/recall, seeded, answered by the full cache) for the
   picks at the report's budgets and --recall_budgets, and reports recall relative to the full
   cache (bench/recall/report.py).
5. Plots the per-layer sensitivity against the k_ρ wave (OUT/wave_vs_sensitivity.png).

With `reasonalloc-static` among --allocators, step 1 also measures each KV head alone
(`calibrate --objective head_sensitivity`, OUT/head_sensitivity.csv) and writes the static-split
profile MODEL.sensitivity.heads (OUT/head_profile.json: the sensitivity profile's layer demand,
each head's KL as head_demand); its candidates run only on that profile.

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
    if not (a.reuse and reusable(out_dir, prompts, max_prompts, tokens, policies, budgets)):
        run(cmd, cwd=ROOT)
    # The grid's own tables and plots (fidelity.md, fidelity_kl.png: KL vs budget per policy),
    # written quietly, also for a reused grid.
    subprocess.run([sys.executable, os.path.join(ROOT, "bench/fidelity/report.py"), out_dir, "-"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    kl = defaultdict(dict)  # (policy, budget) -> prompt -> KL
    for r in csv.DictReader(open(os.path.join(out_dir, "fidelity_runs.csv"))):
        if r["run"] == "forced":
            kl[(r["policy"], int(r["budget"]))][int(r["prompt"])] = float(r["kl_mean"])
    meta = json.load(open(os.path.join(out_dir, "fidelity_meta.json")))
    # The grid's own clock (the full cache and every configuration), also for a reused grid.
    return kl, meta, meta["full_cache_seconds"] + meta["grid_seconds"]


def reusable(out_dir, prompts, max_prompts, tokens, policies, budgets):
    """--reuse: the grid in out_dir ran as many prompts and tokens as asked for and holds every
    (policy, budget) asked for. (It cannot tell another model's grid: keep one OUT per model.)"""
    runs = os.path.join(out_dir, "fidelity_runs.csv")
    meta_path = os.path.join(out_dir, "fidelity_meta.json")
    if not os.path.exists(runs) or not os.path.exists(meta_path):
        return False
    n = sum(1 for line in open(prompts) if line.strip() and not line.startswith("#"))  # ReadPrompts
    meta = json.load(open(meta_path))
    if meta["prompts"] != (min(n, max_prompts) if max_prompts else n) or \
            meta["generated_tokens"] != tokens:
        return False
    have = {(r["policy"], int(r["budget"])) for r in csv.DictReader(open(runs))
            if r["run"] == "forced"}
    if all((p, b) in have for p in policies for b in budgets):
        print(f"reusing {out_dir}", flush=True)
        return True
    return False


def mean(d):
    return float(np.mean(list(d.values())))


def main():
    # No abbreviations: --quick needs to know exactly which flags the command line gave.
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("build")
    ap.add_argument("--model", default="", help="GGUF file (default: the worker's)")
    ap.add_argument("--budgets", default="32,64")
    ap.add_argument("--scorers", default="streaming,snapkv,h2o,rkv")
    ap.add_argument("--allocators", default="uniform,adakv,reasonalloc-layer,reasonalloc-full",
                    help="reasonalloc-* run on the k_ρ profile and on the sensitivity profile; "
                         "reasonalloc-static (the measured per-head split) on the head profile "
                         "step 1 measures")
    ap.add_argument("--probe_prompts", default="worker/prompts/calibration.txt")
    ap.add_argument("--probe_tokens", type=int, default=256)
    ap.add_argument("--max_probe", type=int, default=0,
                    help="use only the first N probe prompts, for the calibration and the probe "
                         "grid (0 = all)")
    ap.add_argument("--heldout_prompts", default="bench/fidelity/prompts.txt")
    ap.add_argument("--heldout_tokens", type=int, default=384)
    ap.add_argument("--max_heldout", type=int, default=16)
    ap.add_argument("--heldout", choices=("picks", "all", "choices"), default="picks",
                    help="held-out grid: the picks with every scorer's uniform and best "
                         "reasonalloc policy; every candidate; or only the picks")
    ap.add_argument("--recall_tasks", type=int, default=48,
                    help="long-range recall tasks (bench/recall, seed 1) for the picks; 0 = none")
    ap.add_argument("--recall_budgets", default="256",
                    help="budgets the picks' recall also runs at (facts 550-600 tokens old rarely "
                         "survive budgets 32 and 64); empty = only --budgets")
    ap.add_argument("--recent", default="16",
                    help="recency variants: every candidate also runs with the last N tokens "
                         "always kept (+rN), for each N in this list; empty = none")
    ap.add_argument("--recall_probe_tasks", type=int, default=0,
                    help="recall tasks (seed 2) on which the sensitivity calibration also measures "
                         "each layer's recall cost; 0 = the KL cost only")
    ap.add_argument("--recall_weight", type=float, default=0.5,
                    help="with --recall_probe_tasks: the recall cost's share of the sensitivity "
                         "profile's demand, in [0, 1]")
    ap.add_argument("--sensitivity_budget", type=int, default=32)
    ap.add_argument("--sensitivity_scorer", default="rkv")
    ap.add_argument("--layer_group", type=int, default=1,
                    help="layers compressed together by the sensitivity calibration (a larger "
                         "model in less time: each group's cost is shared by its layers)")
    ap.add_argument("--profiles", default="deploy/profiles",
                    help="layer profiles the private sidecar starts with (the model's k_ρ wave "
                         "is read from here)")
    ap.add_argument("--sensitivity_profile", default="",
                    help="a sensitivity profile calibrated before (skips step 1)")
    ap.add_argument("--head_sensitivity", default="",
                    help="a per-head sensitivity CSV measured before (skips the head "
                         "measurement of reasonalloc-static)")
    ap.add_argument("--group", type=int, default=4, help="configurations decoded together")
    ap.add_argument("--reuse", action="store_true",
                    help="read a grid (or the recall run) already in OUT when it covers what is "
                         "asked, instead of running it again (a report cut short, rewritten)")
    ap.add_argument("--quick", action="store_true",
                    help="scorers snapkv,rkv; allocators uniform,reasonalloc-full; no recency "
                         "variants; recall only at --budgets; 8 held-out prompts; 24 recall "
                         "tasks (each unless given)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/policy_report"))
    a = ap.parse_args()
    given = {arg[2:].split("=", 1)[0] for arg in sys.argv[1:] if arg.startswith("--")}
    if a.quick:  # smaller defaults; a flag given on the command line still wins, whatever its value
        for name, value in (("scorers", "snapkv,rkv"), ("allocators", "uniform,reasonalloc-full"),
                            ("recent", ""), ("recall_budgets", ""), ("max_heldout", 8),
                            ("recall_tasks", 24)):
            if name not in given:
                setattr(a, name, value)
    a.build = os.path.abspath(a.build)
    budgets = [int(b) for b in a.budgets.split(",") if b]
    scorers = [s for s in a.scorers.split(",") if s]
    allocators = [x for x in a.allocators.split(",") if x]
    if not budgets or not scorers or not allocators:
        ap.error("--budgets, --scorers and --allocators each need at least one entry")
    try:
        recents = [int(r) for r in a.recent.split(",") if r]
        recall_budgets = [int(b) for b in a.recall_budgets.split(",") if b]
    except ValueError:
        ap.error("--recent and --recall_budgets are lists of integers")
    if any(r < 1 for r in recents) or any(b < 1 for b in recall_budgets):
        ap.error("--recent and --recall_budgets entries must be >= 1")
    # A recent window of more than half the smallest budget leaves the scorer little to choose
    # (and one above it is refused by the sidecar): such variants are left out.
    # One no larger than the window (α 8, the grids' default) is the policy without recency.
    for r in recents:
        if r <= 8:
            print(f"--recent {r}: left out, the window (8) is kept anyway", flush=True)
        elif 2 * r > min(budgets):
            print(f"--recent {r}: left out, more than half of budget {min(budgets)}", flush=True)
    recents = [r for r in recents if 8 < r and 2 * r <= min(budgets)]
    if a.max_probe < 0 or a.layer_group < 1:
        ap.error("--max_probe must be >= 0 and --layer_group >= 1")
    if a.recall_probe_tasks < 0 or not 0 <= a.recall_weight <= 1:
        ap.error("--recall_probe_tasks must be >= 0 and --recall_weight in [0, 1]")
    if a.recall_probe_tasks and a.sensitivity_profile:
        ap.error("--recall_probe_tasks calibrates the sensitivity profile; --sensitivity_profile "
                 "gives one calibrated before: use one of them")
    if "recall_weight" in given and not a.recall_probe_tasks:
        ap.error("--recall_weight weighs the recall cost that --recall_probe_tasks measures")
    # --profiles as given (relative to the working directory), else under the repository (its
    # default, deploy/profiles, from anywhere).
    profile_dir = a.profiles if os.path.isdir(a.profiles) else os.path.join(ROOT, a.profiles)
    if not os.path.isdir(profile_dir):
        ap.error(f"--profiles {a.profiles}: not a directory")
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    recall = None
    with tempfile.TemporaryDirectory(prefix="reasonalloc-policy-") as tmp:
        profiles = os.path.join(tmp, "profiles")
        shutil.copytree(profile_dir, profiles)
        sock = os.path.join(tmp, "s.sock")
        target = f"unix://{sock}"
        server = subprocess.Popen([os.path.join(a.build, "server/reasonalloc-server"),
                                   f"--listen={target}", "--metrics_address=127.0.0.1:0",
                                   f"--profile_dir={profiles}", f"--max_arena_bytes={8 << 30}",
                                   "--log_level=error"])
        try:
            while not os.path.exists(sock):
                if server.poll() is not None:
                    sys.exit(f"the sidecar exited with status {server.returncode} before it "
                             f"listened (its message is above)")
                time.sleep(0.05)
            time.sleep(0.2)
            # 1. The sensitivity profile.
            probes = repo_relative(a.probe_prompts)
            if a.max_probe:  # the first --max_probe prompts, in a file of their own
                probes = os.path.join(tmp, "probes.txt")
                with open(os.path.join(ROOT, a.probe_prompts)) as src, open(probes, "w") as dst:
                    dst.writelines([line for line in src if line.strip()
                                    and not line.startswith("#")][:a.max_probe])
            sens_json = os.path.join(a.out, "sensitivity_profile.json")
            layers_csv = os.path.join(a.out, "sensitivity_layers.csv")

            def calibrate(objective, out, *extra, **kw):
                """reasonalloc-worker calibrate on the probe prompts, the report's settings."""
                cmd = [os.path.join(a.build, "worker/reasonalloc-worker"), "calibrate",
                       f"--objective={objective}", f"--target={target}", f"--prompts={probes}",
                       f"--layer_group={a.layer_group}", f"--max_tokens={a.probe_tokens}",
                       f"--budget={a.sensitivity_budget}", f"--scorer={a.sensitivity_scorer}",
                       "--batch=32", f"--out={out}", *extra,
                       *([f"--model={a.model}"] if a.model else [])]
                print("+ " + " ".join(cmd), flush=True)
                return subprocess.run(cmd, check=True, cwd=ROOT, **kw)

            t0 = time.time()
            if a.sensitivity_profile:
                if os.path.abspath(a.sensitivity_profile) != os.path.abspath(sens_json):
                    shutil.copyfile(a.sensitivity_profile, sens_json)
                print(f"sensitivity profile from {a.sensitivity_profile}", flush=True)
            else:
                extra = [f"--layers_csv={layers_csv}"]
                if a.recall_probe_tasks:  # seed 2: never the evaluation's tasks (seed 1)
                    probe_tasks = os.path.join(tmp, "recall_probe_tasks.tsv")
                    run([sys.executable, os.path.join(ROOT, "bench/recall/tasks.py"), "--seed",
                         "2", "--count", str(a.recall_probe_tasks), "--out", probe_tasks])
                    extra += [f"--recall_tasks={probe_tasks}",
                              f"--recall_weight={a.recall_weight}"]
                out = calibrate("sensitivity", sens_json, *extra, stdout=subprocess.PIPE,
                                text=True).stdout  # its errors go straight to stderr
                print(out, flush=True)
            sens_s = time.time() - t0
            # Named MODEL.sensitivity, beside the model's k_ρ profile (named MODEL).
            profile = json.load(open(sens_json))
            if a.max_probe and not a.sensitivity_profile:
                profile["provenance"] = profile["provenance"].replace(
                    probes, f"the first {a.max_probe} of {a.probe_prompts}")
            if a.recall_probe_tasks and not a.sensitivity_profile:
                profile["provenance"] = profile["provenance"].replace(
                    probe_tasks, f"bench/recall/tasks.py --seed 2 --count {a.recall_probe_tasks}")
            model = profile["model"]["name"]
            sensitivity = profile["name"] = f"{model}.sensitivity"
            with open(sens_json, "w") as f:
                json.dump(profile, f, indent=1)
            # --overwrite: this report's profile replaces one of the same name shipped in
            # deploy/profiles (the private sidecar's copy of it), as the report measured it.
            run([os.path.join(a.build, "client/reasonalloc"), "put-profile", f"--target={target}",
                 "--overwrite", sens_json])
            # 1b. The per-head measurement and the static-split profile built on it.
            heads_profile, heads_s = None, 0.0
            if "reasonalloc-static" in allocators:
                t0 = time.time()
                heads_csv = os.path.join(a.out, "head_sensitivity.csv")
                if a.head_sensitivity:
                    if os.path.abspath(a.head_sensitivity) != os.path.abspath(heads_csv):
                        shutil.copyfile(a.head_sensitivity, heads_csv)
                else:
                    calibrate("head_sensitivity", heads_csv, stdout=subprocess.DEVNULL)
                heads_profile = f"{sensitivity}.heads"
                heads_json = os.path.join(a.out, "head_profile.json")
                run([sys.executable, os.path.join(ROOT, "bench/head_sensitivity.py"), heads_csv,
                     f"--out={os.path.join(a.out, 'heads')}", f"--profile_out={heads_json}",
                     f"--base_profile={sens_json}", f"--name={heads_profile}"],
                    stdout=subprocess.DEVNULL)
                run([os.path.join(a.build, "client/reasonalloc"), "put-profile",
                     f"--target={target}", "--overwrite", heads_json])
                heads_s = time.time() - t0
            wave_json = os.path.join(profiles, f"{model}.json")
            has_wave = os.path.exists(wave_json)
            wave = json.load(open(wave_json)) if has_wave else None
            # 2. The probe grid.
            candidates = []
            for s in scorers:
                for x in allocators:
                    for knob in [""] + [f"+r{r}" for r in recents]:
                        if knob and s == "streaming":
                            continue  # streaming keeps only the most recent tokens already
                        if not x.startswith("reasonalloc"):
                            candidates.append(f"{s}/{x}{knob}")
                            continue
                        if x == "reasonalloc-static":  # needs the profile's head demand
                            candidates.append(f"{s}/{x}{knob}@{heads_profile}")
                            continue
                        if has_wave:
                            candidates.append(f"{s}/{x}{knob}")
                        candidates.append(f"{s}/{x}{knob}@{sensitivity}")
            probe_kl, probe_meta, probe_s = grid(
                a, target, os.path.join(a.out, "probe"), os.path.join(ROOT, a.probe_prompts),
                a.max_probe,
                a.probe_tokens, candidates, budgets)
            choice, best_uniform, best_hier = {}, {}, {}
            for b in budgets:
                ranked = sorted((p for p in candidates if (p, b) in probe_kl),
                                key=lambda p: mean(probe_kl[(p, b)]))
                choice[b] = ranked[0]
                best_uniform[b] = next((p for p in ranked if is_uniform(p)), None)
                best_hier[b] = next((p for p in ranked if "/reasonalloc" in p), None)
            picks = sorted({p for d in (choice, best_uniform, best_hier) for p in d.values() if p})
            # 3. The held-out check.
            check = candidates if a.heldout == "all" else list(picks)
            if a.heldout == "picks":
                for s in scorers:
                    for b in budgets:
                        own = sorted((p for p in candidates
                                      if p.startswith(f"{s}/reasonalloc") and (p, b) in probe_kl),
                                     key=lambda p: mean(probe_kl[(p, b)]))
                        check += [f"{s}/uniform"] + [same_scorer_uniform(p) for p in own[:1]] + \
                            own[:1]
                check = [p for p in candidates if p in set(check)]  # the candidates' order
            held_kl, held_meta, held_s = grid(
                a, target, os.path.join(a.out, "heldout"), os.path.join(ROOT, a.heldout_prompts),
                a.max_heldout, a.heldout_tokens, check, budgets)
            # 4. Long-range recall for the picks.
            if a.recall_tasks > 0:
                recall = run_recall(a, target, os.path.join(a.out, "recall"), picks,
                                    budgets + [b for b in recall_budgets if b not in budgets])
        finally:
            server.terminate()
            server.wait()

    lines = [f"# Policy report: {model}\n",
             f"Probe prompts `{a.probe_prompts}` ({probe_meta['prompts']} prompts × "
             f"{a.probe_tokens} tokens) choose; held-out prompts `{a.heldout_prompts}` "
             f"({held_meta['prompts']} prompts × {a.heldout_tokens} tokens) check. Sensitivity "
             f"profile `{sensitivity}`: {a.sensitivity_scorer} at budget {a.sensitivity_budget} "
             f"({'given' if a.sensitivity_profile else f'{sens_s / 60:.1f} min'})"
             + (f"; head profile `{heads_profile}` ("
                f"{'given' if a.head_sensitivity else f'{heads_s / 60:.1f} min'})"
                if heads_profile else "")
             + f"; probe grid "
             f"{len(candidates)} policies × {len(budgets)} budgets ({probe_s / 60:.1f} min); "
             f"held-out grid {len(check)} policies ({held_s / 60:.1f} min)"
             + (f"; recall {recall['seconds'] / 60:.1f} min" if recall else "")
             + f"; {(time.time() - t_start) / 60:.1f} min "
             + ("this run (parts given or reused)"
                if a.reuse or a.sensitivity_profile or a.head_sensitivity else "in all")
             + ". KL: teacher-forced KL(full ‖ "
             f"compressed), nats per token. A policy without `@` runs on the model's k_ρ profile; "
             f"`@{sensitivity}` on the sensitivity profile.\n",
             "## Probe KL of every candidate\n",
             "| policy | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for p in candidates:
        lines.append(f"| {p} | " + " | ".join(
            f"{mean(probe_kl[(p, b)]):.4f}" if (p, b) in probe_kl else "–" for b in budgets) + " |")
    lines += ["\n## Picks (probe prompts)\n",
              "| budget | lowest KL | best uniform | best hierarchical |", "|---|---|---|---|"]
    for b in budgets:
        lines.append(f"| {b} | {choice[b]} | {best_uniform[b] or '–'} | {best_hier[b] or '–'} |")
    lines += ["\n## Held-out KL (mean, 95 % interval over prompts)\n",
              "| policy | " + " | ".join(f"B={b}" for b in budgets) + " |",
              "|---" * (len(budgets) + 1) + "|"]
    for p in check:
        cells = []
        for b in budgets:
            if (p, b) not in held_kl:
                cells.append("–")
                continue
            m, lo, hi = interval(list(held_kl[(p, b)].values()))
            cells.append(f"{m:.4f} [{lo:.4f}, {hi:.4f}]")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["\n## The picks on held-out prompts (difference in KL, paired over prompts, 95 % "
              "interval; below zero: the first policy is better)\n",
              "| budget | policy | against | KL policy | KL against | difference |",
              "|---|---|---|---|---|---|"]
    for b in budgets:
        u = best_uniform[b]
        firsts = [best_hier[b]] + ([choice[b]] if choice[b] not in (best_hier[b], u) else [])
        for first in firsts:
            if first and u and (first, b) in held_kl and (u, b) in held_kl:
                lines.append(pair_row(held_kl, b, first, u))
    lines += ["\n## Every reasonalloc policy against the uniform allocator with the same scorer "
              "and knobs (held-out, paired)\n",
              "| budget | policy | against | KL policy | KL against | difference | verdict |",
              "|---|---|---|---|---|---|---|"]
    for b in budgets:
        for p in check:
            u = same_scorer_uniform(p)
            if "/reasonalloc" not in p or (u, b) not in held_kl or (p, b) not in held_kl:
                continue
            row = pair_row(held_kl, b, p, u, verdict=True)
            lines.append(row)
    if recall:
        lines += ["\n## Long-range recall of the picks\n", recall["text"]]
    # Each layer's measured costs, when this run calibrated (a given profile has no CSV here).
    costs = None
    if not a.sensitivity_profile and os.path.exists(layers_csv):
        costs = list(csv.DictReader(open(layers_csv)))
    if wave is not None:
        lines += wave_section(wave, profile, costs, a.recall_weight,
                              os.path.join(a.out, "wave_vs_sensitivity.png"))
    text = "\n".join(lines) + "\n"
    open(os.path.join(a.out, "policy_report.md"), "w").write(text)
    print(text)


def repo_relative(path):
    """A path under the repository as the repository names it (the provenance a profile records
    must not carry this machine's folders); the calibration runs with the repository as its cwd."""
    full = os.path.join(ROOT, path)
    rel = os.path.relpath(full, ROOT)
    return full if rel.startswith("..") else rel


def same_scorer_uniform(policy):
    """The uniform allocator with a policy's scorer and knobs: rkv/reasonalloc-full+r16@P ->
    rkv/uniform+r16."""
    name = policy.split("@")[0]
    scorer, rest = name.split("/", 1)
    knobs = rest[rest.index("+"):] if "+" in rest else ""
    return f"{scorer}/uniform{knobs}"


def is_uniform(policy):
    return policy.split("+")[0].split("@")[0].endswith("/uniform")


def interval(values, reps=4000, seed=0):
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    return v.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def pair_row(held_kl, b, p, u, verdict=False):
    kp, ku = held_kl[(p, b)], held_kl[(u, b)]
    prompts = sorted(set(kp) & set(ku))
    d, lo, hi = paired_interval([kp[i] for i in prompts], [ku[i] for i in prompts])
    row = (f"| {b} | {p} | {u} | {mean(kp):.4f} | {mean(ku):.4f} | "
           f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] |")
    if verdict:
        row += (" significantly worse |" if lo > 0 else " significantly better |" if hi < 0
                else " not separated |")
    return row


def run_recall(a, target, out_dir, policies, budgets):
    os.makedirs(out_dir, exist_ok=True)
    tasks = os.path.join(out_dir, "tasks.tsv")
    t0 = time.time()
    runs, meta_path = os.path.join(out_dir, "recall_runs.csv"), os.path.join(out_dir, "recall_meta.json")
    have = set()
    if a.reuse and os.path.exists(runs) and os.path.exists(meta_path) and \
            json.load(open(meta_path))["tasks"] == a.recall_tasks:
        have = {(r["policy"], r["budget"]) for r in csv.DictReader(open(runs, errors="replace"))}
    if all((p, str(b)) in have for p in policies for b in budgets):
        print(f"reusing {out_dir}", flush=True)
    else:
        run([sys.executable, os.path.join(ROOT, "bench/recall/tasks.py"), "--seed", "1", "--count",
             str(a.recall_tasks), "--out", tasks])
        run([os.path.join(a.build, "bench/recall"), f"--target={target}", f"--tasks={tasks}",
             f"--out_dir={out_dir}", "--policies=" + ",".join(policies),
             "--budgets=" + ",".join(map(str, budgets)),
             *([f"--model={a.model}"] if a.model else [])], cwd=ROOT)
    meta = json.load(open(os.path.join(out_dir, "recall_meta.json")))
    seconds = meta.get("grid_seconds", 0) + meta.get("full_cache_seconds", 0) or time.time() - t0
    run([sys.executable, os.path.join(ROOT, "bench/recall/report.py"), out_dir])
    text = open(os.path.join(out_dir, "recall.md")).read()
    text = text.split("\n", 1)[1].strip()  # without its title
    return {"seconds": seconds, "text": text}


def normalised(v):
    v = np.asarray(v, dtype=np.float64)
    return v / v.mean()


def wave_section(wave, profile, costs, recall_weight, plot_path):
    """The report's "measured wave" section (and its plot): per layer the k_ρ demand against the
    sensitivity profile's, with the KL and recall costs alone when the calibration measured a
    recall side (`costs`: the rows of its --layers_csv, or None)."""
    with_recall = bool(costs) and all(r["recall_kl_per_token"] for r in costs) and \
        sum(float(r["recall_kl_per_token"]) for r in costs) > 0
    mixed = with_recall and recall_weight > 0
    plot_profiles(wave, profile, plot_path,
                  [float(r["recall_kl_per_token"]) for r in costs] if with_recall else None,
                  mixed)
    if mixed:
        what = ("the sensitivity profile's demand measured here (KL and recall costs mixed, "
                f"recall weight {recall_weight}; each cost alone in the last columns)")
    elif with_recall:
        what = ("the KL sensitivity measured here (the recall cost, measured beside it with "
                "weight 0, in the last columns)")
    else:
        what = "the KL sensitivity measured here"
    lines = ["\n## The measured wave\n",
             "Per layer, normalised to mean 1 (`wave_vs_sensitivity.png`): k_ρ demand of the "
             f"shipped profile and {what}; Spearman rank correlation "
             f"{spearman(wave['demand'], profile['demand']):+.2f}.\n",
             "| layer | k_ρ demand | sensitivity |"
             + (" KL cost | recall cost | answers kept |" if with_recall else ""),
             "|---|---|---|" + ("---|---|---|" if with_recall else "")]
    kr, se = normalised(wave["demand"]), normalised(profile["demand"])
    if with_recall:
        kc = normalised([float(r["kl_per_token"]) for r in costs])
        rc = normalised([float(r["recall_kl_per_token"]) for r in costs])
    for i, (x, y) in enumerate(zip(kr, se)):
        lines.append(f"| {i} | {x:.2f} | {y:.2f} |" + (
            f" {kc[i]:.2f} | {rc[i]:.2f} | {float(costs[i]['recall_kept']):.2f} |"
            if with_recall else ""))
    return lines


def spearman(x, y):
    rx = np.argsort(np.argsort(x)).astype(np.float64)
    ry = np.argsort(np.argsort(y)).astype(np.float64)
    return float(np.corrcoef(rx, ry)[0, 1])


def plot_profiles(wave, sens, path, recall_cost=None, mixed=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(wave["demand"]))
    ax.plot(x, normalised(wave["demand"]), "o-", label=f"k_ρ demand ({wave['name']})")
    ax.plot(x, normalised(sens["demand"]), "s-",
            label=f"{'sensitivity, KL and recall' if mixed else 'KL sensitivity'} "
                  f"({sens['name']})")
    if recall_cost:
        ax.plot(x, normalised(recall_cost), "^--", label="recall cost alone")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative to the mean layer")
    ax.set_title(f"{sens['model']['name']}: the k_ρ wave against the measured sensitivity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
