"""Graceful stop: stop accepting, drain live bridges, close the rest at the deadline."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from support.cli import LineReader, subprocess_env
from support.servers import Listener
from support.sockets import MiB, closed_by_peer, connect, echo_roundtrip, recv_exact, recv_until_eof
from support.waits import stop_bounded, wait_for


def _new_connection_refused(addr):
    """True if a new client is not served: refused, or closed without being bridged."""
    try:
        s = connect(addr, timeout=2)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except socket.timeout:
        return True
    with s:
        try:
            s.sendall(b"are you there")
        except OSError:
            return True
        return closed_by_peer(s, 2) is not None


def _stop_async(proxy, timeout=None):
    box = {}

    def run():
        box["took"] = stop_bounded(proxy, timeout, limit=30)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_drain_keeps_live_bridge_and_refuses_new(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, drain_timeout="10s")
    addr = p.address
    live = connect(addr)
    live.sendall(b"before")
    assert recv_exact(live, 6) == b"before"
    t, box = _stop_async(p)
    try:
        time.sleep(0.3)
        assert t.is_alive(), "stop() returned while a bridge was still live (no drain)"
        # New connects are not served ...
        assert _new_connection_refused(addr), "a new client was served during the drain"
        # ... while the live bridge keeps working.
        for i in range(5):
            msg = b"during drain %d" % i
            live.sendall(msg)
            assert recv_exact(live, len(msg)) == msg
        assert t.is_alive()
        live.shutdown(socket.SHUT_WR)
        assert closed_by_peer(live, 5) == "eof"
    finally:
        live.close()
    t.join(10)
    assert not t.is_alive(), "stop() did not return once the last bridge closed"
    assert box["took"] < 5, "stop() took %.1f s after the bridge finished" % box["took"]
    assert p.stats()["active"] == 0


def test_drain_timeout_closes_remaining_bridges(make_proxy):
    with Listener() as srv:
        p = make_proxy(srv.addr, drain_timeout="1s")
        c = connect(p.address)
        c.sendall(b"hi")
        s = srv.accept()
        assert recv_exact(s, 2) == b"hi"
        took = stop_bounded(p, limit=15)
        assert 0.7 <= took <= 4.0, "stop() took %.2f s with drain_timeout=1s" % took
        # The idle bridge was closed with FIN on both sides.
        assert closed_by_peer(c, 3) == "eof"
        assert closed_by_peer(s, 3) == "eof"
        c.close()
        s.close()
        assert p.stats()["active"] == 0


def test_stop_timeout_argument_overrides_drain_timeout(make_proxy):
    with Listener() as srv:
        p = make_proxy(srv.addr, drain_timeout="30s")
        c = connect(p.address)
        c.sendall(b"hi")
        s = srv.accept()
        assert recv_exact(s, 2) == b"hi"
        took = stop_bounded(p, timeout=0.5, limit=15)
        assert took < 3.0, "stop(timeout=0.5) took %.2f s" % took
        assert closed_by_peer(c, 3) is not None
        c.close()
        s.close()


def test_stop_without_bridges_is_quick_and_idempotent(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, drain_timeout="10s")
    assert echo_roundtrip(p.address, b"x") == b"x"
    assert wait_for(lambda: p.stats()["active"] == 0, 5)
    assert stop_bounded(p, limit=10) < 2.0
    assert stop_bounded(p, limit=10) < 2.0  # second stop: no error, no hang
    assert _new_connection_refused(p.address)


def test_context_manager_starts_and_stops(engine, echo_server):
    from fastproxy import Proxy
    with Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine=engine) as p:
        assert p.engine == engine
        addr = p.address
        assert echo_roundtrip(addr, b"ctx") == b"ctx"
    assert _new_connection_refused(addr)


def test_cli_sigterm_drains_then_exits_zero(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--drain-timeout", "10s")
    live = connect(proxy.address)
    try:
        live.sendall(b"a")
        assert recv_exact(live, 1) == b"a"
        proxy.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proxy.alive(), "exited at once despite a live bridge and a 10 s drain"
        live.sendall(b"still here")
        assert recv_exact(live, 10) == b"still here"
        assert _new_connection_refused(proxy.address)
        live.shutdown(socket.SHUT_WR)
        assert closed_by_peer(live, 5) == "eof"
    finally:
        live.close()
    rc = proxy.wait(8)
    assert rc == 0, "exit code %r; stderr:\n%s" % (rc, proxy.stderr.text())
    assert "Traceback" not in proxy.stderr.text()


def test_cli_sigterm_drain_timeout(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--drain-timeout", "1s")
    live = connect(proxy.address)
    try:
        live.sendall(b"a")
        assert recv_exact(live, 1) == b"a"
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert closed_by_peer(live, 6) == "eof"
        rc = proxy.wait(8)
        took = time.monotonic() - t0
    finally:
        live.close()
    assert rc == 0, proxy.stderr.text()
    assert 0.7 <= took <= 5, took


def test_drain_lets_a_bulk_transfer_finish(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, drain_timeout="10s")
    c = connect(p.address, timeout=20)
    c.sendall(b"go")
    assert recv_exact(c, 2) == b"go"
    t, box = _stop_async(p)
    try:
        payload = os.urandom(8 * MiB)
        sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)),
                                  daemon=True)
        sender.start()
        assert recv_until_eof(c) == payload, "bulk transfer broken by the drain"
        sender.join(10)
    finally:
        c.close()
    t.join(10)
    assert not t.is_alive() and box["took"] < 8


def test_serve_forever_on_a_thread_returns_on_stop(engine, echo_server):
    from fastproxy import Proxy
    before = signal.getsignal(signal.SIGTERM)
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine=engine)
    t = threading.Thread(target=p.serve_forever, daemon=True)
    t.start()

    def addr():
        try:
            return p.address
        except Exception:
            return None

    assert wait_for(addr, 10), "serve_forever() did not start the proxy"
    assert echo_roundtrip(p.address, b"sf") == b"sf"
    # Not the main thread: no signal handler may be installed.
    assert signal.getsignal(signal.SIGTERM) is before
    stop_bounded(p, limit=10)
    t.join(10)
    assert not t.is_alive(), "serve_forever() did not return after stop()"


SERVE_FOREVER = r"""
import sys, threading, time
from fastproxy import Proxy
p = Proxy(listen="127.0.0.1:0", upstream=sys.argv[2], engine=sys.argv[1])
def report():
    for _ in range(1000):
        try:
            a = p.address
        except Exception:
            a = None
        if a:
            print("port", a[1], flush=True)
            return
        time.sleep(0.01)
threading.Thread(target=report, daemon=True).start()
p.serve_forever()
print("returned", flush=True)
"""


def test_serve_forever_main_thread_sigterm(engine, echo_server):
    proc = subprocess.Popen([sys.executable, "-c", SERVE_FOREVER, engine, echo_server.addr],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        out = LineReader(proc.stdout)
        m = out.wait_line(r"^port (\d+)", 20)
        assert m, out.text()
        assert echo_roundtrip(("127.0.0.1", int(m.group(1))), b"main") == b"main"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, out.text()
        assert out.wait_line(r"^returned", 5), "serve_forever() did not return on SIGTERM"
        assert "Traceback" not in out.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
