"""The gRPC stubs of proto/reasonalloc/v1, generated with grpc_tools on first import into a cache
directory keyed by the proto files' contents (so an edited API regenerates them).

The proto directory is $REASONALLOC_PROTO_DIR, else the repository's proto/ next to this package."""
import hashlib
import importlib
import os

_FILES = ("reasonalloc/v1/types.proto", "reasonalloc/v1/sidecar.proto")


def _proto_dir():
    env = os.environ.get("REASONALLOC_PROTO_DIR")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "proto"))


def load():
    proto_dir = _proto_dir()
    digest = hashlib.sha256()
    for f in _FILES:
        with open(os.path.join(proto_dir, f), "rb") as fh:
            digest.update(fh.read())
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "reasonalloc", "stubs-" + digest.hexdigest()[:16])
    if not os.path.exists(os.path.join(cache, "reasonalloc", "v1", "sidecar_pb2_grpc.py")):
        from grpc_tools import protoc
        tmp = f"{cache}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for f in _FILES:
            if protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={tmp}",
                            f"--grpc_python_out={tmp}", os.path.join(proto_dir, f)]) != 0:
                raise RuntimeError(f"protoc failed on {f}")
        try:
            os.rename(tmp, cache)
        except OSError:  # another process won the race
            pass
    # The generated modules live in package reasonalloc.v1: extend this package's path to them.
    import reasonalloc
    generated = os.path.join(cache, "reasonalloc")
    if generated not in reasonalloc.__path__:
        reasonalloc.__path__.append(generated)
    types = importlib.import_module("reasonalloc.v1.types_pb2")
    sidecar = importlib.import_module("reasonalloc.v1.sidecar_pb2")
    grpc_mod = importlib.import_module("reasonalloc.v1.sidecar_pb2_grpc")
    return types, sidecar, grpc_mod
