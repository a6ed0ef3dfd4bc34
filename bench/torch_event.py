"""The compression event of bench/numpy_event.py written in plain PyTorch the way R-KV's code writes it
(CPU, float32, 2 threads), timed in the same run as the engine. It needs torch: the venv of
scripts/torch-venv (created outside the repository).

  "$(scripts/torch-venv)"/bin/python bench/torch_event.py [build dir]

Geometry: DeepSeek-R1-Distill-Llama-8B (L 32, Hq 32, Hkv 8, d 128), B 512, N 640, window 8; scorers
snapkv and rkv with uniform budgets; medians of 5 runs each. Before timing, it checks on a small random
case (with near-duplicate keys) that its kept sets equal those of numpy_event.event.
"""
import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_event  # noqa: E402

KERNEL, LAMBDA, THRESHOLD = 7, 0.1, 0.5


def window_importance(q, k, window):
    """R-KV's compute_attention_scores (GQA max over the group, on logits) and snapkv importance."""
    layers, hq, w, d = q.shape
    hkv = k.shape[1]
    logits = torch.matmul(q.view(layers, hkv, hq // hkv, w, d), k.unsqueeze(2).transpose(3, 4))
    logits = (logits / math.sqrt(d)).max(dim=2).values
    p = F.softmax(logits[..., -window:, :-window], dim=-1, dtype=torch.float32).mean(dim=-2)
    return F.max_pool1d(p, kernel_size=KERNEL, padding=KERNEL // 2, stride=1)


def redundancy(k):
    """R-KV's cal_similarity (retain_direction "last") over all N keys of each head."""
    n = k.shape[-2]
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    s = torch.matmul(kn, kn.transpose(-1, -2))
    s.diagonal(dim1=-2, dim2=-1).zero_()
    mask = s > THRESHOLD
    last = torch.where(mask, torch.arange(n), 0).max(dim=-1, keepdim=True).values
    # R-KV scatters 0 at `last` in every row, so a row without a near-duplicate zeroes S[i, 0];
    # docs/algorithms.md 2.4 (and numpy_event.py) only touch rows that have one.
    s.scatter_(-1, last, s.gather(-1, last) * ~mask.any(dim=-1, keepdim=True))
    return s.mean(dim=-2).softmax(dim=-1)


def scores(q, k, scorer, window):
    score = window_importance(q, k, window)
    if scorer == "rkv":
        score = score * LAMBDA - redundancy(k)[..., :-window] * (1 - LAMBDA)
    return score


def event(q, k, scorer, budget, window):
    return scores(q, k, scorer, window).topk(budget - window, dim=-1).indices.sort(dim=-1).values


@contextlib.contextmanager
def numpy_geometry(**geometry):
    """numpy_event.event reads its geometry from module globals."""
    old = {name: getattr(numpy_event, name) for name in geometry}
    for name, value in geometry.items():
        setattr(numpy_event, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(numpy_event, name, value)


def check_against_numpy():
    g = dict(L=2, HQ=8, HKV=2, G=4, D=32, N=96, B=40, W=8)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((g["L"], g["HQ"], g["W"], g["D"])).astype(np.float32)
    k = rng.standard_normal((g["L"], g["HKV"], g["N"], g["D"])).astype(np.float32)
    src = rng.integers(0, g["N"], size=24)  # near-duplicates, so the retain-last rule matters
    dst = rng.integers(0, g["N"], size=24)
    k[:, :, dst] = k[:, :, src] + np.float32(0.3) * rng.standard_normal(k[:, :, src].shape, np.float32)
    tied = {}
    for scorer in ("snapkv", "rkv"):
        with numpy_geometry(**g):
            want = numpy_event.event(q, k, scorer)
        s = scores(torch.from_numpy(q), torch.from_numpy(k), scorer, g["W"])
        top = s.topk(g["B"] - g["W"], dim=-1)
        kept = np.zeros(s.shape, bool), np.zeros(s.shape, bool)
        np.put_along_axis(kept[0], top.indices.numpy(), True, axis=-1)
        np.put_along_axis(kept[1], want, True, axis=-1)
        # Max pooling makes plateaus of equal scores; neither top-k orders ties, so the two may
        # keep different members of a tie that straddles the cut-off, and nothing else.
        differ = kept[0] != kept[1]
        if (differ & (s.numpy() != top.values[..., -1:].numpy())).any():
            sys.exit(f"check: {scorer} kept sets differ from numpy_event.py beyond ties")
        tied[scorer] = int(differ.any(-1).sum())
    print("check: kept sets equal numpy_event.py's up to ties at the cut-off (L 2, Hq 8, Hkv 2, d 32, "
          f"N 96, B 40; heads differing inside a tie: snapkv {tied['snapkv']}/4, rkv {tied['rkv']}/4)")


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build"
    torch.set_num_threads(2)
    check_against_numpy()
    ne = numpy_event
    rng = np.random.default_rng(1)
    q = rng.standard_normal((ne.L, ne.HQ, ne.W, ne.D)).astype(np.float32)
    k = rng.standard_normal((ne.L, ne.HKV, ne.N, ne.D)).astype(np.float32)
    qt, kt = torch.from_numpy(q), torch.from_numpy(k)
    out = subprocess.run([f"{build}/bench/engine_bench", "--benchmark_filter=Llama8b_(snapkv|rkv)_uniform",
                          "--benchmark_repetitions=5", "--benchmark_report_aggregates_only=true",
                          "--benchmark_format=json"], check=True, capture_output=True, text=True)
    engine = {}
    for b in json.loads(out.stdout)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            engine["snapkv" if "snapkv" in b["name"] else "rkv"] = b["real_time"] / 1e3  # ms -> s
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'scorer':<8}{'engine':>10}{'numpy':>10}{'torch':>10}{'torch/engine':>14}")
    for scorer in ("snapkv", "rkv"):
        tn = ne.median_time(lambda: ne.event(q, k, scorer))
        tt = ne.median_time(lambda: event(qt, kt, scorer, ne.B, ne.W))
        e = engine[scorer]
        print(f"{scorer:<8}{e * 1e3:>8.1f}ms{tn * 1e3:>8.1f}ms{tt * 1e3:>8.1f}ms{tt / e:>13.1f}x")


if __name__ == "__main__":
    main()
