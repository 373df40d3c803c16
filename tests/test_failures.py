"""Resets, refused upstreams and connect timeouts."""
import socket
import time

import pytest

from support.servers import Listener
from support.sockets import (blackhole_listener, closed_by_peer, connect, fmt_addr, how_closed, recv_exact,
                             reserve_refusing_port, set_linger0)
from support.waits import wait_for


def _expect_reset(sock, timeout=5.0):
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return
        except socket.timeout:
            break
        if not data:
            pytest.fail("peer got a clean EOF (FIN), expected a reset (ECONNRESET)")
    pytest.fail("no reset within %.0f s" % timeout)


def test_upstream_reset_resets_client(make_proxy):
    with Listener() as srv:
        p = make_proxy(srv.addr)
        with connect(p.address) as c:
            c.sendall(b"x")
            s = srv.accept()
            assert recv_exact(s, 1) == b"x"
            set_linger0(s)
            s.close()  # RST
            _expect_reset(c)
    assert wait_for(lambda: p.stats()["active"] == 0, 5)


def test_client_reset_resets_upstream(make_proxy):
    with Listener() as srv:
        p = make_proxy(srv.addr)
        c = connect(p.address)
        c.sendall(b"x")
        with srv.accept() as s:
            assert recv_exact(s, 1) == b"x"
            set_linger0(c)
            c.close()  # RST
            _expect_reset(s)
    assert wait_for(lambda: p.stats()["active"] == 0, 5)


def test_upstream_refused(make_proxy):
    hole = reserve_refusing_port()
    try:
        up = fmt_addr("127.0.0.1", hole.getsockname()[1])
        p = make_proxy(up)
        for i in range(3):
            t0 = time.monotonic()
            # RST on both engines (docs/architecture.md, "Connecting").
            assert how_closed(p.address) == "reset", "client not reset after upstream refused"
            assert time.monotonic() - t0 < 1.5, "client not closed promptly"
        # The count and the gauge are updated before the close: no waiting.
        st = p.stats()
        assert st["connect_failures"] == 3 and st["active"] == 0, st
        assert st["accepted"] == 3
        assert st["upstreams"][up]["connect_failures"] == 3
    finally:
        hole.close()


def test_connect_timeout(make_proxy):
    lst, fillers = blackhole_listener()
    try:
        up = fmt_addr(*lst.getsockname())
        # "500ms" also checks duration parsing: read as 500 s the test fails.
        p = make_proxy(up, connect_timeout="500ms")
        with connect(p.address) as c:
            c.sendall(b"hello?")
            t0 = time.monotonic()
            how = closed_by_peer(c, timeout=5)
            took = time.monotonic() - t0
        assert how is not None, "client still open 5 s after a 0.5 s connect timeout"
        assert 0.3 <= took <= 2.5, "closed after %.2f s, expected ~0.5 s" % took
        assert wait_for(lambda: p.stats()["connect_failures"] == 1, 3), p.stats()
        st = p.stats()
        assert st["upstreams"][up]["connect_failures"] == 1
        assert wait_for(lambda: p.stats()["active"] == 0, 3)
    finally:
        for s in fillers:
            s.close()
        lst.close()


def test_client_gone_while_connecting(make_proxy):
    """The client leaves while the upstream connect is still pending: nothing is left."""
    lst, fillers = blackhole_listener()
    try:
        p = make_proxy(fmt_addr(*lst.getsockname()), connect_timeout="1s")
        for _ in range(5):
            connect(p.address).close()
        assert wait_for(lambda: p.stats()["accepted"] == 5, 3), p.stats()
        assert wait_for(lambda: p.stats()["active"] == 0, 5), p.stats()
    finally:
        for s in fillers:
            s.close()
        lst.close()


def test_refused_then_recovered(make_proxy):
    """The same upstream refuses, then comes up: later clients are served."""
    hole = reserve_refusing_port()
    port = hole.getsockname()[1]
    p = make_proxy(fmt_addr("127.0.0.1", port))
    assert how_closed(p.address) == "reset"
    hole.listen(8)  # the upstream comes up on the same port
    hole.settimeout(5)
    try:
        with connect(p.address) as c:
            c.sendall(b"now?")
            s, _ = hole.accept()
            with s:
                assert recv_exact(s, 4) == b"now?"
                s.sendall(b"yes")
                assert recv_exact(c, 3) == b"yes"
    finally:
        hole.close()
    assert p.stats()["connect_failures"] == 1
