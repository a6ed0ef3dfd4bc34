"""The same compression event as bench/engine_bench, written in vectorised NumPy (float32), timed in the
same run as the engine, for the ratio the engine issue asks for.

  .venv/bin/python bench/numpy_event.py [build dir]

Geometry: DeepSeek-R1-Distill-Llama-8B (L 32, Hq 32, Hkv 8, d 128), B 512, N 640, window 8; scorers
snapkv and rkv with uniform budgets; medians of 5 runs each.
"""
import json
import subprocess
import sys
import time

import numpy as np

L, HQ, HKV, D, B, N, W = 32, 32, 8, 128, 512, 640, 8
G = HQ // HKV


def event(q, k, scorer):
    cand = N - W
    # [L, Hkv, G*W, cand] window logits, max over the group before the softmax.
    qh = q.reshape(L, HKV, G * W, D)
    logits = (qh @ k[:, :, :cand].transpose(0, 1, 3, 2)) / np.float32(np.sqrt(D))
    logits = logits.reshape(L, HKV, G, W, cand).max(axis=2)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    imp = p.mean(axis=2)
    pad = np.pad(imp, ((0, 0), (0, 0), (3, 3)), constant_values=-np.inf)
    imp = np.max(np.stack([pad[..., i:i + cand] for i in range(7)]), axis=0)
    if scorer == "rkv":
        kn = k / (np.linalg.norm(k, axis=-1, keepdims=True) + np.float32(1e-8))
        s = kn @ kn.transpose(0, 1, 3, 2)
        idx = np.arange(N)
        s[..., idx, idx] = 0
        above = s > 0.5
        last = N - 1 - np.argmax(above[..., ::-1], axis=-1)
        has = above.any(-1)
        li, hi, ri = np.nonzero(has)
        s[li, hi, ri, last[li, hi, ri]] = 0
        col = s.mean(axis=-2)
        r = np.exp(col - col.max(-1, keepdims=True))
        r /= r.sum(-1, keepdims=True)
        score = np.float32(0.1) * imp - np.float32(0.9) * r[..., :cand]
    else:
        score = imp
    top = np.argpartition(-score, B - W - 1, axis=-1)[..., :B - W]
    return np.sort(top, axis=-1)


def median_time(fn, runs=5):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    rng = np.random.default_rng(1)
    q = rng.standard_normal((L, HQ, W, D)).astype(np.float32)
    k = rng.standard_normal((L, HKV, N, D)).astype(np.float32)
    out = subprocess.run([f"{build}/bench/engine_bench", "--benchmark_filter=Llama8b_(snapkv|rkv)_uniform",
                          "--benchmark_repetitions=5", "--benchmark_report_aggregates_only=true",
                          "--benchmark_format=json"], check=True, capture_output=True, text=True)
    engine = {}
    for b in json.loads(out.stdout)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            scorer = "snapkv" if "snapkv" in b["name"] else "rkv"
            engine[scorer] = b["real_time"] / 1e3  # ms -> s
    print(f"{'scorer':<8}{'engine':>12}{'numpy':>12}{'numpy/engine':>14}")
    for scorer in ("snapkv", "rkv"):
        t = median_time(lambda: event(q, k, scorer))
        print(f"{scorer:<8}{engine[scorer] * 1e3:>10.1f}ms{t * 1e3:>10.1f}ms{t / engine[scorer]:>13.1f}x")


if __name__ == "__main__":
    main()
