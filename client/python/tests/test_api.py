"""The client API against a real server, from this source tree: the checks of api_checks.py (the
same ones test_installed_wheel.py runs against the installed wheel), and the keep-alive thread's
lifetime."""
import gc
import threading
import time

import pytest

import api_checks
from reasonalloc import Client


@pytest.mark.parametrize("check", api_checks.CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_api(sidecar, check):
    check(sidecar)


def keeper_threads():
    return [t for t in threading.enumerate() if t.name == "reasonalloc-keep-alive"]


def test_keep_alive_thread_ends_with_its_sessions(sidecar):
    with Client(sidecar) as client:
        a = client.session(api_checks.model("keeper"), 16, window=4, buffer=8, lease_seconds=3)
        b = client.session(api_checks.model("keeper"), 16, window=4, buffer=8, lease_seconds=3)
        assert len(keeper_threads()) == 1  # one thread per client, for all its sessions
        a.close()
        assert len(keeper_threads()) == 1
        del b  # dropped without close: no longer renewed, the thread ends
        gc.collect()
        deadline = time.time() + 5
        while keeper_threads() and time.time() < deadline:
            time.sleep(0.1)
        assert keeper_threads() == []
        c = client.session(api_checks.model("keeper"), 16, window=4, buffer=8, lease_seconds=3)
        assert len(keeper_threads()) == 1
    assert keeper_threads() == []  # Client.close() stopped it
    assert c.keep_alive_error is None
