"""An independent NumPy forward pass of a Llama GGUF model, built on PyPI's `gguf` reader.

It shares nothing with the C++ worker: the tensors are dequantised by `gguf.quants`, the Q and K
projections are un-permuted back to the Hugging Face layout, and RoPE is applied the Hugging Face
way (rotate_half over the two halves of each head), so a mistake in the worker's reading of the
file's conventions shows up as a difference.
"""
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class NumpyLlama:
    def __init__(self, path):
        r = GGUFReader(path)
        f = lambda k: r.fields[k].contents()
        self.layers = int(f("llama.block_count"))
        self.embd = int(f("llama.embedding_length"))
        self.hq = int(f("llama.attention.head_count"))
        self.hkv = int(f("llama.attention.head_count_kv"))
        self.theta = float(f("llama.rope.freq_base"))
        self.eps = float(f("llama.attention.layer_norm_rms_epsilon"))
        self.d = self.embd // self.hq
        self.t = {}
        for t in r.tensors:
            w = dequantize(t.data, t.tensor_type).astype(np.float32)
            self.t[t.name] = w.reshape([int(x) for x in reversed(t.shape.tolist())])

    def _unpermute(self, w, heads):
        # llama.cpp's converter permuted HF's [heads*d, in] rows as
        # reshape(heads, 2, d/2, in).swapaxes(1, 2); undo it.
        out_dim, in_dim = w.shape
        return w.reshape(heads, self.d // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)

    def _rms(self, x, w):
        return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps).astype(np.float32) * w

    def _rope(self, x, pos):
        # x: [T, heads, d]; HF rotate_half over the halves.
        half = self.d // 2
        inv = self.theta ** (-np.arange(0, half, dtype=np.float64) * 2 / self.d)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, None, :].astype(np.float32)
        sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, None, :].astype(np.float32)
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

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
            wq = self._unpermute(self.t[p + "attn_q.weight"], self.hq)
            wk = self._unpermute(self.t[p + "attn_k.weight"], self.hkv)
            q = self._rope((h @ wq.T).reshape(T, self.hq, self.d), pos)
            k = self._rope((h @ wk.T).reshape(T, self.hkv, self.d), pos)
            v = (h @ self.t[p + "attn_v.weight"].T).reshape(T, self.hkv, self.d)
            k = np.repeat(k, g, axis=1)
            v = np.repeat(v, g, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(self.d) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", s, v).reshape(T, self.embd)
            x = x + o @ self.t[p + "attn_output.weight"].T
            h = self._rms(x, self.t[p + "ffn_norm.weight"])
            a = h @ self.t[p + "ffn_gate.weight"].T
            u = h @ self.t[p + "ffn_up.weight"].T
            x = x + (a / (1 + np.exp(-a)) * u) @ self.t[p + "ffn_down.weight"].T
        x = self._rms(x, self.t["output_norm.weight"])
        out = self.t.get("output.weight", self.t["token_embd.weight"])
        return x @ out.T
