"""--help of the three shipped programs, run as a user would: every form of the request exits 0,
and the text names every subcommand and every flag that the sources declare.

The flags and subcommands are read from the sources, not from the binaries, so that a flag added
without a place in the help output (or a subcommand missing from it) fails here."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROGRAMS = {
    # name: (binary env var, flag source files, dispatcher file or None)
    "reasonalloc-server": ("REASONALLOC_SERVER_BINARY", ["server/main.cc"], None),
    "reasonalloc": ("REASONALLOC_CLI_BINARY",
                    ["client/cli/main.cc", "client/cli/replay.cc", "client/cli/watch.cc"],
                    "client/cli/main.cc"),
    "reasonalloc-worker": ("REASONALLOC_WORKER_BINARY", ["worker/main.cc"], "worker/main.cc"),
}


def declared_flags(files):
    names = []
    for f in files:
        text = open(os.path.join(REPO, f)).read()
        names += re.findall(r"^ABSL_FLAG\([^,]+,\s*([a-z0-9_]+)\s*,", text, re.M)
    assert names, files
    return names


def dispatched_commands(path):
    """The subcommands main() dispatches on: `command == "x"`."""
    return re.findall(r'command == "([a-z-]+)"', open(os.path.join(REPO, path)).read())


def binary(program):
    env = PROGRAMS[program][0]
    path = os.environ.get(env)
    if not path:
        pytest.fail(f"{env} is not set (ctest sets it)")
    return path


def run(program, *args):
    return subprocess.run([binary(program), *args], capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if not k.startswith("REASONALLOC_")})


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("form", ["--help", "-h", "--helpshort", "--helpfull"])
def test_help_exits_0_and_lists_every_flag(program, form):
    r = run(program, form)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "No flags matched" not in r.stdout + r.stderr
    assert r.stdout.startswith(f"{program}: "), r.stdout[:200]
    assert "Usage:" in r.stdout
    missing = [n for n in declared_flags(PROGRAMS[program][1]) if f"  --{n} (default: " not in r.stdout]
    assert not missing, f"{program} {form} omits {missing}"
    if form == "--helpfull":
        assert "  --flagfile (default: " in r.stdout  # the libraries' flags too


@pytest.mark.parametrize("program", [p for p, v in PROGRAMS.items() if v[2]])
def test_every_subcommand_listed_and_has_its_own_help(program):
    commands = dispatched_commands(PROGRAMS[program][2])
    assert len(commands) >= 4, commands
    text = run(program, "--help").stdout
    listed = re.search(r"\nCommands:\n(.*?)\n\n", text, re.S).group(1)
    for c in commands:
        assert re.search(rf"^  {re.escape(c)} ", listed, re.M), f"{c} not in Commands:\n{listed}"
        for args in (["help", c], [c, "--help"]):
            r = run(program, *args)
            assert r.returncode == 0, (args, r.stdout, r.stderr)
            assert r.stdout.startswith(f"Usage:\n  {program} {c}"), (args, r.stdout[:200])


def test_flags_of_a_command_are_under_its_heading():
    text = run("reasonalloc", "help", "compress").stdout
    section = text.split("\nFlags of compress:\n", 1)[1]
    for flag in ("queries", "keys", "values", "lengths", "out", "scorer", "allocator",
                 "reasonalloc_mode", "gqa_reduce", "lambda", "threshold", "sinks", "budget"):
        assert f"  --{flag} (default: " in section, flag
    # Another command's flags are not shown under compress, the common ones are.
    assert "--pool_interval" not in text and "--trace" not in text
    assert "  --target (default: " in text
    watch = run("reasonalloc", "watch", "--help").stdout
    assert "\nFlags of watch:\n" in watch and "  --session (default: " in watch


def test_help_of_an_unknown_command_is_a_usage_error():
    r = run("reasonalloc", "help", "no-such-command")
    assert r.returncode == 2 and "no command \"no-such-command\"" in r.stderr
    r = run("reasonalloc-worker", "help", "no-such-command")
    assert r.returncode == 2


def test_no_command_is_a_usage_error_pointing_at_help():
    for program in ("reasonalloc", "reasonalloc-worker"):
        r = run(program)
        assert r.returncode == 2, (program, r.returncode)
        assert f"{program} --help" in r.stderr, r.stderr


def test_an_unknown_flag_is_still_refused():
    r = run("reasonalloc-server", "--no_such_flag=1")
    assert r.returncode != 0 and "no_such_flag" in r.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_version_names_the_program_and_its_version(program):
    cmake = open(os.path.join(REPO, "CMakeLists.txt")).read()
    version = re.search(r"project\(\s*\w+\s+VERSION\s+([0-9.]+)", cmake).group(1)
    r = run(program, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{program} {version} (revision "), r.stdout
    assert "Debug build" not in r.stdout


@pytest.mark.parametrize("form", [["--help=true"], ["--helpon=main"], ["--helpmatch=max"],
                                  ["--helppackage"], ["help"]])
def test_abseils_other_help_forms_and_help_print_the_same_help(form):
    r = run("reasonalloc-server", *form)
    assert r.returncode == 0, (form, r.stderr)
    assert r.stdout.startswith("reasonalloc-server: ") and "  --max_sessions (default: " in r.stdout


def test_abseils_help_filter_form_gets_the_whole_help():
    # Abseil reads --help=X as "the flags matching X" (and answered "No flags matched", exit 1).
    r = run("reasonalloc", "--help=false")
    assert r.returncode == 0 and "No flags matched" not in r.stdout + r.stderr
    assert "  --target (default: " in r.stdout


def test_a_flag_value_that_looks_like_help_is_a_value():
    # --text takes the next argument as its value: "-h" is tokenized, not a request for help.
    r = run("reasonalloc-worker", "tokenize", "--text", "-h", "--model=/nonexistent/m.gguf")
    assert "Usage:" not in r.stdout and "/nonexistent/m.gguf" in r.stderr, (r.stdout, r.stderr)
    # A flag with a value before the command does not hide the command.
    r = run("reasonalloc", "--target", "unix:///nonexistent.sock", "close", "--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage:\n  reasonalloc close"), r.stdout


def test_the_server_refuses_stray_arguments():
    r = run("reasonalloc-server", "serve")
    assert r.returncode == 2 and "unexpected argument \"serve\"" in r.stderr, r.stderr
