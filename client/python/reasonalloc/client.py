"""Client, sessions and NumPy views over host arenas."""
import mmap
import os

import grpc
import numpy as np

from reasonalloc import _proto

types_pb2, sidecar_pb2, sidecar_grpc = _proto.load()

_DTYPES = {"float32": (types_pb2.DTYPE_FLOAT32, np.float32),
           "float16": (types_pb2.DTYPE_FLOAT16, np.float16),
           "bfloat16": (types_pb2.DTYPE_BFLOAT16, np.uint16)}  # bf16 as raw bits
_ARRAY_DTYPES = {types_pb2.DTYPE_FLOAT32: np.float32, types_pb2.DTYPE_FLOAT16: np.float16,
                 types_pb2.DTYPE_BFLOAT16: np.uint16, types_pb2.DTYPE_INT32: np.int32,
                 types_pb2.DTYPE_INT64: np.int64, types_pb2.DTYPE_UINT64: np.uint64}
_MEMORY = {"inline": types_pb2.MEMORY_KIND_INLINE, "host_shm": types_pb2.MEMORY_KIND_HOST_SHM}


class SidecarError(RuntimeError):
    """A gRPC error from the sidecar: .code (grpc.StatusCode) and the message naming the field."""

    def __init__(self, err):
        super().__init__(f"{err.code().name}: {err.details()}")
        self.code = err.code()
        self.details = err.details()


TOKEN_KEY = "reasonalloc-session-token"


def _call(fn, request, timeout, token=None):
    try:
        return fn(request, timeout=timeout,
                  metadata=((TOKEN_KEY, token),) if token else None)
    except grpc.RpcError as e:
        raise SidecarError(e) from None


def _tensor(a, dtype):
    code, np_type = _DTYPES[dtype]
    a = np.ascontiguousarray(a, dtype=np_type)
    return types_pb2.Tensor(dtype=code, shape=list(a.shape), data=a.tobytes())


class _Arena:
    """One mapped ArenaDescriptor: NumPy views of its arrays by name."""

    def __init__(self, desc):
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
        self.arrays = {}
        for a in desc.arrays:
            if a.byte_offset + a.byte_length > desc.byte_length:
                raise ValueError(f"arena {desc.kind}: array {a.name} lies outside it")
            dt = np.dtype(_ARRAY_DTYPES[a.dtype])
            count = a.byte_length // dt.itemsize
            self.arrays[a.name] = np.frombuffer(self._mm, dtype=dt, count=count,
                                                offset=a.byte_offset).reshape(tuple(a.shape))

    def close(self):
        self.arrays.clear()
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass


class Session:
    """A sidecar session; a context manager that closes it."""

    def __init__(self, client, info, dtype, token=None):
        self.client = client
        self.info = info
        self.id = info.session_id
        # The session's token (CreateSession's answer): lets another uid or a TCP peer use it.
        self.token = token or None
        self.dtype = dtype
        self.L, self.Hq = info.model.num_layers, info.model.num_q_heads
        self.Hkv, self.d = info.model.num_kv_heads, info.model.head_dim
        self.window = info.budget.window
        self._arenas = {d.kind: _Arena(d) for d in info.arenas}
        if "kv" in self._arenas:  # managed: the server's K/V arena and query ring
            kv, ring = self._arenas["kv"].arrays, self._arenas["query_ring"].arrays
            self.k, self.v, self.queries = kv["k"], kv["v"], ring["q"]
        if "h2o_acc" in self._arenas:  # h2o: the worker may hand over per-step attention here
            acc = self._arenas["h2o_acc"].arrays
            self.attention, self.attention_present = acc["attention"], acc["present"]
        if "result" in self._arenas:  # every shared-memory session, advisory ones included
            res = self._arenas["result"].arrays
            self.len, self.offset, self.capacity = res["len"], res["offset"], res["capacity"]
            self.budgets, self.keep_mask, self._epoch = res["budget"], res["keep_mask"], res["epoch"]

    @property
    def epoch(self):
        return int(self._epoch[0])

    def keys(self, layer, head):
        i = layer * self.Hkv + head
        return self.k[self.offset[i]:self.offset[i] + self.len[i]]

    def values(self, layer, head):
        i = layer * self.Hkv + head
        return self.v[self.offset[i]:self.offset[i] + self.len[i]]

    def append(self, step, k, v, q):
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

    def compress(self, step):
        return _call(self.client.stub.Compress,
                     sidecar_pb2.CompressRequest(session_id=self.id, step=step),
                     self.client.timeout, self.token)

    def compress_inline(self, step, queries, keys, values=None, lengths=None, keep_mask=False):
        """Inline Compress: queries [L, Hq, window, d], keys/values [L, Hkv, N, d]."""
        it = sidecar_pb2.InlineTensors(query_window=_tensor(queries, self.dtype),
                                       keys=_tensor(keys, self.dtype))
        if values is not None:
            it.values.CopyFrom(_tensor(values, self.dtype))
        if lengths is not None:
            it.lengths.extend(int(x) for x in np.asarray(lengths).ravel())
        return _call(self.client.stub.Compress,
                     sidecar_pb2.CompressRequest(session_id=self.id, step=step, inline_tensors=it,
                                                 omit_keep_mask=not keep_mask),
                     self.client.timeout, self.token)

    def keep_alive(self, lease_seconds=0):
        return _call(self.client.stub.KeepAlive,
                     sidecar_pb2.KeepAliveRequest(session_id=self.id, lease_seconds=lease_seconds),
                     self.client.timeout, self.token)

    def register_buffers(self, keys_name, keys_shape, queries_name, keys_strides=None,
                         keys_offset=0, keys_bytes=None, queries_bytes=None):
        """Advisory sessions: registers the worker's own shared-memory objects (names as given to
        shm_open, e.g. "/my-keys") holding keys [L, Hkv, N, d] (strides in elements, contiguous by
        default) and the query window [L, Hq, window, d], both in the session's dtype."""
        item = np.dtype(_DTYPES[self.dtype][1]).itemsize
        code = _DTYPES[self.dtype][0]

        def contiguous(shape):
            strides, acc = [], 1
            for n in reversed(shape):
                strides.insert(0, acc)
                acc *= n
            return strides, acc

        kstrides, kcount = contiguous(keys_shape)
        kstrides = list(keys_strides or kstrides)
        kextent = (sum((n - 1) * st for n, st in zip(keys_shape, kstrides)) + 1) * item
        qshape = [self.L, self.Hq, self.window, self.d]
        qstrides, qcount = contiguous(qshape)
        kbytes = keys_bytes or keys_offset + kextent
        qbytes = queries_bytes or qcount * item
        buffers = [
            types_pb2.ArenaDescriptor(
                kind="keys", memory=types_pb2.MEMORY_KIND_HOST_SHM, shm_name=keys_name,
                byte_length=kbytes, layout_version=1,
                arrays=[types_pb2.ArrayDescriptor(name="k", dtype=code, shape=list(keys_shape),
                                                  strides=kstrides, byte_offset=keys_offset,
                                                  byte_length=kbytes - keys_offset)]),
            types_pb2.ArenaDescriptor(
                kind="query_window", memory=types_pb2.MEMORY_KIND_HOST_SHM, shm_name=queries_name,
                byte_length=qbytes, layout_version=1,
                arrays=[types_pb2.ArrayDescriptor(name="q", dtype=code, shape=qshape,
                                                  strides=qstrides, byte_length=qbytes)])]
        return _call(self.client.stub.RegisterBuffers,
                     sidecar_pb2.RegisterBuffersRequest(session_id=self.id, buffers=buffers),
                     self.client.timeout, self.token)

    def kept(self, layer, head):
        """Pre-event positions head (layer, head) kept at the last event, from the keep mask."""
        words = self.keep_mask[layer * self.Hkv + head]
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits)

    def close(self):
        for a in self._arenas.values():
            a.close()
        self._arenas = {}
        return _call(self.client.stub.CloseSession,
                     sidecar_pb2.CloseSessionRequest(session_id=self.id), self.client.timeout, self.token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    def __init__(self, target=None, max_message_bytes=64 << 20, timeout=30.0):
        target = target or os.environ.get("REASONALLOC_TARGET", "unix:///tmp/reasonalloc.sock")
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = sidecar_grpc.KvSidecarStub(self.channel)
        self.timeout = timeout

    def info(self):
        return _call(self.stub.GetServerInfo, sidecar_pb2.GetServerInfoRequest(), self.timeout)

    def session(self, model, budget, scorer="snapkv", allocator="uniform", window=8, buffer=128,
                memory="host_shm", managed=True, lease_seconds=0, **scorer_knobs):
        dtype = model.get("dtype", "float16")
        geometry = types_pb2.ModelGeometry(
            name=model["name"], num_layers=model["num_layers"], num_q_heads=model["num_q_heads"],
            num_kv_heads=model["num_kv_heads"], head_dim=model["head_dim"],
            dtype=_DTYPES[dtype][0], max_context=model.get("max_context", 131072))
        request = sidecar_pb2.CreateSessionRequest(
            model=geometry, budget=types_pb2.BudgetConfig(budget=budget, window=window, buffer=buffer),
            scorer=types_pb2.ScorerConfig(name=scorer, **scorer_knobs),
            allocator=types_pb2.AllocatorConfig(name=allocator),
            mode=types_pb2.SESSION_MODE_MANAGED if managed else types_pb2.SESSION_MODE_ADVISORY,
            memory=_MEMORY[memory], lease_seconds=lease_seconds)
        created = _call(self.stub.CreateSession, request, self.timeout)
        return Session(self, created.session, dtype, created.session_token)

    def open_session(self, session_id, token=None):
        """An existing session (e.g. created by another process), mapping its arenas; `token` is
        needed when this process runs as another uid than the creator's or connects over TCP."""
        info = _call(self.stub.GetSession, sidecar_pb2.GetSessionRequest(session_id=session_id),
                     self.timeout, token)
        dtype = {code: name for name, (code, _) in _DTYPES.items()}[info.model.dtype]
        return Session(self, info, dtype, token)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
