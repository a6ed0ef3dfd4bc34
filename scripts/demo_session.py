"""Synthetic decode history for scripts/demo, and a report of what each policy kept.

  demo_session.py make DIR          writes q.npy, k.npy, v.npy, planted.npy into DIR
  demo_session.py report DIR OUT... prints, per output folder, how much of what matters was kept

The history plants "important" tokens per KV head: keys aligned with the direction the recent queries
look in, scattered over an otherwise random 640-token history, so that a good policy has something to
find. The report gives the share of planted tokens kept and the attention mass of the window queries
that the kept set still covers (1.0 = everything the window attends to is still there).
"""
import os
import sys

import numpy as np

L, HQ, HKV, W, D, N, PLANTED = 4, 8, 2, 8, 64, 640, 6


def make(folder):
    rng = np.random.default_rng(2026)
    direction = rng.standard_normal((L, HKV, D))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    group = HQ // HKV
    q = rng.standard_normal((L, HQ, W, D)) * 0.3
    for h in range(HKV):
        q[:, h * group:(h + 1) * group] += 2.5 * direction[:, h, None, None, :]
    k = rng.standard_normal((L, HKV, N, D))
    planted = np.zeros((L, HKV, N), dtype=bool)
    for l in range(L):
        for h in range(HKV):
            idx = rng.choice(N - W, PLANTED, replace=False)
            planted[l, h, idx] = True
            k[l, h, idx] = 16.0 * direction[l, h] + 0.3 * rng.standard_normal((PLANTED, D))
    v = rng.standard_normal((L, HKV, N, D))
    np.save(os.path.join(folder, "q.npy"), q.astype(np.float16))
    np.save(os.path.join(folder, "k.npy"), k.astype(np.float16))
    np.save(os.path.join(folder, "v.npy"), v.astype(np.float16))
    np.save(os.path.join(folder, "planted.npy"), planted)
    print(f"synthetic history: L={L} Hq={HQ} Hkv={HKV} d={D}, {N} tokens per head, "
          f"{PLANTED} planted important tokens per head")


def window_attention(folder):
    q = np.load(os.path.join(folder, "q.npy")).astype(np.float32)
    k = np.load(os.path.join(folder, "k.npy")).astype(np.float32)
    group = HQ // HKV
    att = np.zeros((L, HKV, N))
    for h in range(HKV):
        logits = np.einsum("lgwd,lnd->lgwn", q[:, h * group:(h + 1) * group], k[:, h]) / np.sqrt(D)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        att[:, h] = p.mean(axis=(1, 2))
    return att


def report(folder, outs):
    planted = np.load(os.path.join(folder, "planted.npy"))
    att = window_attention(folder)
    print(f"{'policy':<22}{'kept/head':>10}{'planted kept':>15}{'window attention kept':>24}")
    for out in outs:
        mask = np.load(os.path.join(out, "keep_mask.npy"))
        kept = mask.sum(-1).mean()
        hit = (mask & planted).sum() / planted.sum()
        recall = (att * mask).sum(-1).mean()
        print(f"{os.path.basename(out):<22}{kept:>10.0f}{hit:>14.0%}{recall:>24.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        report(sys.argv[2], sys.argv[3:])
