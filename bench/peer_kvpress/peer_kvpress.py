"""Compares the sidecar's snapkv / pyramid decisions with NVIDIA kvpress's on a small random Llama.

Run through run.sh (throwaway venv with torch, transformers, kvpress):

  bench/peer_kvpress/run.sh [build dir] [--case snapkv,N,B] [--case pyramid,N,B,BETA] [--keep DIR]

For each N it builds a LlamaForCausalLM with random weights (L 4, Hq 8, Hkv 2, d 64 by default), feeds
random hidden states through it under the kvpress press, and records in a forward hook (run before
kvpress's own) what kvpress sees: the post-RoPE keys of the cache and the post-RoPE window queries
(kvpress.utils.get_prerope_query_states + RoPE, as SnapKVPress.compute_window_attention builds them),
plus SnapKVPress.score on the same tensors. kvpress's kept sets are read back from the compressed cache.
It then writes q.npy [L, Hq, window, d] and k.npy [L, Hkv, N, d] (float32) and runs

  reasonalloc compress --budget B [--window W] --pool_kernel 5 --pool_kind avg --gqa_reduce mean_scores
                       --softmax_all_keys [--allocator pyramid --pyramid_beta BETA']

against a server it starts (the CLI takes the window from the queries' shape; --window is passed where
the CLI has it), and prints per layer the budgets of both and the agreement of the kept sets. For snapkv
cases it also runs the spec's form with GQA mean (on logits) and the softmax over the candidates.

Budget mapping: our B counts the window, like kvpress's n_kept = int(N * (1 - compression_ratio)), so
compression_ratio = 1 - B/N, nudged down by ulps until compute_n_kept gives B. PyramidKV: kvpress's
layer budgets run linearly from hi = 2B - lo down to lo = B/beta with the window inside them (hi clipped
to N - window, lo raised to keep the mean B; uniform when lo < window); docs/algorithms.md 3.2 keeps the window
outside (b_l = window + x_l, x from base B - window). Both are linear in l with mean B, so they coincide
when the last layers agree: beta' = (B - window) / (lo - window).
"""
import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from kvpress import PyramidKVPress, SnapKVPress
from kvpress.utils import compute_n_kept, get_prerope_query_states
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import rotate_half

KVPRESS_FLAGS = ("--softmax_all_keys", "--pyramid_beta")  # and --window where the CLI has it


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", default="build")
    p.add_argument("--case", action="append", help="snapkv,N,B or pyramid,N,B,BETA (repeatable)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hq", type=int, default=8)
    p.add_argument("--hkv", type=int, default=2)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--qk_std", type=float, default=0.08, help="std of the random q/k projections")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", help="keep the dumped tensors and decisions here")
    a = p.parse_args()
    a.case = a.case or ["snapkv,300,150", "pyramid,300,150,2", "pyramid,300,151,2", "pyramid,300,160,2",
                        "pyramid,300,150,20", "pyramid,300,100,20", "pyramid,2600,1300,20"]
    return a


def compression_ratio(n, budget):
    cr = (n - budget) / n
    while compute_n_kept(n, cr) < budget:
        cr = math.nextafter(cr, 0.0)
    assert compute_n_kept(n, cr) == budget
    return cr


def kvpress_run(a, n, press):
    """kvpress's decisions on one random model: window queries, keys, scores, kept sets, budgets."""
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=a.hq * a.d, intermediate_size=2 * a.hq * a.d,
                      num_hidden_layers=a.layers, num_attention_heads=a.hq, num_key_value_heads=a.hkv,
                      head_dim=a.d, max_position_embeddings=max(4096, n), attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, a.qk_std)  # peaked attention, far from ties
    rec = {"q": {}, "k": {}, "score": {}}

    def record(module, args, kwargs, output):
        h, w = kwargs["hidden_states"], press.window_size
        cos, sin = kwargs["position_embeddings"]
        q = get_prerope_query_states(module, h[:, -w:])
        q = q * cos[:, -w:].unsqueeze(1) + rotate_half(q) * sin[:, -w:].unsqueeze(1)
        keys = kwargs["past_key_values"].layers[module.layer_idx].keys
        rec["q"][module.layer_idx] = q[0].clone()
        rec["k"][module.layer_idx] = keys[0].clone()
        rec["score"][module.layer_idx] = press.score(module, h, keys, None, output[1], kwargs)[0]

    layers = model.model.layers
    hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in layers]
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(inputs_embeds=torch.randn(1, n, cfg.hidden_size), past_key_values=cache, use_cache=True)
    for hook in hooks:
        hook.remove()
    q = torch.stack([rec["q"][l] for l in range(a.layers)]).numpy()
    k = torch.stack([rec["k"][l] for l in range(a.layers)]).numpy()
    score = torch.stack([rec["score"][l] for l in range(a.layers)]).numpy()
    keep = np.zeros((a.layers, a.hkv, n), bool)
    budgets = np.zeros((a.layers, a.hkv), np.int32)
    for l in range(a.layers):
        kept = cache.layers[l].keys[0]  # [Hkv, n_l, d], rows gathered from the full keys
        dist = torch.cdist(kept, torch.from_numpy(k[l]), compute_mode="donot_use_mm_for_euclid_dist")
        assert float(dist.min(-1).values.max()) == 0.0, "a kept key is not a row of the full keys"
        keep[l, np.arange(a.hkv)[:, None], dist.argmin(-1).numpy()] = True
        budgets[l] = kept.shape[1]
        top = np.argsort(-score[l], axis=-1, kind="stable")[:, :kept.shape[1]]
        assert keep[l][np.arange(a.hkv)[:, None], top].all(), "kept set is not the top of score()"
    return q, k, score, keep, budgets


def kvpress_math(q, k, window, kernel):
    """SnapKVPress.score (snapkv_press.py) restated in NumPy float64, to check the dumped tensors."""
    layers, hq, w, d = q.shape
    hkv, n = k.shape[1:3]
    logits = q.astype(np.float64) @ np.repeat(k, hq // hkv, axis=1).astype(np.float64).swapaxes(-1, -2)
    logits /= math.sqrt(d)
    logits[..., np.arange(n)[None, :] > n - w + np.arange(w)[:, None]] = -np.inf  # causal in the window
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True))[..., : n - w].mean(-2)  # softmax over all N, then slice
    pad = np.pad(p, ((0, 0), (0, 0), (kernel // 2, kernel // 2)))  # zeros, counted in the mean
    pooled = sum(pad[..., i: i + n - w] for i in range(kernel)) / kernel
    return pooled.reshape(layers, hkv, hq // hkv, n - w).mean(2)


def spec_pyramid(layers, budget, window, beta):
    """docs/algorithms.md 3.2 with the rules of 3: rounding that preserves the sum, floor window + 1."""
    base = budget - window
    lo = base / beta
    hi = 2 * base - lo
    x = [hi - l * (hi - lo) / (layers - 1) for l in range(layers)] if layers > 1 else [float(base)]
    caps = [math.floor(v) for v in x]
    for _ in range(layers * base - sum(caps)):
        frac = [v - c if c == math.floor(v) else -1.0 for v, c in zip(x, caps)]
        caps[next(i for i, f in enumerate(frac) if f >= max(frac) - 1e-6)] += 1
    while min(caps) < 1:
        caps[caps.index(min(caps))] += 1
        caps[max(range(layers), key=lambda i: (caps[i], i))] -= 1
    return [window + c for c in caps]


def kvpress_pyramid(n, cr, window, beta):
    """PyramidKVPress.get_layer_budget's branch and its smallest (last-layer) real budget."""
    lo = n * (1 - cr) / beta
    hi = 2 * n * (1 - cr) - lo
    regime = "pyramid"
    if hi >= n - window:
        hi, lo, regime = n - window, 2 * n * (1 - cr) - (n - window), "clipped"
    if not n >= hi >= lo >= window:
        return "fallback", None  # uniform, max(1, round(N (1 - cr))) per layer
    return regime, lo


class Server:
    def __init__(self, build):
        self.dir = tempfile.mkdtemp(prefix="reasonalloc-peer-")
        self.target = f"unix://{self.dir}/sidecar.sock"
        self.cli = f"{build}/client/reasonalloc"
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen([f"{build}/server/reasonalloc-server", "--listen", self.target,
                                      "--metrics_address=", "--log_level", "warn"], stderr=self.log)
        for _ in range(100):
            health = subprocess.run([self.cli, "health", "--target", self.target], capture_output=True)
            if health.returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.log.flush()
        with open(self.log.name) as f:
            log = f.read()
        self.close()
        sys.exit(f"the server did not come up; its log:\n{log}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def cli_flags(cli):
    text = subprocess.run([cli, "--helpfull"], capture_output=True, text=True).stdout
    return {f for f in KVPRESS_FLAGS + ("--window",) if f"{f} (" in text}


def compress(server, qpath, kpath, out, budget, flags):
    cmd = [server.cli, "compress", "--target", server.target, "--queries", qpath, "--keys", kpath,
           "--out", out, "--budget", str(budget), "--scorer", "snapkv"]
    r = subprocess.run(cmd + flags, capture_output=True, text=True)
    if r.returncode != 0:
        return f"reasonalloc compress failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
    return np.load(os.path.join(out, "budgets.npy")), np.load(os.path.join(out, "keep_mask.npy"))


def agreement(name, kv_budgets, kv_keep, ours):
    if isinstance(ours, str):
        print(f"  {name}: {ours}")
        return
    budgets, keep = ours
    budgets = budgets.reshape(kv_budgets.shape)
    inter = (keep & kv_keep).sum(-1)
    jac = inter / (keep | kv_keep).sum(-1)
    same = (keep == kv_keep).all(-1)
    print(f"  {name}:")
    print(f"    {'layer':<7}{'kvpress b':>10}{'ours b':>8}{'b equal':>9}{'sets equal':>12}"
          f"{'Jaccard mean':>14}{'min':>7}")
    for l in range(kv_budgets.shape[0]):
        kvb, ob = ("/".join(map(str, sorted(set(b[l])))) for b in (kv_budgets, budgets))
        print(f"    {l:<7}{kvb:>10}{ob:>8}{str(bool((budgets[l] == kv_budgets[l]).all())):>9}"
              f"{f'{same[l].sum()}/{same.shape[1]}':>12}{jac[l].mean():>14.4f}{jac[l].min():>7.4f}")
    print(f"    all: budgets equal {int((budgets == kv_budgets).sum())}/{budgets.size} heads, kept sets "
          f"equal {int(same.sum())}/{same.size}, Jaccard mean {jac.mean():.4f}, sum of b: kvpress "
          f"{int(kv_budgets.sum())}, ours {int(budgets.sum())}")


def run_case(a, server, missing, has_window, work, case):
    kind, *nums = case.split(",")
    n, budget = int(nums[0]), int(nums[1])
    cr = compression_ratio(n, budget)
    if kind == "pyramid":
        beta = float(nums[2])
        press = PyramidKVPress(compression_ratio=cr, window_size=a.window, kernel_size=a.kernel, beta=beta)
    else:
        press = SnapKVPress(compression_ratio=cr, window_size=a.window, kernel_size=a.kernel)
    q, k, score, kv_keep, kv_budgets = kvpress_run(a, n, press)
    d = os.path.join(work, case.replace(",", "_"))
    os.makedirs(d, exist_ok=True)
    qpath, kpath = os.path.join(d, "q.npy"), os.path.join(d, "k.npy")
    np.save(qpath, q.astype(np.float32))
    np.save(kpath, k.astype(np.float32))
    np.save(os.path.join(d, "kvpress_keep_mask.npy"), kv_keep)
    np.save(os.path.join(d, "kvpress_budgets.npy"), kv_budgets)
    ref = kvpress_math(q, k, a.window, a.kernel)
    err = np.abs(ref - score[..., :-a.window]).max() / np.abs(ref).max()
    print(f"\n{case}: compression_ratio {cr!r} (N(1-cr) = {n * (1 - cr)!r}); the dumped q, k reproduce "
          f"SnapKVPress.score to {err:.1e} (max abs / max)")
    # The CLI takes the window from the queries' shape; --window, where it exists, must agree.
    flags = (["--window", str(a.window)] if has_window else []) + [
        "--pool_kernel", str(a.kernel), "--pool_kind", "avg", "--gqa_reduce", "mean_scores",
        "--softmax_all_keys"]
    if kind == "pyramid":
        regime, lo = kvpress_pyramid(n, cr, a.window, beta)
        print(f"  kvpress pyramid branch: {regime}; per-layer budgets {kv_budgets[:, 0].tolist()}")
        if regime == "fallback":
            print("  (kvpress fell back to uniform budgets: compared with our uniform allocator)")
        else:
            # Both shapes are linear in l with mean B; ours keeps the window outside the shape, so it
            # matches kvpress's real-valued budgets when its last layer does: window + (B - window)/beta'
            # = lo (kvpress's lo after its clip of layer 0 to N - window, if any).
            ours_beta = min(1e6, (budget - a.window) / max(lo - a.window, 1e-300))
            flags += ["--allocator", "pyramid", f"--pyramid_beta={ours_beta!r}"]
            print(f"  docs/algorithms.md 3.2: beta' {ours_beta!r} gives "
                  f"{spec_pyramid(a.layers, budget, a.window, ours_beta)}; kvpress's beta {beta:g} itself "
                  f"gives {spec_pyramid(a.layers, budget, a.window, beta)}")
    if missing:
        agreement("kvpress mode", kv_budgets, kv_keep, f"skipped (the CLI lacks {' '.join(missing)})")
    else:
        ours = compress(server, qpath, kpath, os.path.join(d, "ours"), budget, flags)
        agreement("kvpress mode", kv_budgets, kv_keep, ours)
    if kind == "snapkv":
        ours = compress(server, qpath, kpath, os.path.join(d, "ours_spec"), budget,
                        ["--pool_kernel", str(a.kernel), "--pool_kind", "avg", "--gqa_reduce", "mean"])
        agreement("spec mode (GQA mean on logits, softmax over candidates, avg pool)", kv_budgets, kv_keep,
                  ours)


def main():
    a = parse_args()
    torch.set_num_threads(2)
    work = a.keep or tempfile.mkdtemp(prefix="reasonalloc-peer-dump-")
    os.makedirs(work, exist_ok=True)
    have = cli_flags(f"{a.build}/client/reasonalloc")
    missing = [f for f in KVPRESS_FLAGS if f not in have]
    has_window = "--window" in have
    print(f"torch {torch.__version__}; kvpress SnapKVPress/PyramidKVPress window {a.window}, kernel "
          f"{a.kernel}; model L {a.layers}, Hq {a.hq}, Hkv {a.hkv}, d {a.d}")
    if missing:
        print(f"the CLI lacks {' '.join(missing)}: the kvpress-mode runs are skipped")
    server = Server(a.build)
    try:
        for case in a.case:
            run_case(a, server, missing, has_window, work, case)
    finally:
        server.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
