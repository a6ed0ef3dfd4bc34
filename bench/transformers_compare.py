"""The sidecar inside Hugging Face transformers against kvpress's own decoding-time compression, on
the same model (SmolLM2-135M-Instruct, loaded by transformers from the reference worker's GGUF
file, fp32, CPU) and prompts: tokens/s, peak KV bytes held per sequence, the time spent inside
Compress, and agreement with the full cache (greedy, free-running: the share of generated
positions whose token equals the full cache's, and the first position that differs).

Run by bench/transformers_compare.sh (which installs the reasonalloc wheel into the torch venv):
  bench/transformers_compare.sh [BUILD_DIR] [--batches 1,8] [--budgets 64,256] [--reps 3] ...

Configurations, each at every batch size:
- full: transformers' default cache (DynamicCache, sdpa attention);
- sidecar, budget above the length: the adapter without any event (its own overhead);
- kvpress snapkv B: kvpress's DecodingPress over SnapKVPress (window 8, kernel 5), compressing
  to B tokens every Δ = 64 decode steps (one length per layer);
- sidecar snapkv B: SidecarPress with the sidecar's snapkv set up as kvpress computes it (mean of
  the group's scores, softmax over all keys, average pooling 5, window 8), uniform budgets, Δ 64;
- sidecar POLICY B: SidecarPress with --policy (default: the policy report's pick for this
  model, h2o + reasonalloc layer on the measured sensitivity profile).
Every sequence generates exactly --new_tokens tokens (end of sequence suppressed until then).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import torch  # noqa: E402
import transformers  # noqa: E402

from reasonalloc import Client  # noqa: E402
from reasonalloc.transformers import SidecarPress  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2


def kv_bytes(cache):
    """Bytes of K and V rows in a transformers cache, per sequence (the batch's mean, padding
    rows included: transformers holds them)."""
    total, batch = 0, 1
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
            batch = layer.keys.shape[0]
    return total // batch


class PeakMeter:
    """Peak KV bytes of a transformers cache, read after every forward pass."""

    def __init__(self, model):
        self.peak = 0
        self.handle = model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "layers"):
            self.peak = max(self.peak, kv_bytes(cache))

    def close(self):
        self.handle.remove()


def parse_policy(text):
    """scorer/allocator[-mode][@profile] → SidecarPress keywords."""
    profile = ""
    if "@" in text:
        text, profile = text.split("@", 1)
    scorer, allocator = text.split("/")
    kw = dict(scorer=scorer)
    if allocator.startswith("reasonalloc"):
        kw.update(allocator="reasonalloc", mode=allocator.partition("-")[2] or "full")
    else:
        kw["allocator"] = allocator
    if profile:
        kw["profile"] = profile
    return kw


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build")
    ap.add_argument("--prompts", default=os.path.join(ROOT, "bench/fidelity/prompts.txt"))
    ap.add_argument("--max_prompts", type=int, default=8)
    ap.add_argument("--batch1_prompts", type=int, default=2,
                    help="prompts decoded one at a time for the batch-1 figures")
    ap.add_argument("--new_tokens", type=int, default=256)
    ap.add_argument("--budgets", default="64,256")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--policy", default="h2o/reasonalloc-layer@smollm2-135m-instruct.sensitivity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/transformers"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from kvpress import DecodingPress, SnapKVPress

    worker = os.path.join(a.build, "worker/reasonalloc-worker")
    model_path = subprocess.check_output([worker, "locate"], text=True).strip()
    prompts = [line.rstrip("\n").replace("\\n", "\n") for line in open(a.prompts)
               if line.strip() and not line.startswith("#")][:a.max_prompts]
    ids = [[int(x) for x in subprocess.check_output(
        [worker, "tokenize", "--chat", "--text", p], text=True).split(",")] for p in prompts]
    t0 = time.monotonic()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32)
    model.eval()
    print(f"model loaded in {time.monotonic() - t0:.1f} s; prompts {[len(i) for i in ids]} "
          f"tokens; CPU {cpu_model()}", flush=True)

    tmp = tempfile.mkdtemp(prefix="reasonalloc-hfbench-")
    sock = os.path.join(tmp, "s.sock")
    server = subprocess.Popen([os.path.join(a.build, "server/reasonalloc-server"),
                               f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
                               f"--profile_dir={os.path.join(ROOT, 'deploy/profiles')}",
                               "--log_level=error"])
    while not os.path.exists(sock):
        time.sleep(0.05)
    time.sleep(0.2)
    client = Client(f"unix://{sock}")
    snap = dict(scorer="snapkv", allocator="uniform", gqa_reduce="mean_scores",
                softmax_all_keys=True, pool_kind="avg", pool_kernel=5)
    policy = parse_policy(a.policy)
    budgets = [int(b) for b in a.budgets.split(",") if b]
    # The adapter with a budget above every length: no event, so its cost against "full" is the
    # adapter's own (attention over the arena rows in Python), not compression.
    above = a.new_tokens + 512
    configs = [("full", None, None), ("sidecar, budget above the length", "sidecar",
                                      dict(budget=above, scorer="snapkv", allocator="uniform"))]
    for b in budgets:
        configs += [(f"kvpress snapkv B{b}", "kvpress", dict(budget=b)),
                    (f"sidecar snapkv B{b}", "sidecar", dict(budget=b, **snap)),
                    (f"sidecar {a.policy} B{b}", "sidecar", dict(budget=b, **policy))]
    rows = []
    try:
        for batch in [int(x) for x in a.batches.split(",") if x]:
            groups = [ids[:batch]] if batch > 1 else [[i] for i in ids[:a.batch1_prompts]]
            reference = {}
            for name, kind, opts in configs:
                times, peaks, compress, events, agree, first = [], [], [], [], [], []
                for rep in range(a.reps):
                    seconds = 0.0
                    peak, comp, ev = 0, 0.0, 0
                    outs = []
                    for gi, group in enumerate(groups):
                        width = max(map(len, group))
                        x = torch.tensor([[EOS] * (width - len(i)) + i for i in group])
                        m = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in group])
                        kw = dict(attention_mask=m, max_new_tokens=a.new_tokens,
                                  min_new_tokens=a.new_tokens, do_sample=False,
                                  pad_token_id=EOS)
                        meter = PeakMeter(model) if kind != "sidecar" else None
                        t = time.perf_counter()
                        with torch.no_grad():
                            if kind is None:
                                out = model.generate(x, **kw)
                            elif kind == "kvpress":
                                press = DecodingPress(
                                    base_press=SnapKVPress(window_size=8, kernel_size=5),
                                    compression_interval=a.buffer, target_size=opts["budget"],
                                    hidden_states_buffer_size=max(8, a.buffer))
                                with press(model):
                                    out = model.generate(x, **kw)
                            else:
                                press = SidecarPress(client, buffer=a.buffer,
                                                     model_name="smollm2-135m-instruct", **opts)
                                with press(model):
                                    out = model.generate(x, **kw)
                                last = press.last["peak_kv_bytes"]  # per sequence
                                peak = max(peak, sum(last) // len(last))
                                comp += press.last["compress_seconds"]
                                ev += press.last["events"]
                        seconds += time.perf_counter() - t
                        if meter:
                            peak = max(peak, meter.peak)
                            meter.close()
                        outs.append((gi, out[:, width:].tolist()))
                    times.append(seconds)
                    peaks.append(peak)
                    compress.append(comp)
                    events.append(ev)
                    if kind is None and rep == 0:
                        reference = dict(outs)
                    if rep == 0:
                        for gi, seqs in outs:
                            for s, r in zip(seqs, reference[gi]):
                                same = [u == v for u, v in zip(s, r)]
                                agree.append(sum(same) / len(same))
                                first.append(same.index(False) if False in same else len(same))
                n_tokens = sum(len(g) for g in groups) * a.new_tokens
                row = dict(config=name, batch=batch, tokens=n_tokens,
                           tokens_per_second=n_tokens / statistics.median(times),
                           seconds=[round(t, 2) for t in times],
                           peak_kv_bytes=max(peaks), compress_seconds=statistics.median(compress),
                           events=events[0], agreement=statistics.mean(agree),
                           first_difference=statistics.median(first))
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        client.close()
        server.terminate()
        server.wait()
    write_report(a, rows)


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def write_report(a, rows):
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "transformers_compare.json"), "w") as f:
        # Paths as the repository names them (no machine's own folders in the results).
        args = {k: (os.path.relpath(v, ROOT) if k in ("build", "prompts", "out") else v)
                for k, v in vars(a).items()}
        json.dump(dict(args=args, cpu=cpu_model(), rows=rows), f, indent=1)
    full = {r["batch"]: r for r in rows if r["config"] == "full"}
    lines = ["# The sidecar in transformers against kvpress\n",
             f"SmolLM2-135M-Instruct (fp32, CPU, {a.threads} threads, {cpu_model()}); "
             f"{a.new_tokens} new tokens per sequence; medians of {a.reps} runs; agreement with "
             "the full cache over the first run's greedy tokens.\n",
             "| batch | configuration | tokens/s | vs full | peak KV / sequence | vs full | "
             "events | time in Compress | agreement | first difference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = full.get(r["batch"])
        lines.append(
            f"| {r['batch']} | {r['config']} | {r['tokens_per_second']:.1f} | "
            f"{r['tokens_per_second'] / f['tokens_per_second']:.2f}× | "
            f"{r['peak_kv_bytes'] / 2**20:.2f} MiB | {r['peak_kv_bytes'] / f['peak_kv_bytes']:.0%} | "
            + (f"{r['events']} | {r['compress_seconds']:.2f} s | "
               if r["config"].startswith("sidecar") else "– | – | ")
            + f"{r['agreement']:.3f} | "
            f"{r['first_difference']:.0f} |")
    with open(os.path.join(a.out, "transformers_compare.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
