"""The compression event of bench/gpu_event_bench.cc written in plain PyTorch on the same GPU, the
way R-KV's and AdaKV's code write it (batched tensor ops, fp32 math on an fp16 cache), timed with
CUDA events: the baseline the CUDA backend's ratio is taken against. tests/gpu/device_check.sh runs
both in one run.

  python3 bench/torch_gpu_event.py [--batches 1,64] [--reps 20] [--json out.json]

Geometry: Llama-8B (L 32, Hq 32, Hkv 8, d 128), fp16, B 512, N 640, window 8. Each timed event
ends with the kept indices on the host, as a CompressBatch does.
  snapkv/uniform  window logits, GQA max, softmax over the candidates, window mean, max-pool 7,
                  per-head top-k
  rkv/uniform     plus R-KV's redundancy (normalised-key Gram matrix, threshold 0.5, retain last,
                  column means, softmax) mixed with λ 0.1
  rkv/adakv       rkv scores; the layer's heads pooled (top-k over the flattened layer), per-head
                  counts, budgets a·cap + (1 − a)·count (floor 0.2), per-head selection by rank
"""
import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

L, HQ, HKV, D, B, N, W = 32, 32, 8, 128, 512, 640, 8
KERNEL, LAMBDA, THRESHOLD, FLOOR = 7, 0.1, 0.5, 0.2


def importance(q, k):
    s, layers, hkv, n, d = k.shape
    g = HQ // HKV
    logits = torch.matmul(q.view(s, layers, hkv, g, W, d).float(),
                          k.float().unsqueeze(3).transpose(-1, -2)) / math.sqrt(d)
    logits = logits.max(dim=3).values  # [S, L, Hkv, W, N]
    p = F.softmax(logits[..., : n - W], dim=-1).mean(dim=-2)
    return F.max_pool1d(p.view(-1, 1, n - W), KERNEL, 1, KERNEL // 2).view(s, layers, hkv, n - W)


def redundancy(k):
    n = k.shape[-2]
    kf = k.float()
    kn = kf / (kf.norm(dim=-1, keepdim=True) + 1e-8)
    sim = torch.matmul(kn, kn.transpose(-1, -2))
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    mask = sim > THRESHOLD
    last = torch.where(mask, torch.arange(n, device=k.device), 0).max(dim=-1, keepdim=True).values
    sim.scatter_(-1, last, sim.gather(-1, last) * ~mask.any(dim=-1, keepdim=True))
    return sim.mean(dim=-2).softmax(dim=-1)


def event(q, k, scorer, allocator):
    score = importance(q, k)
    if scorer == "rkv":
        score = LAMBDA * score - (1 - LAMBDA) * redundancy(k)[..., : N - W]
    cap = B - W
    if allocator == "uniform":
        kept = score.topk(cap, dim=-1).indices.sort(dim=-1).values
        return kept.cpu()
    s = score.shape[0]
    flat = score.reshape(s, L, HKV * (N - W))
    top = flat.topk(HKV * cap, dim=-1).indices // (N - W)
    counts = F.one_hot(top, HKV).sum(dim=-2).float()  # [S, L, Hkv]
    budgets = (FLOOR * cap + (1 - FLOOR) * counts).floor().clamp(max=N - W).long()
    order = score.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(N - W, device=k.device).expand_as(order))
    keep = rank < budgets.unsqueeze(-1)
    return keep.cpu()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("torch_gpu_event: no GPU visible to PyTorch; nothing to measure")
        return
    dev = torch.device("cuda:0")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    gen = torch.Generator(device=dev).manual_seed(1)
    results = []
    print(f"{'scorer/allocator':22s} {'batch':>6s} {'median us':>11s} {'p10 us':>11s} {'p90 us':>11s}")
    for batch in [int(b) for b in args.batches.split(",")]:
        k = torch.randn(batch, L, HKV, N, D, device=dev, generator=gen).half()
        q = torch.randn(batch, L, HQ, W, D, device=dev, generator=gen).half()
        for scorer, allocator in [("snapkv", "uniform"), ("rkv", "uniform"), ("rkv", "adakv")]:
            times = []
            for r in range(args.reps + 3):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                event(q, k, scorer, allocator)
                end.record()
                end.synchronize()
                if r >= 3:
                    times.append(start.elapsed_time(end) * 1e3)
            times.sort()
            med = statistics.median(times)
            p10 = times[int(0.1 * (len(times) - 1))]
            p90 = times[int(0.9 * (len(times) - 1))]
            print(f"{scorer + '/' + allocator:22s} {batch:6d} {med:11.1f} {p10:11.1f} {p90:11.1f}",
                  flush=True)
            results.append({"scorer": scorer, "allocator": allocator, "batch": batch,
                            "median_us": med, "p10_us": p10, "p90_us": p90})
        del k, q
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
