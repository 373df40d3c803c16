"""Durations: every accepted spelling means what it says, huge values included
(a value that overflows an internal clock must not make a timeout fire at once)."""
import socket
import threading
import time

import pytest

from fastproxy import ConfigError
from support.servers import Listener
from support.sockets import (blackhole_listener, closed_by_peer, connect, fmt_addr, recv_exact,
                             recv_until_eof)

HUGE = ["3000000h", 1e10]  # ~342 and ~317 years: past 2**63 nanoseconds


def _make_or_reject(make_proxy, upstream, **kw):
    """A huge duration may be refused up front (ConfigError); if accepted it must work."""
    try:
        return make_proxy(upstream, **kw)
    except ConfigError:
        pytest.skip("rejected up front with ConfigError: fine")


@pytest.mark.parametrize("value", HUGE)
def test_huge_connect_timeout_does_not_fire_at_once(make_proxy, value):
    lst, fillers = blackhole_listener()
    try:
        p = _make_or_reject(make_proxy, fmt_addr(*lst.getsockname()), connect_timeout=value)
        with connect(p.address) as c:
            assert closed_by_peer(c, 1.0) is None, \
                "connect_timeout=%r closed the client at once" % (value,)
        assert p.stats()["connect_failures"] == 0
    finally:
        for s in fillers:
            s.close()
        lst.close()


@pytest.mark.parametrize("value", HUGE)
def test_huge_half_close_timeout_does_not_fire_at_once(make_proxy, value):
    with Listener() as srv:
        p = _make_or_reject(make_proxy, srv.addr, half_close_timeout=value)
        with connect(p.address) as c, srv.accept() as s:
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b""
            assert closed_by_peer(c, 1.0) is None, \
                "half_close_timeout=%r ended the bridge at the first EOF" % (value,)
            s.sendall(b"late reply")
            assert recv_exact(c, 10) == b"late reply"


@pytest.mark.parametrize("value", HUGE)
def test_huge_drain_timeout_does_not_fire_at_once(make_proxy, value):
    with Listener() as srv:
        p = _make_or_reject(make_proxy, srv.addr, drain_timeout=value)
        c = connect(p.address)
        c.sendall(b"x")
        s = srv.accept()
        assert recv_exact(s, 1) == b"x"
        t = threading.Thread(target=p.stop, daemon=True)
        t.start()
        time.sleep(1.0)
        try:
            assert t.is_alive(), "drain_timeout=%r: stop() did not drain the live bridge" % (value,)
            c.sendall(b"still")
            assert recv_exact(s, 5) == b"still"
        finally:
            c.close()
            s.close()
        t.join(10)
        assert not t.is_alive()
