"""Seeded, bounded fuzzing of every KvSidecar RPC against the real server binary.

Requests mix valid baselines with random and boundary values for every field (generic, descriptor-
driven mutation) plus structured cases: tensors whose shape, dtype and byte length disagree, huge
shapes with tiny data, inline events with a large N and a small d, NaN/Inf, non-increasing steps,
scribbled shared-memory arenas, registered buffers that lie about their size or shrink afterwards,
malformed wire bytes. Once per run, fixed scenarios: a FIFO registered as a buffer, a request over
max_message_bytes, events above and just below the work limit (the latter abandoned by its caller:
the server must stop computing), more watchers than --max_watchers, four threads on the same
sessions, 2^20-head sessions.

Every call has a deadline (10 s; 30 s for the few huge ones). After every call the server must be
alive and the status must be OK or a client-fault code (never UNKNOWN, INTERNAL, UNAVAILABLE or
DATA_LOSS; DEADLINE_EXCEEDED only where the deadline is short by design: WatchMetrics, the abandoned
event); an INVALID_ARGUMENT message must name a field of the request (or a documented word such as
"lengths", "shape", an arena array). Successful Compress answers are checked for consistency (kept
indices, keep mask, compacted rows, the result arena's epoch). At the end every session is closed,
the server must list none and have its whole arena pool free, its RSS (+64 MiB), open
descriptors (+8) and /dev/shm arenas (exactly) must be back to the post-warm-up baseline, and
SIGTERM must end it with status 0 within 20 s.

  REASONALLOC_FUZZ_ITERS      number of fuzzed calls (default 1500: about 45 s on 2 cores)
  REASONALLOC_FUZZ_SEED       seed (default fixed, printed; "random" draws one)
  REASONALLOC_FUZZ_SCENARIOS  0 skips the fixed scenarios
  REASONALLOC_FUZZ_VERBOSE    1 prints every distinct error message and the server's usage
  REASONALLOC_SERVER_BINARY, REASONALLOC_PROTO_DIR  as for the other Python integration tests
                          (defaults: build/server/reasonalloc-server and proto/ of this checkout)

Known server defects are listed in KNOWN_DEFECTS below: a failure matching one is printed but
does not fail the test; remove the entry when the fix lands (an entry that matched nothing is
printed)."""
import collections
import glob
import math
import mmap
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = os.environ.get("REASONALLOC_SERVER_BINARY") or os.path.join(
    REPO, "build", "server", "reasonalloc-server")
PROTO_DIR = os.environ.get("REASONALLOC_PROTO_DIR") or os.path.join(REPO, "proto")
ITERS = int(os.environ.get("REASONALLOC_FUZZ_ITERS", "1500"))
_SEED_ENV = os.environ.get("REASONALLOC_FUZZ_SEED", "")
SEED = (random.SystemRandom().randrange(1 << 32) if _SEED_ENV == "random"
        else int(_SEED_ENV) if _SEED_ENV else 20251203)
VERBOSE = os.environ.get("REASONALLOC_FUZZ_VERBOSE", "") not in ("", "0")  # print every message
CALL_TIMEOUT = 10.0
ARENA_BYTES = 64 << 20
SHM_PREFIX = "reasonalloc-"  # HostArena::kNamePrefix ("/reasonalloc-") as a /dev/shm file name
RSS_SLACK = 64 << 20
PEAK_RSS_LIMIT = 1 << 30  # with --max_event_bytes 256 MiB and 64 MiB messages
FD_SLACK = 8

SC = grpc.StatusCode
CLIENT_FAULTS = {SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.ALREADY_EXISTS, SC.PERMISSION_DENIED,
                 SC.FAILED_PRECONDITION, SC.OUT_OF_RANGE, SC.RESOURCE_EXHAUSTED, SC.UNIMPLEMENTED,
                 SC.CANCELLED}
CODE_BY_NUMBER = {c.value[0]: c for c in SC}
RPCS = ("GetServerInfo", "CreateSession", "GetSession", "ListSessions", "CloseSession",
        "KeepAlive", "UpdateBudget", "RegisterBuffers", "Compress", "CompressStream",
        "StartCalibration", "FinishCalibration", "GetProfile", "PutProfile", "ListProfiles",
        "WatchMetrics")

# Failures that the server produces today. Each: (rpc regex, status code name ("-" for an
# invariant of an OK answer), message regex, problem regex, reason). A failure matching all four is
# reported as known, not as a test failure. Remove an entry when its fix lands.
KNOWN_DEFECTS = [
    (r"^wire:", "INTERNAL", r"^$", r"not a client-fault code",
     "gRPC C++ answers a request it cannot parse (truncated or corrupt protobuf, a string field "
     "with invalid UTF-8) with INTERNAL and an empty message before any handler runs; the sidecar "
     "documents INTERNAL as device faults only. Fixing it needs a byte-buffer (generic or "
     "callback) handler or an interceptor that maps the parse failure to INVALID_ARGUMENT."),
]

# Message words that name a field without being a request field: the arena arrays a worker writes
# (layout version 1) and the documented words of the inline checks.
DOCUMENTED_WORDS = [r'"(len|k|v|q|attention|present)"', r"\blengths\b", r"\bshape\b",
                    r"\bquery_ring\b"]

I32 = [0, -1, 1, 2, 3, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 4096, 65536, 1 << 20,
       1 << 24, (1 << 24) + 1, 2**31 - 1, -2**31]
I64 = I32 + [2**32, 2**40, 2**40 + 1, 2**50, 2**62, 2**63 - 1, -2**63]
U32 = [0, 1, 2, 64, 1024, 2**31, 2**32 - 1]
U64 = U32 + [2**40, 2**63, 2**64 - 1]
DBL = [0.0, -0.0, 1.0, -1.0, 0.5, 0.93, 1.0000001, 1e-300, 5e-324, 0.049, 0.05, 3600.0, 3600.5,
       86400.0, 86400.5, 1e7, 1e300, -1e300, math.inf, -math.inf, math.nan]
STRINGS = ["", "a", "m", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "x" * 256, "x" * 257, "x" * 4096,
           "\x00", "a\x00b", "../../etc/passwd", "/", ".hidden", "with space", "\u00e9" * 100,
           "\u202e\u0000", "\U0001F600" * 70, "%s%n%x", "0" * 32, "f" * 32, "0" * 64, "0" * 65,
           "snapkv", "rkv", "h2o", "streaming", "uniform", "pyramid", "adakv", "reasonalloc",
           "fuzz-model", "fuzz-prof", "/reasonalloc-1-00", "/rafuzz-nonexistent"]


def _np_dtype(code):
    return {1: np.float32, 2: np.float16, 3: np.uint16}[code]


def encode(a, code):
    """Array (float64 values) to the bytes of a Tensor of dtype `code` (1 fp32, 2 fp16, 3 bf16)."""
    a = np.ascontiguousarray(a)
    if code == 1:
        return a.astype(np.float32).tobytes()
    if code == 2:
        return a.astype(np.float16).tobytes()
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def summarize(msg, limit=1500):
    """A request as one line of text, bytes and long values shortened."""
    def walk(m):
        parts = []
        for f, v in m.ListFields():
            if f.label == FD.LABEL_REPEATED:
                items = list(v)
                shown = [walk(x) if f.type == FD.TYPE_MESSAGE else short(f, x) for x in items[:8]]
                more = f"...(+{len(items) - 8})" if len(items) > 8 else ""
                parts.append(f"{f.name}:[{', '.join(shown)}{more}]")
            elif f.type == FD.TYPE_MESSAGE:
                parts.append(f"{f.name}{{{walk(v)}}}")
            else:
                parts.append(f"{f.name}:{short(f, v)}")
        return " ".join(parts)

    def short(f, v):
        if f.type == FD.TYPE_BYTES:
            return f"<{len(v)} bytes>"
        if f.type == FD.TYPE_STRING:
            return repr(v) if len(v) <= 80 else repr(v[:40]) + f"...<{len(v)} chars>"
        if f.type == FD.TYPE_ENUM:
            return str(v)
        return repr(v)

    if isinstance(msg, (bytes, bytearray)):
        return f"<{len(msg)} raw bytes: {bytes(msg[:64]).hex()}>"
    text = walk(msg)
    return text if len(text) <= limit else text[:limit] + f"...<{len(text)} chars>"


def field_names(descriptor, seen=None):
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    names = set()
    for f in descriptor.fields:
        names.add(f.name)
        if f.type == FD.TYPE_MESSAGE:
            names |= field_names(f.message_type, seen)
    return names


def names_a_field(message, request_descriptor):
    for name in field_names(request_descriptor):
        if re.search(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", message):
            return True
    return any(re.search(p, message) for p in DOCUMENTED_WORDS)


def server_usage(pid):
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    shm = glob.glob(f"/dev/shm/{SHM_PREFIX}{pid}-*")
    return {"rss": rss, "peak_rss": hwm, "fds": fds, "shm": len(shm),
            "shm_bytes": sum(os.path.getsize(p) for p in shm if os.path.exists(p))}


class MappedArenas:
    """The test's mapping of a host-shm session's arenas: raw mmaps, NumPy views made on demand (so
    that close() can unmap)."""

    def __init__(self, info):
        self.maps, self.arrays = {}, {}
        for desc in info.arenas:
            path = "/dev/shm/" + desc.shm_name.lstrip("/")
            fd = os.open(path, os.O_RDWR)
            try:
                self.maps[desc.kind] = mmap.mmap(fd, desc.byte_length, mmap.MAP_SHARED)
            finally:
                os.close(fd)
            for a in desc.arrays:
                dt = {1: np.float32, 2: np.float16, 3: np.uint16, 4: np.int32, 5: np.int64,
                      6: np.uint64}[a.dtype]
                self.arrays[a.name] = (desc.kind, dt, tuple(a.shape), a.byte_offset)

    def view(self, name):
        kind, dt, shape, offset = self.arrays[name]
        count = int(np.prod(shape))
        return np.frombuffer(self.maps[kind], dtype=dt, count=count, offset=offset).reshape(shape)

    def close(self):
        for m in self.maps.values():
            m.close()
        self.maps = {}


class PoolSession:
    def __init__(self, spec, info, token):
        self.spec, self.info, self.token = spec, info, token
        self.id = info.session_id
        m = info.model
        self.L, self.Hq, self.Hkv, self.d = m.num_layers, m.num_q_heads, m.num_kv_heads, m.head_dim
        self.dtype, self.max_context = m.dtype, m.max_context
        self.window, self.buffer = info.budget.window, info.budget.buffer
        self.managed = info.mode == 1
        self.shm = info.memory == 2
        self.h2o = info.scorer.name == "h2o"
        self.arenas = MappedArenas(info) if self.shm else None
        self.worker_files = []  # advisory shm: the worker's own key and query objects
        self.kept = None  # shm: each head's rows after the last event (its "len" then)
        self.dead = False
        self.stuck = False  # an event at a step near INT64_MAX succeeded: no later step exists

    @property
    def heads(self):
        return self.L * self.Hkv

    def close_maps(self):
        if self.arenas:
            self.arenas.close()
        for path in self.worker_files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


POOL_SPECS = [
    dict(tag="inline-managed-f32-snapkv", model=("fuzz-model", 2, 4, 2, 8, 1, 4096), budget=16,
         window=4, buffer=16, scorer="snapkv", allocator="uniform", mode=1, memory=1),
    dict(tag="inline-advisory-f16-rkv", model=("fuzz-prof", 3, 2, 1, 16, 2, 1024), budget=24,
         window=8, buffer=32, scorer="rkv", allocator="reasonalloc", mode=2, memory=1),
    dict(tag="inline-managed-bf16-h2o", model=("fuzz-h2o", 2, 2, 2, 4, 3, 512), budget=12,
         window=2, buffer=8, scorer="h2o", allocator="adakv", mode=1, memory=1),
    dict(tag="inline-advisory-tiny-d", model=("fuzz-tiny", 1, 1, 1, 1, 2, 1 << 24), budget=16,
         window=1, buffer=16, scorer="streaming", allocator="uniform", mode=2, memory=1),
    dict(tag="shm-managed-f16-streaming", model=("fuzz-model", 2, 4, 2, 8, 2, 4096), budget=16,
         window=4, buffer=8, scorer="streaming", allocator="pyramid", mode=1, memory=2),
    dict(tag="shm-managed-f32-h2o", model=("fuzz-h2o", 1, 2, 1, 8, 1, 1024), budget=12, window=2,
         buffer=8, scorer="h2o", allocator="uniform", mode=1, memory=2),
    dict(tag="shm-advisory-f16-snapkv", model=("fuzz-model", 2, 2, 1, 8, 2, 4096), budget=16,
         window=4, buffer=8, scorer="snapkv", allocator="adakv", mode=2, memory=2),
]


class Fuzzer:
    def __init__(self, pb, types, channel, proc, log_path, tmp):
        self.pb, self.types, self.channel, self.proc = pb, types, channel, proc
        self.log_path, self.tmp = log_path, tmp
        from reasonalloc.v1 import sidecar_pb2_grpc
        self.stub = sidecar_pb2_grpc.KvSidecarStub(channel)
        self.rng = random.Random(SEED)
        self.nrng = np.random.default_rng(SEED)
        self.pool = []
        self.created = {}  # session id -> token, sessions this run created outside the pool
        self.closed_ids = []
        self.profiles = set()
        self.step = 1
        self.failures = []
        self.known = collections.Counter()
        self.known_examples = {}
        self.counts = collections.Counter()
        self.messages = collections.Counter()
        self.codes = collections.Counter()
        self.current = None  # what is being fuzzed, for the crash report
        self.worker_seq = 0

    # ---------------------------------------------------------------- checking

    def server_log_tail(self, n=30):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def assert_alive(self, what):
        rc = self.proc.poll()
        if rc is not None:
            pytest.fail(f"the server exited (status {rc}) after {what}\nseed {SEED}\n"
                        f"server log tail:\n{self.server_log_tail()}")

    def known_reason(self, rpc, code, message, problem):
        for rpc_re, code_name, msg_re, problem_re, reason in KNOWN_DEFECTS:
            if re.search(rpc_re, rpc) and re.fullmatch(code_name, code.name if code else "-") and \
                    re.search(msg_re, message) and re.search(problem_re, problem):
                return reason
        return None

    def check(self, rpc, request, code, message, short_deadline=False, descriptor=None,
              timeout=CALL_TIMEOUT):
        self.counts[rpc] += 1
        self.codes[(rpc, code.name)] += 1
        if VERBOSE and code != SC.OK:
            self.messages[(rpc, code.name, re.sub(r"\d+", "N", message)[:110])] += 1
        self.assert_alive(f"{rpc} {summarize(request)}")
        problems = []
        if code == SC.DEADLINE_EXCEEDED:
            if not short_deadline:
                problems.append(f"no answer within the {timeout} s deadline")
        elif code not in CLIENT_FAULTS:
            problems.append(f"status {code.name} is not a client-fault code")
        if code != SC.OK and not message:
            problems.append("error without a message")
        if code == SC.INVALID_ARGUMENT and descriptor is not None and \
                not names_a_field(message, descriptor):
            problems.append("INVALID_ARGUMENT message names no field of the request")
        if code != SC.OK and isinstance(request, self.pb.CompressRequest) and \
                not request.HasField("inline_tensors") and "inline_tensors." in message:
            # An arena session's event: the worker wrote arenas, it sent no inline tensors.
            problems.append("the message names an inline_tensors field the request did not send")
        if problems:
            self.fail(rpc, request, code, message, "; ".join(problems))

    def fail(self, rpc, request, code, message, problem):
        reason = self.known_reason(rpc, code, message, problem)
        code_name = code.name if code else "OK (invariant)"
        if reason is not None:
            self.known[reason] += 1
            self.known_examples.setdefault(reason, (rpc, code_name, message or problem,
                                                    summarize(request)))
            return
        entry = (rpc, code_name, message[:300], problem, summarize(request))
        self.failures.append(entry)
        print(f"\nFUZZ FAILURE (seed {SEED}) {rpc}: {problem}\n  status {code_name}: "
              f"{message[:300]}\n  request: {summarize(request)}", flush=True)

    def invariant(self, rpc, request, ok, what):
        if not ok:
            self.fail(rpc, request, None, "", f"invariant: {what}")

    def call(self, rpc, request, timeout=CALL_TIMEOUT, metadata=None, short_deadline=False):
        try:
            resp = getattr(self.stub, rpc)(request, timeout=timeout, metadata=metadata)
            code, message = SC.OK, ""
        except grpc.RpcError as e:
            resp, code, message = None, e.code(), e.details() or ""
        self.check(rpc, request, code, message, short_deadline, request.DESCRIPTOR, timeout)
        return resp, code, message

    # ---------------------------------------------------------------- values

    def pick(self, values):
        return values[self.rng.randrange(len(values))]

    def session_id(self):
        r = self.rng.random()
        live = [p for p in self.pool if not p.dead]
        if r < 0.55 and live:
            return self.pick(live).id
        if r < 0.65 and self.created:
            return self.pick(list(self.created))
        if r < 0.72 and self.closed_ids:
            return self.pick(self.closed_ids)
        if r < 0.8:
            return "%032x" % self.rng.getrandbits(128)
        return self.pick(STRINGS)

    def string_for(self, field):
        if "session_id" in field.name:
            return self.session_id()
        if self.rng.random() < 0.01:
            return "y" * (1 << 20)
        return self.pick(STRINGS)

    def value_for(self, f):
        t = f.type
        if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
            return self.pick(I32)
        if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
            return self.pick(I64)
        if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
            return self.pick(U32)
        if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
            return self.pick(U64)
        if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            return self.pick(DBL)
        if t == FD.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t == FD.TYPE_STRING:
            return self.string_for(f)
        if t == FD.TYPE_BYTES:
            return self.pick([b"", b"\x00", b"\xff" * 64, os.urandom(64), os.urandom(7),
                              os.urandom(self.rng.randrange(1, 4096))])
        if t == FD.TYPE_ENUM:
            known = [v.number for v in f.enum_type.values]
            return self.pick(known + [-1, 7, 99, 2**31 - 1, -2**31])
        raise AssertionError(f"no values for {f.full_name}")

    def mutate(self, msg, depth=0):
        """Sets one field, anywhere in `msg`, to a random or boundary value."""
        fields = msg.DESCRIPTOR.fields
        if not fields:
            return
        f = self.pick(fields)
        r = self.rng.random()
        if f.label == FD.LABEL_REPEATED:
            c = getattr(msg, f.name)
            if f.type == FD.TYPE_MESSAGE:
                if r < 0.25:
                    del c[:]
                elif r < 0.7 and len(c) and depth < 4:
                    self.mutate(c[self.rng.randrange(len(c))], depth + 1)
                else:
                    item = c.add()
                    if depth < 4:
                        self.mutate(item, depth + 1)
            elif r < 0.2:
                del c[:]
            elif r < 0.5 and len(c):
                c[self.rng.randrange(len(c))] = self.value_for(f)
            elif r < 0.85:
                c.append(self.value_for(f))
            else:
                c.extend([self.value_for(f)] * self.pick([2, 100, 10000]))
        elif f.type == FD.TYPE_MESSAGE:
            if r < 0.2:
                msg.ClearField(f.name)
            elif r < 0.3:
                getattr(msg, f.name).SetInParent()
                getattr(msg, f.name).Clear()
                getattr(msg, f.name).SetInParent()
            elif depth < 4:
                self.mutate(getattr(msg, f.name), depth + 1)
        elif f.has_presence and r < 0.15:
            msg.ClearField(f.name)
        else:
            setattr(msg, f.name, self.value_for(f))

    def maybe_mutate(self, msg, p=0.6):
        if self.rng.random() < p:
            for _ in range(self.pick([1, 1, 1, 2, 3])):
                self.mutate(msg)
        return msg

    # ---------------------------------------------------------------- sessions

    def create_request(self, spec):
        t = self.types
        name, L, hq, hkv, d, dtype, ctx = spec["model"]
        return self.pb.CreateSessionRequest(
            model=t.ModelGeometry(name=name, num_layers=L, num_q_heads=hq, num_kv_heads=hkv,
                                  head_dim=d, dtype=dtype, max_context=ctx),
            budget=t.BudgetConfig(budget=spec["budget"], window=spec["window"],
                                  buffer=spec["buffer"]),
            scorer=t.ScorerConfig(name=spec["scorer"]),
            allocator=t.AllocatorConfig(name=spec["allocator"]), mode=spec["mode"],
            memory=spec["memory"], lease_seconds=600, client_tag="fuzz-pool " + spec["tag"])

    def fuzz_prof(self):
        """Profile "fuzz-prof" with the geometry of the pool's reasonalloc session."""
        t = self.types
        return self.pb.LayerProfile(
            name="fuzz-prof", model=t.ModelGeometry(name="fuzz-prof", num_layers=3, num_q_heads=2,
                                                    num_kv_heads=1, head_dim=16, dtype=2,
                                                    max_context=1024),
            rho=0.93, demand=[0.5, 1.0, 1.5], provenance="fuzz")

    def add_pool_session(self, spec):
        resp, code, msg = self.call("CreateSession", self.create_request(spec))
        if code == SC.FAILED_PRECONDITION and "layer profile" in msg:
            # A fuzzed PutProfile replaced the pool's profile with another geometry.
            self.call("PutProfile", self.pb.PutProfileRequest(profile=self.fuzz_prof(),
                                                              overwrite=True))
            resp, code, msg = self.call("CreateSession", self.create_request(spec))
        if code == SC.RESOURCE_EXHAUSTED:  # fuzzed sessions hold the arena pool: free it
            for sid in list(self.created):
                self.close_created(sid)
            resp, code, msg = self.call("CreateSession", self.create_request(spec))
        assert code == SC.OK, f"pool session {spec['tag']}: {code.name} {msg}"
        ps = PoolSession(spec, resp.session, resp.session_token)
        if ps.shm and not ps.managed:
            self.register_worker_buffers(ps)
        self.pool.append(ps)
        return ps

    def retire(self, ps):
        ps.dead = True
        ps.close_maps()
        self.closed_ids.append(ps.id)
        self.call("CloseSession", self.pb.CloseSessionRequest(session_id=ps.id))

    def refresh_pool(self):
        """Replaces pool sessions that a fuzzed call closed, expired or made unusable."""
        for i, ps in enumerate(list(self.pool)):
            if ps.dead:
                continue
            _, code, _ = self.call("GetSession", self.pb.GetSessionRequest(session_id=ps.id))
            if code == SC.NOT_FOUND or ps.stuck:
                self.retire(ps)
        self.pool = [p for p in self.pool if not p.dead]
        have = {p.spec["tag"] for p in self.pool}
        for spec in POOL_SPECS:
            if spec["tag"] not in have:
                self.add_pool_session(spec)

    def worker_file(self, nbytes):
        self.worker_seq += 1
        name = f"/rafuzz-{os.getpid()}-{self.worker_seq}"
        path = "/dev/shm" + name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return name, path

    def fill_worker_file(self, path, count, dtype, poison=False):
        a = self.nrng.standard_normal(count)
        if poison and count:
            a[self.rng.randrange(count)] = self.pick([math.nan, math.inf, -math.inf])
        with open(path, "r+b") as f:
            f.write(encode(a, dtype))

    def buffers_request(self, ps, n_rows=48):
        """A valid RegisterBuffers request for an advisory shm session, with fresh worker files."""
        t = self.types
        item = np.dtype(_np_dtype(ps.dtype)).itemsize
        kshape = [ps.L, ps.Hkv, n_rows, ps.d]
        qshape = [ps.L, ps.Hq, ps.window, ps.d]
        kbytes, qbytes = int(np.prod(kshape)) * item, int(np.prod(qshape)) * item
        kname, kpath = self.worker_file(kbytes)
        qname, qpath = self.worker_file(qbytes)
        ps.worker_files += [kpath, qpath]
        self.fill_worker_file(kpath, int(np.prod(kshape)), ps.dtype)
        self.fill_worker_file(qpath, int(np.prod(qshape)), ps.dtype)

        def strides(shape):
            return [int(np.prod(shape[i + 1:])) for i in range(len(shape))]

        req = self.pb.RegisterBuffersRequest(session_id=ps.id, buffers=[
            t.ArenaDescriptor(kind="keys", memory=2, shm_name=kname, byte_length=kbytes,
                              layout_version=1, arrays=[t.ArrayDescriptor(
                                  name="k", dtype=ps.dtype, shape=kshape, strides=strides(kshape),
                                  byte_length=kbytes)]),
            t.ArenaDescriptor(kind="query_window", memory=2, shm_name=qname, byte_length=qbytes,
                              layout_version=1, arrays=[t.ArrayDescriptor(
                                  name="q", dtype=ps.dtype, shape=qshape, strides=strides(qshape),
                                  byte_length=qbytes)])])
        return req, (kpath, qpath, n_rows)

    def register_worker_buffers(self, ps):
        req, files = self.buffers_request(ps)
        _, code, msg = self.call("RegisterBuffers", req, metadata=self.token_md(ps))
        if code == SC.NOT_FOUND:  # a fuzzed KeepAlive gave it a lease of milliseconds
            self.retire(ps)
            return
        assert code == SC.OK, f"RegisterBuffers baseline: {code.name} {msg}"
        ps.registered = files

    def token_md(self, ps):
        return (("reasonalloc-session-token", ps.token),) if self.rng.random() < 0.5 else None

    # ---------------------------------------------------------------- Compress inputs

    def fill_arenas(self, ps, scribble=False):
        """The worker's side of a host-shm event: len per head, finite K/V rows and queries."""
        a = ps.arenas
        cap = a.view("capacity")
        length = a.view("len")
        if ps.managed:
            for name in ("k", "v"):
                view = a.view(name)
                view[...] = self.nrng.standard_normal(view.shape).astype(view.dtype) \
                    if view.dtype != np.uint16 else 0x3F80
            q = a.view("q")
            q[...] = self.nrng.standard_normal(q.shape).astype(q.dtype)
        # From the rows each head kept (an h2o head must keep them) up to buffer more; a head's
        # capacity is its budget + buffer.
        rows = getattr(ps, "registered", (None, None, 1 << 30))[2]
        kept = ps.kept if ps.kept is not None else [0] * len(length)
        lens = []
        for n, c in zip(kept, cap):
            hi = max(0, min(ps.buffer + n, rows, int(c)))
            lens.append(self.rng.randint(min(n, hi), hi))
        length[...] = lens
        if ps.h2o and self.rng.random() < 0.5:
            acc = a.view("attention")
            acc[...] = self.nrng.random(acc.shape).astype(np.float32)
            a.view("present")[0] = 1
        if not scribble:
            return "arena fill"
        what = self.pick(["len", "len", "nan-k", "nan-q", "offset", "capacity", "budget", "epoch",
                          "keep_mask", "attention", "present"])
        if what == "len":
            length[self.rng.randrange(len(length))] = self.pick(I32)
        elif what in ("nan-k", "nan-q") and ps.managed:
            view = a.view("k" if what == "nan-k" else "q")
            flat = view.reshape(-1)
            flat[self.rng.randrange(flat.size)] = np.array(self.pick([math.nan, math.inf]),
                                                           dtype=np.float32).astype(flat.dtype) \
                if flat.dtype != np.uint16 else 0x7FC0
        elif what in ("offset", "capacity", "budget"):
            view = a.view(what) if what in a.arrays else None
            if view is not None:
                view[self.rng.randrange(len(view))] = self.pick(I32)
        elif what == "epoch":
            a.view("epoch")[0] = self.pick(U64)
        elif what == "keep_mask":
            km = a.view("keep_mask").reshape(-1)
            km[...] = self.pick(U64)
        elif what in ("attention", "present") and ps.h2o:
            if what == "attention":
                acc = a.view("attention")
                acc[self.rng.randrange(acc.size)] = self.pick([math.nan, -1.0, math.inf, 1e38])
            a.view("present")[0] = self.pick(U64)
        return f"arena scribble {what}"

    def tensor(self, arr, dtype):
        return self.types.Tensor(dtype=dtype, shape=list(arr.shape), data=encode(arr, dtype))

    def inline_request(self, ps, n=None, lengths=None):
        """A valid inline Compress request for pool session `ps` (the step is the next one)."""
        n = n or self.rng.randint(1, min(ps.max_context, 48))
        lengths = self.rng.random() < 0.5 if lengths is None else lengths
        scale = self.pick([1.0, 1.0, 1.0, 0.01, 30.0])
        q = self.nrng.standard_normal((ps.L, ps.Hq, ps.window, ps.d)) * scale
        k = self.nrng.standard_normal((ps.L, ps.Hkv, n, ps.d)) * scale
        it = self.pb.InlineTensors(query_window=self.tensor(q, ps.dtype),
                                   keys=self.tensor(k, ps.dtype))
        if ps.managed:
            it.values.CopyFrom(self.tensor(self.nrng.standard_normal(k.shape), ps.dtype))
        if lengths:
            it.lengths.extend(self.rng.randint(0, n) for _ in range(ps.heads))
        if ps.h2o and self.rng.random() < 0.3:
            it.attention.CopyFrom(self.tensor(self.nrng.random((ps.L, ps.Hkv, n)), 1))
        return self.pb.CompressRequest(session_id=ps.id, step=self.next_step(), inline_tensors=it,
                                       omit_keep_mask=self.rng.random() < 0.3)

    def next_step(self):
        self.step += self.rng.randint(1, 3)
        return self.step

    def mutate_tensor(self, t, ps):
        """Makes a tensor's shape, dtype, byte length or contents disagree."""
        kind = self.pick(["dtype", "rank", "dim", "dim", "huge", "overflow", "bytes", "bytes",
                          "nan", "empty", "swap"])
        if kind == "dtype":
            t.dtype = self.pick([0, 1, 2, 3, 4, 5, 6, 7, 99, -1])
        elif kind == "rank":
            if t.shape and self.rng.random() < 0.5:
                del t.shape[-1]
            else:
                t.shape.append(self.pick([1, 2, 0]))
        elif kind == "dim" and t.shape:
            t.shape[self.rng.randrange(len(t.shape))] = self.pick(I64)
        elif kind == "huge" and t.shape:  # a huge shape, tiny data
            t.shape[min(2, len(t.shape) - 1)] = self.pick([1 << 24, (1 << 24) + 1, 1 << 40,
                                                            (1 << 40) + 1, 2**62, 2**63 - 1])
        elif kind == "overflow":
            del t.shape[:]
            t.shape.extend([2**31] * 4)
        elif kind == "bytes":
            t.data = t.data[:-1] if self.rng.random() < 0.5 and t.data else t.data + b"\x00"
        elif kind == "nan" and t.data:
            item = 4 if t.dtype == 1 else 2
            count = len(t.data) // item
            if count:
                i = self.rng.randrange(count) * item
                bad = {1: np.array([math.nan], np.float32).tobytes(), 2: b"\x00\x7c",
                       3: b"\xc0\x7f"}.get(t.dtype, b"\xff" * item)
                t.data = t.data[:i] + bad[:item] + t.data[i + item:]
        elif kind == "empty":
            t.data = b""
        elif kind == "swap" and len(t.shape) >= 2:
            t.shape[0], t.shape[1] = t.shape[1], t.shape[0]
        return kind

    def compress_request(self):
        """A Compress request: a valid baseline for a pool session, often mutated."""
        live = [p for p in self.pool if not p.dead and not p.stuck]
        if not live:
            self.refresh_pool()
            live = [p for p in self.pool if not p.dead]
        ps = self.pick(live)
        note = ""
        if ps.shm:
            note = self.fill_arenas(ps, scribble=self.rng.random() < 0.25)
            req = self.pb.CompressRequest(session_id=ps.id, step=self.next_step(),
                                          omit_keep_mask=self.rng.random() < 0.5)
        elif ps.spec["tag"] == "inline-advisory-tiny-d" and self.rng.random() < 0.15:
            # Large N, small d: up to 2^24 fp16 keys of one element (32 MiB, under 64 MiB).
            n = self.pick([1 << 12, 1 << 16, 1 << 20, 1 << 22, 1 << 24])
            req = self.inline_request(ps, n=n)
            note = f"large N = {n}"
        else:
            req = self.inline_request(ps)
        r = self.rng.random()
        if r < 0.35:
            self.maybe_mutate(req, p=1.0)
            note += " generic mutation"
        elif r < 0.6 and req.HasField("inline_tensors"):
            it = req.inline_tensors
            which = self.pick(["query_window", "keys", "keys", "values", "attention", "lengths"])
            if which == "lengths":
                del it.lengths[:]
                it.lengths.extend(self.pick(I32) for _ in range(self.pick([1, ps.heads,
                                                                           ps.heads + 1, 1000])))
                note += " lengths"
            else:
                note += f" {which}: {self.mutate_tensor(getattr(it, which), ps)}"
        elif r < 0.66:
            req.step = self.pick(I64 + [self.step, self.step - 1])
            note += " step"
        elif r < 0.7:
            req.cuda_event_handle = self.pick([b"\x00" * 64, os.urandom(64), os.urandom(3)])
            note += " cuda_event_handle"
        return ps, req, note

    def check_compress_answer(self, ps, req, resp, rpc="Compress"):
        if resp is not None and resp.session_id == ps.id:
            if req.step > 1 << 62:
                ps.stuck = True
            elif req.step > self.step:
                self.step = req.step
        if resp is None or resp.session_id != ps.id or ps.shm:
            if resp is not None and ps.shm and ps.arenas and resp.session_id == ps.id:
                # A stream's later items on the same session may have advanced it since.
                epoch = int(ps.arenas.view("epoch")[0])
                ps.kept = [int(n) for n in ps.arenas.view("len")]
                self.invariant(rpc, req, epoch == resp.epoch if rpc == "Compress" else
                               epoch >= resp.epoch,
                               f"result arena epoch {epoch}, the answer's {resp.epoch}")
            return
        if not req.HasField("inline_tensors"):
            return
        d = resp.decision
        it = req.inline_tensors
        heads = ps.heads
        inv = lambda ok, what: self.invariant(rpc, req, ok, what)  # noqa: E731
        inv(resp.step == req.step, "step echoed")
        inv(d.num_layers == ps.L and d.num_kv_heads == ps.Hkv, "decision geometry")
        if len(d.kept_lengths) != heads or len(d.budgets) != heads:
            inv(False, f"{len(d.kept_lengths)} kept_lengths, {len(d.budgets)} budgets for "
                       f"{heads} heads")
            return
        n = it.keys.shape[2]
        lengths = list(it.lengths) or [n] * heads
        inv(sum(d.kept_lengths) == len(d.kept_indices), "sum(kept_lengths) == len(kept_indices)")
        pos = 0
        for h in range(heads):
            kept = list(d.kept_indices[pos:pos + d.kept_lengths[h]])
            pos += d.kept_lengths[h]
            if not (all(0 <= j < lengths[h] for j in kept) and kept == sorted(set(kept))):
                inv(False, f"head {h}: kept indices {kept[:10]} not ascending within "
                           f"[0, {lengths[h]})")
                return
        if not req.omit_keep_mask:
            words = d.words_per_head
            inv(len(d.keep_mask) == heads * words * 8, "keep_mask length")
            if len(d.keep_mask) == heads * words * 8:
                bits = np.unpackbits(np.frombuffer(d.keep_mask, np.uint8), bitorder="little")
                bits = bits.reshape(heads, words * 64)
                pos = 0
                for h in range(heads):
                    kept = list(d.kept_indices[pos:pos + d.kept_lengths[h]])
                    pos += d.kept_lengths[h]
                    if list(np.flatnonzero(bits[h])) != kept:
                        inv(False, f"head {h}: keep_mask bits differ from kept_indices")
                        break
        if ps.managed and n <= 4096:
            item = 4 if ps.dtype == 1 else 2
            mk = max(d.kept_lengths) if heads else 0
            for src, out in ((it.keys, resp.compacted_keys), (it.values, resp.compacted_values)):
                if list(out.shape) != [ps.L, ps.Hkv, mk, ps.d]:
                    inv(False, f"compacted shape {list(out.shape)}")
                    return
                a = np.frombuffer(src.data, np.uint8).reshape(heads, n, ps.d * item)
                b = np.frombuffer(out.data, np.uint8).reshape(heads, mk, ps.d * item)
                pos = 0
                for h in range(heads):
                    kept = list(d.kept_indices[pos:pos + d.kept_lengths[h]])
                    pos += d.kept_lengths[h]
                    if not np.array_equal(b[h, :len(kept)], a[h, kept]) or b[h, len(kept):].any():
                        inv(False, f"head {h}: compacted rows are not the kept rows")
                        return

    # ---------------------------------------------------------------- one call per RPC

    def do_GetServerInfo(self):
        resp, code, _ = self.call("GetServerInfo", self.pb.GetServerInfoRequest())
        if code == SC.OK:
            self.invariant("GetServerInfo", self.pb.GetServerInfoRequest(),
                           resp.arena_capacity_bytes == ARENA_BYTES and
                           resp.arena_free_bytes <= ARENA_BYTES, "arena bytes")

    def do_CreateSession(self):
        spec = self.pick(POOL_SPECS)
        req = self.create_request(spec)
        req.scorer.name = self.pick(["snapkv", "streaming", "h2o", "rkv"])
        req.allocator.name = self.pick(["uniform", "pyramid", "adakv", "reasonalloc"])
        req.memory = self.pick([0, 1, 2, 2, 3])
        req.mode = self.pick([0, 1, 2])
        req.lease_seconds = self.pick([0, 5, 60, 600])
        req.client_tag = "fuzz"
        if self.rng.random() < 0.3:
            req.allocator.profile = self.pick(sorted(self.profiles) or ["nope"])
        extreme = self.rng.random() < 0.15
        if extreme:  # several dimensions at their limits at once
            m, b = req.model, req.budget
            m.num_layers = self.pick([1, 1024, 1025, 64])
            m.num_kv_heads = self.pick([1, 1024, 1025, 32])
            m.num_q_heads = m.num_kv_heads * self.pick([1, 2, 1024]) if m.num_kv_heads <= 1024 \
                else 1024
            m.num_q_heads = min(m.num_q_heads, self.pick([1024, 1025, 2**31 - 1]))
            m.head_dim = self.pick([1, 1, 1024, 1025])
            m.max_context = self.pick([1 << 24, (1 << 24) + 1, 2**31 - 1, 64])
            b.window = self.pick([0, 1, 1024, 1025])
            b.budget = self.pick([b.window + 1, 1025, 1 << 24, 2**31 - 1])
            b.buffer = self.pick([1, 1 << 24, 2**31 - 1])
        else:
            self.maybe_mutate(req, p=0.75)
        resp, code, _ = self.call("CreateSession", req)
        if code == SC.OK and extreme and resp.session.memory == 1:
            self.tiny_event(resp.session, resp.session_token)
        if code == SC.OK:
            self.created[resp.session.session_id] = resp.session_token
            info = resp.session
            self.invariant("CreateSession", req, re.fullmatch(r"[0-9a-f]{32}", info.session_id)
                           is not None, "session id is 32 hex digits")
            if info.memory == 2:
                self.invariant("CreateSession", req, len(info.arenas) >= 1 and all(
                    os.path.exists("/dev/shm/" + a.shm_name.lstrip("/")) for a in info.arenas),
                    "host-shm session's arenas exist")
        if len(self.created) > 24:
            for sid in list(self.created)[:12]:
                self.close_created(sid)

    def tiny_event(self, info, token):
        """One inline event of N = 1 or 2 tokens on a (possibly huge) freshly created session."""
        m, w = info.model, info.budget.window
        elems = lambda *dims: int(np.prod(dims, dtype=np.int64))  # noqa: E731
        n = min(self.pick([1, 2]), m.max_context)
        if elems(m.num_layers, m.num_q_heads, w, m.head_dim) > 1 << 23 or \
                elems(m.num_layers, m.num_kv_heads, n, m.head_dim) > 1 << 23:
            return
        t = lambda *dims: self.types.Tensor(  # noqa: E731
            dtype=m.dtype, shape=list(dims),
            data=encode(self.nrng.standard_normal(elems(*dims)), m.dtype))
        it = self.pb.InlineTensors(query_window=t(m.num_layers, m.num_q_heads, w, m.head_dim),
                                   keys=t(m.num_layers, m.num_kv_heads, n, m.head_dim))
        if info.mode == 1:
            it.values.CopyFrom(t(m.num_layers, m.num_kv_heads, n, m.head_dim))
        req = self.pb.CompressRequest(session_id=info.session_id, step=1, inline_tensors=it,
                                      omit_keep_mask=self.rng.random() < 0.5)
        self.call("Compress", req, metadata=(("reasonalloc-session-token", token),), timeout=30)

    def close_created(self, sid):
        token = self.created.pop(sid)
        md = (("reasonalloc-session-token", token),) if token else None
        resp, code, msg = self.call("CloseSession", self.pb.CloseSessionRequest(session_id=sid),
                                    metadata=md)
        self.closed_ids.append(sid)
        return code

    def do_GetSession(self):
        req = self.maybe_mutate(self.pb.GetSessionRequest(session_id=self.session_id()), p=0.2)
        md = self.pick([None, None, (("reasonalloc-session-token", "%032x" % 7),),
                        (("reasonalloc-session-token", ""),)])
        self.call("GetSession", req, metadata=md)

    def do_ListSessions(self):
        req = self.pb.ListSessionsRequest(model_name=self.pick(["", "fuzz-model"] + STRINGS))
        self.call("ListSessions", req)

    def do_CloseSession(self):
        r = self.rng.random()
        if r < 0.4 and self.created:
            self.close_created(self.pick(list(self.created)))
            return
        if r < 0.45:  # now and then a pool session (replaced at the next refresh)
            live = [p for p in self.pool if not p.dead]
            if live:
                self.retire(self.pick(live))
                return
        sid = self.pick(self.closed_ids + ["%032x" % self.rng.getrandbits(128)] + STRINGS)
        self.call("CloseSession", self.pb.CloseSessionRequest(session_id=sid))

    def do_KeepAlive(self):
        req = self.pb.KeepAliveRequest(session_id=self.session_id(),
                                       lease_seconds=self.pick([0, 0, 60, 600] + DBL))
        if req.lease_seconds < 1 and req.lease_seconds != 0 and req.session_id in \
                {p.id for p in self.pool} and self.rng.random() < 0.8:
            req.lease_seconds = 600  # keep most pool sessions alive; tiny leases hit the others
        self.call("KeepAlive", req)

    def do_UpdateBudget(self):
        req = self.pb.UpdateBudgetRequest(session_id=self.session_id(),
                                          budget=self.pick([16, 24, 9, 64, 4096] + I32))
        self.call("UpdateBudget", req)

    def do_RegisterBuffers(self):
        targets = [p for p in self.pool if not p.dead and p.shm and not p.managed]
        if not targets or self.rng.random() < 0.15:
            req = self.pb.RegisterBuffersRequest(session_id=self.session_id())
            self.maybe_mutate(req, p=0.8)
            self.call("RegisterBuffers", req)
            return
        ps = self.pick(targets)
        kind = self.pick(["mutate", "mutate", "mutate", "short-file", "shrink", "valid",
                          "server-arena"])
        req, files = self.buffers_request(ps, n_rows=self.pick([1, 8, 48, 48]))
        if kind == "mutate":
            b = req.buffers[self.rng.randrange(2)]
            target = self.pick([b, b.arrays[0], b.arrays[0], req])
            self.mutate(target)
        elif kind == "short-file":  # the description claims more bytes than the object holds
            b = req.buffers[self.rng.randrange(2)]
            path = files[0] if b.kind == "keys" else files[1]
            os.truncate(path, self.pick([0, 1, b.byte_length - 1]))
        elif kind == "server-arena":
            req.buffers[0].shm_name = self.pick([p for p in self.pool if p.shm and not p.dead]
                                                ).info.arenas[0].shm_name
        _, code, _ = self.call("RegisterBuffers", req, metadata=self.token_md(ps))
        if code == SC.OK:
            ps.registered = files
        if kind == "shrink" and code == SC.OK:
            # Registered, then the worker's object shrinks: the event must fail cleanly.
            os.truncate(files[0], self.pick([0, 7]))
            self.fill_arenas(ps)
            ps.arenas.view("len")[...] = 1
            creq = self.pb.CompressRequest(session_id=ps.id, step=self.next_step())
            resp, _, _ = self.call("Compress", creq)
            self.check_compress_answer(ps, creq, resp)
            self.register_worker_buffers(ps)

    def do_Compress(self):
        ps, req, note = self.compress_request()
        resp, code, _ = self.call("Compress", req, metadata=self.token_md(ps))
        if code == SC.OK:
            self.check_compress_answer(ps, req, resp)

    def do_CompressStream(self):
        batches, sessions = [], []
        for _ in range(self.pick([0, 1, 1, 2, 3])):
            items, owners = [], []
            for _ in range(self.pick([0, 1, 2, 3, 5])):
                ps, req, _ = self.compress_request()
                items.append(req)
                owners.append(ps)
            batches.append(self.pb.CompressBatch(requests=items))
            sessions.append(owners)
        cancel = self.rng.random() < 0.1
        seen = 0
        call = self.stub.CompressStream(iter(batches), timeout=CALL_TIMEOUT)
        code, message = SC.OK, ""
        try:
            for bi, result in enumerate(call):
                expected = batches[bi].requests if bi < len(batches) else []
                self.invariant("CompressStream", batches[bi] if bi < len(batches) else
                               self.pb.CompressBatch(), len(result.results) == len(expected),
                               f"batch {bi}: {len(result.results)} results for "
                               f"{len(expected)} requests")
                owners = sessions[bi] if bi < len(sessions) else []
                for item, req, ps in zip(result.results, expected, owners):
                    if item.WhichOneof("result") == "error":
                        c = CODE_BY_NUMBER.get(item.error.code, SC.UNKNOWN)
                        self.check("CompressStream.item", req, c, item.error.message,
                                   descriptor=req.DESCRIPTOR)
                    else:
                        self.counts["CompressStream.item"] += 1
                        self.check_compress_answer(ps, req, item.response, "CompressStream.item")
                seen += 1
                if cancel:
                    call.cancel()
        except grpc.RpcError as e:
            code, message = e.code(), e.details() or ""
        request = self.pb.CompressBatch(requests=[r for b in batches for r in b.requests])
        self.check("CompressStream", request, code, message, descriptor=request.DESCRIPTOR)
        if code == SC.OK:
            self.invariant("CompressStream", request, seen == len(batches),
                           f"{seen} result messages for {len(batches)} batches")

    def do_StartCalibration(self):
        inline = [p for p in self.pool if not p.dead and not p.shm]
        sid = self.pick(inline).id if inline and self.rng.random() < 0.6 else self.session_id()
        req = self.pb.StartCalibrationRequest(session_id=sid, rho=self.pick([0, 0.93, 0.5] + DBL),
                                              stride=self.pick([0, 1, 4, 16] + I32))
        self.call("StartCalibration", req)

    def do_FinishCalibration(self):
        inline = [p for p in self.pool if not p.dead and not p.shm]
        sid = self.pick(inline).id if inline and self.rng.random() < 0.6 else self.session_id()
        req = self.pb.FinishCalibrationRequest(
            session_id=sid, profile_name=self.pick(["", "fuzz-calibrated", "fuzz-prof"] + STRINGS),
            save=self.rng.random() < 0.2)
        resp, code, _ = self.call("FinishCalibration", req)
        if code == SC.OK:
            self.profiles.add(resp.name)

    def do_GetProfile(self):
        names = sorted(self.profiles) + STRINGS
        self.call("GetProfile", self.pb.GetProfileRequest(name=self.pick(names)))

    def profile(self):
        t = self.types
        L = self.pick([1, 2, 3])
        name = self.pick(["fuzz-prof", "fuzz-model", "fuzz-p1", "fuzz-p2"])
        if name == "fuzz-prof" and self.rng.random() < 0.7:
            return self.fuzz_prof()
        hkv = self.pick([1, 2])
        return self.pb.LayerProfile(
            name=name, model=t.ModelGeometry(name=name, num_layers=L, num_q_heads=2 * hkv,
                                             num_kv_heads=hkv, head_dim=self.pick([8, 16]),
                                             dtype=2, max_context=1024),
            rho=self.pick([0.93, 0.5, 1.0]),
            demand=[self.rng.uniform(0.1, 3) for _ in range(L)],
            samples=[self.rng.randint(0, 100) for _ in range(L)] if self.rng.random() < 0.5 else [],
            provenance="fuzz")

    def do_PutProfile(self):
        req = self.pb.PutProfileRequest(profile=self.profile(), overwrite=self.rng.random() < 0.5,
                                        save=self.rng.random() < 0.1)
        if self.rng.random() < 0.3:
            req.profile.demand[self.rng.randrange(len(req.profile.demand))] = self.pick(DBL)
        self.maybe_mutate(req, p=0.6)
        _, code, _ = self.call("PutProfile", req)
        if code == SC.OK:
            self.profiles.add(req.profile.name)

    def do_ListProfiles(self):
        self.call("ListProfiles", self.pb.ListProfilesRequest())

    def do_WatchMetrics(self):
        req = self.pb.WatchMetricsRequest(pool_interval_seconds=self.pick([0, 0.05, 1.0] + DBL))
        for _ in range(self.pick([0, 0, 1, 2])):
            req.session_ids.append(self.session_id())
        if self.rng.random() < 0.3:
            req.model_name = self.pick(STRINGS)
        self.maybe_mutate(req, p=0.3)
        deadline = self.pick([0.2, 0.5, 1.0])
        code, message = SC.OK, ""
        try:
            for i, _ in enumerate(self.stub.WatchMetrics(req, timeout=deadline)):
                if i > 50:
                    break
        except grpc.RpcError as e:
            code, message = e.code(), e.details() or ""
        self.check("WatchMetrics", req, code, message, short_deadline=True,
                   descriptor=req.DESCRIPTOR)

    def do_wire(self):
        """Raw request bytes: a valid message corrupted, truncated or with invalid UTF-8."""
        rpc = self.pick(["GetSession", "CloseSession", "KeepAlive", "CreateSession", "Compress",
                         "GetProfile", "PutProfile"])
        base = {"GetSession": lambda: self.pb.GetSessionRequest(session_id=self.session_id()),
                "CloseSession": lambda: self.pb.CloseSessionRequest(session_id="%032x" % 1),
                "KeepAlive": lambda: self.pb.KeepAliveRequest(session_id=self.session_id()),
                "CreateSession": lambda: self.create_request(self.pick(POOL_SPECS)),
                "Compress": lambda: self.compress_request()[1],
                "GetProfile": lambda: self.pb.GetProfileRequest(name="fuzz-prof"),
                "PutProfile": lambda: self.pb.PutProfileRequest(profile=self.profile())}[rpc]()
        data = bytearray(base.SerializeToString())
        kind = self.pick(["utf8", "truncate", "flip", "unknown-field", "varint", "length"])
        if kind == "utf8":  # field 1 of these requests is a string (or a message holding one)
            data = bytearray(b"\x0a\x04\xff\xfe\xc0\x80") + data
        elif kind == "truncate" and data:
            data = data[:self.rng.randrange(len(data))]
        elif kind == "flip" and data:
            for _ in range(self.pick([1, 2, 8])):
                data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        elif kind == "unknown-field":  # field 1000, varint: must be ignored
            data += b"\xc0\x3e\x01"
        elif kind == "varint":
            data += b"\x10" + b"\xff" * 11
        elif kind == "length":
            data += b"\x1a\xff\xff\xff\xff\x0f"
        method = self.channel.unary_unary(f"/reasonalloc.v1.KvSidecar/{rpc}")
        try:
            answer = method(bytes(data), timeout=CALL_TIMEOUT)
            code, message = SC.OK, ""
            if rpc == "CreateSession":  # a session made from the corrupted bytes: close it later
                created = self.pb.CreateSessionResponse.FromString(answer)
                self.created[created.session.session_id] = created.session_token
        except grpc.RpcError as e:
            code, message = e.code(), e.details() or ""
        self.check(f"wire:{rpc}", bytes(data), code, message, descriptor=base.DESCRIPTOR)

    # ---------------------------------------------------------------- scenarios (once per run)

    def scenario_fifo_buffer(self):
        """A worker "buffer" that is a FIFO: opening it must not block the server."""
        ps = next(p for p in self.pool if p.shm and not p.managed and not p.dead)
        req, files = self.buffers_request(ps)
        name = f"/rafuzz-{os.getpid()}-fifo"
        path = "/dev/shm" + name
        os.mkfifo(path, 0o600)
        try:
            req.buffers[0].shm_name = name
            self.call("RegisterBuffers", req, timeout=5)
        finally:
            try:  # release a server thread blocked in open(2), if any
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            os.unlink(path)

    def scenario_oversized_message(self):
        """A request above the server's max_message_bytes (64 MiB)."""
        ps = next(p for p in self.pool if p.spec["tag"] == "inline-advisory-tiny-d")
        req = self.inline_request(ps, n=8, lengths=False)
        req.inline_tensors.keys.data = b"\x00" * ((64 << 20) + 1024)
        self.call("Compress", req, timeout=30)

    def heavy_session(self, scorer):
        t = self.types
        req = self.pb.CreateSessionRequest(
            model=t.ModelGeometry(name="fuzz-heavy", num_layers=1, num_q_heads=1024,
                                  num_kv_heads=1, head_dim=1, dtype=2, max_context=1 << 24),
            budget=t.BudgetConfig(budget=65, window=64, buffer=64), scorer=t.ScorerConfig(
                name=scorer), mode=2, memory=1, lease_seconds=600)
        resp, code, msg = self.call("CreateSession", req)
        assert code == SC.OK, msg
        self.created[resp.session.session_id] = resp.session_token
        return resp.session

    def heavy_request(self, info, n, step):
        m, w = info.model, info.budget.window
        q = self.nrng.standard_normal((1, m.num_q_heads, w, 1))
        k = self.nrng.standard_normal((1, 1, n, 1))
        return self.pb.CompressRequest(session_id=info.session_id, step=step, omit_keep_mask=True,
                                       inline_tensors=self.pb.InlineTensors(
                                           query_window=self.tensor(q, 2), keys=self.tensor(k, 2)))

    def cpu_seconds(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def scenario_event_limits(self):
        """An event above the work limit is refused at once; one below it (a few seconds of one
        core, one head), whose caller gives up after 0.5 s, must stop burning CPU within 2 s (the
        engine polls cancellation)."""
        info = self.heavy_session("snapkv")  # work = N * window * group * d = N * 2^16
        t0 = time.time()
        self.call("Compress", self.heavy_request(info, 1 << 21, 1))  # 2^37 > 2^36
        took = time.time() - t0
        self.invariant("Compress", self.pb.CompressRequest(session_id=info.session_id),
                       took < 5, f"an event above the work limit took {took:.1f} s to refuse")
        for scorer, n in (("snapkv", 1 << 16), ("rkv", 1 << 15)):
            info = self.heavy_session(scorer) if scorer != "snapkv" else info
            req = self.heavy_request(info, n, 2)
            t0 = time.time()
            self.call("Compress", req, timeout=0.5, short_deadline=True)
            gone = time.time()
            busy = True
            while busy and time.time() < gone + 20:  # measured, so that the report says how long
                c0 = self.cpu_seconds()
                time.sleep(0.5)
                busy = self.cpu_seconds() - c0 > 0.25
            after = time.time() - 0.5 - gone
            self.invariant("Compress", req, after < 2,
                           f"{scorer} event of N = {n}, window 64, group 1024, d = 1: the server "
                           f"kept computing {after:.1f} s after its caller's 0.5 s deadline "
                           f"(answered after {gone - t0:.1f} s)")
            # The session is usable again (its compress guard released).
            self.call("Compress", self.heavy_request(info, 256, 3))

    def scenario_watchers(self):
        """More WatchMetrics streams than --max_watchers (8) at once."""
        import threading
        results = []

        def watch():
            req = self.pb.WatchMetricsRequest(pool_interval_seconds=0.05)
            try:
                for _ in self.stub.WatchMetrics(req, timeout=1.5):
                    pass
                results.append((req, SC.OK, ""))
            except grpc.RpcError as e:
                results.append((req, e.code(), e.details() or ""))

        threads = [threading.Thread(target=watch) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for req, code, message in results:
            self.check("WatchMetrics", req, code, message, short_deadline=True,
                       descriptor=req.DESCRIPTOR)

    def scenario_concurrent(self):
        """Four threads at once on the same few inline sessions: Compress, UpdateBudget, KeepAlive,
        calibration, GetSession, CloseSession (then a new session)."""
        import threading
        lock = threading.Lock()
        spec = next(s for s in POOL_SPECS if s["tag"] == "inline-managed-f32-snapkv")
        sessions = []
        for _ in range(3):
            resp, code, msg = self.call("CreateSession", self.create_request(spec))
            assert code == SC.OK, msg
            sessions.append(PoolSession(spec, resp.session, resp.session_token))
            self.created[resp.session.session_id] = resp.session_token
        results = []

        def worker(seed):
            rng = random.Random(seed)
            nrng = np.random.default_rng(seed)
            for _ in range(40):
                ps = rng.choice(sessions)
                op = rng.choice(["Compress"] * 4 + ["UpdateBudget", "KeepAlive", "GetSession",
                                                    "StartCalibration", "FinishCalibration",
                                                    "CloseSession"])
                with lock:
                    self.step += 1
                    step = self.step
                if op == "Compress":
                    n = rng.randint(1, 64)
                    q = nrng.standard_normal((ps.L, ps.Hq, ps.window, ps.d))
                    k = nrng.standard_normal((ps.L, ps.Hkv, n, ps.d))
                    req = self.pb.CompressRequest(session_id=ps.id, step=step, inline_tensors=(
                        self.pb.InlineTensors(query_window=self.tensor(q, 1),
                                              keys=self.tensor(k, 1), values=self.tensor(k, 1))))
                elif op == "UpdateBudget":
                    req = self.pb.UpdateBudgetRequest(session_id=ps.id, budget=rng.randint(5, 64))
                elif op == "KeepAlive":
                    req = self.pb.KeepAliveRequest(session_id=ps.id, lease_seconds=600)
                elif op == "GetSession":
                    req = self.pb.GetSessionRequest(session_id=ps.id)
                elif op == "StartCalibration":
                    req = self.pb.StartCalibrationRequest(session_id=ps.id, stride=1)
                elif op == "FinishCalibration":
                    req = self.pb.FinishCalibrationRequest(session_id=ps.id,
                                                           profile_name="fuzz-concurrent")
                else:
                    if rng.random() > 0.3:
                        continue
                    req = self.pb.CloseSessionRequest(session_id=ps.id)
                try:
                    getattr(self.stub, op)(req, timeout=CALL_TIMEOUT)
                    results.append((op, req, SC.OK, ""))
                except grpc.RpcError as e:
                    results.append((op, req, e.code(), e.details() or ""))

        threads = [threading.Thread(target=worker, args=(SEED + i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for op, req, code, message in results:
            self.check(op, req, code, message, descriptor=req.DESCRIPTOR)

    def scenario_huge_geometry(self):
        """2^20 heads (L = Hkv = 1024, d = 1): an inline advisory event, a host-shm managed one."""
        t = self.types
        for memory, mode in ((1, 2), (2, 1)):
            req = self.pb.CreateSessionRequest(
                model=t.ModelGeometry(name="fuzz-huge", num_layers=1024, num_q_heads=1024,
                                      num_kv_heads=1024, head_dim=1, dtype=2, max_context=4),
                budget=t.BudgetConfig(budget=2, window=1, buffer=1, sinks=0),
                scorer=t.ScorerConfig(name="snapkv"), mode=mode, memory=memory,
                lease_seconds=600)
            resp, code, _ = self.call("CreateSession", req, timeout=30)
            if code != SC.OK:
                continue
            info = resp.session
            self.created[info.session_id] = resp.session_token
            if memory == 1:
                self.tiny_event(info, resp.session_token)
            else:
                arenas = MappedArenas(info)
                try:
                    arenas.view("len")[...] = 1
                    creq = self.pb.CompressRequest(session_id=info.session_id, step=1)
                    self.call("Compress", creq, timeout=30)
                finally:
                    arenas.close()
            self.close_created(info.session_id)

    def scenario_h2o_arena(self):
        """A host-shm h2o session's worker shrinks a head below its kept rows, then hands over a
        negative accumulated attention: both refused, the messages naming what the worker wrote."""
        ps = next(p for p in self.pool if p.spec["tag"] == "shm-managed-f32-h2o" and not p.dead)
        for _ in range(3):  # events until some head keeps rows
            self.fill_arenas(ps)
            req = self.pb.CompressRequest(session_id=ps.id, step=self.next_step())
            resp, code, _ = self.call("Compress", req)
            if code == SC.OK:
                self.check_compress_answer(ps, req, resp)
        if not ps.kept or max(ps.kept) == 0:
            return
        head = max(range(len(ps.kept)), key=lambda i: ps.kept[i])
        self.fill_arenas(ps)
        ps.arenas.view("len")[head] = ps.kept[head] - 1
        self.call("Compress", self.pb.CompressRequest(session_id=ps.id, step=self.next_step()))
        self.fill_arenas(ps)
        acc = ps.arenas.view("attention")
        acc[...] = 0.5
        acc[0] = -1.0
        ps.arenas.view("present")[0] = 1
        self.call("Compress", self.pb.CompressRequest(session_id=ps.id, step=self.next_step()))

    def scenarios(self):
        for name in ("fifo_buffer", "oversized_message", "event_limits", "watchers",
                     "concurrent", "huge_geometry", "h2o_arena"):
            self.current = "scenario " + name
            getattr(self, "scenario_" + name)()
            self.assert_alive("scenario " + name)

    # ---------------------------------------------------------------- run

    def warm_up(self):
        """Every kind of session through a few valid events and every RPC once, then closed."""
        for spec in POOL_SPECS:
            self.add_pool_session(spec)
        for round in range(3):
            for ps in self.pool:
                if ps.shm:
                    self.fill_arenas(ps)
                    req = self.pb.CompressRequest(session_id=ps.id, step=self.next_step())
                else:
                    req = self.inline_request(ps, n=16 + 8 * round, lengths=False)
                resp, code, msg = self.call("Compress", req)
                assert code == SC.OK, f"warm-up Compress on {ps.spec['tag']}: {code.name} {msg}"
                self.check_compress_answer(ps, req, resp)
        for name in RPCS:
            if name not in ("CreateSession", "CloseSession", "Compress"):
                getattr(self, "do_" + name)()
        # The largest events the run sends, once, so that the allocator's high-water mark (glibc
        # keeps freed heap) is in the baseline and only growth beyond it counts.
        tiny = next(p for p in self.pool if p.spec["tag"] == "inline-advisory-tiny-d")
        for n in (1 << 24, 1 << 22):
            self.call("Compress", self.inline_request(tiny, n=n, lengths=False), timeout=60)
        info = self.heavy_session("snapkv")
        self.call("Compress", self.heavy_request(info, 1 << 14, 1), timeout=60)
        for ps in self.pool:
            self.retire(ps)
        self.pool = []
        for sid in list(self.created):
            self.close_created(sid)

    def run(self, iters):
        self.refresh_pool()
        if os.environ.get("REASONALLOC_FUZZ_SCENARIOS", "1") != "0":
            self.scenarios()
        weights = {"Compress": 30, "CompressStream": 8, "CreateSession": 12, "RegisterBuffers": 6,
                   "wire": 3}
        names = list(RPCS) + ["wire"]
        w = [weights.get(n, 3) for n in names]
        t0 = time.time()
        for i in range(iters):
            # Round-robin first, so that every RPC is fuzzed whatever the iteration count.
            name = names[i] if i < len(names) else self.rng.choices(names, w)[0]
            self.current = name
            getattr(self, "do_" + name)()
            if i % 100 == 99:
                self.refresh_pool()
            if VERBOSE and i % 250 == 249:
                print(f"  [{i + 1} calls] server {server_usage(self.proc.pid)}", flush=True)
        return time.time() - t0

    def close_everything(self):
        for ps in self.pool:
            if not ps.dead:
                self.retire(ps)
        self.pool = []
        for sid in list(self.created):
            self.close_created(sid)
        for path in glob.glob(f"/dev/shm/rafuzz-{os.getpid()}-*"):
            os.unlink(path)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stubs"))
    for f in ("reasonalloc/v1/types.proto", "reasonalloc/v1/sidecar.proto"):
        assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
                            f"--grpc_python_out={out}", f"{PROTO_DIR}/{f}"]) == 0
    sys.path.insert(0, out)
    from reasonalloc.v1 import sidecar_pb2, types_pb2
    return sidecar_pb2, types_pb2


@pytest.fixture(scope="module")
def server():
    tmp = tempfile.mkdtemp(prefix="reasonalloc-fuzz-")
    sock = os.path.join(tmp, "s.sock")
    os.makedirs(os.path.join(tmp, "profiles"))
    flags = [f"--listen=unix://{sock}", "--metrics_address=127.0.0.1:0",
             f"--max_arena_bytes={ARENA_BYTES}", "--log_level=error",
             f"--profile_dir={tmp}/profiles"]
    helpfull = subprocess.run([SERVER, "--helpfull"], capture_output=True, text=True, timeout=30)
    if "--max_event_bytes" in helpfull.stdout + helpfull.stderr:
        flags.append("--max_event_bytes=268435456")
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "w")
    # A fixed glibc mmap threshold: buffers of 256 KiB and more (messages, tensors, scratch) are
    # mapped and unmapped, not kept on the heap after free, so that the RSS check at the end sees
    # live memory rather than the allocator's high-water mark (growth from a leak still shows).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="262144")
    proc = subprocess.Popen([SERVER, *flags], stdout=log, stderr=subprocess.STDOUT, env=env)
    channel = grpc.insecure_channel(f"unix://{sock}", options=[
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.max_receive_message_length", 256 << 20)])
    yield proc, channel, log_path, tmp, flags
    channel.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()
    for path in glob.glob(f"/dev/shm/rafuzz-{os.getpid()}-*"):
        os.unlink(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a failure has printed the log's tail already


def wait_ready(stub, pb, proc):
    deadline = time.time() + 20
    while True:
        try:
            return stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=1)
        except grpc.RpcError:
            assert proc.poll() is None, "the server exited at start"
            assert time.time() < deadline, "the server did not become ready"
            time.sleep(0.05)


def test_rpc_fuzz(stubs, server):
    pb, types = stubs
    proc, channel, log_path, tmp, flags = server
    print(f"\nREASONALLOC_FUZZ_SEED={SEED} REASONALLOC_FUZZ_ITERS={ITERS} server flags: "
          f"{' '.join(flags[1:])}", flush=True)
    fz = Fuzzer(pb, types, channel, proc, log_path, tmp)
    wait_ready(fz.stub, pb, proc)
    fz.warm_up()
    time.sleep(0.5)  # watchers of the warm-up notice their deadline (polled every 100 ms)
    base = server_usage(proc.pid)
    seconds = fz.run(ITERS)
    fz.close_everything()
    fz.assert_alive("closing every session")

    # Everything released: no session, the whole pool free, RSS, descriptors and arenas back.
    deadline = time.time() + 10
    while True:
        listed = fz.stub.ListSessions(pb.ListSessionsRequest(), timeout=CALL_TIMEOUT).sessions
        info = fz.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=CALL_TIMEOUT)
        now = server_usage(proc.pid)
        settled = (not listed and info.sessions == 0 and info.arena_free_bytes == ARENA_BYTES
                   and now["shm"] == base["shm"] and now["fds"] <= base["fds"] + FD_SLACK
                   and now["rss"] <= base["rss"] + RSS_SLACK)
        if settled or time.time() > deadline:
            break
        time.sleep(0.25)

    print(f"{sum(fz.counts.values())} calls in {seconds:.1f} s; by RPC: "
          + ", ".join(f"{k} {v}" for k, v in sorted(fz.counts.items())))
    print("status codes: " + ", ".join(f"{k[0]}/{k[1]} {v}" for k, v in sorted(fz.codes.items())))
    print(f"baseline {base}\nafter    {now}")
    for (rpc, code, message), n in sorted(fz.messages.items()):
        print(f"  {n:5d} {rpc} {code}: {message}")
    for reason, n in fz.known.items():
        rpc, code, message, request = fz.known_examples[reason]
        print(f"KNOWN DEFECT x{n}: {reason}\n  e.g. {rpc} -> {code}: {message[:200]}\n"
              f"  request: {request}")
    for rpc_re, code_name, msg_re, problem_re, reason in KNOWN_DEFECTS:
        if reason not in fz.known:
            print(f"known defect not seen this run (fixed? remove it from KNOWN_DEFECTS if it "
                  f"stays away): {reason[:100]}")

    missing = [r for r in RPCS if fz.counts[r] == 0]
    assert not missing, f"RPCs never called: {missing}"
    assert not listed, f"{len(listed)} sessions left after closing all: " \
        f"{[s.session_id for s in listed][:5]}"
    assert info.sessions == 0 and info.arena_free_bytes == ARENA_BYTES, info
    assert now["shm"] == base["shm"], f"/dev/shm arenas: {now['shm']} now, {base['shm']} baseline"
    assert now["fds"] <= base["fds"] + FD_SLACK, f"open descriptors: {now['fds']} now, " \
        f"{base['fds']} baseline"
    assert now["rss"] <= base["rss"] + RSS_SLACK, f"RSS {now['rss'] >> 20} MiB now, " \
        f"{base['rss'] >> 20} MiB baseline"
    if any(f.startswith("--max_event_bytes") for f in flags):
        assert now["peak_rss"] <= PEAK_RSS_LIMIT, f"peak RSS {now['peak_rss'] >> 20} MiB with " \
            f"--max_event_bytes 256 MiB"
    # A clean drain: nothing the fuzz did keeps the server from exiting (status 0) on SIGTERM.
    t0 = time.time()
    proc.terminate()
    try:
        status = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        status = None
    print(f"SIGTERM -> exit {status} after {time.time() - t0:.1f} s")
    assert status == 0, f"the server did not exit cleanly within 20 s of SIGTERM (status " \
        f"{status}); log tail:\n{fz.server_log_tail()}"
    if fz.failures:
        distinct = {}
        for rpc, code, message, problem, request in fz.failures:
            key = (rpc, code, re.sub(r"\d+", "N", message)[:120], problem)
            distinct.setdefault(key, request)
        lines = [f"{rpc} -> {code}: {problem}\n    message: {message}\n    request: {request}"
                 for (rpc, code, message, problem), request in distinct.items()]
        pytest.fail(f"{len(fz.failures)} failing calls, {len(distinct)} distinct "
                    f"(seed {SEED}):\n" + "\n".join(lines))
