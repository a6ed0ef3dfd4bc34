#!/usr/bin/env python3
"""Paired KL differences between named policies of one fidelity grid.

  .venv/bin/python bench/fidelity/pair.py GRID_DIR FIRST:SECOND [FIRST:SECOND ...]

For each pair and each budget both ran at: the mean over prompts of KL(first) − KL(second)
(teacher-forced, nats per token) with its 95 % paired bootstrap interval (bench/fidelity/report.py's
paired_interval); negative = the first lower. Prints a Markdown table.
"""
import csv
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import paired_interval  # noqa: E402


def main():
    if len(sys.argv) < 3 or any(":" not in p for p in sys.argv[2:]):
        sys.exit(__doc__.strip())
    kl = defaultdict(dict)  # (policy, budget) -> {prompt: kl}
    for r in csv.DictReader(open(os.path.join(sys.argv[1], "fidelity_runs.csv"))):
        if r["run"] == "forced":
            kl[(r["policy"], int(r["budget"]))][r["prompt"]] = float(r["kl_mean"])
    budgets = sorted({b for _, b in kl})
    print("| budget | first | second | KL first | KL second | difference [95 %] |")
    print("|---|---|---|---|---|---|")
    for pair in sys.argv[2:]:
        first, second = pair.split(":", 1)
        if not any((first, b) in kl for b in budgets) or not any((second, b) in kl for b in budgets):
            sys.exit(f"{pair}: a policy that is not in {sys.argv[1]}/fidelity_runs.csv")
        for b in budgets:
            a, c = kl.get((first, b)), kl.get((second, b))
            if not a or not c:
                continue
            prompts = sorted(set(a) & set(c), key=int)
            d, lo, hi = paired_interval([a[p] for p in prompts], [c[p] for p in prompts])
            print(f"| {b} | {first} | {second} | {sum(a[p] for p in prompts) / len(prompts):.4f} | "
                  f"{sum(c[p] for p in prompts) / len(prompts):.4f} | "
                  f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}] |")


if __name__ == "__main__":
    main()
