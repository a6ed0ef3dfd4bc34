"""The asyncio client (grpc.aio): AsyncClient, AsyncSession, AsyncCompressStream,
AsyncMetricsStream. Create and use them inside one running event loop."""
from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any, AsyncIterator, Iterable, List, Optional, Sequence

import grpc

from reasonalloc._common import (DEFAULT_TARGET, KEEP_ALIVE_FRACTION, CompressResult,
                                 EnumValue, ModelSpec, SessionBase, SessionRef, SidecarError,
                                 StreamItem, batch_results, compress_request,
                                 create_session_request, metadata, session_id_and_token,
                                 warn_all, unary_compress_request)
from reasonalloc.v1 import sidecar_pb2, sidecar_pb2_grpc, types_pb2

__all__ = ["AsyncClient", "AsyncSession", "AsyncCompressStream", "AsyncMetricsStream"]


class AsyncSession(SessionBase):
    """A sidecar session of an AsyncClient; an async context manager that closes it. The same
    attributes and NumPy views as Session; the RPCs are coroutines."""

    def __init__(self, client: "AsyncClient", info: sidecar_pb2.SessionInfo,
                 token: Optional[str] = None, warnings: Sequence[str] = ()) -> None:
        super().__init__(info, token, warnings)
        self.client = client
        self._keeper: Optional["asyncio.Task[None]"] = None

    async def compress(self, step: int, *,
                       omit_keep_mask: bool = False) -> sidecar_pb2.CompressResponse:
        """One compression event over the session's arenas at decode step `step`."""
        return await self.client.compress(self, step, omit_keep_mask=omit_keep_mask)

    async def compress_inline(self, step: int, queries: Any, keys: Any, values: Any = None,
                              lengths: Any = None, keep_mask: bool = False,
                              attention: Any = None) -> sidecar_pb2.CompressResponse:
        """Inline Compress: queries [L, Hq, window, d], keys/values [L, Hkv, N, d], lengths
        [L * Hkv] live rows per head, attention (h2o) [L, Hkv, N] fp32."""
        return await self.client.compress(
            self, step, inline=self._inline(queries, keys, values, lengths, attention),
            omit_keep_mask=not keep_mask)

    async def keep_alive(self, lease_seconds: float = 0.0) -> sidecar_pb2.KeepAliveResponse:
        """Renews the lease now (0 = the session's lease length)."""
        return await self.client.keep_alive(self, lease_seconds)

    async def update_budget(self, budget: int) -> sidecar_pb2.SessionInfo:
        """Sets a new budget B from the next Compress; updates and returns `info`."""
        self.info = await self.client.update_budget(self, budget)
        return self.info

    async def refresh(self) -> sidecar_pb2.SessionInfo:
        """GetSession: updates and returns `info`."""
        self.info = await self.client.get_session(self)
        return self.info

    async def register_buffers(self, keys_name: str, keys_shape: Sequence[int],
                               queries_name: str, keys_strides: Optional[Sequence[int]] = None,
                               keys_offset: int = 0, keys_bytes: Optional[int] = None,
                               queries_bytes: Optional[int] = None
                               ) -> sidecar_pb2.RegisterBuffersResponse:
        """Advisory sessions: registers the worker's own shared-memory key and query buffers
        (see Session.register_buffers)."""
        return await self.client.register_buffers(
            self, self._buffers(keys_name, keys_shape, queries_name, keys_strides, keys_offset,
                                keys_bytes, queries_bytes))

    async def start_calibration(self, rho: float = 0.0,
                                stride: int = 0) -> sidecar_pb2.CalibrationStatus:
        """Starts measuring a layer profile on this full-cache session."""
        return await self.client.start_calibration(self, rho=rho, stride=stride)

    async def finish_calibration(self, profile_name: str = "", *,
                                 save: bool = False) -> sidecar_pb2.LayerProfile:
        """Ends the calibration and returns the profile (loaded into the server)."""
        return await self.client.finish_calibration(self, profile_name, save=save)

    async def close(self) -> sidecar_pb2.CloseSessionResponse:
        """Stops the automatic KeepAlive, unmaps the arenas and closes the session."""
        await self._stop_keep_alive()
        self._unmap()
        return await self.client.close_session(self)

    async def _stop_keep_alive(self) -> None:
        task, self._keeper = self._keeper, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _keep_alive(ref: "weakref.ref[AsyncSession]", interval: float) -> None:
    """Renews a session's lease every `interval` seconds while the session exists; holds it
    weakly, so that a dropped session expires with its lease."""
    while True:
        await asyncio.sleep(interval)
        session = ref()
        if session is None:
            return
        client = session.client
        try:
            await client._unary(client.stub.KeepAlive,
                                sidecar_pb2.KeepAliveRequest(session_id=session.id),
                                session.token, timeout=min(client.timeout, max(interval, 1.0)))
            session.keep_alive_error = None
        except SidecarError as e:
            session.keep_alive_error = e
            if e.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                return
        del session, client


class AsyncCompressStream:
    """One CompressStream call: each send() writes a CompressBatch, possibly of many sessions,
    and returns its results in request order. An async context manager that ends the call."""

    def __init__(self, client: "AsyncClient", tokens: Sequence[Optional[str]],
                 omit_keep_mask: bool) -> None:
        self._omit_keep_mask = omit_keep_mask
        self._call = client.stub.CompressStream(metadata=metadata(client.token, *tokens))
        self._closed = False

    async def send(self, items: Iterable[StreamItem], *,
                   omit_keep_mask: Optional[bool] = None) -> List[CompressResult]:
        """Sends one batch of (session, step) pairs or CompressRequest messages; returns a
        CompressResponse, or a SidecarError (not raised) for each request that failed. Raises
        SidecarError when the whole call fails."""
        if self._closed:
            raise ValueError("the stream is closed")
        omit = self._omit_keep_mask if omit_keep_mask is None else omit_keep_mask
        batch = sidecar_pb2.CompressBatch(requests=[compress_request(i, omit) for i in items])
        try:
            await self._call.write(batch)
            result = await self._call.read()
        except grpc.RpcError as e:
            raise SidecarError.from_rpc_error(e) from None
        if result is grpc.aio.EOF:
            code = await self._call.code()
            raise SidecarError(grpc.StatusCode.UNKNOWN if code == grpc.StatusCode.OK else code,
                               await self._call.details() or "the stream ended without a result")
        return batch_results(result)

    async def close(self) -> None:
        """Ends the request stream and waits for the server to end the call."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise SidecarError.from_rpc_error(e) from None

    async def __aenter__(self) -> "AsyncCompressStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncMetricsStream(AsyncIterator[sidecar_pb2.MetricsEvent]):
    """The MetricsEvent stream of WatchMetrics: an async iterator that ends at cancel() or after
    its duration; an async context manager that cancels it."""

    def __init__(self, call: Any, bounded: bool) -> None:
        self._call = call
        self._bounded = bounded
        self._cancelled = False

    def __aiter__(self) -> "AsyncMetricsStream":
        return self

    async def __anext__(self) -> sidecar_pb2.MetricsEvent:
        try:
            event = await self._call.read()
        except asyncio.CancelledError:
            if self._cancelled:
                raise StopAsyncIteration from None
            raise
        except grpc.RpcError as e:
            if (self._cancelled and e.code() == grpc.StatusCode.CANCELLED) or \
                    (self._bounded and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                raise StopAsyncIteration from None
            raise SidecarError.from_rpc_error(e) from None
        if event is grpc.aio.EOF:
            raise StopAsyncIteration
        return event

    def cancel(self) -> None:
        """Ends the stream; iteration stops."""
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> "AsyncMetricsStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient:
    """An asyncio connection to the sidecar (grpc.aio), with every RPC of the KvSidecar service
    as a coroutine; arguments and results as Client's. Every RPC wrapper raises SidecarError. An
    async context manager that closes it."""

    def __init__(self, target: Optional[str] = None, *, timeout: float = 30.0,
                 max_message_bytes: int = 64 << 20, token: Optional[str] = None) -> None:
        self.target = target or os.environ.get("REASONALLOC_TARGET", DEFAULT_TARGET)
        self.timeout = timeout
        self.token = token
        self.channel = grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = sidecar_pb2_grpc.KvSidecarStub(self.channel)
        self._sessions: "weakref.WeakSet[AsyncSession]" = weakref.WeakSet()

    async def _unary(self, method: Any, request: Any, *tokens: Optional[str],
                     timeout: Optional[float] = None) -> Any:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout,
                                metadata=metadata(self.token, *tokens))
        except grpc.RpcError as e:
            raise SidecarError.from_rpc_error(e) from None

    # Server.

    async def get_server_info(self) -> sidecar_pb2.ServerInfo:
        """GetServerInfo: version, backend, arena pool, accepted scorers and allocators."""
        return await self._unary(self.stub.GetServerInfo, sidecar_pb2.GetServerInfoRequest())

    async def info(self) -> sidecar_pb2.ServerInfo:
        """Same as get_server_info()."""
        return await self.get_server_info()

    # Sessions.

    async def session(self, model: ModelSpec, budget: int, scorer: str = "snapkv",
                      allocator: str = "uniform", *, window: int = 0, buffer: int = 0,
                      sinks: Optional[int] = None, recent: int = 0, pool_kernel: int = 0,
                      pool_kind: EnumValue = None, gqa_reduce: EnumValue = None,
                      lambda_: Optional[float] = None, threshold: Optional[float] = None,
                      softmax_all_keys: bool = False, mode: EnumValue = None, profile: str = "",
                      pyramid_beta: Optional[float] = None, adakv_floor: Optional[float] = None,
                      layer_exponent: Optional[float] = None,
                      head_exponent: Optional[float] = None, head_floor: Optional[float] = None,
                      clip_low: Optional[float] = None, clip_high: Optional[float] = None,
                      managed: bool = True, memory: EnumValue = "host_shm",
                      lease_seconds: float = 0.0, client_tag: str = "",
                      keep_alive: Optional[bool] = None) -> AsyncSession:
        """CreateSession; returns the AsyncSession, its arenas mapped. The arguments are
        Client.session's; keep_alive renews the lease from an asyncio task until close()."""
        request = create_session_request(
            model, budget, scorer, allocator, window=window, buffer=buffer, sinks=sinks,
            recent=recent, pool_kernel=pool_kernel, pool_kind=pool_kind, gqa_reduce=gqa_reduce,
            lambda_=lambda_, threshold=threshold, softmax_all_keys=softmax_all_keys, mode=mode,
            profile=profile, pyramid_beta=pyramid_beta, adakv_floor=adakv_floor,
            layer_exponent=layer_exponent, head_exponent=head_exponent, head_floor=head_floor,
            clip_low=clip_low, clip_high=clip_high, managed=managed, memory=memory,
            lease_seconds=lease_seconds, client_tag=client_tag)
        created = await self._unary(self.stub.CreateSession, request)
        try:
            session = AsyncSession(self, created.session, created.session_token, created.warnings)
        except Exception:
            await self._unary(self.stub.CloseSession, sidecar_pb2.CloseSessionRequest(
                session_id=created.session.session_id), created.session_token)
            raise
        warn_all(created.warnings, stacklevel=2)
        if keep_alive or (keep_alive is None and created.session.lease_seconds > 0):
            self._start_keep_alive(session)
        return session

    def _start_keep_alive(self, session: AsyncSession) -> None:
        interval = session.info.lease_seconds * KEEP_ALIVE_FRACTION
        session._keeper = asyncio.get_running_loop().create_task(
            _keep_alive(weakref.ref(session), interval))
        self._sessions.add(session)

    async def open_session(self, session_id: str, token: Optional[str] = None, *,
                           keep_alive: bool = False) -> AsyncSession:
        """An existing session (e.g. created by another process), mapping its arenas."""
        info = await self._unary(self.stub.GetSession,
                                 sidecar_pb2.GetSessionRequest(session_id=session_id), token)
        session = AsyncSession(self, info, token)
        if keep_alive:
            self._start_keep_alive(session)
        return session

    async def get_session(self, session: SessionRef) -> sidecar_pb2.SessionInfo:
        """GetSession."""
        sid, token = session_id_and_token(session)
        return await self._unary(self.stub.GetSession,
                                 sidecar_pb2.GetSessionRequest(session_id=sid), token)

    async def list_sessions(self, model_name: str = "") -> List[sidecar_pb2.SessionInfo]:
        """ListSessions, optionally of one model."""
        listed = await self._unary(self.stub.ListSessions,
                                   sidecar_pb2.ListSessionsRequest(model_name=model_name))
        return list(listed.sessions)

    async def close_session(self, session: SessionRef) -> sidecar_pb2.CloseSessionResponse:
        """CloseSession (idempotent). AsyncSession.close() also unmaps the arenas."""
        sid, token = session_id_and_token(session)
        return await self._unary(self.stub.CloseSession,
                                 sidecar_pb2.CloseSessionRequest(session_id=sid), token)

    async def keep_alive(self, session: SessionRef,
                         lease_seconds: float = 0.0) -> sidecar_pb2.KeepAliveResponse:
        """KeepAlive: renews the lease (0 = the session's lease length)."""
        sid, token = session_id_and_token(session)
        return await self._unary(self.stub.KeepAlive, sidecar_pb2.KeepAliveRequest(
            session_id=sid, lease_seconds=lease_seconds), token)

    async def update_budget(self, session: SessionRef, budget: int) -> sidecar_pb2.SessionInfo:
        """UpdateBudget: a new B from the next Compress."""
        sid, token = session_id_and_token(session)
        return await self._unary(self.stub.UpdateBudget, sidecar_pb2.UpdateBudgetRequest(
            session_id=sid, budget=budget), token)

    async def register_buffers(self, session: SessionRef,
                               buffers: Sequence[types_pb2.ArenaDescriptor]
                               ) -> sidecar_pb2.RegisterBuffersResponse:
        """RegisterBuffers: an advisory session's own key and query buffers."""
        sid, token = session_id_and_token(session)
        return await self._unary(self.stub.RegisterBuffers, sidecar_pb2.RegisterBuffersRequest(
            session_id=sid, buffers=list(buffers)), token)

    # Compression.

    async def compress(self, session: SessionRef, step: int, *,
                       inline: Optional[sidecar_pb2.InlineTensors] = None,
                       omit_keep_mask: bool = False,
                       cuda_event_handle: bytes = b"") -> sidecar_pb2.CompressResponse:
        """Compress: one event of `session` at decode step `step`."""
        request, token = unary_compress_request(session, step, inline, omit_keep_mask,
                                                cuda_event_handle)
        return await self._unary(self.stub.Compress, request, token)

    def compress_stream(self, sessions: Iterable[SessionRef] = (), *,
                        omit_keep_mask: bool = False) -> AsyncCompressStream:
        """Opens a CompressStream (see Client.compress_stream); AsyncCompressStream.send() is a
        coroutine."""
        return AsyncCompressStream(self, [session_id_and_token(s)[1] for s in sessions],
                                   omit_keep_mask)

    # Layer profiles.

    async def start_calibration(self, session: SessionRef, *, rho: float = 0.0,
                                stride: int = 0) -> sidecar_pb2.CalibrationStatus:
        """StartCalibration on a full-cache session (rho 0 = 0.93, stride 0 = 16)."""
        sid, token = session_id_and_token(session)
        return await self._unary(self.stub.StartCalibration, sidecar_pb2.StartCalibrationRequest(
            session_id=sid, rho=rho, stride=stride), token)

    async def finish_calibration(self, session: SessionRef, profile_name: str = "", *,
                                 save: bool = False) -> sidecar_pb2.LayerProfile:
        """FinishCalibration: the measured profile (name "" = the model's)."""
        sid, token = session_id_and_token(session)
        return await self._unary(self.stub.FinishCalibration,
                                 sidecar_pb2.FinishCalibrationRequest(
                                     session_id=sid, profile_name=profile_name, save=save), token)

    async def get_profile(self, name: str) -> sidecar_pb2.LayerProfile:
        """GetProfile."""
        return await self._unary(self.stub.GetProfile, sidecar_pb2.GetProfileRequest(name=name))

    async def put_profile(self, profile: sidecar_pb2.LayerProfile, *, overwrite: bool = False,
                          save: bool = False) -> None:
        """PutProfile: loads `profile` into the server (and writes it to its profile directory
        with save=True)."""
        await self._unary(self.stub.PutProfile, sidecar_pb2.PutProfileRequest(
            profile=profile, overwrite=overwrite, save=save))

    async def list_profiles(self) -> List[sidecar_pb2.LayerProfile]:
        """ListProfiles."""
        listed = await self._unary(self.stub.ListProfiles, sidecar_pb2.ListProfilesRequest())
        return list(listed.profiles)

    # Metrics.

    def watch_metrics(self, sessions: Iterable[SessionRef] = (), *, model_name: str = "",
                      pool_interval_seconds: float = 0.0,
                      duration: Optional[float] = None) -> AsyncMetricsStream:
        """WatchMetrics: an async iterator of MetricsEvent (see Client.watch_metrics)."""
        refs = [session_id_and_token(s) for s in sessions]
        request = sidecar_pb2.WatchMetricsRequest(session_ids=[sid for sid, _ in refs],
                                                  model_name=model_name,
                                                  pool_interval_seconds=pool_interval_seconds)
        call = self.stub.WatchMetrics(request, timeout=duration,
                                      metadata=metadata(self.token, *(t for _, t in refs)))
        return AsyncMetricsStream(call, duration is not None)

    async def close(self) -> None:
        """Stops the automatic KeepAlive and closes the channel (sessions stay until their
        leases end)."""
        for session in list(self._sessions):
            await session._stop_keep_alive()
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
