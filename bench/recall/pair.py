#!/usr/bin/env python3
"""Paired recall differences between named policies of one recall run.

  .venv/bin/python bench/recall/pair.py RESULTS_DIR FIRST:SECOND [FIRST:SECOND ...]

For each pair and each budget both ran at: recall(first) − recall(second) over the tasks the full
cache answers (both ran on the same ones), with its 95 % paired bootstrap interval over tasks
(report.py's paired_interval); positive = the first keeps more answers. Prints a Markdown table.
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
    path = os.path.join(sys.argv[1], "recall_runs.csv")
    correct = defaultdict(dict)  # (policy, budget) -> {task: 0 or 1}
    for r in csv.DictReader(open(path, encoding="utf-8", errors="replace")):
        if r["policy"] != "full":
            correct[(r["policy"], int(r["budget"]))][r["task"]] = int(r["correct"])
    budgets = sorted({b for _, b in correct})
    print("| budget | first | second | recall first | recall second | difference [95 %] |")
    print("|---|---|---|---|---|---|")
    for pair in sys.argv[2:]:
        first, second = pair.split(":", 1)
        if not any((first, b) in correct for b in budgets) or \
                not any((second, b) in correct for b in budgets):
            sys.exit(f"{pair}: a policy that is not in {path}")
        for b in budgets:
            a, c = correct.get((first, b)), correct.get((second, b))
            if not a or not c:
                continue
            tasks = sorted(set(a) & set(c))
            d, lo, hi = paired_interval([a[t] for t in tasks], [c[t] for t in tasks])
            print(f"| {b} | {first} | {second} | {sum(a[t] for t in tasks) / len(tasks):.2f} | "
                  f"{sum(c[t] for t in tasks) / len(tasks):.2f} | "
                  f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] |")


if __name__ == "__main__":
    main()
