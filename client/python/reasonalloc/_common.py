"""What Client and AsyncClient share: errors, request building, NumPy views over host arenas."""
from __future__ import annotations

import mmap
import os
import warnings
from typing import (Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union,
                    TYPE_CHECKING)

import grpc
import numpy as np

from reasonalloc import _enums
from reasonalloc._enums import EnumValue
from reasonalloc.v1 import sidecar_pb2, types_pb2

if TYPE_CHECKING:
    from reasonalloc.aio import AsyncSession
    from reasonalloc.client import Session

DEFAULT_TARGET = "unix:///tmp/reasonalloc.sock"
"""The server's default --listen address, the target when neither argument nor
$REASONALLOC_TARGET names one."""

TOKEN_KEY = "reasonalloc-session-token"
"""Metadata key of a session token (CreateSession's answer): a call carrying it may use the session
from another uid or over TCP."""

ModelSpec = Union[Mapping[str, Any], types_pb2.ModelGeometry]
"""A ModelGeometry, or a mapping of its fields with dtype as a DType spelling."""
SessionRef = Union[str, "Session", "AsyncSession"]
"""A session or its id; a session's token goes along with the call."""
StreamItem = Union[Tuple[SessionRef, int], sidecar_pb2.CompressRequest]
"""One request of a CompressBatch: (session, step), or the message itself."""
CompressResult = Union[sidecar_pb2.CompressResponse, "SidecarError"]
"""One result of a CompressBatch: the response, or the error of that request."""

KEEP_ALIVE_FRACTION = 1 / 3
"""Automatic KeepAlive renews a lease after this fraction of it."""

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_NUMPY_TYPES: Dict[int, Any] = {
    types_pb2.DTYPE_FLOAT32: np.float32, types_pb2.DTYPE_FLOAT16: np.float16,
    types_pb2.DTYPE_BFLOAT16: np.uint16,  # bf16 as raw bits
    types_pb2.DTYPE_INT32: np.int32, types_pb2.DTYPE_INT64: np.int64,
    types_pb2.DTYPE_UINT64: np.uint64}
_MODEL_REQUIRED = ("name", "num_layers", "num_q_heads", "num_kv_heads", "head_dim")
_MODEL_DEFAULTS = {"dtype": "float16", "max_context": 131072}


class SidecarError(RuntimeError):
    """An error status from the sidecar.

    `code` is the grpc.StatusCode and `details` the server's message, which names the offending
    field (e.g. INVALID_ARGUMENT, "budget.budget = 2 is smaller than budget.window 8 + 1")."""

    code: grpc.StatusCode
    details: str

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> "SidecarError":
        """The error of a failed call (grpc.RpcError, grpc.aio.AioRpcError)."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")

    @classmethod
    def from_status(cls, code: int, message: str) -> "SidecarError":
        """The error of one request of a CompressBatch (an RpcError message)."""
        return cls(_STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN), message)


class ReasonAllocWarning(UserWarning):
    """A warning of CreateSession (e.g. no layer profile for the model: uniform layer budgets)."""


def warn_all(messages: Iterable[str], stacklevel: int) -> None:
    """Emits each message as a ReasonAllocWarning attributed to the caller `stacklevel` up."""
    for message in messages:
        warnings.warn(message, ReasonAllocWarning, stacklevel=stacklevel + 1)


def metadata(*tokens: Optional[str]) -> Optional[Tuple[Tuple[str, str], ...]]:
    """Call metadata carrying each distinct non-empty token; None when there is none."""
    distinct = list(dict.fromkeys(t for t in tokens if t))
    return tuple((TOKEN_KEY, t) for t in distinct) or None


def session_id_and_token(session: SessionRef) -> Tuple[str, Optional[str]]:
    """(id, token) of a session; (id, None) of a session id."""
    if isinstance(session, str):
        return session, None
    return session.id, session.token


def compress_request(item: StreamItem, omit_keep_mask: bool) -> sidecar_pb2.CompressRequest:
    """The CompressRequest of one CompressBatch item."""
    if isinstance(item, sidecar_pb2.CompressRequest):
        return item
    session, step = item
    session_id, _ = session_id_and_token(session)
    return sidecar_pb2.CompressRequest(session_id=session_id, step=step,
                                       omit_keep_mask=omit_keep_mask)


def unary_compress_request(session: SessionRef, step: int,
                           inline: Optional[sidecar_pb2.InlineTensors], omit_keep_mask: bool,
                           cuda_event_handle: bytes) -> Tuple[sidecar_pb2.CompressRequest,
                                                              Optional[str]]:
    """The request of a unary Compress and the session's token (sync and asyncio clients)."""
    sid, token = session_id_and_token(session)
    request = sidecar_pb2.CompressRequest(session_id=sid, step=step, omit_keep_mask=omit_keep_mask,
                                          cuda_event_handle=cuda_event_handle)
    if inline is not None:
        request.inline_tensors.CopyFrom(inline)
    return request, token


def batch_results(result: sidecar_pb2.CompressBatchResult) -> List[CompressResult]:
    """The results of a CompressBatch in request order, errors as SidecarError values."""
    out: List[CompressResult] = []
    for r in result.results:
        if r.WhichOneof("result") == "error":
            out.append(SidecarError.from_status(r.error.code, r.error.message))
        else:
            out.append(r.response)
    return out


def geometry(model: ModelSpec) -> types_pb2.ModelGeometry:
    """ModelGeometry from a message or a mapping of its fields (dtype as a DType spelling)."""
    if isinstance(model, types_pb2.ModelGeometry):
        out = types_pb2.ModelGeometry()
        out.CopyFrom(model)
        return out
    fields = [f.name for f in types_pb2.ModelGeometry.DESCRIPTOR.fields]
    unknown = sorted(set(model) - set(fields))
    if unknown:
        raise ValueError(f"model: unknown keys {unknown}; accepted: {', '.join(fields)}")
    missing = [k for k in _MODEL_REQUIRED if k not in model]
    if missing:
        raise ValueError(f"model: missing {', '.join(missing)}")
    values = {**_MODEL_DEFAULTS, **model}
    values["dtype"] = _enums.parse(types_pb2.DType.DESCRIPTOR, values["dtype"], "model.dtype")
    return types_pb2.ModelGeometry(**values)


def create_session_request(
        model: ModelSpec, budget: int, scorer: str = "snapkv", allocator: str = "uniform", *,
        window: int = 0, buffer: int = 0, sinks: Optional[int] = None, recent: int = 0,
        pool_kernel: int = 0, pool_kind: EnumValue = None, gqa_reduce: EnumValue = None,
        lambda_: Optional[float] = None, threshold: Optional[float] = None,
        softmax_all_keys: bool = False, mode: EnumValue = None, profile: str = "",
        pyramid_beta: Optional[float] = None, adakv_floor: Optional[float] = None,
        layer_exponent: Optional[float] = None, head_exponent: Optional[float] = None,
        head_floor: Optional[float] = None, clip_low: Optional[float] = None,
        clip_high: Optional[float] = None, managed: bool = True, memory: EnumValue = "host_shm",
        lease_seconds: float = 0.0, client_tag: str = "") -> sidecar_pb2.CreateSessionRequest:
    """The CreateSessionRequest of Client.session's arguments (see there)."""

    def label(message: Any, field: str, value: EnumValue, parameter: str) -> str:
        enum = message.DESCRIPTOR.fields_by_name[field].enum_type
        return enum.values_by_number[_enums.parse(enum, value, parameter)].name

    budget_config = types_pb2.BudgetConfig(budget=budget, buffer=buffer, window=window,
                                           recent=recent)
    if sinks is not None:
        budget_config.sinks = sinks
    scorer_config = types_pb2.ScorerConfig(
        name=scorer, pool_kernel=pool_kernel,
        pool_kind=label(types_pb2.ScorerConfig, "pool_kind", pool_kind, "pool_kind"),
        gqa_reduce=label(types_pb2.ScorerConfig, "gqa_reduce", gqa_reduce, "gqa_reduce"),
        softmax_all_keys=softmax_all_keys)
    for field, value in (("lambda", lambda_), ("threshold", threshold)):
        if value is not None:
            setattr(scorer_config, field, value)
    allocator_config = types_pb2.AllocatorConfig(
        name=allocator, profile=profile,
        reasonalloc_mode=label(types_pb2.AllocatorConfig, "reasonalloc_mode", mode, "mode"))
    for field, value in (("pyramid_beta", pyramid_beta), ("adakv_floor", adakv_floor),
                         ("layer_exponent", layer_exponent), ("head_exponent", head_exponent),
                         ("head_floor", head_floor), ("clip_low", clip_low),
                         ("clip_high", clip_high)):
        if value is not None:
            setattr(allocator_config, field, value)
    return sidecar_pb2.CreateSessionRequest(
        model=geometry(model), budget=budget_config, scorer=scorer_config,
        allocator=allocator_config,
        mode=types_pb2.SESSION_MODE_MANAGED if managed else types_pb2.SESSION_MODE_ADVISORY,
        memory=label(sidecar_pb2.CreateSessionRequest, "memory", memory, "memory"),
        lease_seconds=lease_seconds, client_tag=client_tag)


def tensor(a: Any, dtype: types_pb2.DType) -> types_pb2.Tensor:
    """A Tensor message of array `a` converted to DType `dtype`."""
    a = np.ascontiguousarray(a, dtype=_NUMPY_TYPES[dtype])
    return types_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=a.tobytes())


class _Arena:
    """One mapped ArenaDescriptor: NumPy views of its arrays by name."""

    def __init__(self, desc: types_pb2.ArenaDescriptor) -> None:
        if desc.layout_version != 1:
            raise ValueError(f"arena {desc.kind}: layout_version {desc.layout_version}, expected 1")
        path = "/dev/shm/" + desc.shm_name.lstrip("/")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size < desc.byte_length:
                raise ValueError(f"arena {desc.kind} is smaller than its byte_length")
            self._mm = mmap.mmap(fd, desc.byte_length, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.arrays: Dict[str, np.ndarray] = {}
        for a in desc.arrays:
            if a.byte_offset + a.byte_length > desc.byte_length:
                raise ValueError(f"arena {desc.kind}: array {a.name} lies outside it")
            dt = np.dtype(_NUMPY_TYPES[a.dtype])
            count = a.byte_length // dt.itemsize
            self.arrays[a.name] = np.frombuffer(self._mm, dtype=dt, count=count,
                                                offset=a.byte_offset).reshape(tuple(a.shape))

    def close(self) -> None:
        self.arrays.clear()
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass


class SessionBase:
    """A session's identity and, for memory="host_shm", NumPy views over its arenas.

    Managed sessions have `k`, `v` (rows of every head's region) and `queries` (the query ring
    [L, Hq, window, d]); h2o sessions `attention` and `attention_present`; every shared-memory
    session `len`, `offset`, `capacity`, `budgets` and `keep_mask`, indexed by l * Hkv + h."""

    id: str
    info: sidecar_pb2.SessionInfo
    token: Optional[str]
    warnings: List[str]
    dtype: str
    keep_alive_error: Optional[SidecarError]
    k: np.ndarray
    v: np.ndarray
    queries: np.ndarray
    attention: np.ndarray
    attention_present: np.ndarray
    len: np.ndarray
    offset: np.ndarray
    capacity: np.ndarray
    budgets: np.ndarray
    keep_mask: np.ndarray

    def __init__(self, info: sidecar_pb2.SessionInfo, token: Optional[str] = None,
                 warnings: Sequence[str] = ()) -> None:
        self.info = info
        self.id = info.session_id
        self.token = token or None
        self.warnings = list(warnings)
        self.keep_alive_error = None
        self._dtype = info.model.dtype
        self.dtype = _enums.short_name(types_pb2.DType.DESCRIPTOR, info.model.dtype)
        self.L, self.Hq = info.model.num_layers, info.model.num_q_heads
        self.Hkv, self.d = info.model.num_kv_heads, info.model.head_dim
        self.window = info.budget.window
        self._arenas: Dict[str, _Arena] = {}
        try:
            for desc in info.arenas:
                self._arenas[desc.kind] = _Arena(desc)
        except Exception:
            self._unmap()
            raise
        if "kv" in self._arenas:  # managed: the server's K/V arena and query ring
            kv, ring = self._arenas["kv"].arrays, self._arenas["query_ring"].arrays
            self.k, self.v, self.queries = kv["k"], kv["v"], ring["q"]
        if "h2o_acc" in self._arenas:  # h2o: the worker may hand over per-step attention here
            acc = self._arenas["h2o_acc"].arrays
            self.attention, self.attention_present = acc["attention"], acc["present"]
        if "result" in self._arenas:  # every shared-memory session, advisory ones included
            res = self._arenas["result"].arrays
            self.len, self.offset, self.capacity = res["len"], res["offset"], res["capacity"]
            self.budgets, self.keep_mask = res["budget"], res["keep_mask"]
            self._epoch = res["epoch"]

    @property
    def epoch(self) -> int:
        """Completed compression events, from the result arena."""
        return int(self._epoch[0])

    def keys(self, layer: int, head: int) -> np.ndarray:
        """View of the live key rows of head (layer, head)."""
        i = layer * self.Hkv + head
        return self.k[self.offset[i]:self.offset[i] + self.len[i]]

    def values(self, layer: int, head: int) -> np.ndarray:
        """View of the live value rows of head (layer, head)."""
        i = layer * self.Hkv + head
        return self.v[self.offset[i]:self.offset[i] + self.len[i]]

    def append(self, step: int, k: Any, v: Any, q: Any) -> None:
        """Writes one token: k, v [L, Hkv, d] at the end of every head, q [L, Hq, d] into ring slot
        step mod window."""
        heads = self.L * self.Hkv
        if np.any(self.len[:heads] >= self.capacity[:heads]):
            raise ValueError("a head is full: call compress() first")
        rows = self.offset + self.len
        self.k[rows] = np.asarray(k).reshape(heads, self.d)
        self.v[rows] = np.asarray(v).reshape(heads, self.d)
        self.queries[:, :, step % self.window] = q
        self.len += 1

    def kept(self, layer: int, head: int) -> np.ndarray:
        """Pre-event positions head (layer, head) kept at the last event, from the keep mask."""
        words = self.keep_mask[layer * self.Hkv + head]
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits)

    def _inline(self, queries: Any, keys: Any, values: Any = None, lengths: Any = None,
                attention: Any = None) -> sidecar_pb2.InlineTensors:
        it = sidecar_pb2.InlineTensors(query_window=tensor(queries, self._dtype),
                                       keys=tensor(keys, self._dtype))
        if values is not None:
            it.values.CopyFrom(tensor(values, self._dtype))
        if lengths is not None:
            it.lengths.extend(int(x) for x in np.asarray(lengths).ravel())
        if attention is not None:
            it.attention.CopyFrom(tensor(attention, types_pb2.DTYPE_FLOAT32))
        return it

    def _buffers(self, keys_name: str, keys_shape: Sequence[int], queries_name: str,
                 keys_strides: Optional[Sequence[int]] = None, keys_offset: int = 0,
                 keys_bytes: Optional[int] = None,
                 queries_bytes: Optional[int] = None) -> List[types_pb2.ArenaDescriptor]:
        item = np.dtype(_NUMPY_TYPES[self._dtype]).itemsize

        def contiguous(shape: Sequence[int]) -> Tuple[List[int], int]:
            strides: List[int] = []
            acc = 1
            for n in reversed(shape):
                strides.insert(0, acc)
                acc *= n
            return strides, acc

        kstrides = list(keys_strides or contiguous(keys_shape)[0])
        kextent = (sum((n - 1) * st for n, st in zip(keys_shape, kstrides)) + 1) * item
        qshape = [self.L, self.Hq, self.window, self.d]
        qstrides, qcount = contiguous(qshape)
        kbytes = keys_bytes or keys_offset + kextent
        qbytes = queries_bytes or qcount * item
        return [
            types_pb2.ArenaDescriptor(
                kind="keys", memory=types_pb2.MEMORY_KIND_HOST_SHM, shm_name=keys_name,
                byte_length=kbytes, layout_version=1,
                arrays=[types_pb2.ArrayDescriptor(name="k", dtype=self._dtype,
                                                  shape=list(keys_shape), strides=kstrides,
                                                  byte_offset=keys_offset,
                                                  byte_length=kbytes - keys_offset)]),
            types_pb2.ArenaDescriptor(
                kind="query_window", memory=types_pb2.MEMORY_KIND_HOST_SHM, shm_name=queries_name,
                byte_length=qbytes, layout_version=1,
                arrays=[types_pb2.ArrayDescriptor(name="q", dtype=self._dtype, shape=qshape,
                                                  strides=qstrides, byte_length=qbytes)])]

    def _unmap(self) -> None:
        for a in self._arenas.values():
            a.close()
        self._arenas = {}
