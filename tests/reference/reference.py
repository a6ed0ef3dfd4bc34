"""An independent NumPy implementation of the scorers, allocators and selection of docs/algorithms.md.

Written from the specification (float64 throughout), not from the C++ engine, so that the two can be
compared: tests/reference/test_reference.py runs both on random and adversarial configurations.
"""
import math

import numpy as np


# ---------------------------------------------------------------- scorers (§2)

def pool1d(x, kernel, pool):
    """Stride 1, padding kernel // 2: max ignores the padding, avg counts it as zeros."""
    r = kernel // 2
    padded = np.concatenate([np.full(r, -np.inf if pool == "max" else 0.0), x,
                             np.full(r, -np.inf if pool == "max" else 0.0)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel)
    return windows.max(axis=1) if pool == "max" else windows.sum(axis=1) / kernel


def softmax_rows(logits, visible):
    """Softmax of each row a over its first visible[a] entries; the rest get 0."""
    p = np.zeros_like(logits)
    for a, v in enumerate(visible):
        row = logits[..., a, :v]
        e = np.exp(row - row.max(axis=-1, keepdims=True))
        p[..., a, :v] = e / e.sum(axis=-1, keepdims=True)
    return p


def snapkv(q, k, window, kernel=7, pool="max", gqa="max", all_keys=False):
    """q: [G, window, d] window queries of one KV head's group; k: [n, d]. Returns [n - window].

    gqa "max"/"mean" reduce the group's logits before the softmax; "mean_scores" averages the
    pooled per-query-head scores. all_keys: softmax over every key the window query sees (causal),
    else over the candidates only."""
    n, d = k.shape
    cand = n - window
    if cand <= 0:
        return np.zeros(0)
    cols = n if all_keys else cand
    logits = np.einsum("gad,jd->gaj", q, k[:cols]) / math.sqrt(d)
    visible = [cand + a + 1 if all_keys else cand for a in range(window)]
    if gqa == "mean_scores":
        p = softmax_rows(logits, visible)[:, :, :cand].mean(axis=1)  # [G, cand]
        return np.mean([pool1d(p[g], kernel, pool) for g in range(q.shape[0])], axis=0)
    logits = logits.max(axis=0) if gqa == "max" else logits.mean(axis=0)
    imp = softmax_rows(logits, visible)[:, :cand].mean(axis=0)
    return pool1d(imp, kernel, pool)


def window_attention(q, k, first_row=0):
    """H2O's per-event addition for one head: the group-mean softmax attention of window rows
    first_row.. (row a is the query at position n - window + a, causal). Returns [n]."""
    n, d = k.shape
    G, window, _ = q.shape
    acc = np.zeros(n)
    for a in range(first_row, window):
        pos = n - window + a
        if pos < 0:
            continue
        logits = q[:, a] @ k[:pos + 1].T / math.sqrt(d)  # [G, pos + 1]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        acc[:pos + 1] += (e / e.sum(axis=1, keepdims=True)).mean(axis=0)
    return acc


def streaming(n, window):
    cand = max(0, n - window)
    # Age from the head's end, so that heads of different lengths compare by recency.
    return np.array([float(j - (n - 1)) for j in range(cand)])


SINK_SCORE, RECENT_SCORE = 2.0 ** 25, 2.0 ** 24


def protect(scores, n, window, sinks, recent):
    """The always-kept rows above every scorer's scores: the first `sinks` rows, then rows younger
    than `recent` (newer first)."""
    s = np.array(scores, dtype=np.float64)
    cand = len(s)
    for j in range(max(0, n - recent), cand):
        s[j] = RECENT_SCORE - (n - 1 - j)
    s[:min(sinks, cand)] = SINK_SCORE
    return s


def rkv(q, k, window, lam=0.1, threshold=0.5, **snap):
    n, _ = k.shape
    cand = n - window
    if cand <= 0:
        return np.zeros(0)
    imp = snapkv(q, k, window, **snap)
    kn = k / (np.linalg.norm(k, axis=1, keepdims=True) + 1e-8)
    s = kn @ kn.T
    np.fill_diagonal(s, 0.0)
    for i in range(n):
        above = np.nonzero(s[i] > threshold)[0]
        if above.size:
            s[i, above.max()] = 0.0
    col = s.mean(axis=0)
    red = np.exp(col - col.max())
    red /= red.sum()
    return lam * imp - (1 - lam) * red[:cand]


# ---------------------------------------------------------------- common rules (§3)

def round_preserving_sum(x, total):
    x = np.asarray(x, dtype=np.float64)
    out = np.floor(x).astype(np.int64)
    frac = np.rint((x - np.floor(x)) * 1e6).astype(np.int64)
    order = sorted(range(len(x)), key=lambda i: (-frac[i], i))
    k = 0
    while out.sum() < total:
        out[order[k % len(x)]] += 1
        k += 1
    return out


def selectable_floor(units):
    units = list(units)
    n = len(units)
    for i in range(n):
        while units[i] < 1:
            others = [j for j in range(n) if j != i]
            if not others:
                break
            giver = max(others, key=lambda j: (units[j], j))  # ties: the higher index gives
            if units[giver] <= 1:
                break
            units[giver] -= 1
            units[i] += 1
    return np.array(units, dtype=np.int64)


def robustify(demand, total, p, lo, hi):
    w = (np.asarray(demand, dtype=np.float64) + 1e-6) ** p
    # Bisection on λ: Σ clip(λ w, lo, hi) is continuous and non-decreasing.
    a, b = 0.0, hi / w.min() + 1.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if np.clip(m * w, lo, hi).sum() < total:
            a = m
        else:
            b = m
    x = np.clip(b * w, lo, hi)
    free = np.nonzero((x > lo) & (x < hi))[0]
    if free.size:
        x[free[0]] += total - x.sum()
    return round_preserving_sum(x, total)


def cap_and_redistribute(units, caps, weights):
    units = np.array(units, dtype=np.int64)
    while True:
        freed = int(np.maximum(units - caps, 0).sum())
        units = np.minimum(units, caps)
        if freed == 0:
            return units
        open_ = [i for i in range(len(units)) if units[i] < caps[i]]
        if not open_:
            return units
        wsum = sum(weights[i] for i in open_)
        share = [freed * weights[i] / wsum if wsum > 0 else freed / len(open_) for i in open_]
        add = round_preserving_sum(share, freed)
        for i, a in zip(open_, add):
            units[i] += a


# ---------------------------------------------------------------- allocators (§3)

def layer_budgets(name, L, B, window, beta=20.0, demand=None, mode="full", gamma=0.5,
                  clip=(0.25, 2.0)):
    base = B - window
    caps = np.full(L, base, dtype=np.int64)
    if name == "pyramid":
        min_n = base / beta
        max_n = 2 * base - min_n
        x = [max_n - l * (max_n - min_n) / (L - 1) for l in range(L)] if L > 1 else [base]
        caps = selectable_floor(round_preserving_sum(x, L * base))
    elif name == "reasonalloc" and demand is not None and mode in ("layer", "full", "static"):
        d = np.asarray(demand, dtype=np.float64)
        d = d * L / d.sum()
        caps = selectable_floor(robustify(d, L * base, gamma, clip[0] * base, clip[1] * base))
    return window + caps


def normalise_heads(head_demand, L, H):
    """A profile's head_demand as the server stores it: each layer over its largest entry, then
    to mean 1 (a layer of zeros to ones)."""
    d = np.asarray(head_demand, dtype=np.float64).reshape(L, H).copy()
    for l in range(L):
        m = d[l].max()
        d[l] = d[l] / m if m > 0 else 1.0
        d[l] *= H / d[l].sum()
    return d


def allocate(name, scores, lengths, L, H, B, window, floor_a=0.2, mode="full", beta=0.5, mu=0.25,
             demand=None, head_demand=None):
    """scores: list of L*H arrays of candidate scores. Returns [L*H] budgets. mode "static"
    splits each layer by head_demand ([L*H], as put in the profile) instead of the scores."""
    heads_d = normalise_heads(head_demand, L, H) if mode == "static" else None
    layers = layer_budgets(name, L, B, window, demand=demand, mode=mode)
    out = np.zeros(L * H, dtype=np.int64)
    for l in range(L):
        heads = range(l * H, (l + 1) * H)
        cap = layers[l] - window
        total = H * cap
        cand = np.array([len(scores[i]) for i in heads], dtype=np.int64)
        if name == "adakv":
            pool = [(-scores[i][j], h, j) for h, i in enumerate(heads) for j in range(cand[h])]
            if len(pool) <= total:
                out[l * H:(l + 1) * H] = window + cand
                continue
            pool.sort()
            count = np.zeros(H)
            for _, h, _ in pool[:total]:
                count[h] += 1
            x = count * (1 - floor_a) + floor_a * cap
            units = selectable_floor(round_preserving_sum(x, total))
            out[l * H:(l + 1) * H] = window + cap_and_redistribute(units, cand, x)
        elif name == "reasonalloc" and mode in ("head", "full", "static"):
            if mode == "static":
                r = heads_d[l]
            else:
                pool = np.concatenate([scores[i] for i in heads]) if cand.sum() else np.zeros(0)
                tau = -np.inf if pool.size < total else np.sort(pool)[::-1][total - 1]
                r = np.array([np.count_nonzero(scores[i] >= tau) for i in heads],
                             dtype=np.float64)
            w = (r + 1e-6) ** beta
            c = robustify(r, total, beta, mu * cap, total)
            units = selectable_floor(c)
            out[l * H:(l + 1) * H] = window + cap_and_redistribute(units, cand, w)
        else:
            out[l * H:(l + 1) * H] = layers[l]
    return out


# ---------------------------------------------------------------- selection (§1, §4)

def select(scores, n, budget, window):
    if n <= budget:
        return list(range(n))
    k = budget - window
    order = sorted(range(n - window), key=lambda j: (-scores[j], j))
    return sorted(order[:k]) + list(range(n - window, n))
