"""Hook API surface: exports, registration (constructor, decorator, too late), the
Connection object, ids shared by the hooks of one bridge, new stats keys."""
import hashlib
import os
import socket
import threading
import time

import pytest

import fastproxy
from fastproxy import CLOSE, WAIT, CloseReason, CloseRecord, Connection, Direction
from support.hooks import Recorder
from support.sockets import MiB, connect, echo_roundtrip, recv_exact, recv_until_eof
from support.waits import wait_for

REASONS = ("CLIENT_CLOSED", "UPSTREAM_CLOSED", "CLIENT_RESET", "UPSTREAM_RESET",
           "CONNECT_FAILED", "REFUSED", "TIMEOUT", "HOOK_CLOSED", "HOOK_ERROR", "SHUTDOWN")


def test_exports():
    for name in ("Proxy", "Connection", "Direction", "CloseReason", "CloseRecord", "WAIT", "CLOSE"):
        assert hasattr(fastproxy, name), name
    assert {"UPSTREAM", "DOWNSTREAM"} <= set(Direction.__members__)
    assert Direction.UPSTREAM != Direction.DOWNSTREAM
    assert set(REASONS) <= set(CloseReason.__members__)
    assert len({getattr(CloseReason, r) for r in REASONS}) == len(REASONS)
    assert WAIT is not CLOSE and WAIT != CLOSE
    for sentinel in (WAIT, CLOSE):
        assert sentinel is not None and not isinstance(sentinel, (bytes, bool, str))


def test_stats_have_hook_keys(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    st = p.stats()
    assert st["hook_errors"] == 0 and st["dropped_records"] == 0, st


def test_register_methods_return_fn_and_work_as_decorators(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, start=False)

    def c(conn):
        return None

    assert p.on_connect(c) is c

    @p.on_data
    def d(conn, direction, data):
        return None

    @p.on_close
    def e(conn, record):
        pass

    assert callable(d) and callable(e)
    assert p.on_data(d, direction=Direction.UPSTREAM) is d
    p.start()
    assert echo_roundtrip(p.address, b"abc") == b"abc"


def test_register_after_start_raises(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with pytest.raises(RuntimeError):
        p.on_connect(lambda conn: None)
    with pytest.raises(RuntimeError):
        p.on_data(lambda conn, d, data: None)
    with pytest.raises(RuntimeError):
        p.on_data(lambda conn, d, data: None, direction=Direction.DOWNSTREAM)
    with pytest.raises(RuntimeError):
        p.on_close(lambda conn, rec: None)
    assert echo_roundtrip(p.address, b"still fine") == b"still fine"


def test_constructor_hooks(make_proxy, echo_server):
    seen = []
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=lambda conn: seen.append("c"),
                   on_data=lambda conn, d, data: data.upper(), on_close=rec,
                   hook_threads=4, max_hold=65536, access_log=None)
    assert echo_roundtrip(p.address, b"abc") == b"ABC"
    rec.wait(1)
    assert seen == ["c"]


def test_connection_attributes_and_shared_id(make_proxy, echo_server):
    got = {"connect": [], "data": [], "close": []}
    lock = threading.Lock()

    def on_connect(conn):
        with lock:
            got["connect"].append(conn)

    def on_data(conn, direction, data):
        assert isinstance(data, bytes)
        with lock:
            got["data"].append((conn, direction))

    rec = Recorder()
    p = make_proxy(echo_server.addr, start=False)
    p.on_connect(on_connect)
    p.on_data(on_data)
    p.on_close(rec)
    p.start()
    clients = []
    for i in range(3):
        t0 = time.time()
        with connect(p.address) as c:
            local = c.getsockname()
            c.sendall(b"x%d" % i)
            assert recv_exact(c, 2) == b"x%d" % i
            c.shutdown(socket.SHUT_WR)
            assert recv_until_eof(c) == b""
        clients.append((local, t0, time.time()))
        rec.wait(i + 1)
    conns = got["connect"]
    assert len(conns) == 3
    assert len({c.id for c in conns}) == 3, "ids not unique per bridge"
    for conn, (local, t0, t1) in zip(conns, clients):
        assert isinstance(conn, Connection)
        assert isinstance(conn.id, int)
        assert conn.client_address == local and isinstance(conn.client_address, tuple)
        assert tuple(conn.listener_address) == tuple(p.address)
        assert t0 - 0.5 <= conn.accepted_at <= t1 + 0.5
    # Each bridge's on_data calls (both directions) and on_close carry the same id.
    ids = [c.id for c in conns]
    for conn, direction in got["data"]:
        assert conn.id in ids
        assert direction in (Direction.UPSTREAM, Direction.DOWNSTREAM)
    assert {c.id for c, d in got["data"] if d == Direction.UPSTREAM} == set(ids)
    assert {c.id for c, d in got["data"] if d == Direction.DOWNSTREAM} == set(ids)
    by_id = {conn.id: (conn, r) for conn, r in rec.calls}
    assert set(by_id) == set(ids)
    for conn in conns:
        cconn, r = by_id[conn.id]
        assert isinstance(r, CloseRecord)
        assert r.id == conn.id == cconn.id
        assert cconn.client_address == conn.client_address
        assert r.client_address == conn.client_address
        assert r.accepted_at == pytest.approx(conn.accepted_at, abs=1e-3)


def test_connection_is_read_only_and_safe_to_keep(make_proxy, echo_server):
    kept = []
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=kept.append, on_close=rec)
    assert echo_roundtrip(p.address, b"keep") == b"keep"
    rec.wait(1)
    conn = kept[0]
    for attr, value in (("id", 12345), ("client_address", ("1.2.3.4", 5)),
                        ("listener_address", ("1.2.3.4", 5)), ("accepted_at", 0.0)):
        with pytest.raises((AttributeError, TypeError)):
            setattr(conn, attr, value)
    p.stop()
    # Objects kept after the calls returned (and after the proxy stopped) still read fine.
    record = rec.records[0]
    assert conn.id == record.id
    assert conn.client_address[0] == "127.0.0.1"
    assert record.bytes_upstream == 4 and record.bytes_downstream == 4
    assert record.reason in (CloseReason.CLIENT_CLOSED, CloseReason.UPSTREAM_CLOSED)
    repr(conn), repr(record)


def test_identity_on_data_chunks_bounded_and_data_intact(make_proxy, echo_server):
    sizes = {Direction.UPSTREAM: [], Direction.DOWNSTREAM: []}
    lock = threading.Lock()

    def on_data(conn, direction, data):
        with lock:
            sizes[direction].append(len(data))
        return None

    p = make_proxy(echo_server.addr, on_data=on_data)
    payload = os.urandom(4 * MiB)
    with connect(p.address, timeout=20) as c:
        t = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)),
                             daemon=True)
        t.start()
        got = recv_until_eof(c)
        t.join(10)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    for d in sizes:
        assert sum(sizes[d]) == len(payload), d
        assert max(sizes[d]) <= 64 * 1024, "chunk of %d bytes > 64 KiB" % max(sizes[d])
        assert min(sizes[d]) > 0, "on_data called with an empty chunk"


def test_hooks_not_called_without_registration_and_splice_path_still_works(make_proxy, echo_server):
    """on_connect only: data still flows intact (no on_data on this listener)."""
    n = []
    p = make_proxy(echo_server.addr, on_connect=lambda conn: n.append(conn.id))
    payload = os.urandom(2 * MiB)
    assert echo_roundtrip(p.address, payload, timeout=20) == payload
    assert len(n) == 1
    assert wait_for(lambda: p.stats()["active"] == 0, 3)
    assert p.stats()["hook_errors"] == 0
