"""Prints scripts/demo's comparison of a full-cache run and a run through the sidecar.

  demo_report.py FULL.json SIDECAR.json PROFILE_DIR

The JSON files are `reasonalloc-worker generate --json` lines; PROFILE_DIR holds the layer
profiles the sidecar was given, of which the one named after the model that ran is drawn (its
per-layer demand, the Reasoning Wave).
"""
import json
import os
import sys


def load(path):
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8", errors="replace"))


def main():
    full, side = load(sys.argv[1]), load(sys.argv[2])
    # The layer profile of the model that ran, if the sidecar has one.
    path = os.path.join(sys.argv[3], f"{side['model_name']}.json")
    profile = load(path) if os.path.exists(path) else {"demand": []}
    print("-- answer through the sidecar --")
    print(side["text"].strip())
    print("-- answer with the full cache --")
    print(full["text"].strip())
    print()
    a, b = full["generated"], side["generated"]
    n = min(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    print(f"agreement with the full-cache run: {same}/{n} tokens at the same positions "
          f"({100.0 * same / max(n, 1):.1f}%); first divergence: "
          f"{'none' if first is None else f'generated token {first}'}"
          f" (lengths {len(a)} and {len(b)})")
    print(f"KV memory held: peak {side['peak_kv_bytes'] / 2**20:.2f} MiB through the sidecar vs "
          f"{side['full_kv_bytes'] / 2**20:.2f} MiB for the full cache of the same sequence "
          f"({100.0 * side['peak_kv_bytes'] / side['full_kv_bytes']:.1f}%)")
    print(f"speed: {full['tokens_per_second']:.1f} tokens/s full cache, "
          f"{side['tokens_per_second']:.1f} tokens/s through the sidecar "
          f"({side['events']} compression events, {side['compress_seconds']:.2f} s in Compress, "
          f"{100.0 * side['compress_seconds'] / side['seconds']:.1f}% of the run)")
    budgets = side.get("layer_budgets", [])
    wave = profile["demand"]
    if not budgets or len(wave) != len(budgets):
        return
    print()
    print("per-layer budgets after the last event (mean over kv heads; # = 4 tokens) "
          "and the Reasoning Wave's demand D:")
    top = max(budgets)
    for layer, (b_l, d) in enumerate(zip(budgets, wave)):
        bar = "#" * int(round(b_l / 4))
        print(f"  layer {layer:2d} {b_l:6.1f} {bar:<{int(top / 4) + 1}} D={d:4.2f}")


if __name__ == "__main__":
    main()
