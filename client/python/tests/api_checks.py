"""Checks of the client API against a running server, shared by test_api.py (the source tree) and
test_installed_wheel.py, which runs this file as a script in a fresh venv holding only the wheel
and its dependencies:

    python api_checks.py [--installed] unix:///path/to/s.sock

Each check_* function takes the server's target; the script runs them all, prints one line per
check and exits 1 when one failed. --installed adds check_installed_layout.
"""
import asyncio
import os
import sys
import time
import traceback
import warnings

import grpc
import numpy as np

import reasonalloc
from reasonalloc import (AsyncClient, Client, ReasonAllocWarning, SidecarError, _proto)
from reasonalloc.v1 import sidecar_pb2, sidecar_pb2_grpc, types_pb2

L, HQ, HKV, D, W, B, DELTA = 2, 4, 2, 8, 4, 16, 8


def model(name):
    return dict(name=name, num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                dtype="float16", max_context=4096)


def fill(session, steps, rng):
    for step in range(steps):
        session.append(step, rng.standard_normal((L, HKV, D)), rng.standard_normal((L, HKV, D)),
                       rng.standard_normal((L, HQ, D)))


def check_version_and_stubs(target):
    assert reasonalloc.__version__ == "0.2.0", reasonalloc.__version__
    assert _proto.load() == (types_pb2, sidecar_pb2, sidecar_pb2_grpc)
    assert hasattr(sidecar_pb2_grpc, "KvSidecarStub")
    with Client(target) as client:
        info = client.get_server_info()
        assert "rkv" in info.scorers and "reasonalloc" in info.allocators, info
        assert client.info().version == info.version


def check_managed_host_shm_session_with_plain_strings(target):
    rng = np.random.default_rng(1)
    with Client(target) as client:
        with client.session(model("plain"), B, "rkv", "reasonalloc", mode="head",
                            gqa_reduce="mean", memory="host_shm", window=W, buffer=DELTA,
                            lambda_=0.2, sinks=2, client_tag="plain") as s:
            assert s.info.scorer.gqa_reduce == types_pb2.GQA_REDUCE_MEAN
            assert abs(getattr(s.info.scorer, "lambda") - 0.2) < 1e-9
            assert s.info.allocator.reasonalloc_mode == \
                types_pb2.AllocatorConfig.REASONALLOC_MODE_HEAD
            assert s.info.memory == types_pb2.MEMORY_KIND_HOST_SHM
            assert s.info.mode == types_pb2.SESSION_MODE_MANAGED
            assert s.info.budget.sinks == 2 and s.dtype == "float16"
            assert s.warnings == []  # head routing needs no layer profile
            fill(s, B + DELTA - 2, rng)
            assert list(s.len) == [B + DELTA - 2] * (L * HKV)
            result = s.compress(B + DELTA - 3)
            assert result.epoch == 1 == s.epoch
            n = L * HKV * (B + DELTA - 2)
            assert sum(s.len) == n - result.decision.evicted_tokens <= L * HKV * B
            assert s.keys(1, 1).shape == (s.len[L * HKV - 1], D)
            assert len(s.kept(0, 0)) == s.len[0]
            assert [x.session_id for x in client.list_sessions("plain")] == [s.id]
        # The proto spellings and numbers work as well.
        with client.session(model("proto-spelling"), B, "snapkv", "reasonalloc",
                            mode="REASONALLOC_MODE_HEAD", gqa_reduce="GQA_REDUCE_MAX",
                            pool_kind=types_pb2.POOL_KIND_AVG, memory="MEMORY_KIND_INLINE",
                            managed=False, window=W, buffer=DELTA) as s:
            assert s.info.scorer.gqa_reduce == types_pb2.GQA_REDUCE_MAX
            assert s.info.scorer.pool_kind == types_pb2.POOL_KIND_AVG
            assert s.info.memory == types_pb2.MEMORY_KIND_INLINE and not s.info.arenas
            assert s.info.mode == types_pb2.SESSION_MODE_ADVISORY
            got = s.compress_inline(1, rng.standard_normal((L, HQ, W, D)),
                                    rng.standard_normal((L, HKV, 12, D)), keep_mask=True)
            assert got.epoch == 1 and len(got.decision.keep_mask) > 0
            assert s.update_budget(B - 2).budget.budget == B - 2 == s.info.budget.budget
        assert client.list_sessions("plain") == []


def check_warnings_surfaced(target):
    with Client(target) as client:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            s = client.session(model("no-such-profile"), B, "rkv", "reasonalloc", mode="full",
                               window=W, buffer=DELTA)
        try:
            ours = [w for w in caught if issubclass(w.category, ReasonAllocWarning)]
            assert len(ours) == 1, [str(w.message) for w in caught]
            assert "no layer profile" in str(ours[0].message), ours[0].message
            assert ours[0].filename == __file__  # attributed to the caller of session()
            assert s.warnings == [str(ours[0].message)]
        finally:
            s.close()


def check_keep_alive_renews(target):
    with Client(target, timeout=10) as client:
        kept = client.session(model("lease"), B, lease_seconds=1, window=W, buffer=DELTA)
        left = client.session(model("lease"), B, lease_seconds=1, window=W, buffer=DELTA,
                              keep_alive=False)
        first = kept.info.lease_expires_unix_ms
        time.sleep(2.5)
        info = client.get_session(kept)  # still alive after 2.5 leases
        assert info.lease_expires_unix_ms > first + 1000, (first, info.lease_expires_unix_ms)
        assert kept.keep_alive_error is None
        try:
            client.get_session(left)
            raise AssertionError("the session without keep-alive outlived its lease")
        except SidecarError as e:
            assert e.code == grpc.StatusCode.NOT_FOUND, e
        assert kept.close().existed


def check_compress_stream_batches_sessions(target):
    rng = np.random.default_rng(2)
    with Client(target) as client:
        sessions = [client.session(model("stream"), B, "rkv", "reasonalloc", mode="head",
                                   window=W, buffer=DELTA) for _ in range(3)]
        try:
            for s in sessions:
                fill(s, B + 4, rng)
            with client.compress_stream(sessions) as stream:
                results = stream.send([(s, B + 3) for s in sessions])
                assert [r.session_id for r in results] == [s.id for s in sessions], results
                assert all(r.epoch == 1 for r in results)
                assert [s.epoch for s in sessions] == [1, 1, 1]
                # A failing request fails alone, in its place.
                results = stream.send([(sessions[0], B + 3), ("0" * 32, 1),
                                       sidecar_pb2.CompressRequest(session_id=sessions[1].id,
                                                                   step=B + 9)])
                assert isinstance(results[0], SidecarError), results[0]
                assert results[0].code == grpc.StatusCode.FAILED_PRECONDITION
                assert "step" in results[0].details, results[0].details
                assert isinstance(results[1], SidecarError)
                assert results[1].code == grpc.StatusCode.NOT_FOUND
                assert results[2].epoch == 2
        finally:
            for s in sessions:
                s.close()


def check_watch_metrics(target):
    rng = np.random.default_rng(3)
    with Client(target) as client:
        with client.watch_metrics(pool_interval_seconds=0.2, duration=20) as stream:
            first = next(stream)
            assert first.WhichOneof("event") == "pool", first
            assert first.pool.arena_capacity_bytes > 0
        with client.session(model("watched"), B, window=W, buffer=DELTA) as s, \
                client.watch_metrics([s], pool_interval_seconds=5, duration=20) as stream:
            assert next(stream).WhichOneof("event") == "pool"  # the first comes at once: it is up
            fill(s, B + 4, rng)
            s.compress(B + 3)
            event = next(e for e in stream if e.WhichOneof("event") == "compress")
            assert event.compress.session_id == s.id and event.compress.epoch == 1
            stream.cancel()
            assert list(stream) == []
        events = list(client.watch_metrics(pool_interval_seconds=0.2, duration=0.5))
        assert 1 <= len(events) <= 5, events  # the duration ends the iteration


def check_profiles(target):
    with Client(target) as client:
        geometry = types_pb2.ModelGeometry(**dict(model("profiled"),
                                                  dtype=types_pb2.DTYPE_FLOAT16))
        profile = sidecar_pb2.LayerProfile(name="wheel-profile", model=geometry, rho=0.9,
                                           demand=[0.5, 1.5], samples=[100, 100],
                                           provenance="api_checks")
        client.put_profile(profile, overwrite=True)
        assert "wheel-profile" in [p.name for p in client.list_profiles()]
        got = client.get_profile("wheel-profile")
        assert list(got.demand) == [0.5, 1.5] and got.owner, got
        with warnings.catch_warnings():
            warnings.simplefilter("error", ReasonAllocWarning)
            with client.session(geometry, B, "rkv", "reasonalloc", mode="full",
                                profile="wheel-profile", window=W, buffer=DELTA) as s:
                assert s.info.profile == "wheel-profile" and s.warnings == []
        try:
            client.get_profile("no-such-profile")
            raise AssertionError("an unknown profile was found")
        except SidecarError as e:
            assert e.code == grpc.StatusCode.NOT_FOUND and "no-such-profile" in e.details, e


def check_errors(target):
    with Client(target) as client:
        try:
            client.session(model("errors"), 2, window=8)
            raise AssertionError("budget 2 with window 8 was accepted")
        except SidecarError as e:
            assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e
            assert "budget" in e.details, e.details
            assert isinstance(e, RuntimeError) and e.details in str(e)
        try:
            client.session(dict(model("errors"), num_kv_heads=3), B)
            raise AssertionError("num_kv_heads 3 was accepted")
        except SidecarError as e:
            assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "num_kv_heads" in e.details, e
        try:
            client.compress("0" * 32, 1)
            raise AssertionError("an unknown session was compressed")
        except SidecarError as e:
            assert e.code == grpc.StatusCode.NOT_FOUND and "session_id" in e.details, e
        try:
            client.session(model("errors"), B, gqa_reduce="median")
            raise AssertionError("gqa_reduce='median' was accepted")
        except ValueError as e:
            assert "gqa_reduce" in str(e) and "mean_scores" in str(e), e
        try:
            client.session(model("errors"), B, memory="gpu")
            raise AssertionError("memory='gpu' was accepted")
        except ValueError as e:
            assert "memory" in str(e) and "host_shm" in str(e), e
        assert client.list_sessions("errors") == []
    with Client("unix:///nonexistent/reasonalloc.sock", timeout=1) as dead:
        try:
            dead.get_server_info()
            raise AssertionError("a call to no server succeeded")
        except SidecarError as e:
            assert e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), e


async def _async_main(target):
    rng = np.random.default_rng(4)
    async with AsyncClient(target) as client:
        info = await client.get_server_info()
        assert info.backend
        s = await client.session(model("async"), B, "rkv", "reasonalloc", mode="head",
                                 gqa_reduce="mean", window=W, buffer=DELTA, lease_seconds=1)
        async with s:
            fill(s, B + 4, rng)
            result = await s.compress(B + 3)
            assert result.epoch == 1 == s.epoch
            await asyncio.sleep(2.2)  # past two leases: the keep-alive task renewed it
            assert (await s.refresh()).session_id == s.id and s.keep_alive_error is None
        assert not (await client.close_session(s)).existed
        others = [await client.session(model("async-stream"), B, window=W, buffer=DELTA)
                  for _ in range(2)]
        watch = client.watch_metrics(others, pool_interval_seconds=5, duration=20)
        event = await watch.__anext__()
        assert event.WhichOneof("event") == "pool"  # the first comes at once: it is up
        async with client.compress_stream(others) as stream:
            for o in others:
                fill(o, B + 4, rng)
            results = await stream.send([(o, B + 3) for o in others])
            assert [r.session_id for r in results] == [o.id for o in others]
            assert [r.epoch for r in results] == [1, 1]
            results = await stream.send([(others[0], 1)])
            assert isinstance(results[0], SidecarError)
            assert results[0].code == grpc.StatusCode.FAILED_PRECONDITION
        async with watch:
            async for event in watch:
                if event.WhichOneof("event") == "compress":
                    break
            assert event.compress.session_id in [o.id for o in others], event
        for o in others:
            await o.close()
        try:
            await client.session(model("async"), 2, window=8)
            raise AssertionError("budget 2 with window 8 was accepted")
        except SidecarError as e:
            assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "budget" in e.details, e
        try:
            await client.get_session("0" * 32)
            raise AssertionError("an unknown session was found")
        except SidecarError as e:
            assert e.code == grpc.StatusCode.NOT_FOUND
        assert await client.list_sessions("async") == []


def check_async_client(target):
    asyncio.run(_async_main(target))


def check_installed_layout(target):
    """The package and its stubs come from the installed wheel, without protos or grpc_tools."""
    import importlib
    import importlib.util

    package = os.path.dirname(os.path.abspath(reasonalloc.__file__))
    assert package.startswith(os.path.realpath(sys.prefix)) or package.startswith(sys.prefix), \
        (package, sys.prefix)
    assert importlib.util.find_spec("grpc_tools") is None, "grpc_tools is installed"
    for name in ("v1/types_pb2.py", "v1/types_pb2.pyi", "v1/sidecar_pb2.py", "v1/sidecar_pb2.pyi",
                 "v1/sidecar_pb2_grpc.py", "py.typed"):
        assert os.path.isfile(os.path.join(package, name)), name
    for module in _proto.load():
        assert os.path.dirname(module.__file__) == os.path.join(package, "v1"), module.__file__
    assert reasonalloc.__path__ == [package], reasonalloc.__path__  # no stub cache added
    # Without the extra, the transformers adapter says what to install.
    if importlib.util.find_spec("torch") is None:
        try:
            importlib.import_module("reasonalloc.transformers")
        except ImportError as e:
            assert 'pip install "reasonalloc[transformers]"' in str(e), e
        else:
            raise AssertionError("reasonalloc.transformers imported without torch")


CHECKS = [check_version_and_stubs, check_managed_host_shm_session_with_plain_strings,
          check_warnings_surfaced, check_keep_alive_renews, check_compress_stream_batches_sessions,
          check_watch_metrics, check_profiles, check_errors, check_async_client]


def main(argv):
    installed = "--installed" in argv
    target = [a for a in argv if a != "--installed"][0]
    failed = 0
    for check in ([check_installed_layout] if installed else []) + CHECKS:
        t0 = time.monotonic()
        try:
            check(target)
            print(f"ok    {check.__name__} ({time.monotonic() - t0:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001  (every check runs; each failure is reported)
            failed += 1
            print(f"FAIL  {check.__name__}\n{traceback.format_exc()}", flush=True)
    print(f"{len(CHECKS) + installed - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
