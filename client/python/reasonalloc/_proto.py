"""The generated gRPC stubs of proto/reasonalloc/v1: modules types_pb2, sidecar_pb2 and
sidecar_pb2_grpc of package reasonalloc.v1.

A built wheel carries them (generated at build time), and load() merely imports them. A source
checkout used through PYTHONPATH=client/python has no reasonalloc/v1: there, and only when
grpc_tools and the protos ($REASONALLOC_PROTO_DIR, else the repository's proto/) are at hand,
load() generates them once into $XDG_CACHE_HOME/reasonalloc/stubs-HASH (HASH of the protos and the
grpcio-tools version) and adds that folder to the package's path.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from types import ModuleType
from typing import Tuple

_PROTOS = ("reasonalloc/v1/types.proto", "reasonalloc/v1/sidecar.proto")
_MODULES = ("types_pb2", "sidecar_pb2", "sidecar_pb2_grpc")


def load() -> Tuple[ModuleType, ModuleType, ModuleType]:
    """Returns (types_pb2, sidecar_pb2, sidecar_pb2_grpc) of package reasonalloc.v1."""
    try:
        return _import()
    except ModuleNotFoundError as e:
        if e.name not in ("reasonalloc.v1", *(f"reasonalloc.v1.{m}" for m in _MODULES)):
            raise
    _add_source_tree_stubs()
    return _import()


def _import() -> Tuple[ModuleType, ModuleType, ModuleType]:
    types, sidecar, grpc_mod = (importlib.import_module(f"reasonalloc.v1.{m}") for m in _MODULES)
    return types, sidecar, grpc_mod


def _proto_dir() -> str:
    env = os.environ.get("REASONALLOC_PROTO_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "proto"))


def _add_source_tree_stubs() -> None:
    proto_dir = _proto_dir()
    try:
        from grpc_tools import protoc
    except ImportError:
        protoc = None
    if protoc is None or not all(os.path.isfile(os.path.join(proto_dir, f)) for f in _PROTOS):
        raise ImportError(
            "reasonalloc.v1 (the generated gRPC stubs) is missing: install a wheel built from "
            "client/python, or run from a source checkout with grpcio-tools installed and the "
            f"protos in {proto_dir} ($REASONALLOC_PROTO_DIR)")
    from importlib.metadata import version

    digest = hashlib.sha256(version("grpcio-tools").encode())
    for f in _PROTOS:
        with open(os.path.join(proto_dir, f), "rb") as fh:
            digest.update(fh.read())
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "reasonalloc", "stubs-" + digest.hexdigest()[:16])
    if not os.path.exists(os.path.join(cache, "reasonalloc", "v1", "sidecar_pb2_grpc.py")):
        tmp = f"{cache}.tmp{os.getpid()}"
        os.makedirs(os.path.join(tmp, "reasonalloc", "v1"), exist_ok=True)
        for out, files in (("--python_out", _PROTOS), ("--grpc_python_out", _PROTOS[1:])):
            args = ["protoc", f"-I{proto_dir}", f"{out}={tmp}",
                    *(os.path.join(proto_dir, f) for f in files)]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed: {' '.join(args)}")
        with open(os.path.join(tmp, "reasonalloc", "v1", "__init__.py"), "w") as fh:
            fh.write('"""gRPC stubs of proto/reasonalloc/v1, generated for a source checkout."""\n')
        try:
            os.rename(tmp, cache)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    import reasonalloc

    generated = os.path.join(cache, "reasonalloc")
    if generated not in reasonalloc.__path__:
        reasonalloc.__path__.append(generated)
    importlib.invalidate_caches()
