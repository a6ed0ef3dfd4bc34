"""Writes the seed corpora of the fuzz targets into OUT/<target>/ (deterministic).

    python fuzz/make_corpus.py OUT

npy: small arrays of every dtype the reader knows (and a Fortran-ordered one); profile_json: the
shipped layer profiles and one with a head demand; gguf: a tiny GGUF file with metadata of every
kind and F32, F16, Q8_0, Q4_0, Q4_K and Q6_K tensors; the structured targets (inline_inputs, register_buffers,
arena_descriptor) read their input through FuzzedDataProvider, so their seeds are seeded random
bytes.
"""
import io
import pathlib
import shutil
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def npy_seeds(out):
    arrays = {
        "f4_2x3": np.arange(6, dtype="<f4").reshape(2, 3),
        "f2_4": np.linspace(-1, 1, 4).astype("<f2"),
        "i8_3": np.array([1, -2, 3], dtype="<i8"),
        "i4_2x2": np.array([[1, 2], [3, 4]], dtype="<i4"),
        "f4_scalar": np.array(1.5, dtype="<f4"),
        "f4_1x2x2x2": np.ones((1, 2, 2, 2), dtype="<f4"),
        "f4_fortran": np.asfortranarray(np.arange(6, dtype="<f4").reshape(2, 3)),
        "f4_empty": np.zeros((0, 3), dtype="<f4"),
    }
    for name, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        (out / f"{name}.npy").write_bytes(buf.getvalue())


def profile_seeds(out):
    for p in sorted((ROOT / "deploy" / "profiles").glob("*.json")):
        shutil.copy(p, out / p.name)
    (out / "minimal.json").write_text(
        '{"name": "m", "model": {"name": "m", "num_layers": 2, "num_q_heads": 2, '
        '"num_kv_heads": 1, "head_dim": 4}, "rho": 0.9, "demand": [1.0, 1.0], '
        '"samples": ["3", "3"]}')
    (out / "head_demand.json").write_text(
        '{"name": "h", "model": {"name": "h", "num_layers": 2, "num_q_heads": 4, '
        '"num_kv_heads": 2, "head_dim": 4}, "rho": 1, "demand": [1.0, 3.0], '
        '"head_demand": [2.0, 0.5, 0.0, 0.0]}')


def gguf_seeds(out):
    from gguf import GGUFWriter, GGMLQuantizationType as Q
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    path = out / "tiny.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_head_count(2)
    w.add_rope_freq_base(10000.0)
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, 0.5])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("q8_0", quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("q4_0", quantize(x, Q.Q4_0), raw_dtype=Q.Q4_0)
    # K-quant blocks of 256 weights: random bytes with small fp16 scales.
    for qtype, block in ((Q.Q4_K, 144), (Q.Q6_K, 210)):
        raw = rng.integers(0, 256, (2, block), dtype=np.uint8)
        scale = np.array([0.01], dtype=np.float16).view(np.uint8)
        if qtype == Q.Q4_K:
            raw[:, 0:2] = scale
            raw[:, 2:4] = scale
        else:
            raw[:, block - 2:] = scale
        w.add_tensor(qtype.name.lower(), raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_seeds(out, sizes):
    rng = np.random.default_rng(1)
    for i, n in enumerate(sizes):
        (out / f"seed{i}").write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def main():
    base = pathlib.Path(sys.argv[1])
    targets = {
        "fuzz_npy": npy_seeds,
        "fuzz_profile_json": profile_seeds,
        "fuzz_gguf": gguf_seeds,
        "fuzz_inline_inputs": lambda o: random_seeds(o, [64, 256, 1024, 4096]),
        "fuzz_register_buffers": lambda o: random_seeds(o, [64, 256, 1024]),
        "fuzz_arena_descriptor": lambda o: random_seeds(o, [32, 128, 512]),
    }
    for name, make in targets.items():
        out = base / name
        out.mkdir(parents=True, exist_ok=True)
        make(out)


if __name__ == "__main__":
    main()
