"""Reference-worker decode speed, full cache against the same decode through the sidecar
(managed host-shm sessions, rkv + reasonalloc, budget 64, Δ 64 unless told), at batch 1 and a
larger batch.

  .venv/bin/python bench/worker_speed.py BUILD_DIR [--reps 3] [--tokens 320] [--batch 16]
      [--model FILE]   (a path or a file name in the model folder; default: the reference model)
      [--budget B] [--buffer D]

Runs alternate (full, sidecar) so that both see the same machine state; prints the medians, the
sidecar/full speed ratio and the share of the run spent inside Compress calls.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

PROMPT = ("A baker has 3 trays of 12 cookies. She sells 20 cookies and bakes 8 more. "
          "How many cookies does she have now? Think step by step.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--model", default="", help="GGUF file (default: the worker's)")
    ap.add_argument("--budget", type=int, default=64, help="B of the sidecar run")
    ap.add_argument("--buffer", type=int, default=64, help="Δ of the sidecar run")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = os.path.join(a.build, "worker/reasonalloc-worker")
    with tempfile.TemporaryDirectory(prefix="reasonalloc-speed-") as tmp:
        sock = f"unix://{tmp}/s.sock"
        server = subprocess.Popen([os.path.join(a.build, "server/reasonalloc-server"),
                                   f"--listen={sock}", "--metrics_address=127.0.0.1:0",
                                   f"--profile_dir={root}/deploy/profiles"],
                                  stderr=subprocess.DEVNULL)
        while not os.path.exists(f"{tmp}/s.sock"):
            time.sleep(0.05)
        time.sleep(0.3)
        common = [f"--prompt={PROMPT}", f"--max_tokens={a.tokens}", "--ignore_eos", "--json",
                  *([f"--model={a.model}"] if a.model else [])]
        side = [f"--target={sock}", "--scorer=rkv", "--allocator=reasonalloc",
                f"--budget={a.budget}", f"--buffer={a.buffer}"]
        results = {}
        try:
            for rep in range(a.reps):
                for batch in (1, a.batch):
                    for name, extra in (("full", ["--full_cache"]), ("sidecar", side)):
                        out = subprocess.run([worker, "generate", *extra, *common, f"--batch={batch}"],
                                             capture_output=True, check=True).stdout
                        r = json.loads(out.decode("utf-8", errors="replace"))
                        results.setdefault((batch, name), []).append(r)
                        print(f"rep {rep} batch {batch:3d} {name:8s} {r['tokens_per_second']:7.1f} tokens/s"
                              f"  Compress {r['compress_seconds']:.2f} s of {r['seconds']:.1f} s"
                              f" ({r['events']} events)", flush=True)
        finally:
            server.terminate()
            server.wait()
    print()
    print(f"{results[(1, 'full')][0]['model_name']}: medians of {a.reps} runs, {a.tokens} generated "
          f"tokens per sequence, sidecar budget {a.budget}, Δ {a.buffer}:")
    for batch in (1, a.batch):
        f = statistics.median(r["tokens_per_second"] for r in results[(batch, "full")])
        s = statistics.median(r["tokens_per_second"] for r in results[(batch, "sidecar")])
        share = statistics.median(r["compress_seconds"] / r["seconds"] for r in results[(batch, "sidecar")])
        print(f"batch {batch:3d}: full cache {f:7.1f} tokens/s, through the sidecar {s:7.1f} tokens/s "
              f"(ratio {s / f:.2f}); Compress calls take {100 * share:.1f}% of the sidecar run")


if __name__ == "__main__":
    main()
