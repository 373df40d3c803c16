"""Slow and hostile clients: slowloris on the PROXY header (bytes keep
coming, the header never ends), thousands of idle connections, and a
connect storm at the fd limit, each while other clients are served.
(Clients that never read: tests/test_reliability_memory.py.)"""
import selectors
import socket
import time

import pytest

from support.sockets import connect, echo_roundtrip, open_many, recv_exact
from support.traffic import StreamLoad, VerifyingServer
from support.waits import wait_for

HEADER_START = b"PROXY TCP4 192.0.2."


def _v1(i):
    return ("PROXY TCP4 192.0.2.%d 127.0.0.1 %d 2\r\n" % (i % 250 + 1, 1000 + i)).encode()


@pytest.mark.slow
def test_slowloris_on_the_proxy_header_is_cut_at_the_timeout(make_proxy, echo_server):
    """200 clients send the start of a PROXY header, then one byte every
    0.2 s, never its end: each is closed proxy_header_timeout after its
    accept however much keeps coming (the timer is not re-armed by bytes),
    and clients with a whole header are served all the while."""
    n, timeout = 200, 1.0
    p = make_proxy(echo_server.addr, accept_proxy=True, proxy_header_timeout=timeout, workers=2)
    slow = open_many(p.address, n)
    assert len(slow) == n
    t0 = time.monotonic()
    sel = selectors.DefaultSelector()
    for s in slow:
        s.sendall(HEADER_START)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_, served, cut_at = set(slow), 0, []
    try:
        while open_ and time.monotonic() - t0 < 4 * timeout:
            for key, _ in sel.select(0.2):
                s = key.fileobj
                try:
                    data = s.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                assert data == b"", "a slowloris client got %r" % data
                cut_at.append(time.monotonic() - t0)
                sel.unregister(s)
                open_.discard(s)
            for s in list(open_):
                try:
                    s.send(b"1")   # a digit: still a well-formed header so far
                except OSError:
                    pass
            with connect(p.address) as c:   # a real client meanwhile
                c.sendall(_v1(served) + b"fast")
                assert recv_exact(c, 4) == b"fast"
                served += 1
    finally:
        sel.close()
        for s in slow:
            s.close()
    assert not open_, "%d slowloris clients still open after %.1fs" % (len(open_), 4 * timeout)
    assert max(cut_at) < timeout + 1.5, "cut after %.2fs, the timeout is %.1fs" % (max(cut_at), timeout)
    assert served >= 5
    st = wait_for(lambda: p.stats()["proxy_header_errors"] >= n and p.stats(), 3)
    assert st and st["proxy_header_errors"] == n, p.stats()


def test_slowloris_past_proxy_header_max_is_cut_at_once(make_proxy, echo_server):
    """A header that keeps growing is refused once it passes
    proxy_header_max, before the timeout."""
    p = make_proxy(echo_server.addr, accept_proxy=True, proxy_header_timeout=10, proxy_header_max=64)
    with connect(p.address) as c:
        c.sendall(HEADER_START)
        t0 = time.monotonic()
        closed = False
        for _ in range(200):
            try:
                c.sendall(b"1")
                c.settimeout(0.01)
                if c.recv(16) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - t0 < 5
    assert wait_for(lambda: p.stats()["proxy_header_errors"] == 1, 3)


@pytest.mark.slow
@pytest.mark.linux_only
def test_5000_idle_connections_do_not_stop_new_clients(cli_proxy, echo_server):
    """5,000 clients connected through to the upstream that never send or
    close: new clients are still served, each within a second."""
    n = 5000
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--workers", "2")
    addr = proxy.connect_addr()
    idle = []
    try:
        for start in range(0, n, 500):
            idle += open_many(addr, 500, timeout=30)
        assert len(idle) == n
        assert wait_for(lambda: echo_server.open_connections >= n, 60), echo_server.open_connections
        worst = 0.0
        for i in range(50):
            t0 = time.monotonic()
            assert echo_roundtrip(addr, b"new %d" % i) == b"new %d" % i
            worst = max(worst, time.monotonic() - t0)
        assert worst < 1.0, "a new client took %.2fs with %d idle bridges" % (worst, n)
        assert proxy.alive()
    finally:
        for s in idle:
            s.close()


@pytest.mark.slow
@pytest.mark.linux_only
def test_a_connect_storm_at_the_fd_limit_leaves_live_bridges_flowing(cli_proxy):
    """10 bridges stream both ways (random chunks, pauses, half-closes)
    while 300 clients storm a proxy with 64 fds: the storm's clients wait or
    are dropped, every byte of the live bridges arrives."""
    with VerifyingServer() as srv:
        proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", srv.addr, "--workers", "2",
                          rlimit_nofile=64)
        addr = proxy.connect_addr()
        load = StreamLoad(addr, n=10, server=srv, seed=41, max_pause=0.2,
                          up_len=(128 * 1024, 512 * 1024), down_len=(128 * 1024, 512 * 1024)).start()
        # Live: every load bridge reached the server (a client still in the
        # backlog when the storm comes waits behind it, as it should).
        assert wait_for(lambda: srv.active == 10, 10), srv.active
        storm = open_many(addr, 300, timeout=10)
        try:
            for s in storm:
                try:
                    s.send(b"storm")
                except OSError:
                    pass
            result = load.wait(90)
        finally:
            for s in storm:
                s.close()
        # With the server's verdicts on each load bridge's up stream (the
        # storm's clients that got through look bad to it: no header).
        result.assert_all_ok()
        assert all(c.server is not None and c.server.ok for c in result.conns)
        assert proxy.alive(), proxy.stderr.text()
        # The proxy still accepts the storm's backlog as fds come free: end
        # it, then let the server see every connection end, or it would be
        # left holding transports of connections it got while closing.
        proxy.kill()
        assert wait_for(lambda: srv.active == 0, 20), srv.active
