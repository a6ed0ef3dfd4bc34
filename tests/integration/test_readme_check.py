"""scripts/check-readme: the documents pass it, and it fails, naming the item, when a documented
flag, metric, environment variable, path, rpc or default stops matching the code."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "check-readme")
BUILD = os.environ.get("REASONALLOC_BUILD_DIR", os.path.join(REPO, "build"))


def check(*args):
    return subprocess.run([sys.executable, SCRIPT, "--build", BUILD, *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def readme():
    return open(os.path.join(REPO, "README.md")).read()


def test_the_documents_pass():
    r = check()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout


@pytest.mark.parametrize("name,edit,expect", [
    ("a flag the server does not have",
     lambda t: t.replace("| `--max_sessions` | 4096 |", "| `--max_sessionz` | 4096 |"),
     ["--max_sessionz", "flags not in its table: ['max_sessions']"]),
    ("a wrong default",
     lambda t: t.replace("| `--max_sessions` | 4096 |", "| `--max_sessions` | 4000 |"),
     ["--max_sessions: README '4000'"]),
    ("a CLI flag on a command line",
     lambda t: t + "\n```\nreasonalloc watch --no_such_watch_flag\n```\n",
     ["reasonalloc --no_such_watch_flag"]),
    ("a metric the server does not export",
     lambda t: t + "\n`reasonalloc_no_such_metric_total`\n",
     ["reasonalloc_no_such_metric_total"]),
    ("a metric left out of the table",
     lambda t: t.replace("| `reasonalloc_sessions` | gauge | |\n", ""),
     ["missing from the table: ['reasonalloc_sessions']"]),
    # (spelled in two parts: the check looks for the whole name in the tree's code, this file too)
    ("an environment variable nothing reads",
     lambda t: t + "\nSet `REASONALLOC_" + "NO_SUCH_SETTING=1`.\n",
     ["REASONALLOC_" + "NO_SUCH_SETTING"]),
    ("a path that is not in the tree",
     lambda t: t + "\nSee `docs/no-such-page.md`.\n",
     ["docs/no-such-page.md"]),
    ("an rpc that does not exist",
     lambda t: t.replace("| `RegisterBuffers` |", "| `RegisterBuffers`, `EvictEverything` |"),
     ["EvictEverything"]),
])
def test_a_mismatch_fails_naming_it(tmp_path, readme, name, edit, expect):
    doctored = edit(readme)
    assert doctored != readme, f"{name}: the edit matched nothing in README.md"
    path = tmp_path / "README.md"
    path.write_text(doctored)
    r = check("--readme", str(path), "--docs")
    assert r.returncode == 1, f"{name}: rc {r.returncode}\n{r.stdout}{r.stderr}"
    for e in expect:
        assert e in r.stdout, f"{name}: {e!r} not in\n{r.stdout}"
