"""Idle timeout and max lifetime end to end: quiet bridges close after about D,
busy ones (bytes either way) keep going; a lifetime ends even a busy bridge."""
import socket
import threading
import time


from fastproxy import CloseReason
from support.hooks import Recorder
from support.servers import Listener
from support.sockets import connect, read_all, recv_exact

D = 0.3



def ping(sock, payload=b"."):
    sock.sendall(payload)
    assert recv_exact(sock, len(payload)) == payload


def wait_closed(sock, timeout=D + 1.0):
    """Seconds until the proxy closed sock (FIN), failing if it stays open."""
    t0 = time.monotonic()
    data, how = read_all(sock, timeout)
    assert how == "eof", "bridge not closed by the proxy within %.1fs (%r)" % (timeout, how)
    return time.monotonic() - t0, data


def test_idle_bridge_closes_after_d(make_proxy, echo_server):
    rec = Recorder()
    p = make_proxy(echo_server.addr, idle_timeout=D, on_close=rec)
    with connect(p.address) as c:
        ping(c)
        took, data = wait_closed(c)
    assert data == b""
    assert D - 0.05 <= took < D + 1.0, "idle bridge closed after %.2fs, want ~%.1fs" % (took, D)
    r = rec.one()
    assert r.reason == CloseReason.TIMEOUT
    assert r.bytes_upstream == 1 and r.bytes_downstream == 1


def test_active_bridge_outlives_idle_timeout(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, idle_timeout=D)
    with connect(p.address) as c:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * D:
            ping(c)
            time.sleep(D / 3)
        ping(c, b"still here")


def test_bridge_closes_once_quiet_after_activity(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, idle_timeout=D)
    with connect(p.address) as c:
        for _ in range(3):
            ping(c)
            time.sleep(D / 2)
        took, _ = wait_closed(c)
    assert took < D + 1.0


def test_downstream_bytes_alone_keep_a_bridge_alive(make_proxy):
    # The client never writes; the server talks every D/3 for 3*D.
    with Listener() as lst:
        p = make_proxy(lst.addr, idle_timeout=D)
        with connect(p.address) as c, lst.accept() as srv:
            sent = []

            def talk():
                try:
                    for _ in range(9):
                        srv.sendall(b"tick")
                        sent.append(1)
                        time.sleep(D / 3)
                except OSError:
                    pass

            t = threading.Thread(target=talk, daemon=True)
            t.start()
            got = b""
            while len(got) < 9 * 4:
                chunk = c.recv(64)
                assert chunk, "bridge closed after %d ticks though the server kept talking" % len(sent)
                got += chunk
            t.join(5)


def test_max_lifetime_closes_a_busy_bridge(make_proxy, echo_server):
    rec = Recorder()
    life = 0.5
    p = make_proxy(echo_server.addr, max_lifetime=life, on_close=rec)
    with connect(p.address) as c:
        t0 = time.monotonic()
        closed = None
        while time.monotonic() - t0 < life + 2.0:
            try:
                c.sendall(b"busy")
                data = c.recv(4)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                closed = time.monotonic() - t0
                break
            time.sleep(0.05)
    assert closed is not None, "busy bridge outlived max_lifetime"
    assert life - 0.05 <= closed < life + 1.0, "closed after %.2fs, want ~%.1fs" % (closed, life)
    assert rec.one().reason == CloseReason.TIMEOUT


def test_cli_idle_timeout_and_max_lifetime(cli_proxy, echo_server):
    cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                   "--idle-timeout", "300ms", "--max-lifetime", "800ms")
    with connect(cp.address) as c:
        ping(c)
        took, _ = wait_closed(c)
    assert 0.25 <= took < 1.3
    with socket.create_connection(cp.address, timeout=5) as c:
        t0 = time.monotonic()
        closed = None
        while time.monotonic() - t0 < 3.0:
            try:
                c.sendall(b"x")
                data = c.recv(1)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                closed = time.monotonic() - t0
                break
            time.sleep(0.1)
    assert closed is not None and 0.75 <= closed < 1.8, closed
