"""reasonalloc.transformers as a user meets it: run from outside the source tree, in a venv with
torch and transformers and the reasonalloc wheel installed, against a real server and the reference
worker. SmolLM2-135M-Instruct is loaded by transformers from the worker's own GGUF file.

    python transformers_checks.py --target T --worker BIN --model FILE.gguf

Each check prints ok/FAIL; the exit status is the number of failures (capped at 1)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import reasonalloc  # noqa: E402
from reasonalloc import Client  # noqa: E402
from reasonalloc.transformers import (ReasonAllocCache, check_config, generate,  # noqa: E402
                                      prefill, prepare)

PROMPTS = ["What is 17 times 23? Think step by step.",
           "Name three primary colours and explain why they are called primary.",
           "Write a short poem about the sea.",
           "A train leaves at 3 pm and travels 120 km at 60 km/h. When does it arrive? Explain "
           "your reasoning carefully in several steps, checking each one."]
NEW_TOKENS = 64
EOS = 2  # SmolLM2's <|im_end|>, the worker's end of sequence


class Env:
    def __init__(self, args):
        self.target, self.worker, self.model_path = args.target, args.worker, args.model
        self.tmp = tempfile.mkdtemp(prefix="reasonalloc-hf-")
        self.prompts_file = os.path.join(self.tmp, "prompts.txt")
        with open(self.prompts_file, "w") as f:
            f.write("\n".join(PROMPTS) + "\n")
        self.ids = [[int(x) for x in subprocess.check_output(
            [self.worker, "tokenize", "--chat", f"--model={self.model_path}", "--text", p],
            text=True).split(",")] for p in PROMPTS]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        t0 = time.monotonic()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(self.model_path), gguf_file=os.path.basename(self.model_path),
            dtype=torch.float32)
        self.model.eval()
        print(f"model loaded by transformers in {time.monotonic() - t0:.1f} s", flush=True)
        prepare(self.model)

    def batch(self, n, copies=False):
        """The first n prompts (n copies of the first), left-padded: input_ids, attention_mask,
        prompt length."""
        ids = [self.ids[0]] * n if copies else self.ids[:n]
        width = max(map(len, ids))
        x = torch.tensor([[EOS] * (width - len(i)) + i for i in ids])
        m = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        return x, m, width

    def worker_generate(self, n, policy, copies=False):
        args = [self.worker, "generate", "--json", f"--model={self.model_path}",
                f"--target={self.target}", f"--max_tokens={NEW_TOKENS}",
                *(f"--{k}={v}" for k, v in policy.items())]
        if copies or n == 1:
            args += ["--prompt", PROMPTS[0], f"--batch={n}"]
        else:
            assert n == len(PROMPTS)
            args += [f"--prompts={self.prompts_file}"]
        return json.loads(subprocess.check_output(args, text=True).splitlines()[-1])

    def cache(self, client, policy):
        kw = dict(budget=policy["budget"], scorer=policy["scorer"],
                  allocator=policy["allocator"], buffer=policy.get("buffer", 64),
                  model_name="smollm2-135m-instruct")
        if policy["allocator"] == "reasonalloc":
            kw["mode"] = policy.get("mode", "full")
        return ReasonAllocCache(client, self.model.config, **kw)


def tokens(out, b, width):
    """Sequence b's generated tokens up to its first end of sequence (as the worker stops)."""
    g = out[b, width:].tolist()
    return g[:g.index(EOS) + 1] if EOS in g else g


def same_as_worker(env, n, policy, copies=False):
    w = env.worker_generate(n, policy, copies)
    x, m, width = env.batch(n, copies)
    with Client(env.target) as client, env.cache(client, policy) as cache:
        t0 = time.monotonic()
        with torch.no_grad():
            out = generate(env.model, x, cache, attention_mask=m, max_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
        seconds = time.monotonic() - t0
        for b in range(n):
            mine, theirs = tokens(out, b, width), w["sequences"][b]
            assert mine == theirs, (policy, b, mine, theirs)
        # A finished sequence is fed no more (as the worker stops it): the same events.
        assert cache.events == w["events"], (cache.events, w["events"])
        heads = 30 * 3
        assert all(a >= heads * (policy["budget"] + policy.get("buffer", 64)) * 64 * 2 * 4
                   for a in cache.arena_bytes()), cache.arena_bytes()
        assert cache.peak_kv_bytes[0] == w["peak_kv_bytes"], (cache.peak_kv_bytes, w)
        full = (len(env.ids[0]) + len(w["sequences"][0]) - 1) * 30 * 3 * 64 * 2 * 4
        assert cache.peak_kv_bytes[0] < full, (cache.peak_kv_bytes[0], full)
        if copies:  # every sequence fills at the same step: one CompressStream message each
            assert cache.stream_batches == cache.events // n > 0, (cache.stream_batches,
                                                                  cache.events)
        lengths = [int(v) for v in cache.sessions[0].len[:90]]
        budgets = cache.layer_budgets(0)
    print(f"      {policy} batch {n}: {sum(map(len, w['sequences']))} tokens identical to the "
          f"worker, {cache.events} events ({cache.stream_batches} CompressStream messages), "
          f"peak KV {cache.peak_kv_bytes[0]} B vs full {full} B, {seconds:.1f} s", flush=True)
    return lengths, budgets


def check_batch_of_four_matches_the_worker(env):
    """Left-padded batch of 4 prompts (38-69 tokens), 64 new tokens, events mid-decode; and 4
    copies of one prompt, whose events fall on the same steps and travel in one CompressStream
    message per step."""
    for policy in (dict(scorer="rkv", allocator="reasonalloc", mode="full", budget=32),
                   dict(scorer="snapkv", allocator="uniform", budget=32),
                   dict(scorer="h2o", allocator="adakv", budget=32)):
        same_as_worker(env, 4, policy)
    same_as_worker(env, 4, dict(scorer="rkv", allocator="reasonalloc", mode="head", budget=24,
                                buffer=16), copies=True)


def check_prompt_through_the_budget(env):
    """Budget 16, Δ 16: every prompt overflows its 32 rows, so prefill() compresses between
    chunks, as the worker's one-token-at-a-time prefill does; head routing leaves ragged heads."""
    same_as_worker(env, 4, dict(scorer="streaming", allocator="uniform", budget=16, buffer=16))
    lengths, _ = same_as_worker(env, 1, dict(scorer="rkv", allocator="reasonalloc", mode="head",
                                             budget=16, buffer=16))
    assert len(set(lengths)) > 1, lengths  # per-head lengths: rows really freed, not masked


def check_batch_of_one_matches_the_worker(env):
    same_as_worker(env, 1, dict(scorer="snapkv", allocator="pyramid", budget=24))


def check_full_cache_when_the_budget_exceeds_the_length(env):
    """Budget 256 > prompt + 64 tokens: no event, and the tokens equal transformers' own cache."""
    x, m, width = env.batch(4)
    with Client(env.target) as client, ReasonAllocCache(
            client, env.model.config, budget=256, scorer="rkv", allocator="uniform",
            model_name="smollm2-135m-instruct") as cache:
        with torch.no_grad():
            mine = env.model.generate(x, attention_mask=m, past_key_values=cache,
                                      max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=EOS, pad_token_id=EOS)
        assert cache.events == 0
    env.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            theirs = env.model.generate(x, attention_mask=m, max_new_tokens=NEW_TOKENS,
                                        do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
    finally:
        prepare(env.model)
    for b in range(4):
        assert tokens(mine, b, width) == tokens(theirs, b, width), b


def check_refusals(env):
    """Unsupported models, dtypes and misuse fail with an error that names the cause."""
    def raises(exc, text, fn):
        try:
            fn()
        except exc as e:
            assert text in str(e), (text, str(e))
            return
        raise AssertionError(f"no {exc.__name__} mentioning {text!r}")

    raises(ValueError, "sliding_window", lambda: check_config(transformers.MistralConfig(
        sliding_window=4096, max_position_embeddings=32768)))
    raises(ValueError, "config.model_type 'gpt2'", lambda: check_config(transformers.GPT2Config()))
    raises(ValueError, "config.layer_types", lambda: check_config(transformers.Qwen2Config(
        use_sliding_window=True, sliding_window=64, max_window_layers=1, num_hidden_layers=2)))
    check_config(transformers.Qwen2Config())  # its window is off unless use_sliding_window
    # A window on no layer (max_window_layers covers them all) is full attention.
    check_config(transformers.Qwen2Config(use_sliding_window=True, sliding_window=64,
                                          max_window_layers=2, num_hidden_layers=2))
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64)).to(torch.float64)
    raises(TypeError, "unsupported dtype torch.float64", lambda: prepare(tiny))
    raises(ValueError, "cross-attention", lambda: check_config(transformers.LlamaConfig(
        add_cross_attention=True)))
    with Client(env.target) as client:
        cache = ReasonAllocCache(client, env.model.config, budget=32,
                                 model_name="smollm2-135m-instruct")
        raises(TypeError, "unsupported dtype torch.float64", lambda: cache.open(1, torch.float64))
        raises(ValueError, "budget must be >= 1", lambda: ReasonAllocCache(
            client, env.model.config, budget=0))
        x, m, _ = env.batch(1)
        # A prompt longer than budget + Δ through model.generate alone: a clear error naming
        # what to use instead, and the cache refuses further use.
        with env.cache(client, dict(scorer="rkv", allocator="uniform", budget=16,
                                    buffer=16)) as small:
            raises(ValueError, "prefill()", lambda: env.model.generate(
                x, attention_mask=m, past_key_values=small, max_new_tokens=2))
            raises(RuntimeError, "a pass failed earlier", lambda: env.model.generate(
                x, attention_mask=m, past_key_values=small, max_new_tokens=2))
        # The model on another attention implementation cannot use the cache silently.
        env.model.set_attn_implementation("sdpa")
        try:
            with env.cache(client, dict(scorer="rkv", allocator="uniform", budget=32)) as other:
                raises(RuntimeError, "attn_implementation", lambda: env.model(
                    input_ids=x, attention_mask=m, past_key_values=other))
        finally:
            prepare(env.model)
        # The batch size is fixed by the first pass.
        with env.cache(client, dict(scorer="rkv", allocator="uniform", budget=32)) as fixed:
            prefill(env.model, fixed, x[:, :5], m[:, :5])
            x2, m2, _ = env.batch(2)
            raises(ValueError, "holds 1 sequences; this pass has 2", lambda: env.model(
                input_ids=x2[:, :1], attention_mask=m2[:, :1], past_key_values=fixed))
        raises(NotImplementedError, "beam search", lambda: cache.reorder_cache(None))


def check_sessions_closed(env):
    """close() ends every session: none of this client's are left on the server."""
    with Client(env.target) as client:
        with env.cache(client, dict(scorer="rkv", allocator="uniform", budget=32)) as cache:
            x, m, _ = env.batch(2)
            prefill(env.model, cache, x, m)
            ids = [s.id for s in cache.sessions]
            assert cache.kv_bytes()[0] > 0
        for sid in ids:
            try:
                client.get_session(sid)
            except reasonalloc.SidecarError as e:
                assert e.code.name == "NOT_FOUND", e
            else:
                raise AssertionError(f"session {sid} still open")


def check_tiny_qwen2_and_mistral_in_fp32_and_bf16(env):
    """Random-weight Qwen2 (attention biases) and Mistral models with GQA, budget above the
    length: logits over a left-padded prompt and 8 greedy steps equal transformers' eager
    attention with its own cache (fp32: 1e-4; bf16: the same tokens, logits within 0.1)."""
    torch.manual_seed(0)
    with Client(env.target) as client:
        for cfg in (transformers.Qwen2Config(hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=97),
                    transformers.MistralConfig(hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, vocab_size=97,
                                               sliding_window=None)):
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
                model = transformers.AutoModelForCausalLM.from_config(cfg)
                with torch.no_grad():  # weights large enough for peaked attention
                    for p in model.parameters():
                        p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
                model = model.to(dtype).eval()
                x = torch.randint(3, 97, (2, 12))
                m = torch.ones_like(x)
                m[1, :4] = 0
                model.set_attn_implementation("eager")
                with torch.no_grad():
                    want = model(input_ids=x, attention_mask=m).logits
                    want_tokens = model.generate(x, attention_mask=m, max_new_tokens=8,
                                                 do_sample=False, pad_token_id=0)
                prepare(model)
                with ReasonAllocCache(client, model.config, budget=64, scorer="snapkv",
                                      allocator="uniform", model_name=f"tiny-{cfg.model_type}",
                                      max_context=4096) as cache, torch.no_grad():
                    got = model(input_ids=x, attention_mask=m, past_key_values=cache).logits
                keep = m.bool()
                diff = (got[keep].float() - want[keep].float()).abs().max().item()
                assert diff <= tol * (1 + want[keep].float().abs().max().item()), \
                    (cfg.model_type, dtype, diff)
                with ReasonAllocCache(client, model.config, budget=64, scorer="snapkv",
                                      allocator="uniform", model_name=f"tiny-{cfg.model_type}",
                                      max_context=4096) as cache, torch.no_grad():
                    got_tokens = generate(model, x, cache, attention_mask=m, max_new_tokens=8,
                                          do_sample=False, pad_token_id=0)
                assert torch.equal(got_tokens, want_tokens), (cfg.model_type, dtype)
                print(f"      tiny {cfg.model_type} {dtype}: max |Δ logit| {diff:.2e}, 8 tokens "
                      "equal", flush=True)


CHECKS = [check_batch_of_four_matches_the_worker, check_prompt_through_the_budget,
          check_batch_of_one_matches_the_worker,
          check_full_cache_when_the_budget_exceeds_the_length,
          check_tiny_qwen2_and_mistral_in_fp32_and_bf16, check_refusals,
          check_sessions_closed]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("REASONALLOC_TORCH_THREADS", "1")))
    assert os.path.dirname(reasonalloc.__file__).startswith(sys.prefix), reasonalloc.__file__
    env = Env(args)
    failed = 0
    for check in CHECKS:
        t0 = time.monotonic()
        try:
            check(env)
            print(f"ok    {check.__name__} ({time.monotonic() - t0:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001  (every check runs; each failure is reported)
            failed += 1
            print(f"FAIL  {check.__name__}\n{traceback.format_exc()}", flush=True)
    print(f"{len(CHECKS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
