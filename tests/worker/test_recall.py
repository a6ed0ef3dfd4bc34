"""The long-range recall benchmark: its task generator, its answer rule, and the program end to end
on the reference model through a real sidecar.

Binaries come from REASONALLOC_RECALL_BINARY, REASONALLOC_WORKER_BINARY and
REASONALLOC_SERVER_BINARY (set by ctest).
"""
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench", "recall"))
import tasks as T  # noqa: E402

RECALL = os.environ.get("REASONALLOC_RECALL_BINARY", "build/bench/recall")
WORKER = os.environ.get("REASONALLOC_WORKER_BINARY", "build/worker/reasonalloc-worker")
SERVER = os.environ.get("REASONALLOC_SERVER_BINARY", "build/server/reasonalloc-server")


def start_server(tmp_path):
    """A sidecar on a private socket with the shipped profiles: (process, target)."""
    sock = tmp_path / "s.sock"
    server = subprocess.Popen([SERVER, f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
                               f"--profile_dir={ROOT}/deploy/profiles", "--log_level=error"])
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    return server, f"unix://{sock}"


def words(text):
    return set(re.findall(r"[0-9A-Za-z']+", text.lower()))


def test_tasks_are_seeded_and_the_seed_names_the_split():
    a = T.make_tasks(1, 30)
    assert [(t.answer, t.prompt()) for t in a] == [(t.answer, t.prompt()) for t in T.make_tasks(1, 30)]
    b = T.make_tasks(2, 30)
    # Seed 2 (the calibration's) shares no prompt with seed 1 (the evaluation's).
    assert not {t.prompt() for t in a} & {t.prompt() for t in T.make_tasks(2, 48)}
    assert sum(x.prompt() == y.prompt() for x, y in zip(a, b)) == 0
    assert {t.kind for t in a} == set(T.KINDS)
    assert sorted(t.kind for t in a).count("passkey") == 10


def test_every_answer_is_stated_once_early_and_never_again():
    for t in T.make_tasks(7, 90):
        assert T.answer_matches(t.answer, t.head), t.id
        assert len(re.findall(r"(?<![0-9a-z])" + re.escape(t.answer.lower()) + r"(?![0-9a-z])",
                              t.head.lower())) == 1, t.id
        # Not in the filler nor in the question: only the early fact can supply it.
        assert not T.answer_matches(t.answer, t.tail), t.id
        assert len(t.tail.split()) >= 480, t.id
        assert t.tail.rstrip().endswith("only."), t.id
        if t.kind == "passkey":
            assert re.fullmatch(r"[1-9][0-9]{4}", t.answer)
            assert not re.search(r"[0-9]", t.tail)
        if t.kind == "list":
            items = t.head.split(": ", 1)[1].rstrip(".").split(", ")
            ordinal = re.search(r"What is the (\w+) item", t.tail).group(1)
            k = [n for n, w in T.ORDINALS.items() if w == ordinal][0]
            assert items[k - 1] == t.answer
        if t.kind == "name":
            role = re.search(r"The (.+) in this story", t.head).group(1)
            assert f"name of the {role}?" in t.tail


def test_the_filler_vocabulary_cannot_supply_an_answer():
    filler_words = set()
    for part in (T.SUBJECTS, T.VERBS, T.OBJECTS, T.TAILS, T.CONNECTIVES, T.ROLES, [T.INTRO]):
        for s in part:
            filler_words |= words(s)
    answers = {n.lower() for n in T.NAMES} | {w for v in T.LIST_KINDS.values() for w in v}
    assert not (answers & filler_words)


def test_the_answer_rule_takes_whole_words_only():
    assert T.answer_matches("27611", "The passkey is 27611.")
    assert T.answer_matches("27611", "27611")
    assert not T.answer_matches("27611", "276110")
    assert not T.answer_matches("27611", "2761")
    assert T.answer_matches("Octavia", "octavia")
    assert not T.answer_matches("rope", "ropes")
    assert T.answer_matches("rope", "The third item is rope!")


def test_the_file_round_trips(tmp_path):
    out = tmp_path / "t.tsv"
    assert T.main(["--seed", "3", "--count", "4", "--out", str(out)]) == 0
    rows = [l.split("\t") for l in out.read_text().splitlines() if not l.startswith("#")]
    want = T.make_tasks(3, 4)
    assert len(rows) == 4
    for r, t in zip(rows, want):
        assert r[:3] == [t.id, t.kind, t.answer]
        assert r[3].replace("\\n", "\n") + r[4].replace("\\n", "\n") == t.prompt()


def test_the_benchmark_end_to_end(tmp_path):
    """Short tasks on the reference model: a budget above every prompt's length answers exactly what
    the full cache answers; a 16-token streaming budget loses the early fact."""
    tasks_file = tmp_path / "tasks.tsv"
    assert T.main(["--seed", "11", "--count", "3", "--filler_words", "70", "--kinds", "passkey",
                   "--out", str(tasks_file)]) == 0
    server, target = start_server(tmp_path)
    try:
        p = subprocess.run([RECALL, f"--target={target}", f"--tasks={tasks_file}",
                            "--min_distance=64", "--answer_tokens=12", "--budgets=16,512",
                            "--policies=streaming/uniform,rkv/reasonalloc-full",
                            f"--out_dir={tmp_path}", "--model=SmolLM2-135M-Instruct.Q4_1.gguf"],
                           capture_output=True, text=True, cwd=ROOT, timeout=400)
        print(p.stderr)
        assert p.returncode == 0, p.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    rows = list(csv.DictReader(open(tmp_path / "recall_runs.csv", encoding="utf-8", errors="replace")))
    full = {r["task"]: r for r in rows if r["policy"] == "full"}
    assert len(full) == 3
    for r in rows:  # the program's verdict is the generator's rule
        assert (r["correct"] == "1") == T.answer_matches(r["answer"], r["text"].replace("\\n", "\n"))
        assert int(r["distance"]) >= 64
    answered = [t for t, r in full.items() if r["correct"] == "1"]
    assert answered, "the full cache answers none of the short tasks"
    grid = [r for r in rows if r["policy"] != "full"]
    assert {r["task"] for r in grid} == set(answered)  # only tasks the full cache answers
    for r in grid:
        if r["budget"] == "512":
            assert r["text"] == full[r["task"]]["text"], r
            assert r["events"] == "0"
        else:
            assert int(r["peak_kv_bytes"]) < int(r["full_kv_bytes"])
    lost = [r for r in grid if r["policy"].startswith("streaming") and r["budget"] == "16"]
    assert lost and all(r["correct"] == "0" for r in lost), lost
    # The report reads what the program wrote.
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "recall", "report.py"),
                    str(tmp_path)], check=True, capture_output=True)
    table = [l for l in (tmp_path / "recall.md").read_text().splitlines()
             if l.startswith("| streaming/uniform |")]
    assert len(table) == 1 and "0.00 [0.00, 0.00]" in table[0], table


def test_the_sensitivity_calibration_measures_recall_on_the_reference_model(tmp_path):
    """calibrate --objective sensitivity --recall_tasks on the reference model, two groups of 15
    layers: the answered tasks are found on the real tokenizer (a passkey's digits are several
    tokens), the recall cost is measured over the answer tokens and positive at a small budget,
    and the profile's demand is the equal mix of the two normalised costs."""
    tasks_file = tmp_path / "tasks.tsv"
    assert T.main(["--seed", "12", "--count", "3", "--filler_words", "70", "--kinds",
                   "passkey,name", "--out", str(tasks_file)]) == 0
    probes = tmp_path / "probes.txt"
    probes.write_text("Name three colours.\n")
    server, target = start_server(tmp_path)
    try:
        layers = tmp_path / "layers.csv"
        p = subprocess.run([WORKER, "calibrate", "--objective=sensitivity", f"--target={target}",
                            f"--prompts={probes}", "--max_tokens=32", "--budget=16",
                            "--buffer=16", "--scorer=rkv", "--layer_group=15",
                            f"--recall_tasks={tasks_file}", "--recall_weight=0.5",
                            f"--layers_csv={layers}", f"--out={tmp_path / 'p.json'}",
                            "--model=SmolLM2-135M-Instruct.Q4_1.gguf"],
                           capture_output=True, text=True, cwd=ROOT, timeout=400)
        print(p.stdout, p.stderr)
        assert p.returncode == 0, p.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    m = re.search(r"recall side: (\d+) of 3 tasks answered", p.stdout)
    assert m and int(m.group(1)) >= 1, p.stdout
    rows = list(csv.DictReader(open(layers)))
    assert len(rows) == 30
    kl = [float(r["kl_per_token"]) for r in rows]
    rkl = [float(r["recall_kl_per_token"]) for r in rows]
    assert len(set(kl)) == 2 and len(set(rkl)) == 2  # one measurement per group of 15
    assert all(k > 0 for k in kl) and all(k > 0 for k in rkl), rows
    demand = [float(r["demand"]) for r in rows]
    want = [0.5 * k / (sum(kl) / 30) + 0.5 * r / (sum(rkl) / 30) for k, r in zip(kl, rkl)]
    assert demand == pytest.approx(want, rel=1e-9)


def test_the_report_pairs_a_hierarchical_policy_with_the_uniform_one_of_its_knobs(tmp_path):
    """A reasonalloc policy with recency (+r16) is paired with its scorer's uniform policy with the
    same recency where that ran, and with the plain uniform policy where it did not."""
    fields = ["policy", "budget", "task", "kind", "distance", "correct", "answer", "text"]
    rows = []
    for t in range(6):
        rows.append({"policy": "full", "budget": 0, "task": f"t{t}", "kind": "passkey",
                     "distance": 600, "correct": 1, "answer": "4711", "text": "4711"})
    answers = {"h2o/uniform": [1, 1, 1, 1, 0, 0], "h2o/uniform+r16": [0, 0, 0, 0, 0, 0],
               "h2o/reasonalloc-layer+r16@m.sensitivity": [1, 1, 1, 1, 0, 0],
               "rkv/uniform": [0, 0, 0, 0, 0, 0], "rkv/reasonalloc-full+r16@m.sensitivity":
               [1, 1, 0, 0, 0, 0]}
    for policy, correct in answers.items():
        for t, c in enumerate(correct):
            rows.append({"policy": policy, "budget": 256, "task": f"t{t}", "kind": "passkey",
                         "distance": 600, "correct": c, "answer": "4711",
                         "text": "4711" if c else "no"})
    with open(tmp_path / "recall_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "recall_meta.json").write_text(
        '{"model": "m", "tasks": 6, "answer_tokens": 12, "grid_seconds": 1, '
        '"full_cache_seconds": 1}')
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "recall", "report.py"),
                    str(tmp_path)], check=True, capture_output=True)
    same = (tmp_path / "recall.md").read_text().split("same scorer and knobs")[1]
    assert "| 256 | h2o/reasonalloc-layer+r16@m.sensitivity | h2o/uniform+r16 | +0.67" in same, same
    assert ("| 256 | rkv/reasonalloc-full+r16@m.sensitivity | rkv/uniform (no rkv/uniform+r16 "
            "run) | +0.33") in same, same
    assert "Paired against the best uniform-budget policy" in (tmp_path / "recall.md").read_text()
    # A run without any uniform policy has no such section (not an empty table).
    with open(tmp_path / "recall_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(r for r in rows if "/uniform" not in r["policy"])
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "recall", "report.py"),
                    str(tmp_path)], check=True, capture_output=True)
    text = (tmp_path / "recall.md").read_text()
    assert "best uniform" not in text and "| h2o/reasonalloc-layer+r16@m.sensitivity |" in text, text


def test_the_pair_tool_pairs_policies_over_tasks(tmp_path):
    """bench/recall/pair.py: the mean of the per-task differences in recall at each budget both
    policies ran at, with an interval that contains it; the full cache's rows are not a policy;
    a policy not in the run is refused by name."""
    rows = ["policy,budget,task,correct"]
    a = {"t0": 1, "t1": 1, "t2": 0, "t3": 1}
    b = {"t0": 0, "t1": 1, "t2": 0, "t3": 0}
    for t in a:
        rows += [f"full,0,{t},1", f"x/recall,256,{t},{a[t]}", f"x/kl,256,{t},{b[t]}",
                 f"x/recall,128,{t},0"]
    (tmp_path / "recall_runs.csv").write_text("\n".join(rows) + "\n")
    tool = os.path.join(ROOT, "bench", "recall", "pair.py")
    p = subprocess.run([sys.executable, tool, str(tmp_path), "x/recall:x/kl"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [l for l in p.stdout.splitlines() if re.match(r"\| \d", l)]
    assert len(lines) == 1 and lines[0].startswith("| 256 |"), p.stdout  # 128: one policy only
    assert "| 0.75 | 0.25 | +0.50 [" in lines[0], lines[0]
    lo, hi = map(float, re.search(r"\[([+-][\d.]+), ([+-][\d.]+)\]", lines[0]).groups())
    assert lo <= 0.5 <= hi, lines[0]
    bad = subprocess.run([sys.executable, tool, str(tmp_path), "x/recall:full"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "x/recall:full" in bad.stderr, bad.stderr
