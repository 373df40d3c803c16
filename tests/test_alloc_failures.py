"""Memory allocation failures on the worker path close the bridge they hit
(or refuse the client), never the process, and the other bridges keep
flowing. Needs the FASTPROXY_FAULTS=1 build (setup.py; .ci/sanitize makes
one with the sanitizers), whose _core._fail_allocs makes allocations
without the GIL fail on demand; skipped on other builds."""
import socket
import time

import pytest

from fastproxy import _core
from support.sockets import connect, echo_roundtrip, recv_exact
from support.traffic import StreamLoad, VerifyingServer
from support.waits import stop_bounded, wait_for

pytestmark = pytest.mark.skipif(not hasattr(_core, "_fail_allocs"),
                                reason="not a FASTPROXY_FAULTS=1 build")

BUF_SIZE = 65536   # the copy buffer (DataPlane's buf_size)


@pytest.fixture(autouse=True)
def disarmed():
    _core._fail_allocs(0)
    yield
    _core._fail_allocs(0)


def _open(addr, payload=b"live"):
    """A bridge that has echoed `payload` once."""
    s = connect(addr)
    s.sendall(payload)
    assert recv_exact(s, len(payload)) == payload
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
        assert p.stats()["no_memory"] > 0, p.stats()
        assert wait_for(lambda: p.stats()["active"] == 0, 20), p.stats()["active"]
        # Memory is back: the same proxy moves every byte again.
        again = StreamLoad(p.address, n=10, up_len=(0, 64 * 1024), down_len=(0, 64 * 1024), seed=17).start()
        again.wait(timeout=60).assert_all_ok()


# ---- each remaining path of the worker: the bridge that misses memory ends
# (or its client is refused), counted in no_memory; the others flow on.

SIZES = _core._fault_sizes() if hasattr(_core, "_fault_sizes") else {}


def _no_memory(p, name=None):
    st = p.stats()
    return st["listeners"][name]["no_memory"] if name else st["no_memory"]


def _still_flows(s, payload=b"still"):
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        assert chunk, "a bridge the failure did not hit was closed"
        got += chunk
    assert got == payload


@pytest.fixture
def two_listeners(engine, echo_server):
    """A proxy of one worker and two listeners: "a" (under test) and "b"
    (no toxics: its bridge allocates nothing the test aims at)."""
    from fastproxy import Config, Proxy

    made = []

    def make(**a_options):
        cfgs = [Config.build(name=n, listen="127.0.0.1:0", upstreams=[echo_server.addr], engine=engine,
                             workers=1, **(a_options if n == "a" else {})) for n in ("a", "b")]
        p = Proxy.from_config(cfgs).start()
        made.append(p)
        return p

    yield make
    for p in made:
        stop_bounded(p, timeout=2.0, limit=20.0)


@pytest.mark.parametrize("what", ["toxic_state", "toxic_pick", "latency_ring", "toxic_heap"])
def test_a_toxics_state_that_cannot_be_had_ends_its_bridge(two_listeners, what):
    # Flowing on without it would let the bridge escape the listener's
    # toxics (or, without its heap entry, wait for a wake-up never coming).
    from fastproxy import toxic

    p = two_listeners()
    p.add_toxic(toxic("latency", "downstream", latency=5), listener="a")
    live = _open(p.addresses["b"])
    try:
        before = _core._failed_allocs()
        _core._fail_allocs(1, size=SIZES[what])
        with socket.create_connection(p.addresses["a"], timeout=5) as victim:
            victim.sendall(b"x" * 100)
            assert _closed_by_proxy(victim), f"a bridge without its {what} was left open"
        assert _core._failed_allocs() == before + 1
        _core._fail_allocs(0)
        assert wait_for(lambda: _no_memory(p, "a") == 1, 5), p.stats()["listeners"]["a"]
        assert _no_memory(p) == 1 and _no_memory(p, "b") == 0
        _still_flows(live)
        with _open(p.addresses["a"]) as again:
            assert [b["toxics"] for b in p.bridges() if b["listener"] == "a"] == [["latency_downstream"]]
            _still_flows(again)
    finally:
        live.close()


def test_a_toxic_added_to_a_bridge_short_of_memory_ends_it(two_listeners):
    # The sync that moves live bridges to a new set: the one that cannot
    # have it ends, rather than keep the old set until the next change.
    from fastproxy import toxic

    p = two_listeners()
    live = _open(p.addresses["b"])
    victim = _open(p.addresses["a"])
    try:
        _core._fail_allocs(1, size=SIZES["toxic_state"])
        p.add_toxic(toxic("latency", "downstream", latency=5), listener="a")
        assert _closed_by_proxy(victim), "a bridge that could not take the new toxic was left open"
        _core._fail_allocs(0)
        assert _no_memory(p, "a") == 1
        _still_flows(live)
    finally:
        live.close()
        victim.close()


def test_a_proxy_header_block_that_cannot_be_had_refuses_that_client(make_proxy, echo_server):
    # A header that comes in pieces is kept in a block of its own.
    p = make_proxy(echo_server.addr, workers=1, accept_proxy=True, proxy_header_max=1024)
    live = _open_proxied(p.address)
    try:
        _core._fail_allocs(1, size=16 + 1024)
        with socket.create_connection(p.address, timeout=5) as victim:
            victim.sendall(b"PROXY TCP4 10.0.0.1 ")
            assert _closed_by_proxy(victim), "a client whose header could not be kept was left open"
        _core._fail_allocs(0)
        assert wait_for(lambda: _no_memory(p) == 1, 5), p.stats()
        _still_flows(live)
        with _open_proxied(p.address) as again:
            _still_flows(again)
    finally:
        live.close()


def _open_proxied(addr):
    s = socket.create_connection(addr, timeout=5)
    s.sendall(b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\nlive")
    assert s.recv(4) == b"live"
    return s


def test_a_client_hello_block_that_cannot_be_had_refuses_that_client(make_proxy, echo_server):
    # route = sni keeps the server name (and ALPN) for the hooks and logs.
    from support.tls import client_hello

    name = "a-name-of-thirty-seven-chars.example"   # the block: 2 + its length
    p = make_proxy(upstreams=[echo_server.addr], workers=1, route="sni",
                   routes=[{"server_names": [name], "upstreams": [echo_server.addr]}])
    hello = client_hello(name)
    live = _open(p.address, hello)
    try:
        _core._fail_allocs(1, size=2 + len(name))
        with socket.create_connection(p.address, timeout=5) as victim:
            victim.sendall(hello)
            assert _closed_by_proxy(victim), "a client whose hello could not be kept was left open"
        _core._fail_allocs(0)
        assert wait_for(lambda: _no_memory(p) == 1, 5), p.stats()
        _still_flows(live)
        with _open(p.address, hello) as again:
            _still_flows(again)
    finally:
        live.close()


def test_a_client_let_out_of_the_wait_queue_short_of_memory_is_served_or_closed(make_proxy, echo_server):
    # It waited with its bridge block; once a slot frees, what it needs to
    # flow comes from the pool the closed bridge filled, or cannot be had:
    # then it is closed (counted), never left hanging.
    p = make_proxy(echo_server.addr, workers=1, max_connections=1, on_limit="queue", queue_timeout=30)
    holder = _open(p.address)
    victim = socket.create_connection(p.address, timeout=5)
    try:
        assert wait_for(lambda: p.stats()["queued"] == 1, 5), p.stats()
        victim.sendall(b"x" * 100)
        before = _core._failed_allocs()
        _core._fail_allocs(10 ** 6)
        holder.close()
        got, ended = b"", False
        victim.settimeout(5)
        try:
            while len(got) < 100:
                chunk = victim.recv(65536)
                if not chunk:
                    ended = True
                    break
                got += chunk
        except ConnectionResetError:
            ended = True
        except socket.timeout:
            pytest.fail(f"a client let out of the queue without memory was left hanging (got {len(got)} bytes)")
        failed = _core._failed_allocs() - before
        _core._fail_allocs(0)
        if ended:
            assert wait_for(lambda: _no_memory(p) >= 1, 5), p.stats()
        else:
            assert got == b"x" * 100
            _still_flows(victim)
            assert _no_memory(p) == 0, (failed, p.stats())
        assert echo_roundtrip(p.address, b"after") == b"after" if ended else True
    finally:
        victim.close()


def test_a_splicing_bridge_flows_on_with_every_allocation_failing(make_proxy, echo_server):
    # Pipes come from the worker's pool (fds, no memory): a bulk flow that
    # turned to splice needs no allocation to go on.
    p = make_proxy(echo_server.addr, workers=1)
    if p.engine != "epoll":
        pytest.skip("the poll engine copies: its flows take buffers")
    bulk = b"z" * (1 << 20)
    with _open(p.address, bulk) as s:
        before = _core._failed_allocs()
        _core._fail_allocs(10 ** 6)
        try:
            _still_flows(s, bulk)
            _still_flows(s, bulk)
        finally:
            _core._fail_allocs(0)
        assert p.stats()["no_memory"] == 0
    assert _core._failed_allocs() >= before


def test_bridges_snapshot_with_every_worker_allocation_failing(make_proxy, echo_server):
    # The snapshot's buffer is the control plane's (taken with the GIL) and
    # the workers copy into it without allocating: it lists every bridge.
    p = make_proxy(echo_server.addr, workers=2)
    socks = [_open(p.address) for _ in range(5)]
    try:
        _core._fail_allocs(10 ** 6)
        try:
            seen = p.bridges()
        finally:
            _core._fail_allocs(0)
        assert len(seen) == 5
        for s in socks:
            _still_flows(s)
    finally:
        for s in socks:
            s.close()
