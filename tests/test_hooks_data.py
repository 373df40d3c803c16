"""on_data: forward, rewrite (length changes) both ways, drop, WAIT (greeting in
pieces), CLOSE, exceptions, direction-specific registration, the held-data bound,
backpressure on the copy path."""
import hashlib
import os
import select
import socket
import threading
import time

import pytest

from fastproxy import CLOSE, WAIT, CloseReason, Direction
from support.hooks import Recorder
from support.servers import Listener
from support.sockets import MiB, connect, echo_roundtrip, read_all, recv_exact, recv_until_eof
from support.waits import wait_for, wait_stat

GREETING = b"HELLO fastproxy/1\r\n"


def _greeting_filter(calls):
    passed = set()

    def on_data(conn, direction, data):
        if direction != Direction.UPSTREAM or conn.id in passed:
            return None
        calls.append(bytes(data))
        if len(data) < len(GREETING) and GREETING.startswith(data):
            return WAIT  # not enough yet: hold it, call again with the next piece joined
        if data.startswith(GREETING):
            passed.add(conn.id)
            return None
        return CLOSE

    return on_data


def _send_in_pieces(sock, data, size=3, pause=0.03):
    for i in range(0, len(data), size):
        sock.sendall(data[i:i + size])
        time.sleep(pause)


def test_greeting_in_pieces_accepted_with_wait(make_proxy):
    calls = []
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=_greeting_filter(calls))
        with connect(p.address) as c:
            _send_in_pieces(c, GREETING + b"payload")
            with srv.accept() as s:
                assert recv_exact(s, len(GREETING) + 7) == GREETING + b"payload"
                s.sendall(b"welcome")
                assert recv_exact(c, 7) == b"welcome"
    # WAIT made the hook see the greeting grow: several calls, each a prefix of the next.
    assert len(calls) >= 3, calls
    for a, b in zip(calls, calls[1:]):
        assert b.startswith(a), (a, b)
    assert calls[-1].startswith(GREETING)


def test_wrong_greeting_in_pieces_closed_nothing_forwarded(make_proxy):
    calls = []
    rec = Recorder()
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=_greeting_filter(calls), on_close=rec)
        with connect(p.address) as c:
            try:
                _send_in_pieces(c, b"HELLO fastproxy/2\r\nrest")
            except (BrokenPipeError, ConnectionResetError):
                pass
            _, how = read_all(c, timeout=3)
            assert how is not None, "client not closed after a wrong greeting"
            with srv.accept() as s:
                got, how = read_all(s, timeout=3)
                assert how is not None
                assert got == b"", "held bytes were forwarded: %r" % got
    assert len(calls) >= 3, calls  # "HEL", "HELLO ", ... were held with WAIT first
    r = rec.one()
    assert r.reason == CloseReason.HOOK_CLOSED
    assert r.bytes_upstream == 0
    assert p.stats()["hook_errors"] == 0


def test_rewrite_both_directions_with_length_changes(make_proxy):
    def on_data(conn, direction, data):
        if direction == Direction.UPSTREAM:
            return data.replace(b"o", b"0000")  # grows
        return data.replace(b"l", b"")  # shrinks

    up = b"hello world, foo boo " * 20000  # ~420 KB: several chunks
    down = b"all lollipops, la la land " * 20000
    rec = Recorder()
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=on_data, on_close=rec)
        with connect(p.address, timeout=20) as c:
            t = threading.Thread(target=c.sendall, args=(up,), daemon=True)
            t.start()
            with srv.accept(timeout=10) as s:
                want_up = up.replace(b"o", b"0000")
                assert recv_exact(s, len(want_up)) == want_up
                t.join(10)
                c.shutdown(socket.SHUT_WR)
                assert recv_until_eof(s) == b""
                t2 = threading.Thread(target=lambda: (s.sendall(down), s.shutdown(socket.SHUT_WR)),
                                      daemon=True)
                t2.start()
                got = recv_until_eof(c)
                t2.join(10)
    assert got == down.replace(b"l", b"")
    r = rec.one()
    assert r.bytes_upstream == len(want_up)
    assert r.bytes_downstream == len(got)


def test_drop_chunks(make_proxy):
    dropped = threading.Event()

    def on_data(conn, direction, data):
        if direction == Direction.UPSTREAM and data.startswith(b"DROP"):
            dropped.set()
            return b""
        if direction == Direction.DOWNSTREAM and data.startswith(b"secret"):
            return b""
        return None

    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=on_data)
        with connect(p.address) as c:
            c.sendall(b"keep1")
            with srv.accept() as s:
                assert recv_exact(s, 5) == b"keep1"
                c.sendall(b"DROPME")
                assert dropped.wait(3)
                c.sendall(b"keep2")
                assert recv_exact(s, 5) == b"keep2"
                s.sendall(b"secret stuff")
                time.sleep(0.1)
                s.sendall(b"public")
                assert recv_exact(c, 6) == b"public"
                c.shutdown(socket.SHUT_WR)
                assert recv_until_eof(s) == b""  # "DROPME" never arrived
                s.shutdown(socket.SHUT_WR)
                assert recv_until_eof(c) == b""


def test_close_from_on_data(make_proxy):
    rec = Recorder()

    def on_data(conn, direction, data):
        return CLOSE if b"QUIT" in data else None

    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=on_data, on_close=rec)
        with connect(p.address) as c:
            c.sendall(b"hi")
            with srv.accept() as s:
                assert recv_exact(s, 2) == b"hi"
                c.sendall(b"QUIT")
                data, how = read_all(c, timeout=3)
                assert how is not None and data == b""
                data, how = read_all(s, timeout=3)
                assert how is not None and data == b""
    r = rec.one()
    assert r.reason == CloseReason.HOOK_CLOSED
    assert r.bytes_upstream == 2 and r.bytes_downstream == 0
    assert p.stats()["hook_errors"] == 0


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
def test_on_data_raises_closes_counts_and_keeps_serving(make_proxy, echo_server, direction):
    boom = Direction.UPSTREAM if direction == "upstream" else Direction.DOWNSTREAM

    def on_data(conn, d, data):
        if d == boom and data.startswith(b"boom"):
            raise ValueError("boom in on_data")
        return None

    rec = Recorder()
    p = make_proxy(echo_server.addr, on_data=on_data, on_close=rec)
    with connect(p.address) as c:
        c.sendall(b"boom")
        data, how = read_all(c, timeout=3)
        assert how is not None, "bridge not closed after on_data raised"
        assert data == b""
    r = rec.one()
    assert r.reason == CloseReason.HOOK_ERROR
    assert wait_stat(p, "hook_errors", 1)["hook_errors"] == 1
    for i in range(3):
        assert echo_roundtrip(p.address, b"fine %d" % i) == b"fine %d" % i
    assert wait_for(lambda: p.stats()["active"] == 0, 3)
    assert p.stats()["hook_errors"] == 1


def test_direction_specific_registration(make_proxy, echo_server):
    seen = []
    p2 = make_proxy(echo_server.addr, start=False)
    p2.on_data(lambda conn, d, data: (seen.append(d), data.upper())[1], direction=Direction.UPSTREAM)
    p2.start()
    assert echo_roundtrip(p2.address, b"abc") == b"ABC"
    assert seen and all(d == Direction.UPSTREAM for d in seen)

    seen.clear()
    p3 = make_proxy(echo_server.addr, start=False)
    p3.on_data(lambda conn, d, data: (seen.append(d), data + b"!")[1], direction=Direction.DOWNSTREAM)
    p3.start()
    assert echo_roundtrip(p3.address, b"abc") == b"abc!"
    assert seen and all(d == Direction.DOWNSTREAM for d in seen)


def test_one_hook_per_direction(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, start=False)
    p.on_data(lambda conn, d, data: data.upper(), direction=Direction.UPSTREAM)
    p.on_data(lambda conn, d, data: data[::-1], direction=Direction.DOWNSTREAM)
    p.start()
    assert echo_roundtrip(p.address, b"abc") == b"CBA"


def _send_until_closed(sock, total, timeout=5.0):
    """Send up to total bytes; return (sent, closed) where closed says the peer reset/closed."""
    sock.setblocking(False)
    block = b"z" * 65536
    sent, deadline = 0, time.monotonic() + timeout
    try:
        while sent < total and time.monotonic() < deadline:
            try:
                sent += sock.send(block[:total - sent])
            except BlockingIOError:
                select.select([], [sock], [], 0.1)
    except (BrokenPipeError, ConnectionResetError):
        return sent, True
    finally:
        sock.setblocking(True)
    return sent, False


@pytest.mark.parametrize("max_hold", [64 * 1024, None])
def test_held_data_bound_closes_bridge(make_proxy, echo_server, max_hold):
    calls = []

    def always_wait(conn, direction, data):
        calls.append(len(data))
        return WAIT

    kw = {} if max_hold is None else {"max_hold": max_hold}
    bound = max_hold or MiB
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_data=always_wait, on_close=rec, **kw)
    with connect(p.address) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        _send_until_closed(c, 3 * bound, timeout=5)
        data, how = read_all(c, timeout=5)
        assert how is not None, "bridge still open after %d bytes held with WAIT" % (3 * bound)
        assert data == b""
    r = rec.one()
    assert r.reason in (CloseReason.HOOK_CLOSED, CloseReason.HOOK_ERROR), r.reason
    assert r.bytes_upstream == 0
    assert max(calls) <= bound + 64 * 1024, "held %d bytes with max_hold %d" % (max(calls), bound)
    assert echo_roundtrip(p.address, b"") == b""  # proxy still serves


def test_held_data_below_bound_is_kept(make_proxy):
    """WAIT up to just under max_hold, then forward it all."""
    hold = 256 * 1024

    def on_data(conn, direction, data):
        if direction == Direction.UPSTREAM and len(data) < hold - 1000:
            return WAIT
        return None

    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=on_data, max_hold=hold)
        payload = os.urandom(hold - 1000)
        with connect(p.address) as c:
            c.sendall(payload)
            with srv.accept() as s:
                assert recv_exact(s, len(payload)) == payload


def test_backpressure_holds_on_copy_path(make_proxy):
    """The server stops reading: the client's writes stall, the proxy does not buffer
    without bound; then everything arrives intact."""
    with Listener() as srv:
        srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        p = make_proxy(srv.addr, on_data=lambda conn, d, data: None)
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
        c.settimeout(10)
        c.connect(p.address)
        with c, srv.accept() as s:
            total = 64 * MiB
            block = os.urandom(MiB)
            c.setblocking(False)
            sent, stalled_since = 0, None
            deadline = time.monotonic() + 10
            h = hashlib.sha256()
            while sent < total and time.monotonic() < deadline:
                try:
                    off = sent % MiB
                    n = c.send(block[off:off + 65536])
                    h.update(block[off:off + n])
                    sent += n
                    stalled_since = None
                except BlockingIOError:
                    now = time.monotonic()
                    stalled_since = stalled_since or now
                    if now - stalled_since > 0.5:
                        break
                    select.select([], [c], [], 0.05)
            assert sent < 24 * MiB, "client wrote %d bytes to a server that reads nothing" % sent
            c.setblocking(True)
            c.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            got = recv_until_eof(s)
            assert len(got) == sent
            assert hashlib.sha256(got).digest() == h.digest()
