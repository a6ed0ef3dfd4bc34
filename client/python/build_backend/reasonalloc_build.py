"""PEP 517 build backend of the reasonalloc package (client/python).

The wheel holds reasonalloc/ and the gRPC stubs of proto/reasonalloc/v1, generated with grpc_tools
at build time into reasonalloc/v1: types_pb2 and sidecar_pb2 with their .pyi type stubs, and
sidecar_pb2_grpc. The protos are the repository's (two levels up) or, building from an sdist, the
copy it carries in proto/. Nothing is written into the source tree.

The version is reasonalloc.__version__; the other metadata comes from pyproject.toml [project].
An editable install puts client/python on sys.path and requires grpcio-tools at run time: the
package then generates its stubs itself (reasonalloc/_proto.py).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import re
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "reasonalloc"
PROTOS = ("reasonalloc/v1/types.proto", "reasonalloc/v1/sidecar.proto")
SERVICE_PROTOS = ("reasonalloc/v1/sidecar.proto",)
GENERATED = "reasonalloc/v1"
TAG = "py3-none-any"
PROJECT_KEYS = {"name", "dynamic", "description", "requires-python", "dependencies",
                "optional-dependencies", "classifiers"}


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _version() -> str:
    text = (ROOT / PACKAGE / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if not m:
        raise ValueError(f"{PACKAGE}/__init__.py has no __version__ = \"...\" line")
    return m.group(1)


def _name_version() -> Tuple[str, str]:
    name = re.sub(r"[-_.]+", "_", _pyproject()["project"]["name"]).lower()
    return name, _version()


def _metadata(extra_requires: Tuple[str, ...] = ()) -> str:
    project = _pyproject()["project"]
    unknown = sorted(set(project) - PROJECT_KEYS)
    if unknown:
        raise ValueError(f"pyproject.toml [project]: keys this backend does not write: {unknown}")
    if project.get("dynamic", ["version"]) != ["version"] or "version" in project:
        raise ValueError("pyproject.toml [project]: the version must be dynamic "
                         "(reasonalloc.__version__)")
    lines = ["Metadata-Version: 2.1", f"Name: {project['name']}", f"Version: {_version()}"]
    if "description" in project:
        lines.append(f"Summary: {project['description']}")
    if "requires-python" in project:
        lines.append(f"Requires-Python: {project['requires-python']}")
    lines += [f"Classifier: {c}" for c in project.get("classifiers", [])]
    lines += [f"Requires-Dist: {r}" for r in [*project.get("dependencies", []), *extra_requires]]
    for extra, requires in project.get("optional-dependencies", {}).items():
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", extra):
            raise ValueError(f"pyproject.toml [project.optional-dependencies]: extra {extra!r} "
                             "is not a normalised name")
        lines.append(f"Provides-Extra: {extra}")
        for r in requires:
            if ";" in r:
                raise ValueError(f"optional dependency {r!r}: markers are not supported here")
            lines.append(f'Requires-Dist: {r}; extra == "{extra}"')
    return "\n".join(lines) + "\n"


def _wheel_file() -> str:
    return f"Wheel-Version: 1.0\nGenerator: reasonalloc_build\nRoot-Is-Purelib: true\nTag: {TAG}\n"


def _build_requirement(project_name: str) -> str:
    for r in _pyproject()["build-system"]["requires"]:
        if re.match(rf"{re.escape(project_name)}\s*[=<>~!]", r):
            return r
    raise ValueError(f"pyproject.toml [build-system] requires no {project_name}")


def _proto_dir() -> Path:
    for candidate in (ROOT / "proto", ROOT.parent.parent / "proto"):
        if all((candidate / p).is_file() for p in PROTOS):
            return candidate
    raise FileNotFoundError(f"{', '.join(PROTOS)} not found under {ROOT / 'proto'} (an sdist) "
                            f"or {ROOT.parent.parent / 'proto'} (the repository)")


def _generate(out: Path) -> Dict[str, bytes]:
    """The generated modules of reasonalloc/v1, by path inside the wheel."""
    import grpc_tools
    from grpc_tools import protoc

    proto_dir = _proto_dir()
    includes = [f"-I{proto_dir}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}"]
    runs = [([f"--python_out={out}", f"--pyi_out={out}"], PROTOS),
            ([f"--grpc_python_out={out}"], SERVICE_PROTOS)]
    for outputs, protos in runs:
        args = ["grpc_tools.protoc", *includes, *outputs, *(str(proto_dir / p) for p in protos)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
    from importlib.metadata import version
    files = {f"{GENERATED}/__init__.py": (
        f'"""gRPC stubs of proto/reasonalloc/v1, generated at build time by grpcio-tools '
        f'{version("grpcio-tools")}."""\n').encode()}
    for path in sorted((out / GENERATED).iterdir()):
        files[f"{GENERATED}/{path.name}"] = path.read_bytes()
    return files


def _package_files() -> Dict[str, bytes]:
    """reasonalloc/ as in the source tree, without caches and without a reasonalloc/v1 folder."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if (not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo")
                or rel.startswith(GENERATED + "/")):
            continue
        files[rel] = path.read_bytes()
    return files


def _timestamp() -> int:
    """SOURCE_DATE_EPOCH, else 1980-01-01: archives do not depend on when they were built."""
    return max(int(os.environ.get("SOURCE_DATE_EPOCH", "315532800")), 315532800)


def _write_wheel(directory: str, files: Dict[str, bytes], metadata: str) -> str:
    name, version = _name_version()
    dist_info = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{dist_info}/METADATA"] = metadata.encode()
    files[f"{dist_info}/WHEEL"] = _wheel_file().encode()
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    filename = f"{name}-{version}-{TAG}.whl"
    stamp = time.gmtime(_timestamp())[:6]
    with zipfile.ZipFile(os.path.join(directory, filename), "w", zipfile.ZIP_DEFLATED) as whl:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, date_time=stamp)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            whl.writestr(info, data)
    return filename


def _write_metadata_dir(directory: str, metadata: str) -> str:
    name, version = _name_version()
    dist_info = Path(directory) / f"{name}-{version}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(metadata, encoding="utf-8")
    (dist_info / "WHEEL").write_text(_wheel_file(), encoding="utf-8")
    return dist_info.name


# PEP 517 hooks.

def get_requires_for_build_wheel(config_settings: Optional[dict] = None) -> List[str]:
    return []


def get_requires_for_build_sdist(config_settings: Optional[dict] = None) -> List[str]:
    return []


def get_requires_for_build_editable(config_settings: Optional[dict] = None) -> List[str]:
    return []


def prepare_metadata_for_build_wheel(metadata_directory: str,
                                     config_settings: Optional[dict] = None) -> str:
    return _write_metadata_dir(metadata_directory, _metadata())


def prepare_metadata_for_build_editable(metadata_directory: str,
                                        config_settings: Optional[dict] = None) -> str:
    return _write_metadata_dir(metadata_directory,
                               _metadata((_build_requirement("grpcio-tools"),)))


def build_wheel(wheel_directory: str, config_settings: Optional[dict] = None,
                metadata_directory: Optional[str] = None) -> str:
    with tempfile.TemporaryDirectory(prefix="reasonalloc-build-") as tmp:
        files = {**_package_files(), **_generate(Path(tmp))}
    return _write_wheel(wheel_directory, files, _metadata())


def build_editable(wheel_directory: str, config_settings: Optional[dict] = None,
                   metadata_directory: Optional[str] = None) -> str:
    files = {f"_{PACKAGE}_editable.pth": (str(ROOT) + "\n").encode()}
    return _write_wheel(wheel_directory, files, _metadata((_build_requirement("grpcio-tools"),)))


def build_sdist(sdist_directory: str, config_settings: Optional[dict] = None) -> str:
    name, version = _name_version()
    base = f"{name}-{version}"
    files = {"pyproject.toml": (ROOT / "pyproject.toml").read_bytes(),
             "build_backend/reasonalloc_build.py": Path(__file__).read_bytes(),
             "PKG-INFO": _metadata().encode()}
    files.update(_package_files())
    proto_dir = _proto_dir()
    files.update({f"proto/{p}": (proto_dir / p).read_bytes() for p in PROTOS})
    filename = f"{base}.tar.gz"
    mtime = _timestamp()
    with open(os.path.join(sdist_directory, filename), "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            info = tarfile.TarInfo(f"{base}/{path}")
            info.size, info.mtime, info.mode = len(files[path]), mtime, 0o644
            tar.addfile(info, io.BytesIO(files[path]))
    return filename
