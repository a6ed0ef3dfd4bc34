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
  model of scripts/setup; the Qwen2.5-Coder-1.5B-Instruct Q4_K_M and Gemma 3 270M Q4_K_M files of
  scripts/fetch-model, or REASONALLOC_KQUANT_GGUF): skipped with the reason otherwise.

- a llama file with a SentencePiece vocabulary through tokenize, logits and generate (its [INST]
  template and --raw); calibrate on it and generate through a sidecar with the profile it wrote.

Binaries come from REASONALLOC_WORKER_BINARY, REASONALLOC_GGUF_DEQUANT_TOOL,
REASONALLOC_SERVER_BINARY and REASONALLOC_CLIENT_BINARY (set by ctest).
"""
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

sys.path.insert(0, os.path.dirname(__file__))
from numpy_forward import NumpyForward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.environ.get("REASONALLOC_WORKER_BINARY", "build/worker/reasonalloc-worker")
TOOL = os.environ.get("REASONALLOC_GGUF_DEQUANT_TOOL", "build/tests/gguf_dequant_tool")
SERVER = os.environ.get("REASONALLOC_SERVER_BINARY", "build/server/reasonalloc-server")
CLIENT = os.environ.get("REASONALLOC_CLIENT_BINARY", "build/client/reasonalloc")

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


# A SentencePiece vocabulary (tokenizer.ggml.model "llama"): control tokens, the 256 byte-fallback
# tokens <0xNN>, a few scored pieces with the U+2581 leading-space convention, padded to V.
SPM_PIECES = [("▁", -1.0), ("a", -1.0), ("b", -1.0), ("c", -1.0), ("h", -1.0), ("e", -1.0),
              ("l", -1.0), ("o", -1.0), ("bc", -0.5), ("he", -2.0), ("ll", -1.5), ("hell", -2.5),
              ("hello", -2.6), ("▁hello", -2.7)]
INST = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")


def spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for text, score in SPM_PIECES:
        tokens.append(text)
        types.append(1)
        scores.append(score)
    while len(tokens) < V:
        tokens.append(f"<extra_{len(tokens)}>")
        types.append(3)
        scores.append(0.0)
    return tokens, scores, types


def write_model(path, variant="llama-tied", wtype="F32", arch=None, seed=0, skip=(),
                override=None, tokenizer="gpt2", zero_v_head=None):
    """One synthetic model file. `arch` overrides the written architecture name; tensors named in
    `skip` are left out; `override` = (name, type) stores one weight in another type; `tokenizer`
    "gpt2" (byte-level BPE, ChatML) or "llama" (SentencePiece, an [INST] template);
    `zero_v_head` = h zeroes KV head h's value projection in every layer (its attention output is
    zero whatever it keeps)."""
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
    if tokenizer == "llama":
        tokens, scores, types = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)
        w.add_chat_template(INST)
    else:
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
        value = (scale * rng.standard_normal((rows, cols))).astype(np.float32)
        if zero_v_head is not None and name.endswith("attn_v.weight"):
            value[zero_v_head * D:(zero_v_head + 1) * D] = 0
        add_weight(w, name, value, t, rng)

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


def test_a_llama_file_with_a_sentencepiece_vocabulary_runs_every_subcommand(tmp_path):
    """The shape of most Llama-family GGUF files (SentencePiece vocabulary, untied head, k-quant
    weights): tokenize, logits, and generate with the file's own [INST] template and with --raw."""
    model = write_model(tmp_path / "spm.gguf", "llama-untied", "Q4_K", seed=5, tokenizer="llama")
    tokens = spm_vocab()[0]
    p = subprocess.run([WORKER, "tokenize", f"--model={model}", "--text=hello abc\u00e9"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ids = [int(t) for t in p.stdout.strip().split(",")]
    # BOS, then "▁hello" (the leading-space convention), "▁", "a", "bc", and é as two byte tokens.
    assert ids == [1, tokens.index("▁hello"), tokens.index("▁"), tokens.index("a"),
                   tokens.index("bc"), tokens.index("<0xC3>"), tokens.index("<0xA9>")], ids
    p = worker_logits(model, tmp_path / "logits.npy", ids)
    assert p.returncode == 0, p.stderr
    got = np.load(tmp_path / "logits.npy")
    want = NumpyForward(str(model)).logits(ids)
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= 1e-5 * (1 + scale)
    lengths = {}
    for extra in ([], ["--raw"]):
        p = subprocess.run([WORKER, "generate", f"--model={model}", "--full_cache", "--prompt=hello",
                            "--max_tokens=3", "--ignore_eos", "--json", *extra],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)
        assert len(r["generated"]) == 3
        lengths[bool(extra)] = r["prompt_tokens"]
    # [INST] hello [/INST] is longer than hello.
    assert lengths[False] > lengths[True] == 2


def test_calibrate_and_generate_through_the_sidecar_on_your_own_file(tmp_path):
    """What README tells a user with their own GGUF: calibrate writes a profile named after the
    file, whose provenance names the file; the sidecar, holding that profile, serves a reasonalloc
    session for it with no warning, while a model it has no profile for gets the sidecar's warning
    printed by the worker."""
    model = write_model(tmp_path / "my-model.Q4_K.gguf", "llama-untied", "Q4_K", seed=9,
                        tokenizer="llama")
    prompts = tmp_path / "probes.txt"
    prompts.write_text("hello abc\nabc hello hello\n")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    sock = tmp_path / "s.sock"
    server = subprocess.Popen([SERVER, f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
                               f"--profile_dir={profiles}", "--log_level=error"])
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        out = profiles / "my-model.json"
        p = subprocess.run([WORKER, "calibrate", f"--model={model}", f"--target=unix://{sock}",
                            f"--prompts={prompts}", "--max_tokens=40", "--ignore_eos", "--stride=4",
                            f"--out={out}"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        profile = json.loads(out.read_text())
        assert profile["name"] == "my-model" and len(profile["demand"]) == LAYERS
        assert "my-model.Q4_K.gguf" in profile["provenance"], profile["provenance"]
        assert 'general.name "synthetic-llama-untied-Q4_K"' in profile["provenance"]
        # FinishCalibration left the profile with the sidecar already.
        held = subprocess.run([CLIENT, "profiles", f"--target=unix://{sock}", "--json"],
                              capture_output=True, text=True)
        assert held.returncode == 0 and "my-model" in held.stdout, held.stderr
        # The text table widens its name column for a long name (the columns stay aligned).
        long_name = dict(profile, name="my-model.a-very-long-profile-name.sensitivity")
        (tmp_path / "long.json").write_text(json.dumps(long_name))
        put = subprocess.run([CLIENT, "put-profile", f"--target=unix://{sock}",
                              str(tmp_path / "long.json")], capture_output=True, text=True)
        assert put.returncode == 0, put.stderr
        table = subprocess.run([CLIENT, "profiles", f"--target=unix://{sock}"],
                               capture_output=True, text=True).stdout.splitlines()
        rows = [table[0]] + [r for r in table if r.startswith("my-model")]
        assert len(rows) == 3, table
        width = max(32, len(long_name["name"]))
        assert rows[0][width + 2:width + 8] == "LAYERS", table
        assert all(r[width + 2:width + 8].strip() == str(LAYERS) and
                   r[:width].rstrip() in ("my-model", long_name["name"]) for r in rows[1:]), table
        gen = ["generate", f"--model={model}", f"--target=unix://{sock}", "--scorer=rkv",
               "--allocator=reasonalloc", "--budget=16", "--buffer=8", "--prompt=hello abc",
               "--max_tokens=40", "--ignore_eos", "--json"]
        p = subprocess.run([WORKER, *gen], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert "warning" not in p.stderr, p.stderr
        assert json.loads(p.stdout)["events"] > 0
        p = subprocess.run([WORKER, *gen, "--model_name=someone-else"], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
        assert 'no layer profile for model "someone-else"' in p.stderr, p.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def start_server(tmp_path, profiles):
    sock = tmp_path / "s.sock"
    server = subprocess.Popen([SERVER, f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
                               f"--profile_dir={profiles}", "--log_level=error"])
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    return server, f"unix://{sock}"


def sensitivity_setup(tmp_path, name):
    """A two-layer model (seed 21), two probe prompts and a sidecar with an empty profile folder:
    (model, prompts, profiles, server, target)."""
    model = write_model(tmp_path / f"{name}.gguf", "llama-untied", "F32", seed=21)
    prompts = tmp_path / "probes.txt"
    prompts.write_text("the the a in\nhe in the a the\n")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    server, target = start_server(tmp_path, profiles)
    return model, prompts, profiles, server, target


def test_sensitivity_calibration_measures_each_layer_alone(tmp_path):
    """calibrate --objective sensitivity on a two-layer model: one entry per layer, the KL its own
    compression costs, positive at a small budget and deterministic; grouped layers share one
    entry; a budget above the trajectory loses nothing (an error, not a profile); the profile
    (mean 1) is one the sidecar accepts."""
    model, prompts, profiles, server, target = sensitivity_setup(tmp_path, "sens")
    try:
        common = ["calibrate", "--objective=sensitivity", f"--model={model}", f"--target={target}",
                  f"--prompts={prompts}", "--max_tokens=48", "--scorer=streaming", "--buffer=8"]
        out = profiles / "sens.json"
        p = subprocess.run([WORKER, *common, "--budget=12", "--profile=sens.sensitivity",
                            f"--out={out}"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        print(p.stdout)
        profile = json.loads(out.read_text())
        assert profile["name"] == "sens.sensitivity" and profile["model"]["name"] == "sens"
        demand = profile["demand"]
        assert len(demand) == LAYERS and abs(sum(demand) / LAYERS - 1) < 1e-9
        assert all(d >= 0 for d in demand) and max(demand) > min(demand)
        assert profile["samples"] == [str(2 * 48)] * LAYERS
        assert "--objective sensitivity" in profile["provenance"]
        kl = [float(line.split()[1]) for line in p.stdout.splitlines()
              if line.strip() and line.split()[0].isdigit()]
        assert len(kl) == LAYERS and all(k > 0 for k in kl)
        # Deterministic.
        again = subprocess.run([WORKER, *common, "--budget=12", f"--out={tmp_path / 'b.json'}"],
                               capture_output=True, text=True)
        assert json.loads((tmp_path / "b.json").read_text())["demand"] == demand
        # Layers grouped: both layers compressed at once, one measurement shared by the group.
        grouped = subprocess.run([WORKER, *common, "--budget=12", "--layer_group=2",
                                  f"--out={tmp_path / 'g.json'}"], capture_output=True, text=True)
        assert grouped.returncode == 0, grouped.stderr
        both = [float(line.split()[1]) for line in grouped.stdout.splitlines()
                if line.strip() and line.split()[0].isdigit()]
        assert both[0] == both[1] and both[0] > 0
        # Nothing evicted, nothing lost: refused with the reason.
        none = subprocess.run([WORKER, *common, "--budget=200", f"--out={tmp_path / 'n.json'}"],
                              capture_output=True, text=True)
        assert none.returncode != 0 and "no layer loses anything" in none.stderr, none.stderr
        # The sidecar takes the profile (the same checks as any profile).
        put = subprocess.run([CLIENT, "put-profile", f"--target={target}", str(out)],
                             capture_output=True, text=True)
        assert put.returncode == 0, put.stderr
        # ... and a reasonalloc session of the model runs on it by name, without a warning.
        gen = subprocess.run([WORKER, "generate", f"--model={model}", f"--target={target}",
                              "--allocator=reasonalloc", "--profile=sens.sensitivity",
                              "--budget=12", "--buffer=8", "--prompt=the a", "--max_tokens=40",
                              "--ignore_eos", "--json"], capture_output=True, text=True)
        assert gen.returncode == 0, gen.stderr
        assert "warning" not in gen.stderr and json.loads(gen.stdout)["events"] > 0, gen.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def whole_words(text):
    """The alphanumeric runs of text, each as AnswerMatches would find it (a whole word)."""
    return re.findall(r"[0-9A-Za-z]+", text)


def test_sensitivity_calibration_measures_the_recall_cost_of_each_layer(tmp_path):
    """calibrate --objective sensitivity --recall_tasks: the same groups compressed alone on recall
    tasks; only the tasks the full cache answers count (the answer taken from the full cache's own
    text here, a task with an answer it never writes left out), measured over the answer tokens;
    the layers CSV holds both costs and the demand is the weighted mix of the two normalised
    costs; weight 0 gives the KL-only profile; bad flags are refused before anything runs."""
    model, prompts, _, server, target = sensitivity_setup(tmp_path, "recall")
    try:
        heads = ["the a the in he.", "he in a the the a."]
        tail = " the the a in he in the a the in a he the the in a the he in the a" * 2
        answers = []
        for head in heads:
            g = subprocess.run([WORKER, "generate", f"--model={model}", "--full_cache",
                                f"--prompt={head}{tail}", "--max_tokens=12", "--ignore_eos",
                                "--json"], capture_output=True, text=True)
            assert g.returncode == 0, g.stderr
            words = whole_words(json.loads(g.stdout)["text"])
            assert words, g.stdout
            answers.append(words[0])
        tasks = tmp_path / "tasks.tsv"
        # The task the full cache cannot answer comes first: the measured tasks are not the first
        # ones of the file.
        tasks.write_text("# id\tkind\tanswer\thead\ttail (seed 5, 70 filler words)\n"
                         f"t2\tname\tzzzzqqq\t{heads[0]}\t{tail}\n" + "".join(
                             f"t{i}\tname\t{a}\t{h}\t{tail}\n"
                             for i, (a, h) in enumerate(zip(answers, heads))))
        common = ["calibrate", "--objective=sensitivity", f"--model={model}", f"--target={target}",
                  f"--prompts={prompts}", "--max_tokens=48", "--scorer=rkv", "--buffer=8",
                  "--budget=12"]
        layers = tmp_path / "layers.csv"
        p = subprocess.run([WORKER, *common, f"--recall_tasks={tasks}", "--recall_weight=0.5",
                            f"--layers_csv={layers}", f"--out={tmp_path / 'mixed.json'}"],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        print(p.stdout)
        assert "recall side: 2 of 3 tasks answered by the full cache" in p.stdout, p.stdout
        rows = list(csv.DictReader(layers.read_text().splitlines()))
        assert [int(r["layer"]) for r in rows] == list(range(LAYERS)), rows
        kl = [float(r["kl_per_token"]) for r in rows]
        rkl = [float(r["recall_kl_per_token"]) for r in rows]
        kept = [float(r["recall_kept"]) for r in rows]
        assert all(k > 0 for k in kl) and all(k > 0 for k in rkl), rows
        assert all(k in (0.0, 0.5, 1.0) for k in kept) and min(kept) < 1, rows
        # Only the answer tokens are measured: the same on both layers, fewer than the 2 x 12
        # decoded, and unchanged (KL too) when more tokens are decoded after the answer.
        positions = [int(r["recall_positions"]) for r in rows]
        assert len(set(positions)) == 1 and 2 <= positions[0] < 2 * 12, rows
        longer = subprocess.run([WORKER, *common, f"--recall_tasks={tasks}", "--answer_tokens=24",
                                 f"--layers_csv={tmp_path / 'longer.csv'}",
                                 f"--out={tmp_path / 'longer.json'}"], capture_output=True,
                                text=True)
        assert longer.returncode == 0, longer.stderr
        again = list(csv.DictReader((tmp_path / "longer.csv").read_text().splitlines()))
        assert [(r["recall_kl_per_token"], r["recall_positions"]) for r in again] == \
            [(r["recall_kl_per_token"], r["recall_positions"]) for r in rows], (again, rows)
        mixed = json.loads((tmp_path / "mixed.json").read_text())
        want = [0.5 * k / (sum(kl) / LAYERS) + 0.5 * r / (sum(rkl) / LAYERS)
                for k, r in zip(kl, rkl)]
        assert mixed["demand"] == pytest.approx(want, rel=1e-9), (mixed["demand"], want)
        assert [float(r["demand"]) for r in rows] == pytest.approx(want, rel=1e-9)
        assert "recall side: the same on 2 of 3 recall tasks" in mixed["provenance"]
        # The plot of the profile beside both costs.
        png = tmp_path / "costs.png"
        d = subprocess.run([sys.executable, os.path.join(ROOT, "bench/profiles_plot.py"),
                            str(tmp_path / "mixed.json"), f"--layers_csv={layers}",
                            f"--out={png}"], capture_output=True, text=True)
        assert d.returncode == 0 and png.stat().st_size > 0, d.stderr
        # Weight 0: the recall side is measured and shown, the demand is the KL-only one.
        plain = subprocess.run([WORKER, *common, f"--out={tmp_path / 'plain.json'}"],
                               capture_output=True, text=True)
        assert plain.returncode == 0, plain.stderr
        zero = subprocess.run([WORKER, *common, f"--recall_tasks={tasks}", "--recall_weight=0",
                               f"--out={tmp_path / 'zero.json'}"], capture_output=True, text=True)
        assert zero.returncode == 0, zero.stderr
        assert json.loads((tmp_path / "zero.json").read_text())["demand"] == pytest.approx(
            json.loads((tmp_path / "plain.json").read_text())["demand"], rel=1e-12)
        # Recall prompts the budget holds whole: nothing lost, every answer kept; such a recall
        # side cannot weigh the layers (refused with the reason) unless its weight is 0.
        short = tmp_path / "short.tsv"
        short.write_text(f"t0\tname\t{answers[0]}\t{heads[0]}\t{tail}\n")
        # (the file of one task; heads[0]'s prompt is 5 + 2 x 22 words: about 100 tokens here)
        roomy = [c for c in common if not c.startswith(("--budget", "--max_tokens"))] + [
            "--budget=150", "--max_tokens=200"]  # the KL side's trajectories still exceed it
        whole = subprocess.run([WORKER, *roomy, f"--recall_tasks={short}", "--recall_weight=0",
                                f"--layers_csv={layers}", f"--out={tmp_path / 'whole.json'}"],
                               capture_output=True, text=True)
        assert whole.returncode == 0, whole.stderr
        rows = list(csv.DictReader(layers.read_text().splitlines()))
        assert all(float(r["recall_kl_per_token"]) == 0 and float(r["recall_kept"]) == 1
                   for r in rows), rows
        refused = subprocess.run([WORKER, *roomy, f"--recall_tasks={short}",
                                  f"--out={tmp_path / 'whole.json'}"], capture_output=True,
                                 text=True)
        assert refused.returncode != 0, refused.stdout
        assert "recall side: no layer group loses anything" in refused.stderr, refused.stderr
        assert "seconds" not in refused.stdout and "probes" not in refused.stdout, \
            refused.stdout  # refused before the KL side ran
        # Without --recall_tasks the CSV leaves the recall columns empty.
        only = subprocess.run([WORKER, *common, f"--layers_csv={tmp_path / 'only.csv'}",
                               f"--out={tmp_path / 'only.json'}"], capture_output=True, text=True)
        assert only.returncode == 0, only.stderr
        assert all(r["recall_kl_per_token"] == r["recall_positions"] == "" and
                   float(r["kl_per_token"]) > 0
                   for r in csv.DictReader((tmp_path / "only.csv").read_text().splitlines()))
        # Refusals, each naming its flag; none leaves a profile behind.
        unanswered = tmp_path / "none.tsv"
        unanswered.write_text(f"t0\tname\tzzzzqqq\t{heads[0]}\t{tail}\n")
        evaluation = tmp_path / "seed1.tsv"
        evaluation.write_text("# id\tkind\tanswer\thead\ttail (seed 1, 480 filler words)\n"
                              f"t0\tname\t{answers[0]}\t{heads[0]}\t{tail}\n")
        bad_tasks = tmp_path / "bad.tsv"
        bad_tasks.write_text("t0\tname\tx\n")
        for flags, message in [
                ([f"--recall_tasks={tasks}", "--recall_weight=1.5"], "--recall_weight 1.5"),
                ([f"--recall_tasks={tasks}", "--recall_weight=nan"], "--recall_weight"),
                ([f"--recall_tasks={tasks}", "--answer_tokens=0"], "--answer_tokens 0"),
                ([f"--recall_tasks={tmp_path / 'missing.tsv'}"], "--recall_tasks"),
                ([f"--recall_tasks={bad_tasks}"], "3 columns, want 5"),
                ([f"--recall_tasks={unanswered}"], "the full cache answers none of the 1 tasks"),
                ([f"--recall_tasks={evaluation}"], "holds the evaluation tasks (seed 1)"),
                (["--recall_weight=5"], "--recall_weight 5"),  # checked without --recall_tasks too
                ([f"--layers_csv={tmp_path / 'no' / 'dir.csv'}"], "--layers_csv"),
                ([f"--layers_csv={tmp_path / 'refused.json'}"], "same file as --out"),
                ([f"--layers_csv={tmp_path / 'l.csv'}", "--target="], "--target is required"),
        ]:
            out = tmp_path / "refused.json"
            r = subprocess.run([WORKER, *common, *flags, f"--out={out}"], capture_output=True,
                               text=True)
            assert r.returncode != 0 and message in r.stderr, (flags, r.stderr)
            assert not out.exists(), flags
            assert not list(tmp_path.glob("*.partial")), flags
        for objective in ("head_sensitivity", "k_rho"):
            r = subprocess.run([WORKER, *common, f"--objective={objective}",
                                f"--recall_tasks={tasks}", f"--out={tmp_path / 'x'}"],
                               capture_output=True, text=True)
            assert r.returncode != 0 and "--recall_tasks" in r.stderr, (objective, r.stderr)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_head_sensitivity_measures_each_kv_head_alone(tmp_path):
    """calibrate --objective head_sensitivity: one row per (layer, KV head), each head compressed
    alone while the other head of its layer keeps its full cache; positive at a small budget,
    deterministic, different between the heads of a layer; a budget holding the whole trajectory
    is refused."""
    model, prompts, _, server, target = sensitivity_setup(tmp_path, "heads")
    try:
        common = ["calibrate", "--objective=head_sensitivity", f"--model={model}",
                  f"--target={target}", f"--prompts={prompts}", "--max_tokens=48",
                  "--scorer=rkv", "--buffer=8", "--budget=12",
                  "--batch=2"]  # each probe batch as large as the reference run's: same GEMMs
        out = tmp_path / "heads.csv"
        p = subprocess.run([WORKER, *common, f"--out={out}"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        print(p.stdout)
        rows = list(csv.DictReader(out.read_text().splitlines()))
        assert [(int(r["layer"]), int(r["head"])) for r in rows] == \
            [(l, h) for l in range(LAYERS) for h in range(HKV)], rows
        kl = [float(r["kl_per_token"]) for r in rows]
        assert all(k > 0 for k in kl), rows
        assert all(int(r["positions"]) == 2 * 48 for r in rows), rows
        for l in range(LAYERS):
            pair = kl[l * HKV:(l + 1) * HKV]
            assert max(pair) > min(pair), rows  # the heads are probed apart
            rel = [float(r["relative_to_layer"]) for r in rows[l * HKV:(l + 1) * HKV]]
            assert abs(sum(rel) / HKV - 1) < 1e-6, rows
        again = subprocess.run([WORKER, *common, f"--out={tmp_path / 'again.csv'}"],
                               capture_output=True, text=True)
        assert again.returncode == 0 and (tmp_path / "again.csv").read_text() == out.read_text()
        # Which head is probed, with which query group: on a model whose KV head 1 has a zero
        # value projection, compressing head 1 alone costs nothing, and compressing head 0 alone
        # costs what compressing the whole layer costs (head 1's share of it is zero) only if the
        # head probe gave head 0 its own keys, values and query group.
        zero = write_model(tmp_path / "zero.gguf", "llama-untied", "F32", seed=21, zero_v_head=1)
        args = [a for a in common if not a.startswith("--model=")] + [f"--model={zero}"]
        p = subprocess.run([WORKER, *args, f"--out={tmp_path / 'zero.csv'}"], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr
        zrows = list(csv.DictReader((tmp_path / "zero.csv").read_text().splitlines()))
        zkl = {(int(r["layer"]), int(r["head"])): float(r["kl_per_token"]) for r in zrows}
        assert all(zkl[(l, 1)] == 0 and zkl[(l, 0)] > 0 for l in range(LAYERS)), zkl
        # Every layer has a head that lost nothing: the analysis says so instead of failing.
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/head_sensitivity.py"),
                            str(tmp_path / "zero.csv"), f"--out={tmp_path / 'zero-analysis'}"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "no variance split" in p.stdout, p.stdout + p.stderr
        layer = subprocess.run([WORKER, *["--objective=sensitivity"
                                          if a == "--objective=head_sensitivity" else a
                                          for a in args], f"--out={tmp_path / 'layer.json'}"],
                               capture_output=True, text=True)
        assert layer.returncode == 0, layer.stderr
        layer_kl = [float(line.split()[1]) for line in layer.stdout.splitlines()
                    if line.strip() and line.split()[0].isdigit()]
        assert len(layer_kl) == LAYERS, layer.stdout
        for l in range(LAYERS):  # the layer table prints 5 decimals
            assert abs(layer_kl[l] - zkl[(l, 0)]) <= 6e-6, (l, layer_kl, zkl)
        # Nothing evicted, nothing lost: refused, and the earlier CSV at --out is left as it was.
        before = out.read_text()
        none = subprocess.run([WORKER, *common, "--budget=200", f"--out={out}"],
                              capture_output=True, text=True)
        assert none.returncode != 0 and "no KV head loses anything" in none.stderr, none.stderr
        assert out.read_text() == before and not list(tmp_path.glob("*.partial"))
        # The analysis: per-layer spread and the between/within-layer split of the variance.
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/head_sensitivity.py"),
                            str(out), f"--out={tmp_path / 'analysis'}"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        md = (tmp_path / "analysis" / "head_sensitivity.md").read_text()
        logkl = np.log(np.array(kl).reshape(LAYERS, HKV))
        within = ((logkl - logkl.mean(axis=1, keepdims=True)) ** 2).sum() / \
            ((logkl - logkl.mean()) ** 2).sum()
        assert f"{100 * within:.0f} % within layers" in md, md
        assert len([l for l in md.splitlines() if re.match(r"\| \d+ \|", l)]) == LAYERS, md
        assert (tmp_path / "analysis" / "head_sensitivity.png").stat().st_size > 0
        # A profile for the static head split: the layer profile's demand, these heads' KL.
        static = tmp_path / "static.json"
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/head_sensitivity.py"),
                            str(out), f"--out={tmp_path / 'analysis'}",
                            f"--profile_out={static}", f"--base_profile={tmp_path / 'layer.json'}",
                            "--name=heads.static"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        written = json.loads(static.read_text())
        assert written["head_demand"] == kl
        assert written["demand"] == json.loads((tmp_path / "layer.json").read_text())["demand"]
        for name in (static, tmp_path / "layer.json"):
            put = subprocess.run([CLIENT, "put-profile", f"--target={target}", str(name)],
                                 capture_output=True, text=True)
            assert put.returncode == 0, put.stderr
        gen = [WORKER, "generate", f"--model={model}", f"--target={target}",
               "--allocator=reasonalloc", "--mode=static", "--scorer=rkv", "--budget=12",
               "--buffer=8", "--prompt=the a", "--max_tokens=40", "--ignore_eos", "--json"]
        run = subprocess.run([*gen, "--profile=heads.static"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["events"] > 0, run.stdout
        # A profile without head demand cannot serve the static mode: refused, naming it.
        layer_name = json.loads((tmp_path / "layer.json").read_text())["name"]
        run = subprocess.run([*gen, f"--profile={layer_name}"], capture_output=True, text=True)
        assert run.returncode != 0 and "head_demand" in run.stderr, run.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_policy_report_pairs_each_policy_with_the_uniform_one_of_its_knobs():
    spec = importlib.util.spec_from_file_location("policy_report",
                                                  os.path.join(ROOT, "bench/policy_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    pairs = {"rkv/reasonalloc-full+r16@m.sensitivity": "rkv/uniform+r16",
             "h2o/reasonalloc-layer@m.sensitivity": "h2o/uniform",
             "snapkv/reasonalloc-full+s4+r32+l0.07": "snapkv/uniform+s4+r32+l0.07",
             "rkv/adakv": "rkv/uniform"}
    for policy, uniform in pairs.items():
        assert report.same_scorer_uniform(policy) == uniform, policy
    assert report.is_uniform("h2o/uniform+r16") and not report.is_uniform("h2o/adakv+r16")


def test_the_policy_report_shows_each_layers_kl_and_recall_cost(tmp_path):
    """The report's wave section from a calibration's layers CSV: with a recall side, the KL and
    recall costs alone (each of mean 1) and the share of answers kept beside the mixed demand;
    at weight 0 the demand is said to be the KL sensitivity; without a recall side (or one that
    lost nothing) the columns are left out. The plot is written each time."""
    spec = importlib.util.spec_from_file_location("policy_report",
                                                  os.path.join(ROOT, "bench/policy_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    wave = {"name": "m", "demand": [2.0, 1.0, 1.0, 0.0]}
    profile = {"name": "m.sensitivity", "model": {"name": "m"}, "demand": [0.5, 1.5, 1.0, 1.0]}
    costs = [{"layer": str(i), "kl_per_token": str(k), "recall_kl_per_token": str(r),
              "recall_kept": str(p), "recall_positions": "40", "demand": "1"}
             for i, (k, r, p) in enumerate([(0.1, 0.0, 1.0), (0.3, 0.2, 0.5), (0.2, 0.1, 0.75),
                                            (0.2, 0.1, 1.0)])]
    png = tmp_path / "wave.png"
    lines = report.wave_section(wave, profile, costs, 0.5, str(png))
    assert png.stat().st_size > 0
    text = "\n".join(lines)
    assert "KL and recall costs mixed, recall weight 0.5" in text, text
    rows = [l for l in lines if re.match(r"\| \d \|", l)]
    assert rows[1] == "| 1 | 1.00 | 1.50 | 1.50 | 2.00 | 0.50 |", rows
    assert rows[0] == "| 0 | 2.00 | 0.50 | 0.50 | 0.00 | 1.00 |", rows
    text = "\n".join(report.wave_section(wave, profile, costs, 0.0, str(png)))
    assert "the KL sensitivity measured here (the recall cost" in text, text
    for none in (None, [dict(r, recall_kl_per_token="", recall_kept="") for r in costs],
                 [dict(r, recall_kl_per_token="0") for r in costs]):
        lines = report.wave_section(wave, profile, none, 0.5, str(png))
        assert "| layer | k_ρ demand | sensitivity |" in lines and "recall" not in "\n".join(
            lines), lines


def test_the_policy_report_runs_on_your_own_file(tmp_path):
    """bench/policy_report.py end to end on a synthetic model: a sensitivity profile from the
    probe prompts, the probe grid over every scorer and allocator, the picks per budget checked on
    held-out prompts (paired), every reasonalloc policy against uniform with its scorer. (The recall
    step needs prompts longer than this model's context: test_recall.py runs it on the real one.)"""
    model = write_model(tmp_path / "rep.gguf", "llama-untied", "F32", seed=33)
    probes, heldout = tmp_path / "probes.txt", tmp_path / "heldout.txt"
    probes.write_text("the the a in\nhe in the a the\n")
    heldout.write_text("a in he\nin in the he a\nthe a a\n")
    build = os.path.dirname(os.path.dirname(os.path.abspath(WORKER)))
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=12,16", f"--probe_prompts={probes}",
                        f"--heldout_prompts={heldout}", "--probe_tokens=40", "--heldout_tokens=40",
                        "--sensitivity_budget=12", "--scorers=streaming,rkv", "--recall_tasks=0",
                        "--heldout=all", f"--out={out}"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (out / "policy_report.md").read_text()
    print(report)
    for policy in ("streaming/uniform", "rkv/uniform", "rkv/adakv", "streaming/adakv",
                   "rkv/reasonalloc-layer@rep.sensitivity", "rkv/reasonalloc-full@rep.sensitivity"):
        assert f"| {policy} |" in report, policy
    sections = report.split("\n## ")
    picks = next(x for x in sections if x.startswith("Picks"))
    assert len([l for l in picks.splitlines() if re.match(r"\| 1[26] \|", l)]) == 2, picks
    held = next(x for x in sections if x.startswith("Held-out KL"))
    assert held.count("reasonalloc") == 4 and held.count("[") == 2 * 8, held
    same = next(x for x in sections if x.startswith("Every reasonalloc"))
    verdicts = [l for l in same.splitlines() if l.startswith("| 1")]
    assert len(verdicts) == 2 * 2 * 2, same  # 2 budgets x 2 scorers x (layer, full)
    assert all(re.search(r"(worse|better|not separated) \|$", l) for l in verdicts), same
    assert "Long-range recall" not in report, report
    # Head routing's per-head budgets (averaged over events) are written for the sequences whose
    # heads of a layer got different budgets: only allocators that route heads appear.
    heads = list(csv.DictReader(open(out / "probe" / "fidelity_heads.csv")))
    assert heads, "no sequence's heads were routed apart"
    assert all(r["policy"].split("@")[0].split("/")[1] in ("adakv", "reasonalloc-full")
               for r in heads), {r["policy"] for r in heads}
    groups = defaultdict(list)
    for r in heads:
        groups[(r["policy"], r["budget"], r["prompt"])].append(float(r["mean_budget"]))
    assert all(len(v) == LAYERS * HKV and min(v) > 0 for v in groups.values()), groups
    # (The default recency variant, +r16, is more than half of budget 12: left out, said so.)
    assert "--recent 16: left out" in p.stdout and "+r16" not in report, p.stdout[-2000:]
    # The default held-out grid: the picks, and per scorer its uniform and best reasonalloc policy
    # (with the uniform policy of the same knobs); recency variants (+r10) among the candidates,
    # one no larger than the window (8) left out.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=20,24", f"--probe_prompts={probes}",
                        f"--heldout_prompts={heldout}", "--probe_tokens=40", "--heldout_tokens=40",
                        "--scorers=streaming,rkv", "--recall_tasks=0", "--recent=4,10",
                        f"--sensitivity_profile={out / 'sensitivity_profile.json'}",
                        f"--out={tmp_path / 'picks'}"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "--recent 4: left out" in p.stdout, p.stdout[-2000:]
    report = (tmp_path / "picks" / "policy_report.md").read_text()
    sections = report.split("\n## ")
    probe_rows = [l.split(" | ")[0][2:] for l in next(
        x for x in sections if x.startswith("Probe KL")).splitlines() if l.startswith("| ") and
        "." in l.split(" | ")[1]]
    # 8 policies without recency; rkv's 4 again with +r10 (streaming keeps the most recent already).
    assert len(probe_rows) == 8 + 4 and "rkv/uniform+r10" in probe_rows, probe_rows
    assert "rkv/reasonalloc-full+r10@rep.sensitivity" in probe_rows, probe_rows
    assert not any(r.startswith("streaming") and "+r" in r for r in probe_rows), probe_rows
    held = next(x for x in sections if x.startswith("Held-out KL"))
    rows = [l.split(" | ")[0][2:] for l in held.splitlines() if l.startswith("| ") and "[" in l]
    for scorer in ("streaming", "rkv"):
        assert f"{scorer}/uniform" in rows, held
        assert any(r.startswith(f"{scorer}/reasonalloc") for r in rows), held
    assert len(rows) < len(probe_rows), held
    # A reasonalloc policy is paired with the uniform allocator of its scorer and knobs.
    same = next(x for x in sections if x.startswith("Every reasonalloc"))
    assert [l for l in same.splitlines() if l.startswith("| 2")], same
    for line in (l for l in same.splitlines() if l.startswith("| 2")):
        policy, against = line.split(" | ")[1:3]
        knobs = policy.split("@")[0].split("/")[1].partition("+")[2]
        assert against == policy.split("/")[0] + "/uniform" + ("+" + knobs if knobs else ""), line
    # --reuse rewrites the report from the grids already there, running none.
    first = (out / "policy_report.md").read_text()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=12,16", f"--probe_prompts={probes}",
                        f"--heldout_prompts={heldout}", "--probe_tokens=40", "--heldout_tokens=40",
                        "--scorers=streaming,rkv", "--recall_tasks=0", "--heldout=all", "--reuse",
                        f"--sensitivity_profile={out / 'sensitivity_profile.json'}",
                        f"--out={out}"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("reusing") == 2 and "bench/fidelity" not in p.stdout, p.stdout
    again = (out / "policy_report.md").read_text()
    assert again.split("## Probe KL")[1] == first.split("## Probe KL")[1]
    # reasonalloc-static: the report measures each head, builds the static-split profile on the
    # sensitivity profile and runs the static candidates on it, paired with uniform as any other.
    static = tmp_path / "static"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=12", f"--probe_prompts={probes}",
                        f"--heldout_prompts={heldout}", "--probe_tokens=40", "--heldout_tokens=40",
                        "--scorers=rkv", "--allocators=uniform,reasonalloc-static",
                        "--recall_tasks=0", "--heldout=all",
                        f"--sensitivity_profile={out / 'sensitivity_profile.json'}",
                        f"--out={static}"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader(open(static / "head_sensitivity.csv")))
    assert len(rows) == LAYERS * HKV, rows
    written = json.loads((static / "head_profile.json").read_text())
    assert written["name"] == "rep.sensitivity.heads" and len(written["head_demand"]) == LAYERS * HKV
    report = (static / "policy_report.md").read_text()
    assert "| rkv/reasonalloc-static@rep.sensitivity.heads |" in report, report
    same = next(x for x in report.split("\n## ") if x.startswith("Every reasonalloc"))
    assert [l for l in same.splitlines()
            if "rkv/reasonalloc-static@rep.sensitivity.heads | rkv/uniform |" in l], same
    profile = json.loads((out / "sensitivity_profile.json").read_text())
    assert profile["name"] == "rep.sensitivity" and len(profile["demand"]) == LAYERS
    # A profile of the same name already in the profile directory (as deploy/profiles ships one
    # for the reference model) is replaced by the one this report measures.
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "rep.sensitivity.json").write_text(json.dumps(
        dict(profile, demand=[2.0] + [0.0] * (LAYERS - 1), provenance="shipped")))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=12", f"--probe_prompts={probes}",
                        f"--heldout_prompts={heldout}", "--probe_tokens=40", "--heldout_tokens=40",
                        "--sensitivity_budget=12", "--scorers=rkv", "--recall_tasks=0",
                        f"--profiles={shipped}", f"--out={tmp_path / 'shipped-out'}"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    measured = json.loads((tmp_path / "shipped-out" / "sensitivity_profile.json").read_text())
    assert measured["provenance"] != "shipped" and measured["demand"] == profile["demand"]
    # The reduced run for a larger model: --quick's smaller grid (a flag given still wins), the
    # first probe prompt only, layers calibrated in groups of two.
    small = tmp_path / "small"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=12", f"--probe_prompts={probes}",
                        f"--heldout_prompts={heldout}", "--probe_tokens=40", "--heldout_tokens=40",
                        "--sensitivity_budget=12", "--quick", "--scorers=streaming,rkv",
                        "--recall_tasks=0", "--max_probe=1", "--layer_group=2", f"--out={small}"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    profile = json.loads((small / "sensitivity_profile.json").read_text())
    assert len(profile["demand"]) == LAYERS, profile
    assert f"1 probe prompts from the first 1 of {probes}" in profile["provenance"], profile
    assert "each group of 2 layer(s)" in profile["provenance"], profile
    assert json.loads((small / "probe" / "fidelity_meta.json").read_text())["prompts"] == 1
    probe = (small / "policy_report.md").read_text().split("## Probe KL")[1].split("\n## ")[0]
    rows = sorted(l.split(" | ")[0][2:] for l in probe.splitlines() if l.startswith("| ") and "/" in l)
    # (No k_ρ profile ships for this model: reasonalloc runs on the sensitivity profile only.)
    assert rows == ["rkv/reasonalloc-full@rep.sensitivity", "rkv/uniform",
                    "streaming/reasonalloc-full@rep.sensitivity", "streaming/uniform"], probe
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=", f"--out={small}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--budgets" in p.stderr, p.stderr
    # The recall side of the calibration: the seed-2 recall tasks reach the worker (they do not fit
    # this model's context, which is refused with the reason); a weight outside [0, 1] is refused
    # before anything runs.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=12", f"--probe_prompts={probes}",
                        "--probe_tokens=40", "--sensitivity_budget=12", "--recall_tasks=0",
                        "--recall_probe_tasks=3", f"--out={tmp_path / 'recall'}"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0, p.stdout[-3000:]
    assert "tasks.py --seed 2 --count 3" in p.stdout, p.stdout[-3000:]
    assert "--recall_tasks=" in p.stdout and "--recall_weight=0.5" in p.stdout, p.stdout[-3000:]
    assert "--recall_tasks" in p.stderr and "more than the model's context of 512" in p.stderr, \
        p.stderr[-3000:]
    for flags, message in ((["--recall_probe_tasks=3", "--recall_weight=2"], "--recall_weight"),
                           (["--recall_weight=0.3"], "--recall_weight weighs"),
                           (["--recall_probe_tasks=3", f"--sensitivity_profile={small}"],
                            "use one of them")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                            f"--model={model}", *flags, f"--out={small}"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2 and message in p.stderr, (flags, p.stderr)


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
             os.environ.get("REASONALLOC_KQUANT_GGUF") or located("gemma-3-270m-q4_k_m.gguf")]
    return [f for f in files if f and os.path.exists(f)]


def test_real_tensors_match_gguf(tmp_path):
    files = real_files()
    if not files:
        pytest.skip("no real GGUF file at hand (scripts/setup's reference model; "
                    "REASONALLOC_EXTRA_MODELS=gemma-3-270m,qwen2.5-coder-1.5b-instruct scripts/setup "
                    "fetches files with k-quant tensors; or REASONALLOC_KQUANT_GGUF)")
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
    missing = {"Q4_K", "Q6_K", "Q8_0", "Q5_0"} - seen
    if missing:
        pytest.skip(f"no real tensor of type {sorted(missing)} at hand (the Gemma 3 270M Q4_K_M "
                    "file has them all: REASONALLOC_EXTRA_MODELS=gemma-3-270m scripts/setup)")


def test_the_pair_tool_pairs_policies_over_prompts(tmp_path):
    """bench/fidelity/pair.py: the mean of the per-prompt differences at each budget both policies
    ran at, with an interval that contains it; a policy not in the grid is refused by name."""
    rows = ["policy,budget,run,prompt,kl_mean"]
    a = {0: 0.30, 1: 0.20, 2: 0.25}
    b = {0: 0.40, 1: 0.22, 2: 0.35}
    for p in a:
        rows += [f"x/static,32,forced,{p},{a[p]}", f"x/layer,32,forced,{p},{b[p]}",
                 f"x/static,32,free,{p},9", f"x/static,64,forced,{p},0.1"]
    (tmp_path / "fidelity_runs.csv").write_text("\n".join(rows) + "\n")
    tool = os.path.join(ROOT, "bench/fidelity/pair.py")
    p = subprocess.run([sys.executable, tool, str(tmp_path), "x/static:x/layer"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stdout.splitlines() if l.startswith("| 32")]
    assert len(lines) == 1 and "| 64" not in p.stdout, p.stdout  # 64: only one policy ran
    m = re.search(r"\| ([+-]\d\.\d+) \[([+-]\d\.\d+), ([+-]\d\.\d+)\] \|$", lines[0])
    d = sum(a[k] - b[k] for k in a) / len(a)
    assert m and abs(float(m.group(1)) - d) < 1e-4, lines[0]
    assert float(m.group(2)) <= float(m.group(1)) <= float(m.group(3)), lines[0]
    assert "| 0.2500 | 0.3233 |" in lines[0], lines[0]  # forced rows only
    bad = subprocess.run([sys.executable, tool, str(tmp_path), "x/static:x/nothing"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "x/static:x/nothing" in bad.stderr, bad.stderr


def test_quick_keeps_a_flag_given_at_its_default_value(tmp_path):
    """--quick replaces only the defaults the command line did not give: --recent 16, the default
    value, stays (and is then left out for budget 12, which the report says) instead of becoming
    --quick's empty list."""
    model = write_model(tmp_path / "q.gguf", "llama-untied", "F32", seed=33)
    probes, heldout = tmp_path / "probes.txt", tmp_path / "heldout.txt"
    probes.write_text("the the a in\n")
    heldout.write_text("a in he\n")
    build = os.path.dirname(os.path.dirname(os.path.abspath(WORKER)))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench/policy_report.py"), build,
                        f"--model={model}", "--budgets=12", f"--probe_prompts={probes}",
                        f"--heldout_prompts={heldout}", "--probe_tokens=24", "--heldout_tokens=24",
                        "--sensitivity_budget=12", "--scorers=rkv", "--recall_tasks=0", "--quick",
                        "--recent=16", f"--out={tmp_path / 'r'}"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "--recent 16: left out" in p.stdout, p.stdout[-2000:]
    # A run that measured everything itself says "in all"; one given a profile, "this run".
    assert "min in all." in (tmp_path / "r" / "policy_report.md").read_text()
