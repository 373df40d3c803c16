"""on_close: once per bridge, with the record's fields, for every CloseReason that can
be provoked; a raising on_close is counted and the proxy keeps serving."""
import socket
import threading
import time

from fastproxy import CLOSE, CloseReason, CloseRecord
from support.hooks import Recorder
from support.servers import Listener
from support.sockets import (closed_by_peer, connect, echo_roundtrip, fmt_addr, how_closed, read_all,
                             recv_exact, recv_until_eof, reserve_refusing_port, set_linger0)
from support.waits import stop_bounded, wait_for, wait_stat


def _bridge(make_proxy, srv, rec, **kw):
    """A proxy to srv with rec as on_close, one bridge carrying 3 bytes up and 2 down.
    Returns (proxy, client, server-side socket, conn ids seen by on_connect)."""
    ids = []
    p = make_proxy(srv.addr, on_close=rec, on_connect=lambda conn: ids.append(conn.id), **kw)
    c = connect(p.address)
    c.sendall(b"abc")
    s = srv.accept()
    assert recv_exact(s, 3) == b"abc"
    s.sendall(b"de")
    assert recv_exact(c, 2) == b"de"
    return p, c, s, ids


def _check_record(r, ids, srv, t0, bytes_up=3, bytes_down=2):
    assert isinstance(r, CloseRecord)
    assert r.id == ids[0]
    assert r.client_address[0] == "127.0.0.1"
    assert r.upstream == srv.addr
    assert r.bytes_upstream == bytes_up and r.bytes_downstream == bytes_down
    assert 0 <= r.duration < time.time() - t0 + 0.5
    assert t0 - 0.5 <= r.accepted_at <= time.time()


def test_client_closed(make_proxy):
    rec = Recorder()
    t0 = time.time()
    with Listener() as srv:
        p, c, s, ids = _bridge(make_proxy, srv, rec)
        time.sleep(0.2)
        c.close()  # the client's FIN comes first
        with s:
            assert recv_until_eof(s) == b""
        r = rec.one()
    assert r.reason == CloseReason.CLIENT_CLOSED
    _check_record(r, ids, srv, t0)
    assert r.duration >= 0.15


def test_upstream_closed(make_proxy):
    rec = Recorder()
    t0 = time.time()
    with Listener() as srv:
        p, c, s, ids = _bridge(make_proxy, srv, rec)
        s.close()  # the server's FIN comes first
        with c:
            assert recv_until_eof(c) == b""
        r = rec.one()
    assert r.reason == CloseReason.UPSTREAM_CLOSED
    _check_record(r, ids, srv, t0)


def test_client_reset(make_proxy):
    rec = Recorder()
    t0 = time.time()
    with Listener() as srv:
        p, c, s, ids = _bridge(make_proxy, srv, rec)
        set_linger0(c)
        c.close()
        with s:
            read_all(s, timeout=3)
        r = rec.one()
    assert r.reason == CloseReason.CLIENT_RESET
    _check_record(r, ids, srv, t0)


def test_upstream_reset(make_proxy):
    rec = Recorder()
    t0 = time.time()
    with Listener() as srv:
        p, c, s, ids = _bridge(make_proxy, srv, rec)
        set_linger0(s)
        s.close()
        with c:
            read_all(c, timeout=3)
        r = rec.one()
    assert r.reason == CloseReason.UPSTREAM_RESET
    _check_record(r, ids, srv, t0)


def test_connect_failed(make_proxy):
    hole = reserve_refusing_port()
    try:
        rec = Recorder()
        p = make_proxy(fmt_addr("127.0.0.1", hole.getsockname()[1]), on_close=rec)
        assert how_closed(p.address) == "reset"
        r = rec.one()
    finally:
        hole.close()
    assert r.reason == CloseReason.CONNECT_FAILED
    assert r.bytes_upstream == 0 and r.bytes_downstream == 0


def test_refused(make_proxy, echo_server):
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=lambda conn: False, on_close=rec)
    with connect(p.address) as c:
        assert closed_by_peer(c, 3) is not None
    r = rec.one()
    assert r.reason == CloseReason.REFUSED and r.upstream is None


def test_timeout_half_close(make_proxy):
    rec = Recorder()
    t0 = time.time()
    with Listener() as srv:
        p, c, s, ids = _bridge(make_proxy, srv, rec, half_close_timeout="500ms")
        with c, s:
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b""
            # The server neither answers nor closes: the proxy ends the bridge.
            assert closed_by_peer(c, 4) is not None
            r = rec.one()
    assert r.reason == CloseReason.TIMEOUT
    _check_record(r, ids, srv, t0)
    assert r.duration >= 0.4


def test_hook_closed(make_proxy):
    rec = Recorder()
    with Listener() as srv:
        p = make_proxy(srv.addr, on_close=rec,
                       on_data=lambda conn, d, data: CLOSE if data == b"bye" else None)
        with connect(p.address) as c:
            c.sendall(b"abc")
            with srv.accept() as s:
                assert recv_exact(s, 3) == b"abc"
                c.sendall(b"bye")
                assert closed_by_peer(c, 3) is not None
        r = rec.one()
    assert r.reason == CloseReason.HOOK_CLOSED
    assert r.upstream == srv.addr and r.bytes_upstream == 3


def test_hook_error(make_proxy, echo_server):
    def on_data(conn, d, data):
        raise KeyError("nope")

    rec = Recorder()
    p = make_proxy(echo_server.addr, on_close=rec, on_data=on_data)
    with connect(p.address) as c:
        c.sendall(b"abc")
        assert closed_by_peer(c, 3) is not None
    r = rec.one()
    assert r.reason == CloseReason.HOOK_ERROR
    assert wait_stat(p, "hook_errors", 1)["hook_errors"] == 1


def test_shutdown_reason_on_stop_with_live_bridge(make_proxy):
    rec = Recorder()
    t0 = time.time()
    with Listener() as srv:
        p, c, s, ids = _bridge(make_proxy, srv, rec)
        with c, s:
            took = stop_bounded(p, timeout=0, limit=10)
            assert took < 3
            assert closed_by_peer(c, 3) is not None
            # The record of a bridge closed by stop() is still delivered.
            r = rec.one()
    assert r.reason == CloseReason.SHUTDOWN
    _check_record(r, ids, srv, t0)


def test_on_close_once_per_bridge_many(make_proxy, echo_server):
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_close=rec, workers=2)
    n = 40
    errors = []

    def client(i):
        try:
            msg = b"m%03d" % i
            assert echo_roundtrip(p.address, msg) == msg
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors, errors[:3]
    recs = rec.wait(n)
    time.sleep(0.1)
    recs = rec.records
    assert len(recs) == n
    assert len({r.id for r in recs}) == n
    for r in recs:
        assert r.bytes_upstream == 4 and r.bytes_downstream == 4
        assert r.reason in (CloseReason.CLIENT_CLOSED, CloseReason.UPSTREAM_CLOSED)
    assert p.stats()["dropped_records"] == 0


def test_on_close_raises_counted_and_keeps_serving(make_proxy, echo_server):
    calls = []

    def on_close(conn, record):
        calls.append(record.id)
        raise RuntimeError("boom in on_close")

    p = make_proxy(echo_server.addr, on_close=on_close)
    for i in range(3):
        assert echo_roundtrip(p.address, b"r%d" % i) == b"r%d" % i
    assert wait_for(lambda: len(calls) == 3, 3), calls
    assert wait_stat(p, "hook_errors", 3)["hook_errors"] == 3


def test_record_upstream_is_none_when_refused_by_hook_error(make_proxy, echo_server):
    def on_connect(conn):
        raise OSError("auth service down")

    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=on_connect, on_close=rec)
    with connect(p.address) as c:
        assert closed_by_peer(c, 3) is not None
    r = rec.one()
    assert r.reason == CloseReason.HOOK_ERROR and r.upstream is None
    assert r.bytes_upstream == 0 and r.bytes_downstream == 0
