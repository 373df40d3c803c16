"""Memory allocation failures on the worker path close the bridge they hit
(or refuse the client), never the process, and the other bridges keep
flowing. Needs the FASTPROXY_FAULTS=1 build (setup.py; .ci/sanitize makes
one with the sanitizers), whose _core._fail_allocs makes allocations
without the GIL fail on demand; skipped on other builds."""
import socket
import time

import pytest

from fastproxy import _core
from support.sockets import echo_roundtrip
from support.traffic import StreamLoad, VerifyingServer
from support.waits import wait_for

pytestmark = pytest.mark.skipif(not hasattr(_core, "_fail_allocs"),
                                reason="not a FASTPROXY_FAULTS=1 build")

BUF_SIZE = 65536   # the copy buffer (DataPlane's buf_size)


@pytest.fixture(autouse=True)
def disarmed():
    _core._fail_allocs(0)
    yield
    _core._fail_allocs(0)


def _open(addr, payload=b"live"):
    s = socket.create_connection(addr, timeout=5)
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        assert chunk, "closed"
        got += chunk
    assert got == payload
    return s


def _closed_by_proxy(s, timeout=5.0):
    """True once the proxy ended s (EOF or reset)."""
    s.settimeout(timeout)
    try:
        return s.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_a_new_clients_bridge_block_refuses_that_client(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, workers=1)
    live = _open(p.address)
    try:
        before = _core._failed_allocs()
        _core._fail_allocs(1)   # the next allocation: the bridge's own block
        with socket.create_connection(p.address, timeout=5) as victim:
            victim.sendall(b"x")
            assert _closed_by_proxy(victim), "the client whose bridge could not be made was not closed"
        assert _core._failed_allocs() == before + 1
        _core._fail_allocs(0)
        live.sendall(b"still")
        assert live.recv(5) == b"still"
        assert echo_roundtrip(p.address, b"after") == b"after"
    finally:
        live.close()


def test_a_copy_buffer_that_cannot_be_had_closes_its_bridge(make_proxy, echo_server):
    # The poll engine copies every byte: a flow's first read takes a buffer
    # (a fresh proxy has none pooled). Waiting for memory would stall the
    # bridge for good: nothing wakes a flow when memory comes back.
    p = make_proxy(echo_server.addr, workers=1)
    if p.engine != "poll":
        pytest.skip("the epoll engine splices: its flows take pipes, not buffers")
    before = _core._failed_allocs()
    _core._fail_allocs(2, size=BUF_SIZE)   # the request's buffer, and its answer's
    with socket.create_connection(p.address, timeout=5) as victim:
        victim.sendall(b"x" * 100)
        assert _closed_by_proxy(victim), "a bridge without a buffer was left open"
    assert _core._failed_allocs() > before
    _core._fail_allocs(0)
    assert wait_for(lambda: p.stats()["active"] == 0, 5), p.stats()["active"]
    live = _open(p.address)
    try:
        live.sendall(b"still")
        assert live.recv(5) == b"still"
        assert echo_roundtrip(p.address, b"after") == b"after"
    finally:
        live.close()


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "hooks"])
def test_every_third_allocation_failing_under_load_spares_the_process(make_proxy, hooked):
    # Every path at once: bridges, buffers, pipes' bookkeeping, hook calls
    # and close records, the poll array. Bridges it hits close; nothing is
    # stuck open afterwards, and the proxy serves again once memory is back.
    kw = {}
    if hooked:
        kw = dict(on_data=lambda conn, direction, data: data, on_close=lambda conn, record: None)
    with VerifyingServer() as srv:
        p = make_proxy(srv.addr, workers=2, **kw)
        load = StreamLoad(p.address, n=40, up_len=(0, 128 * 1024), down_len=(0, 128 * 1024),
                          max_pause=0.3, seed=16).start()
        try:
            _core._fail_allocs(10 ** 6, every=3)
            time.sleep(1.5)
        finally:
            _core._fail_allocs(0)
        failed = _core._failed_allocs()
        result = load.wait(timeout=60)
        assert not result.timed_out, "a bridge hit by a failure was left hanging"
        assert failed > 0, "nothing was allocated under the load: the test shows nothing"
        assert wait_for(lambda: p.stats()["active"] == 0, 20), p.stats()["active"]
        # Memory is back: the same proxy moves every byte again.
        again = StreamLoad(p.address, n=10, up_len=(0, 64 * 1024), down_len=(0, 64 * 1024), seed=17).start()
        again.wait(timeout=60).assert_all_ok()
