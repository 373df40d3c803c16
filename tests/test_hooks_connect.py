"""on_connect: proceed, refuse, route by client address (configured and direct
upstreams), exceptions."""
import logging
import time

from fastproxy import CloseReason
from support.hooks import Recorder
from support.servers import TagServer, tag_of
from support.sockets import (closed_by_peer, connect, connect_from, echo_roundtrip, fmt_addr, how_closed,
                             read_all, reserve_refusing_port)
from support.waits import wait_for, wait_stat


def test_none_and_true_proceed(make_proxy, echo_server):
    answers = iter([None, True])
    upstream_accepts_at_hook = []

    def on_connect(conn):
        upstream_accepts_at_hook.append(echo_server.accepted)
        return next(answers)

    p = make_proxy(echo_server.addr, on_connect=on_connect)
    assert echo_roundtrip(p.address, b"one") == b"one"
    assert echo_roundtrip(p.address, b"two") == b"two"
    # Called before the upstream connect.
    assert upstream_accepts_at_hook == [0, 1]


def test_false_refuses(make_proxy, echo_server):
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=lambda conn: conn.client_address[0] != "127.0.0.2",
                   on_close=rec)
    with connect_from(p.address, "127.0.0.2") as c:
        t0 = time.monotonic()
        c.sendall(b"let me in")
        data, how = read_all(c, timeout=3)
        assert how is not None, "refused client not closed"
        assert time.monotonic() - t0 < 1.5
        assert data == b""
    r = rec.one()
    assert r.reason == CloseReason.REFUSED
    assert r.upstream is None
    assert r.bytes_upstream == 0 and r.bytes_downstream == 0
    assert r.client_address[0] == "127.0.0.2"
    time.sleep(0.1)
    assert echo_server.accepted == 0, "refused client reached the upstream"
    # Others are served.
    with connect_from(p.address, "127.0.0.3") as c:
        c.sendall(b"ok")
        assert c.recv(2) == b"ok"
    assert p.stats()["hook_errors"] == 0


def test_route_by_client_address_to_configured_upstreams(make_proxy):
    with TagServer("A") as a, TagServer("B") as b:
        routes = {"127.0.0.2": a.addr, "127.0.0.3": b.addr}
        rec = Recorder()
        p = make_proxy(upstreams=[a.addr, b.addr], start=False)

        @p.on_connect
        def route(conn):
            return routes.get(conn.client_address[0])

        p.on_close(rec)
        p.start()
        for _ in range(3):
            assert tag_of(p.address, "127.0.0.2") == b"A"
            assert tag_of(p.address, "127.0.0.3") == b"B"
        assert a.accepted == 3 and b.accepted == 3
        recs = rec.wait(6)
        for r in recs:
            assert r.upstream == routes[r.client_address[0]], r
        st = p.stats()
        assert st["upstreams"][a.addr]["accepted"] == 3, st
        assert st["upstreams"][b.addr]["accepted"] == 3, st


def test_route_to_unconfigured_address_connects_directly(make_proxy):
    with TagServer("default") as d, TagServer("direct") as x:
        rec = Recorder()
        p = make_proxy(d.addr, start=False)
        p.on_connect(lambda conn: x.addr if conn.client_address[0] == "127.0.0.2" else None)
        p.on_close(rec)
        p.start()
        assert tag_of(p.address, "127.0.0.2") == b"direct"
        assert tag_of(p.address, "127.0.0.1") == b"default"
        assert x.peers and x.peers[0][0] == "127.0.0.1"
        ups = sorted(r.upstream for r in rec.wait(2))
        assert ups == sorted([x.addr, d.addr])


def test_route_to_refusing_address_is_connect_failed(make_proxy, echo_server):
    hole = reserve_refusing_port()
    try:
        dead = fmt_addr("127.0.0.1", hole.getsockname()[1])
        rec = Recorder()
        p = make_proxy(echo_server.addr, on_connect=lambda conn: dead, on_close=rec)
        assert how_closed(p.address) == "reset"
        r = rec.one()
        assert r.reason == CloseReason.CONNECT_FAILED
        assert r.upstream in (None, dead)
        assert r.bytes_upstream == 0 and r.bytes_downstream == 0
    finally:
        hole.close()


def test_on_connect_raises_refuses_counts_and_keeps_serving(make_proxy, echo_server):
    calls = []

    def on_connect(conn):
        calls.append(conn.id)
        if len(calls) == 1:
            raise ValueError("boom in on_connect")

    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=on_connect, on_close=rec)
    with connect(p.address) as c:
        data, how = read_all(c, timeout=3)
        assert how is not None and data == b""
    r = rec.wait(1)[0]
    assert r.reason == CloseReason.HOOK_ERROR
    assert r.upstream is None
    assert wait_stat(p, "hook_errors", 1)["hook_errors"] == 1
    assert echo_server.accepted == 0
    assert echo_roundtrip(p.address, b"next") == b"next"
    assert p.stats()["hook_errors"] == 1


def test_hook_traceback_logged_but_rate_limited(make_proxy, echo_server, caplog):
    def on_connect(conn):
        raise RuntimeError("always failing on_connect")

    caplog.set_level(logging.DEBUG)
    p = make_proxy(echo_server.addr, on_connect=on_connect)
    n = 10
    for _ in range(n):
        with connect(p.address) as c:
            assert closed_by_peer(c, 3) is not None
    assert wait_stat(p, "hook_errors", n)["hook_errors"] == n
    assert wait_for(lambda: any(r.exc_info for r in caplog.records), 2), \
        "no traceback logged for a failing hook"
    logged = [r for r in caplog.records if r.exc_info and "always failing" in str(r.exc_info[1])]
    assert 1 <= len(logged) <= 3, "%d tracebacks logged for %d errors in ~1 s" % (len(logged), n)
