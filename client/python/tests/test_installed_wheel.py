"""The package as users get it: a wheel built from a copy of the tree (client/python and proto/
only, as in a clean clone), installed into a fresh venv without system site packages, and the
checks of api_checks.py run there from outside the source tree against a real server.

The venv gets the wheel and its dependencies with pip --no-index from a wheel cache:
$REASONALLOC_WHEEL_CACHE, else build/python-wheels of the repository. Missing dependencies are
downloaded into it from PyPI once; without them and without PyPI the install test skips."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent  # client/python
REPO = PROJECT.parent.parent
GENERATED = ["reasonalloc/v1/__init__.py", "reasonalloc/v1/types_pb2.py",
             "reasonalloc/v1/types_pb2.pyi", "reasonalloc/v1/sidecar_pb2.py",
             "reasonalloc/v1/sidecar_pb2.pyi", "reasonalloc/v1/sidecar_pb2_grpc.py"]


def run(args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, args))}\n{r.stdout}\n{r.stderr}"
    return r


def pip_wheel(source, out):
    """The offline build: this interpreter's grpcio-tools, no build isolation, no index."""
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
         "-q", source, "-w", out])
    (wheel,) = Path(out).glob("reasonalloc-*.whl")
    return wheel


def tree(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    pytest.importorskip("grpc_tools", reason="building the wheel offline needs grpcio-tools")
    root = tmp_path_factory.mktemp("clone")
    project = root / "client" / "python"
    for name in ("build_backend", "reasonalloc"):  # as committed: no caches, no stubs
        shutil.copytree(PROJECT / name, project / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "v1"))
    shutil.copy2(PROJECT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(REPO / "proto", root / "proto")
    return root


@pytest.fixture(scope="module")
def wheel(clone, tmp_path_factory):
    before = tree(clone)
    built = pip_wheel(clone / "client" / "python", tmp_path_factory.mktemp("dist"))
    assert tree(clone) == before, "the build left files in the source tree"
    return built


def metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        return Parser().parsestr(z.read("reasonalloc-0.2.0.dist-info/METADATA").decode())


def test_wheel_holds_the_generated_stubs(wheel):
    assert wheel.name == "reasonalloc-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert set(GENERATED + ["reasonalloc/py.typed", "reasonalloc/__init__.py",
                                "reasonalloc/client.py", "reasonalloc/aio.py",
                                "reasonalloc/transformers.py"]) <= set(names)
        assert not [n for n in names if n.endswith(".proto") or "__pycache__" in n
                    or n.startswith(("tests/", "build_backend/"))], names
        assert "reasonalloc/v1/types_pb2_grpc.py" not in names  # types.proto has no service
        generated_for = z.read("reasonalloc/v1/types_pb2.py").decode().split(
            "# Protobuf Python Version: ")[1].split()[0]
    meta = metadata(wheel)
    assert meta["Version"] == "0.2.0" and meta["Requires-Python"] == ">=3.9"
    requires = meta.get_all("Requires-Dist")
    assert not [r for r in requires if r.startswith(("grpcio-tools", "grpcio_tools"))], requires
    assert "grpcio>=1.62.2" in requires and any(r.startswith("numpy") for r in requires)
    # torch and transformers only with the extra that reasonalloc.transformers needs.
    assert meta.get_all("Provides-Extra") == ["transformers"]
    heavy = [r for r in requires if r.startswith(("torch", "transformers"))]
    assert len(heavy) == 2 and all(r.endswith('; extra == "transformers"') for r in heavy), heavy
    (protobuf,) = [r for r in requires if r.startswith("protobuf>=")]
    # The runtime may not be older than the protoc that generated the stubs.
    minimum = protobuf[len("protobuf>="):]
    assert [int(x) for x in minimum.split(".")] >= [int(x) for x in generated_for.split(".")], \
        (protobuf, generated_for)


def test_sdist_carries_the_protos_and_builds_the_same_wheel(clone, wheel, tmp_path):
    project = clone / "client" / "python"
    hook = "import sys, reasonalloc_build as b; print(b.build_sdist(sys.argv[1]))"
    r = run([sys.executable, "-c", hook, tmp_path], cwd=project,
            env=dict(os.environ, PYTHONPATH=str(project / "build_backend")))
    sdist = tmp_path / r.stdout.strip()
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        assert "reasonalloc-0.2.0/proto/reasonalloc/v1/sidecar.proto" in names
        assert "reasonalloc-0.2.0/PKG-INFO" in names
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp_path / "unpacked", **safe)
    again = pip_wheel(tmp_path / "unpacked" / "reasonalloc-0.2.0", tmp_path / "dist")
    assert again.read_bytes() == wheel.read_bytes()  # no repository around it, same wheel


def wheel_cache():
    cache = Path(os.environ.get("REASONALLOC_WHEEL_CACHE") or REPO / "build" / "python-wheels")
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def install(venv, wheel, cache):
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
         "--no-index", "--find-links", cache, wheel], capture_output=True, text=True, timeout=300)


def test_installed_wheel_against_server(wheel, sidecar, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    cache = wheel_cache()
    r = install(venv, wheel, cache)
    if r.returncode != 0:  # fetch the dependencies into the cache once
        requires = [r for r in metadata(wheel).get_all("Requires-Dist") if "extra ==" not in r]
        fetch = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                                "--only-binary=:all:", "-d", cache, *requires],
                               capture_output=True, text=True, timeout=300)
        if fetch.returncode != 0:
            reason = (f"no wheels of {requires} in {cache} and PyPI unreachable: "
                      f"{fetch.stderr.strip().splitlines()[-1:]}")
            print(f"SKIP: {reason}")
            pytest.skip(reason)
        r = install(venv, wheel, cache)
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(HERE / "api_checks.py", work / "api_checks.py")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "REASONALLOC_", "VIRTUAL_ENV"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # a stub cache would show up here
    r = subprocess.run([venv / "bin" / "python", "api_checks.py", "--installed", sidecar],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "0 failed" in r.stdout
    assert not (tmp_path / "cache").exists()
