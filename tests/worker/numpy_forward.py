"""An independent NumPy forward pass of a Llama-family GGUF model (`llama`, `qwen2`), built on
PyPI's `gguf` reader and dequantiser.

It shares nothing with the C++ worker: tensors are dequantised by `gguf.quants`, and the file's
conventions are undone the Hugging Face way, so a mistake in the worker's reading of them shows up
as a difference:

- `llama`: the converter permuted the Q and K rows for llama.cpp's adjacent-pair ("normal") RoPE;
  they are un-permuted back to Hugging Face's layout and RoPE is applied as Hugging Face does
  (rotate_half over the two halves of each head); optional `rope_freqs.weight` divides the
  frequencies (llama.cpp's freq_factors);
- `qwen2`: the converter leaves Q and K as Hugging Face has them (llama.cpp runs NEOX RoPE), so
  rotate_half applies directly; Q, K and V have biases;
- the output head is `output.weight` when the file has one, the token embeddings otherwise.
"""
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ARCHITECTURES = ("llama", "qwen2")


class NumpyForward:
    def __init__(self, path):
        r = GGUFReader(path)
        f = lambda k: r.fields[k].contents()
        self.arch = f("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"architecture {self.arch} is not one this reference implements")
        a = self.arch + "."
        self.layers = int(f(a + "block_count"))
        self.embd = int(f(a + "embedding_length"))
        self.hq = int(f(a + "attention.head_count"))
        self.hkv = int(f(a + "attention.head_count_kv"))
        self.theta = float(f(a + "rope.freq_base")) if a + "rope.freq_base" in r.fields else 1e4
        self.eps = float(f(a + "attention.layer_norm_rms_epsilon"))
        self.d = self.embd // self.hq
        self.t = {}
        for t in r.tensors:
            w = dequantize(t.data, t.tensor_type).astype(np.float32)
            self.t[t.name] = w.reshape([int(x) for x in reversed(t.shape.tolist())])

    def _unpermute(self, w, heads):
        # llama.cpp's converter permuted HF's [heads*d, ...] rows as
        # reshape(heads, 2, d/2, ...).swapaxes(1, 2); undo it (a bias is a 1-column matrix).
        shape = w.shape
        w = w.reshape(shape[0], -1)
        w = w.reshape(heads, self.d // 2, 2, w.shape[1]).swapaxes(1, 2)
        return w.reshape(shape)

    def _rms(self, x, w):
        ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
        return x / np.sqrt(ms + self.eps).astype(np.float32) * w

    def _rope(self, x, pos):
        # x: [T, heads, d]; Hugging Face's rotate_half over the two halves of each head.
        half = self.d // 2
        inv = self.theta ** (-np.arange(0, half, dtype=np.float64) * 2 / self.d)
        if "rope_freqs.weight" in self.t:
            inv = inv / self.t["rope_freqs.weight"].astype(np.float64)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, None, :].astype(np.float32)
        sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, None, :].astype(np.float32)
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def _proj(self, h, p, name, heads=None):
        w = self.t[p + name + ".weight"]
        b = self.t.get(p + name + ".bias")
        if heads is not None and self.arch == "llama":
            w = self._unpermute(w, heads)
            b = None if b is None else self._unpermute(b, heads)
        y = h @ w.T
        return y if b is None else y + b

    def logits(self, tokens):
        tokens = np.asarray(tokens)
        T = len(tokens)
        pos = np.arange(T)
        x = self.t["token_embd.weight"][tokens]
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        g = self.hq // self.hkv
        for l in range(self.layers):
            p = f"blk.{l}."
            h = self._rms(x, self.t[p + "attn_norm.weight"])
            q = self._rope(self._proj(h, p, "attn_q", self.hq).reshape(T, self.hq, self.d), pos)
            k = self._rope(self._proj(h, p, "attn_k", self.hkv).reshape(T, self.hkv, self.d), pos)
            v = self._proj(h, p, "attn_v").reshape(T, self.hkv, self.d)
            k = np.repeat(k, g, axis=1)
            v = np.repeat(v, g, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(self.d) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", s, v).reshape(T, self.embd)
            x = x + self._proj(o, p, "attn_output")
            h = self._rms(x, self.t[p + "ffn_norm.weight"])
            a = h @ self.t[p + "ffn_gate.weight"].T
            u = h @ self.t[p + "ffn_up.weight"].T
            x = x + (a / (1 + np.exp(-a)) * u) @ self.t[p + "ffn_down.weight"].T
        x = self._rms(x, self.t["output_norm.weight"])
        out = self.t.get("output.weight", self.t["token_embd.weight"])
        return x @ out.T
