"""The Python client against the real server: a 1,000-step decode loop through the host arenas with
NumPy, bit for bit against the inline path; errors; arena lifetime."""
import os
import subprocess
import tempfile
import time

import numpy as np
import pytest

from reasonalloc import Client, SidecarError

L, HQ, HKV, D, W, B, DELTA = 2, 4, 2, 8, 4, 16, 8
MODEL = dict(name="py-client", num_layers=L, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
             dtype="float16")


@pytest.fixture(scope="module")
def client():
    tmp = tempfile.mkdtemp(prefix="reasonalloc-py-")
    sock = os.path.join(tmp, "s.sock")
    proc = subprocess.Popen([os.environ["REASONALLOC_SERVER_BINARY"], f"--listen=unix://{sock}",
                             "--metrics_address=", "--log_level=warn"])
    c = Client(f"unix://{sock}")
    deadline = time.time() + 20
    while True:
        try:
            c.info()
            break
        except SidecarError:
            assert time.time() < deadline
            time.sleep(0.05)
    yield c
    c.close()
    proc.terminate()
    assert proc.wait(timeout=20) == 0


@pytest.mark.parametrize("scorer,allocator", [("snapkv", "uniform"), ("rkv", "adakv")])
def test_decode_loop_matches_inline_bit_for_bit(client, scorer, allocator):
    rng = np.random.default_rng(11)
    knobs = dict(softmax_all_keys=True)
    with client.session(MODEL, B, scorer, allocator, window=W, buffer=DELTA, **knobs) as shm, \
            client.session(MODEL, B, scorer, allocator, window=W, buffer=DELTA, memory="inline",
                           **knobs) as inline:
        cache_k = [np.zeros((0, D), np.float16) for _ in range(L * HKV)]
        cache_v = [np.zeros((0, D), np.float16) for _ in range(L * HKV)]
        history = []
        events = 0
        for step in range(1000):
            k = rng.standard_normal((L, HKV, D)).astype(np.float16)
            v = rng.standard_normal((L, HKV, D)).astype(np.float16)
            q = rng.standard_normal((L, HQ, D)).astype(np.float16)
            shm.append(step, k, v, q)
            for i in range(L * HKV):
                cache_k[i] = np.vstack([cache_k[i], k.reshape(-1, D)[i]])
                cache_v[i] = np.vstack([cache_v[i], v.reshape(-1, D)[i]])
            history = (history + [q])[-W:]
            if step % DELTA != 2 or step < DELTA:
                continue
            got = shm.compress(step)
            assert got.ByteSize() < 1024 and shm.epoch == got.epoch
            n = max(len(c) for c in cache_k)
            keys = np.zeros((L * HKV, n, D), np.float16)
            values = np.zeros((L * HKV, n, D), np.float16)
            for i in range(L * HKV):
                keys[i, :len(cache_k[i])] = cache_k[i]
                values[i, :len(cache_v[i])] = cache_v[i]
            window = np.stack(history, axis=2)  # [L, Hq, W, d], oldest first
            want = inline.compress_inline(step, window, keys.reshape(L, HKV, n, D),
                                          values.reshape(L, HKV, n, D),
                                          lengths=[len(c) for c in cache_k]).decision
            assert list(shm.budgets) == list(want.budgets)
            assert list(shm.len) == list(want.kept_lengths)
            at = 0
            for i in range(L * HKV):
                kept = list(want.kept_indices[at:at + want.kept_lengths[i]])
                at += want.kept_lengths[i]
                bits = np.unpackbits(shm.keep_mask[i].view(np.uint8), bitorder="little")
                assert list(np.nonzero(bits)[0]) == kept
                cache_k[i], cache_v[i] = cache_k[i][kept], cache_v[i][kept]
                l, h = divmod(i, HKV)
                assert np.array_equal(shm.keys(l, h).view(np.uint16), cache_k[i].view(np.uint16))
                assert np.array_equal(shm.values(l, h).view(np.uint16), cache_v[i].view(np.uint16))
            events += 1
        assert events == 124
        name = shm.info.arenas[0].shm_name
    assert not os.path.exists("/dev/shm/" + name.lstrip("/"))  # closing the session unlinked it


def test_errors_name_the_field(client):
    with client.session(MODEL, B, window=W, buffer=DELTA) as s:
        s.len[0] = B + DELTA + 1
        with pytest.raises(SidecarError) as e:
            s.compress(1)
        assert "\"len\"[0]" in e.value.details
        s.len[0] = 0
        with pytest.raises(ValueError):
            for step in range(B + DELTA + 1):
                s.append(step, np.zeros((L, HKV, D)), np.zeros((L, HKV, D)), np.zeros((L, HQ, D)))
    with pytest.raises(SidecarError) as e:
        client.session(dict(MODEL, num_kv_heads=3), B)
    assert "num_kv_heads" in e.value.details


def _shm_array(name, shape):
    """A worker-owned shared-memory object as a NumPy fp16 array (the worker's own KV buffers)."""
    import mmap
    path = "/dev/shm/" + name.lstrip("/")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = int(np.prod(shape)) * 2
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.float16).reshape(shape), path


def test_advisory_loop_keeps_what_inline_keeps(client):
    """Advisory session over shared memory: the worker's own keys and query window, registered
    once; after each event the keep mask equals the inline advisory decision, and the worker
    compacts its own buffer by it."""
    rng = np.random.default_rng(5)
    rows = HKV * B + DELTA  # adakv may give one head the whole layer's budget
    tag = f"/py-advisory-{os.getpid()}"
    keys, kpath = _shm_array(tag + "-k", (L, HKV, rows, D))
    queries, qpath = _shm_array(tag + "-q", (L, HQ, W, D))
    try:
        with client.session(MODEL, B, "rkv", "adakv", window=W, buffer=DELTA, managed=False,
                            softmax_all_keys=True) as adv, \
                client.session(MODEL, B, "rkv", "adakv", window=W, buffer=DELTA, managed=False,
                               memory="inline", softmax_all_keys=True) as inline:
            assert [a.kind for a in adv.info.arenas] == ["result"]
            adv.register_buffers(tag + "-k", (L, HKV, rows, D), tag + "-q")
            lengths = np.zeros(L * HKV, np.int32)
            history = []
            events = 0
            for step in range(1, 400):
                k = rng.standard_normal((L, HKV, D)).astype(np.float16)
                q = rng.standard_normal((L, HQ, D)).astype(np.float16)
                for i in range(L * HKV):
                    l, h = divmod(i, HKV)
                    keys[l, h, lengths[i]] = k[l, h]
                lengths += 1
                adv.len[:] = lengths
                queries[:, :, step % W] = q
                history = (history + [q])[-W:]
                if step % DELTA != 2 or step < DELTA:
                    continue
                got = adv.compress(step)
                assert got.ByteSize() < 1024
                n = int(lengths.max())
                window = np.stack(history, axis=2)
                want = inline.compress_inline(step, window, keys[:, :, :n].copy(),
                                              lengths=lengths).decision
                at = 0
                for i in range(L * HKV):
                    l, h = divmod(i, HKV)
                    kept = list(want.kept_indices[at:at + want.kept_lengths[i]])
                    at += want.kept_lengths[i]
                    assert list(adv.kept(l, h)) == kept
                    assert adv.len[i] == len(kept) and adv.budgets[i] == want.budgets[i]
                    keys[l, h, :len(kept)] = keys[l, h, kept]  # the worker compacts its own cache
                    lengths[i] = len(kept)
                events += 1
            assert events > 40
    finally:
        del keys, queries
        os.unlink(kpath)
        os.unlink(qpath)
