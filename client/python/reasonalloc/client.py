"""The blocking client: Client, Session, CompressStream, MetricsStream."""
from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import grpc

from reasonalloc._common import (DEFAULT_TARGET, KEEP_ALIVE_FRACTION, CompressResult,
                                 EnumValue, ModelSpec, SessionBase, SessionRef, SidecarError,
                                 StreamItem, batch_results, compress_request,
                                 create_session_request, metadata, session_id_and_token,
                                 warn_all, unary_compress_request)
from reasonalloc._common import TOKEN_KEY, ReasonAllocWarning, _Arena  # noqa: F401  (as before)
from reasonalloc.v1 import sidecar_pb2, sidecar_pb2_grpc, types_pb2

__all__ = ["Client", "Session", "CompressStream", "MetricsStream", "SidecarError"]


class Session(SessionBase):
    """A sidecar session of a Client; a context manager that closes it.

    Carries the session's token, CreateSession's `warnings`, and for memory="host_shm" NumPy
    views over its arenas (see SessionBase). `keep_alive_error` holds the last failure of the
    automatic KeepAlive, None while renewals succeed."""

    def __init__(self, client: "Client", info: sidecar_pb2.SessionInfo,
                 token: Optional[str] = None, warnings: Sequence[str] = ()) -> None:
        super().__init__(info, token, warnings)
        self.client = client

    def compress(self, step: int, *, omit_keep_mask: bool = False) -> sidecar_pb2.CompressResponse:
        """One compression event over the session's arenas at decode step `step`."""
        return self.client.compress(self, step, omit_keep_mask=omit_keep_mask)

    def compress_inline(self, step: int, queries: Any, keys: Any, values: Any = None,
                        lengths: Any = None, keep_mask: bool = False,
                        attention: Any = None) -> sidecar_pb2.CompressResponse:
        """Inline Compress: queries [L, Hq, window, d], keys/values [L, Hkv, N, d], lengths
        [L * Hkv] live rows per head, attention (h2o) [L, Hkv, N] fp32."""
        return self.client.compress(self, step,
                                    inline=self._inline(queries, keys, values, lengths, attention),
                                    omit_keep_mask=not keep_mask)

    def keep_alive(self, lease_seconds: float = 0.0) -> sidecar_pb2.KeepAliveResponse:
        """Renews the lease now (0 = the session's lease length)."""
        return self.client.keep_alive(self, lease_seconds)

    def update_budget(self, budget: int) -> sidecar_pb2.SessionInfo:
        """Sets a new budget B from the next Compress; updates and returns `info`."""
        self.info = self.client.update_budget(self, budget)
        return self.info

    def refresh(self) -> sidecar_pb2.SessionInfo:
        """GetSession: updates and returns `info`."""
        self.info = self.client.get_session(self)
        return self.info

    def register_buffers(self, keys_name: str, keys_shape: Sequence[int], queries_name: str,
                         keys_strides: Optional[Sequence[int]] = None, keys_offset: int = 0,
                         keys_bytes: Optional[int] = None, queries_bytes: Optional[int] = None
                         ) -> sidecar_pb2.RegisterBuffersResponse:
        """Advisory sessions: registers the worker's own shared-memory objects (names as given to
        shm_open, e.g. "/my-keys") holding keys [L, Hkv, N, d] (strides in elements, contiguous by
        default) and the query window [L, Hq, window, d], both in the session's dtype."""
        return self.client.register_buffers(
            self, self._buffers(keys_name, keys_shape, queries_name, keys_strides, keys_offset,
                                keys_bytes, queries_bytes))

    def start_calibration(self, rho: float = 0.0, stride: int = 0) -> sidecar_pb2.CalibrationStatus:
        """Starts measuring a layer profile on this full-cache session."""
        return self.client.start_calibration(self, rho=rho, stride=stride)

    def finish_calibration(self, profile_name: str = "", *,
                           save: bool = False) -> sidecar_pb2.LayerProfile:
        """Ends the calibration and returns the profile (loaded into the server)."""
        return self.client.finish_calibration(self, profile_name, save=save)

    def close(self) -> sidecar_pb2.CloseSessionResponse:
        """Stops the automatic KeepAlive, unmaps the arenas and closes the session."""
        self.client._keeper.remove(self)
        self._unmap()
        return self.client.close_session(self)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CompressStream:
    """One CompressStream call: each send() writes a CompressBatch, possibly of many sessions,
    and returns its results in request order. A context manager that ends the call."""

    def __init__(self, client: "Client", tokens: Sequence[Optional[str]],
                 omit_keep_mask: bool) -> None:
        self._omit_keep_mask = omit_keep_mask
        self._requests: "queue.Queue[Optional[sidecar_pb2.CompressBatch]]" = queue.Queue()
        self._responses = client.stub.CompressStream(iter(self._requests.get, None),
                                                     metadata=metadata(client.token, *tokens))
        self._closed = False

    def send(self, items: Iterable[StreamItem], *,
             omit_keep_mask: Optional[bool] = None) -> List[CompressResult]:
        """Sends one batch of (session, step) pairs or CompressRequest messages; returns a
        CompressResponse, or a SidecarError (not raised) for each request that failed. Raises
        SidecarError when the whole call fails."""
        if self._closed:
            raise ValueError("the stream is closed")
        omit = self._omit_keep_mask if omit_keep_mask is None else omit_keep_mask
        batch = sidecar_pb2.CompressBatch(requests=[compress_request(i, omit) for i in items])
        self._requests.put(batch)
        try:
            result = next(self._responses)
        except grpc.RpcError as e:
            raise SidecarError.from_rpc_error(e) from None
        except StopIteration:
            raise SidecarError(grpc.StatusCode.UNKNOWN,
                               "the stream ended without a result") from None
        return batch_results(result)

    def close(self) -> None:
        """Ends the request stream and waits for the server to end the call."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise SidecarError.from_rpc_error(e) from None

    def __enter__(self) -> "CompressStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsStream(Iterator[sidecar_pb2.MetricsEvent]):
    """The MetricsEvent stream of WatchMetrics: an iterator that ends at cancel() or after its
    duration; a context manager that cancels it."""

    def __init__(self, call: Any, bounded: bool) -> None:
        self._call = call
        self._bounded = bounded
        self._cancelled = False

    def __iter__(self) -> "MetricsStream":
        return self

    def __next__(self) -> sidecar_pb2.MetricsEvent:
        try:
            return next(self._call)
        except grpc.RpcError as e:
            if (self._cancelled and e.code() == grpc.StatusCode.CANCELLED) or \
                    (self._bounded and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StopIteration from None
            raise SidecarError.from_rpc_error(e) from None

    def cancel(self) -> None:
        """Ends the stream; iteration stops."""
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> "MetricsStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class _LeaseKeeper:
    """Renews the leases of a client's sessions from one daemon thread, each after
    KEEP_ALIVE_FRACTION of its lease. Holds the sessions weakly: a dropped session is no longer
    renewed and expires with its lease."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: Dict[str, Tuple[float, float, "weakref.ref[Session]"]] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def add(self, session: Session) -> None:
        interval = session.info.lease_seconds * KEEP_ALIVE_FRACTION
        if interval <= 0:
            return
        with self._cond:
            if self._stopped:
                raise ValueError("the client is closed")
            self._due[session.id] = (time.monotonic() + interval, interval, weakref.ref(session))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="reasonalloc-keep-alive",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, session: Session) -> None:
        with self._cond:
            self._due.pop(session.id, None)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._due.clear()
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # also when a renewal raised something unexpected
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                for sid in [s for s, (_, _, ref) in self._due.items() if ref() is None]:
                    del self._due[sid]
                if self._stopped or not self._due:
                    self._thread = None  # under the lock: add() starts a new one
                    return
                due = [(sid, interval, ref) for sid, (at, interval, ref) in self._due.items()
                       if at <= now]
                if not due:
                    self._cond.wait(min(at for at, _, _ in self._due.values()) - now)
                    continue
                for sid, interval, ref in due:
                    self._due[sid] = (now + interval, interval, ref)
            for sid, interval, ref in due:
                session = ref()
                if session is not None:
                    self._renew(session, interval)
                del session

    def _renew(self, session: Session, interval: float) -> None:
        try:
            session.client._unary(session.client.stub.KeepAlive,
                                  sidecar_pb2.KeepAliveRequest(session_id=session.id),
                                  session.token, timeout=min(session.client.timeout,
                                                             max(interval, 1.0)))
            session.keep_alive_error = None
        except SidecarError as e:
            session.keep_alive_error = e
            if e.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                self.remove(session)
        except ValueError:  # the channel was closed under us
            self.remove(session)


class Client:
    """A blocking connection to the sidecar, with every RPC of the KvSidecar service.

    `target` is a gRPC target ("unix:///run/reasonalloc/sidecar.sock", "host:port"), by default
    $REASONALLOC_TARGET, else unix:///tmp/reasonalloc.sock. `timeout` bounds each unary call in
    seconds; `token` is a session token sent with every call, besides the token of the session a
    call names. Every RPC wrapper raises SidecarError. A context manager that closes it."""

    def __init__(self, target: Optional[str] = None, *, timeout: float = 30.0,
                 max_message_bytes: int = 64 << 20, token: Optional[str] = None) -> None:
        self.target = target or os.environ.get("REASONALLOC_TARGET", DEFAULT_TARGET)
        self.timeout = timeout
        self.token = token
        self.channel = grpc.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = sidecar_pb2_grpc.KvSidecarStub(self.channel)
        self._keeper = _LeaseKeeper()

    def _unary(self, method: Any, request: Any, *tokens: Optional[str],
               timeout: Optional[float] = None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout,
                          metadata=metadata(self.token, *tokens))
        except grpc.RpcError as e:
            raise SidecarError.from_rpc_error(e) from None

    # Server.

    def get_server_info(self) -> sidecar_pb2.ServerInfo:
        """GetServerInfo: version, backend, arena pool, accepted scorers and allocators."""
        return self._unary(self.stub.GetServerInfo, sidecar_pb2.GetServerInfoRequest())

    def info(self) -> sidecar_pb2.ServerInfo:
        """Same as get_server_info()."""
        return self.get_server_info()

    # Sessions.

    def session(self, model: ModelSpec, budget: int, scorer: str = "snapkv",
                allocator: str = "uniform", *, window: int = 0, buffer: int = 0,
                sinks: Optional[int] = None, recent: int = 0, pool_kernel: int = 0,
                pool_kind: EnumValue = None, gqa_reduce: EnumValue = None,
                lambda_: Optional[float] = None, threshold: Optional[float] = None,
                softmax_all_keys: bool = False, mode: EnumValue = None, profile: str = "",
                pyramid_beta: Optional[float] = None, adakv_floor: Optional[float] = None,
                layer_exponent: Optional[float] = None, head_exponent: Optional[float] = None,
                head_floor: Optional[float] = None, clip_low: Optional[float] = None,
                clip_high: Optional[float] = None, managed: bool = True,
                memory: EnumValue = "host_shm", lease_seconds: float = 0.0, client_tag: str = "",
                keep_alive: Optional[bool] = None) -> Session:
        """CreateSession; returns the Session, its arenas mapped.

        model: a ModelGeometry, or a mapping of its fields (name, num_layers, num_q_heads,
            num_kv_heads, head_dim, dtype = "float16", max_context = 131072).
        budget, window, buffer, sinks, recent: BudgetConfig (0 and None = the server's default).
        scorer ("snapkv", "streaming", "h2o", "rkv"), pool_kernel, pool_kind, gqa_reduce,
            lambda_, threshold, softmax_all_keys: ScorerConfig.
        allocator ("uniform", "pyramid", "adakv", "reasonalloc"), mode (the reasonalloc mode:
            "layer", "head", "full", "off", "static"), profile, pyramid_beta, adakv_floor, layer_exponent,
            head_exponent, head_floor, clip_low, clip_high: AllocatorConfig.
        managed: False for an advisory session. memory: "inline", "host_shm", "cuda_ipc".
        lease_seconds (0 = the server's default), client_tag.
        keep_alive: renew the lease from a background thread until close(); None = when the
            session has a lease.

        Enum arguments take a short spelling ("mean") or the proto's ("GQA_REDUCE_MEAN"); None
        leaves the field unspecified. CreateSession's warnings are emitted as ReasonAllocWarning
        and kept in Session.warnings."""
        request = create_session_request(
            model, budget, scorer, allocator, window=window, buffer=buffer, sinks=sinks,
            recent=recent, pool_kernel=pool_kernel, pool_kind=pool_kind, gqa_reduce=gqa_reduce,
            lambda_=lambda_, threshold=threshold, softmax_all_keys=softmax_all_keys, mode=mode,
            profile=profile, pyramid_beta=pyramid_beta, adakv_floor=adakv_floor,
            layer_exponent=layer_exponent, head_exponent=head_exponent, head_floor=head_floor,
            clip_low=clip_low, clip_high=clip_high, managed=managed, memory=memory,
            lease_seconds=lease_seconds, client_tag=client_tag)
        created = self._unary(self.stub.CreateSession, request)
        try:
            session = Session(self, created.session, created.session_token, created.warnings)
        except Exception:
            self._unary(self.stub.CloseSession, sidecar_pb2.CloseSessionRequest(
                session_id=created.session.session_id), created.session_token)
            raise
        warn_all(created.warnings, stacklevel=2)
        if keep_alive or (keep_alive is None and created.session.lease_seconds > 0):
            self._keeper.add(session)
        return session

    def open_session(self, session_id: str, token: Optional[str] = None, *,
                     keep_alive: bool = False) -> Session:
        """An existing session (e.g. created by another process), mapping its arenas; `token` is
        needed when this process runs as another uid than the creator's or connects over TCP."""
        info = self._unary(self.stub.GetSession,
                           sidecar_pb2.GetSessionRequest(session_id=session_id), token)
        session = Session(self, info, token)
        if keep_alive:
            self._keeper.add(session)
        return session

    def get_session(self, session: SessionRef) -> sidecar_pb2.SessionInfo:
        """GetSession."""
        sid, token = session_id_and_token(session)
        return self._unary(self.stub.GetSession, sidecar_pb2.GetSessionRequest(session_id=sid),
                           token)

    def list_sessions(self, model_name: str = "") -> List[sidecar_pb2.SessionInfo]:
        """ListSessions, optionally of one model."""
        return list(self._unary(self.stub.ListSessions,
                                sidecar_pb2.ListSessionsRequest(model_name=model_name)).sessions)

    def close_session(self, session: SessionRef) -> sidecar_pb2.CloseSessionResponse:
        """CloseSession (idempotent). Session.close() also unmaps the arenas."""
        sid, token = session_id_and_token(session)
        return self._unary(self.stub.CloseSession,
                           sidecar_pb2.CloseSessionRequest(session_id=sid), token)

    def keep_alive(self, session: SessionRef,
                   lease_seconds: float = 0.0) -> sidecar_pb2.KeepAliveResponse:
        """KeepAlive: renews the lease (0 = the session's lease length)."""
        sid, token = session_id_and_token(session)
        return self._unary(self.stub.KeepAlive, sidecar_pb2.KeepAliveRequest(
            session_id=sid, lease_seconds=lease_seconds), token)

    def update_budget(self, session: SessionRef, budget: int) -> sidecar_pb2.SessionInfo:
        """UpdateBudget: a new B from the next Compress."""
        sid, token = session_id_and_token(session)
        return self._unary(self.stub.UpdateBudget, sidecar_pb2.UpdateBudgetRequest(
            session_id=sid, budget=budget), token)

    def register_buffers(self, session: SessionRef, buffers: Sequence[types_pb2.ArenaDescriptor]
                         ) -> sidecar_pb2.RegisterBuffersResponse:
        """RegisterBuffers: an advisory session's own key and query buffers."""
        sid, token = session_id_and_token(session)
        return self._unary(self.stub.RegisterBuffers, sidecar_pb2.RegisterBuffersRequest(
            session_id=sid, buffers=list(buffers)), token)

    # Compression.

    def compress(self, session: SessionRef, step: int, *,
                 inline: Optional[sidecar_pb2.InlineTensors] = None,
                 omit_keep_mask: bool = False,
                 cuda_event_handle: bytes = b"") -> sidecar_pb2.CompressResponse:
        """Compress: one event of `session` at decode step `step`."""
        request, token = unary_compress_request(session, step, inline, omit_keep_mask,
                                                cuda_event_handle)
        return self._unary(self.stub.Compress, request, token)

    def compress_stream(self, sessions: Iterable[SessionRef] = (), *,
                        omit_keep_mask: bool = False) -> CompressStream:
        """Opens a CompressStream: each CompressStream.send() carries the events of many
        sessions in one CompressBatch. The tokens of `sessions` travel in the call's metadata
        (needed for sessions of another uid or over TCP)."""
        return CompressStream(self, [session_id_and_token(s)[1] for s in sessions],
                              omit_keep_mask)

    # Layer profiles.

    def start_calibration(self, session: SessionRef, *, rho: float = 0.0,
                          stride: int = 0) -> sidecar_pb2.CalibrationStatus:
        """StartCalibration on a full-cache session (rho 0 = 0.93, stride 0 = 16)."""
        sid, token = session_id_and_token(session)
        return self._unary(self.stub.StartCalibration, sidecar_pb2.StartCalibrationRequest(
            session_id=sid, rho=rho, stride=stride), token)

    def finish_calibration(self, session: SessionRef, profile_name: str = "", *,
                           save: bool = False) -> sidecar_pb2.LayerProfile:
        """FinishCalibration: the measured profile (name "" = the model's)."""
        sid, token = session_id_and_token(session)
        return self._unary(self.stub.FinishCalibration, sidecar_pb2.FinishCalibrationRequest(
            session_id=sid, profile_name=profile_name, save=save), token)

    def get_profile(self, name: str) -> sidecar_pb2.LayerProfile:
        """GetProfile."""
        return self._unary(self.stub.GetProfile, sidecar_pb2.GetProfileRequest(name=name))

    def put_profile(self, profile: sidecar_pb2.LayerProfile, *, overwrite: bool = False,
                    save: bool = False) -> None:
        """PutProfile: loads `profile` into the server (and writes it to its profile directory
        with save=True)."""
        self._unary(self.stub.PutProfile, sidecar_pb2.PutProfileRequest(
            profile=profile, overwrite=overwrite, save=save))

    def list_profiles(self) -> List[sidecar_pb2.LayerProfile]:
        """ListProfiles."""
        return list(self._unary(self.stub.ListProfiles,
                                sidecar_pb2.ListProfilesRequest()).profiles)

    # Metrics.

    def watch_metrics(self, sessions: Iterable[SessionRef] = (), *, model_name: str = "",
                      pool_interval_seconds: float = 0.0,
                      duration: Optional[float] = None) -> MetricsStream:
        """WatchMetrics: an iterator of MetricsEvent (a CompressEvent per event of the sessions
        named, all by default, of `model_name` if given; PoolGauges every pool_interval_seconds
        if > 0). It ends at MetricsStream.cancel() or after `duration` seconds."""
        refs = [session_id_and_token(s) for s in sessions]
        request = sidecar_pb2.WatchMetricsRequest(session_ids=[sid for sid, _ in refs],
                                                  model_name=model_name,
                                                  pool_interval_seconds=pool_interval_seconds)
        call = self.stub.WatchMetrics(request, timeout=duration,
                                      metadata=metadata(self.token, *(t for _, t in refs)))
        return MetricsStream(call, duration is not None)

    def close(self) -> None:
        """Stops the automatic KeepAlive and closes the channel (sessions stay until their
        leases end)."""
        self._keeper.stop()
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
