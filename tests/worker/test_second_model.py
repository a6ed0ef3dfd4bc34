"""The reference worker on the second model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M (architecture
qwen2: Q/K/V biases, NEOX RoPE, an untied Q6_K output head, Q4_K and Q6_K weights, head dimension
128, 12 query heads over 2 KV heads), against the independent NumPy forward pass of
numpy_forward.py: max |logit difference| <= 1e-5 * (1 + max |logit|) and the same argmax at every
position of a ~25-token code prompt; and a greedy answer in its own chat template that is the
function it was asked for.

Skipped with the reason unless the model was fetched (scripts/fetch-model; it lives in
$REASONALLOC_MODEL_DIR or the XDG cache's reasonalloc/models). Needs about 9 GB of memory at a time
(the worker, then NumPy, each holding the weights in fp32) and a few minutes.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from numpy_forward import NumpyForward  # noqa: E402

WORKER = os.environ.get("REASONALLOC_WORKER_BINARY", "build/worker/reasonalloc-worker")
NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
# Found as the worker finds models (`reasonalloc-worker locate`: one rule everywhere).
_located = subprocess.run([WORKER, "locate", f"--model={NAME}"], capture_output=True, text=True)
MODEL = _located.stdout.strip() if _located.returncode == 0 else _located.stderr.strip()
# Code with indentation, a docstring and digits: long enough for RoPE at head dimension 128 to
# matter across positions.
TEXT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'


@pytest.mark.skipif(not os.path.exists(MODEL),
                    reason=f"{NAME} was not fetched (REASONALLOC_EXTRA_MODELS=qwen2.5-coder-1.5b-instruct "
                           f"scripts/setup): {MODEL}")
def test_second_model_logits_match_numpy_forward(tmp_path):
    out = tmp_path / "logits.npy"
    t = subprocess.run([WORKER, "tokenize", f"--model={MODEL}", f"--text={TEXT}"],
                       capture_output=True, text=True)
    assert t.returncode == 0, t.stderr
    tokens = [int(x) for x in t.stdout.strip().split(",")]
    assert tokens[:3] == [750, 75698, 1445]  # "def fibonacci(n"
    assert len(tokens) >= 20
    p = subprocess.run([WORKER, "logits", f"--model={MODEL}",
                        "--tokens=" + ",".join(map(str, tokens)), f"--out={out}"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = np.load(out)
    want = NumpyForward(MODEL).logits(tokens)
    assert got.shape == want.shape == (len(tokens), 151936)
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    print(f"\n{NAME}: max |logit difference| over {len(tokens)} positions {diff:.3g} "
          f"(largest |logit| {scale:.1f})")
    assert diff <= 1e-5 * (1 + scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.skipif(not os.path.exists(MODEL),
                    reason=f"{NAME} was not fetched (REASONALLOC_EXTRA_MODELS=qwen2.5-coder-1.5b-instruct "
                           f"scripts/setup): {MODEL}")
def test_second_model_greedy_answer_is_coherent():
    """Asked in its own chat template for a small function, the greedy answer is that function."""
    p = subprocess.run([WORKER, "generate", f"--model={MODEL}", "--full_cache", "--max_tokens=40",
                        "--prompt=Write a Python function square(x) that returns x squared. "
                        "Reply with the code only."], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    print(f"\n{NAME} greedy answer:\n{p.stdout}")
    assert "def square(x)" in p.stdout and "return" in p.stdout and "x" in p.stdout
