"""The reference worker on the second model, Qwen2.5-Coder-1.5B-Instruct Q4_K_M (architecture
qwen2: Q/K/V biases, NEOX RoPE, an untied Q6_K output head, Q4_K and Q6_K weights, head dimension
128, 12 query heads over 2 KV heads), against the independent NumPy forward pass of
numpy_forward.py: max |logit difference| <= 1e-5 * (1 + max |logit|) and the same argmax at every
position.

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
# "def fibonacci(n):" in Qwen2.5's vocabulary.
TOKENS = [750, 75698, 1445, 1648]


@pytest.mark.skipif(not os.path.exists(MODEL),
                    reason=f"{NAME} was not fetched (REASONALLOC_EXTRA_MODELS=qwen2.5-coder-1.5b-instruct "
                           f"scripts/setup): {MODEL}")
def test_second_model_logits_match_numpy_forward(tmp_path):
    out = tmp_path / "logits.npy"
    p = subprocess.run([WORKER, "logits", f"--model={MODEL}",
                        "--tokens=" + ",".join(map(str, TOKENS)), f"--out={out}"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = np.load(out)
    want = NumpyForward(MODEL).logits(TOKENS)
    assert got.shape == want.shape == (len(TOKENS), 151936)
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    print(f"\n{NAME}: max |logit difference| over {len(TOKENS)} positions {diff:.3g} "
          f"(largest |logit| {scale:.1f})")
    assert diff <= 1e-5 * (1 + scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()
