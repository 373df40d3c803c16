"""Half-close: an EOF travels as shutdown(SHUT_WR); the other direction keeps working."""
import hashlib
import os
import socket
import time

from support.servers import Listener
from support.sockets import MiB, closed_by_peer, connect, recv_exact, recv_until_eof
from support.waits import wait_for


def test_client_shuts_first_reply_still_arrives(make_proxy):
    request = os.urandom(3 * MiB)
    reply = os.urandom(2 * MiB)
    with Listener() as srv:
        p = make_proxy(srv.addr)
        with connect(p.address, timeout=20) as c:
            c.sendall(request)
            c.shutdown(socket.SHUT_WR)
            with srv.accept(timeout=10) as s:
                s.settimeout(20)
                # The server sees the whole request, then EOF (the forwarded FIN).
                got = recv_until_eof(s)
                assert hashlib.sha256(got).digest() == hashlib.sha256(request).digest()
                # The reply travels after the client's FIN.
                s.sendall(hashlib.sha256(got).digest() + reply)
                s.shutdown(socket.SHUT_WR)
                answer = recv_until_eof(c)
    assert answer[:32] == hashlib.sha256(request).digest()
    assert answer[32:] == reply


def test_server_shuts_first_client_can_still_send(make_proxy):
    late = os.urandom(2 * MiB)
    with Listener() as srv:
        p = make_proxy(srv.addr)
        with connect(p.address, timeout=20) as c:
            c.sendall(b"hello")
            with srv.accept(timeout=10) as s:
                s.settimeout(20)
                assert recv_exact(s, 5) == b"hello"
                s.sendall(b"bye")
                s.shutdown(socket.SHUT_WR)
                # The client gets the server's bytes, then EOF, while its own side is open.
                assert recv_until_eof(c) == b"bye"
                # ... and can still send: the server receives all of it.
                c.sendall(late)
                c.shutdown(socket.SHUT_WR)
                got = recv_until_eof(s)
                assert got == late


def test_bridge_ends_after_both_directions_done(make_proxy):
    with Listener() as srv:
        p = make_proxy(srv.addr)
        with connect(p.address) as c:
            c.sendall(b"x")
            with srv.accept() as s:
                assert recv_exact(s, 1) == b"x"
                c.shutdown(socket.SHUT_WR)
                assert recv_until_eof(s) == b""
                s.shutdown(socket.SHUT_WR)
                assert recv_until_eof(c) == b""
                deadline = time.monotonic() + 5
                while p.stats()["active"] and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert p.stats()["active"] == 0


def test_half_close_timeout_closes_bridge(make_proxy):
    with Listener() as srv:
        p = make_proxy(srv.addr, half_close_timeout="1s")
        with connect(p.address) as c:
            c.sendall(b"ping")
            with srv.accept() as s:
                assert recv_exact(s, 4) == b"ping"
                c.shutdown(socket.SHUT_WR)
                assert recv_until_eof(s) == b""  # forwarded FIN
                t0 = time.monotonic()
                # The server neither replies nor closes: after ~1 s the proxy ends the bridge.
                how = closed_by_peer(c, timeout=6)
                took = time.monotonic() - t0
                assert how is not None, "bridge still open 6 s after EOF with half_close_timeout=1s"
                assert 0.5 <= took <= 4.0, took
                assert closed_by_peer(s, timeout=3) is not None


def test_half_close_timeout_is_silence_not_a_deadline(make_proxy):
    # As HAProxy's client-fin: a client that sent its request and FIN gets
    # the whole of a slow answer; the bridge ends only after a second of
    # silence once it stops.
    with Listener() as srv:
        p = make_proxy(srv.addr, half_close_timeout="1s")
        with connect(p.address) as c:
            c.sendall(b"GET")
            c.shutdown(socket.SHUT_WR)
            with srv.accept() as s:
                assert recv_exact(s, 3) == b"GET"
                assert recv_until_eof(s) == b""
                for i in range(12):   # 2.75 s in all, well past the timeout
                    s.sendall(b"%d," % i)
                    time.sleep(0.25)
                assert recv_exact(c, len(b"".join(b"%d," % i for i in range(12)))) == \
                    b"".join(b"%d," % i for i in range(12))
                t0 = time.monotonic()
                assert closed_by_peer(c, timeout=6) is not None
                assert 0.5 <= time.monotonic() - t0 <= 3.0
        assert p.stats()["active"] == 0 or wait_for(lambda: p.stats()["active"] == 0, 5)


def test_server_speaks_first(make_proxy):
    """Banner protocols (SMTP, MySQL): the upstream writes before the client does."""
    with Listener() as srv:
        p = make_proxy(srv.addr)
        with connect(p.address) as c:
            with srv.accept() as s:
                s.sendall(b"220 banner\r\n")
                assert recv_exact(c, 12) == b"220 banner\r\n"
                c.sendall(b"QUIT\r\n")
                assert recv_exact(s, 6) == b"QUIT\r\n"
                s.shutdown(socket.SHUT_WR)
                assert recv_until_eof(c) == b""
