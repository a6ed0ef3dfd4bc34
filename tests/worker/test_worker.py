"""The reference worker against independent references.

- logits of a short chat prompt against a NumPy forward pass built on PyPI's gguf reader;
- the tokenizer against Hugging Face's tokenizers library built from the same GGUF vocabulary;
- greedy decoding is deterministic;
- through the sidecar: identical tokens until the first compression event, the KV held bounded by
  budget + Δ rows per head, the expected number of events;
- bad model files are errors naming the problem.

Binaries come from REASONALLOC_WORKER_BINARY and REASONALLOC_SERVER_BINARY (set by ctest); the
reference model, found as the worker finds models (`reasonalloc-worker locate`: in the model folder
scripts/setup fills).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from numpy_llama import NumpyLlama  # noqa: E402

WORKER = os.environ.get("REASONALLOC_WORKER_BINARY", "build/worker/reasonalloc-worker")
SERVER = os.environ.get("REASONALLOC_SERVER_BINARY", "build/server/reasonalloc-server")
# The model the worker itself would load: one rule for the worker, the tests and the scripts.
# These checks are about the reference model (its geometry and SmolLM's tokenizer are pinned
# below), so it is named, whatever $REASONALLOC_MODEL says.
_located = subprocess.run([WORKER, "locate", "--model=SmolLM2-135M-Instruct.Q4_1.gguf"],
                          capture_output=True, text=True)
if _located.returncode != 0:
    raise RuntimeError(f"reasonalloc-worker locate: {_located.stderr.strip()} (run scripts/setup)")
MODEL = _located.stdout.strip()
PROMPT = "Sam has 3 boxes with 4 pens each. How many pens? Think step by step."
L, HKV, D = 30, 3, 64


def worker(*args, check=True):
    p = subprocess.run([WORKER, *args, f"--model={MODEL}"], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"worker {args} failed: {p.stderr}")
    return p


def tokenize(text, chat=False):
    out = worker("tokenize", f"--text={text}", *(["--chat"] if chat else [])).stdout.strip()
    return [int(t) for t in out.split(",")] if out else []


def test_logits_match_an_independent_numpy_forward_pass(tmp_path):
    tokens = tokenize("What is 7 times 8?", chat=True)
    out = tmp_path / "logits.npy"
    worker("logits", "--tokens=" + ",".join(map(str, tokens)), f"--out={out}")
    got = np.load(out)
    want = NumpyLlama(MODEL).logits(tokens)
    assert got.shape == want.shape == (len(tokens), 49152)
    diff = float(np.abs(got - want).max())
    print(f"\nmax |logit difference| over {len(tokens)} positions: {diff:.3g} "
          f"(largest |logit| {float(np.abs(want).max()):.1f})")
    assert diff < 2e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


def hf_tokenizer():
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r = GGUFReader(MODEL)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])
    return hf


def test_tokenizer_matches_hugging_face_tokenizers():
    hf = hf_tokenizer()
    texts = [
        PROMPT,
        "It's 12:30 -- they'll arrive at 1,250.75 km/h!  Double  spaces\tand\ttabs.\n\nNew paragraph",
        "  leading spaces, trailing spaces   ",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "x=(a+b)*c; if (x>=10) {return \"ok\";} // done...\r\n",
        "I'm sure we've seen you'd do it; DON'T shout.",
    ]
    for text in texts:
        assert tokenize(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)


def generate_json(*args):
    out = worker("generate", *args, "--json").stdout
    return json.loads(out)


def test_greedy_decoding_is_deterministic_and_decodes_like_hugging_face():
    runs = [generate_json("--full_cache", f"--prompt={PROMPT}", "--max_tokens=24")
            for _ in range(2)]
    assert runs[0]["generated"] == runs[1]["generated"]
    assert len(runs[0]["generated"]) > 0
    assert runs[0]["text"] == hf_tokenizer().decode(runs[0]["generated"], skip_special_tokens=False)


def test_temperature_sampling_is_reproducible_for_a_seed():
    common = ["--full_cache", f"--prompt={PROMPT}", "--max_tokens=16", "--temperature=1.0",
              "--ignore_eos"]
    a = generate_json(*common, "--seed=1")["generated"]
    b = generate_json(*common, "--seed=1")["generated"]
    c = generate_json(*common, "--seed=2")["generated"]
    assert a == b
    assert a != c


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="reasonalloc-worker-") as tmp:
        sock = f"unix://{tmp}/s.sock"
        proc = subprocess.Popen([SERVER, f"--listen={sock}", "--metrics_address=127.0.0.1:0"],
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while not os.path.exists(f"{tmp}/s.sock"):
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        time.sleep(0.2)
        yield sock
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_through_the_sidecar(server):
    budget, delta, n = 48, 8, 40
    common = [f"--prompt={PROMPT}", f"--max_tokens={n}", "--ignore_eos", "--json"]
    full = json.loads(worker("generate", "--full_cache", *common).stdout)
    side = json.loads(worker("generate", f"--target={server}", "--scorer=rkv", "--allocator=uniform",
                             f"--budget={budget}", f"--buffer={delta}", "--window=4",
                             *common).stdout)
    prompt = full["prompt_tokens"]
    steps = prompt + n - 1
    first_event = budget + delta  # the step before which the regions are first full
    assert prompt < first_event < steps
    # Identical until the first event changes the cache (position first_event onward).
    same = first_event - prompt + 1
    assert side["generated"][:same] == full["generated"][:same]
    # Then an event every Δ steps, and never more than budget + Δ rows per head.
    assert side["events"] == (steps - first_event - 1) // delta + 1
    assert side["peak_kv_bytes"] == L * HKV * (budget + delta) * D * 2 * 4
    assert side["full_kv_bytes"] == steps * L * HKV * D * 2 * 4
    assert side["layer_budgets"] == [budget] * L


def test_reasonalloc_without_a_profile_and_errors(server):
    out = json.loads(worker("generate", f"--target={server}", "--allocator=reasonalloc",
                            "--budget=16", "--buffer=8", "--window=4", f"--prompt={PROMPT}",
                            "--max_tokens=8", "--ignore_eos", "--json").stdout)
    assert out["events"] > 0
    bad = worker("generate", f"--target={server}", "--allocator=reasonalloc", "--mode=sideways",
                 f"--prompt={PROMPT}", check=False)
    assert bad.returncode == 2 and "--mode" in bad.stderr
    bad = worker("generate", f"--target={server}", "--scorer=nope", f"--prompt={PROMPT}",
                 check=False)
    assert bad.returncode != 0 and "scorer" in bad.stderr


def test_bad_model_files_are_errors_that_say_why(tmp_path):
    missing = subprocess.run([WORKER, "tokenize", "--text=x", f"--model={tmp_path}/none.gguf"],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "none.gguf" in missing.stderr
    truncated = tmp_path / "cut.gguf"
    with open(MODEL, "rb") as f:
        truncated.write_bytes(f.read(4096))
    p = subprocess.run([WORKER, "tokenize", "--text=x", f"--model={truncated}"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "truncated" in p.stderr
    p = subprocess.run([WORKER, "tokenize", "--text=x", f"--model={tmp_path}"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "not a regular file" in p.stderr


def test_bad_flags_are_errors_naming_the_flag():
    for args, flag in [(["--max_tokens=9000"], "--max_tokens"), (["--max_tokens=0"], "--max_tokens"),
                       (["--batch=0"], "--batch"), (["--temperature=-1"], "--temperature")]:
        p = worker("generate", "--full_cache", "--prompt=hi", *args, check=False)
        assert p.returncode == 2 and flag in p.stderr, (args, p.stderr)
    p = worker("generate", "--prompt=hi", check=False)
    assert p.returncode == 2 and "--target" in p.stderr
    p = worker("logits", "--tokens=1,x", "--out=/dev/null", check=False)
    assert p.returncode == 2 and "--tokens" in p.stderr
    p = worker("logits", "--tokens=99999999", "--out=/dev/null", check=False)
    assert p.returncode == 2 and "out of range" in p.stderr
