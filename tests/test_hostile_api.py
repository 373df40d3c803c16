"""Hostile API use found by an adversarial run: routes with NUL bytes,
hooks registered after stop(), stop() while hooks block."""

import socket
import struct
import threading
import time

import pytest

from fastproxy import CloseReason
from fastproxy.proxy import STOP_GRACE
from support.hooks import Recorder
from support.sockets import connect, fmt_addr, how_closed, read_all, reserve_refusing_port
from support.waits import stop_bounded, wait_stat


@pytest.mark.parametrize("route", ["127.0.0.1\x00:{port}", "127.0.0.1\x00junk:{port}", "127.0.0.1 :{port}"])
def test_a_route_with_a_nul_or_space_is_a_hook_error_not_a_connect(make_proxy, echo_server, route):
    # getaddrinfo reads "127.0.0.1\0..." as 127.0.0.1: the route reached the
    # echo server (or counted as a connect failure where nothing listened).
    target = route.format(port=echo_server.addr[1])
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=lambda conn: target, on_close=rec)
    with connect(p.address) as c:
        c.sendall(b"hello")
        data, how = read_all(c, timeout=3)
        assert how is not None and data == b""
    assert rec.one().reason == CloseReason.HOOK_ERROR
    stats = wait_stat(p, "hook_errors", 1)
    assert stats["hook_errors"] == 1 and stats["connect_failures"] == 0
    assert echo_server.accepted == 0


def test_registering_a_hook_after_stop_says_the_proxy_is_stopped(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    with pytest.raises(RuntimeError, match="data plane is running"):
        p.on_connect(lambda conn: None)
    stop_bounded(p, timeout=1.0)
    for register in (p.on_connect, p.on_data, p.on_close):
        with pytest.raises(RuntimeError, match="this proxy is stopped") as info:
            register(lambda *a: None)
        assert "running" not in str(info.value)


@pytest.mark.parametrize("hook", ["on_connect", "on_data", "on_close"])
def test_stop_is_bounded_by_its_timeout_when_hooks_block(make_proxy, echo_server, hook):
    release = threading.Event()
    entered = threading.Event()

    def blocking(*args):
        entered.set()
        release.wait(30)

    p = make_proxy(echo_server.addr, **{hook: blocking})
    c = connect(p.address)
    try:
        c.sendall(b"x")
        if hook == "on_close":
            c.close()
        assert entered.wait(5), "the hook was not called"
        timeout = 0.5
        took = stop_bounded(p, timeout=timeout, limit=20.0)
        # Before: the drain, then up to 5 s joining the blocked hook thread.
        assert took < timeout + STOP_GRACE + 0.5, took
        assert p.stats()["active"] == 0
    finally:
        c.close()
        release.set()


@pytest.mark.parametrize("send_first", [False, True])
def test_a_refused_upstream_reaches_the_client_as_rst_and_is_counted_before(make_proxy, send_first):
    # Both engines: RST whether or not the client sent bytes the proxy never
    # read (FIN before, but RST when unread bytes made the kernel send one),
    # and connect_failures counts it by the time the client sees it.
    hole = reserve_refusing_port()
    try:
        p = make_proxy(fmt_addr("127.0.0.1", hole.getsockname()[1]), workers=1)
        for n in range(1, 21):
            assert how_closed(p.address, send=b"request" if send_first else b"") == "reset", n
            # Read at once, no waiting: counted before the close it caused.
            stats = p.stats()
            assert stats["connect_failures"] == n and stats["active"] == 0, (n, stats)
    finally:
        hole.close()



class ResettingServer:
    """Sends a greeting to each client, then resets it (SO_LINGER 0)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.addr = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with s:
                s.sendall(b"bye")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def test_a_closed_bridge_is_out_of_active_before_its_client_sees_the_close(make_proxy):
    # The upstream resets: the proxy resets the client. stats() read the
    # moment the client saw it no longer counts the bridge (before: about
    # 2-3 % of reads still did).
    upstream = ResettingServer()
    try:
        p = make_proxy(fmt_addr(*upstream.addr), workers=1)
        late = 0
        for _ in range(300):
            assert how_closed(p.address) == "reset"
            late += p.stats()["active"] != 0
        assert late == 0, f"{late} of 300 reads counted a bridge whose client saw it close"
    finally:
        upstream.close()


def fastproxy_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("fastproxy")]


@pytest.mark.parametrize("with_hooks", [False, True])
def test_a_proxy_collected_without_stop_warns_and_cleans_up(engine, echo_server, tmp_path, with_hooks):
    # Before: its threads held it, so it was never collected: workers, hook
    # threads, listening socket, pipes and poll fds lived until exit.
    import gc
    import os
    import weakref

    from fastproxy import Proxy

    assert fastproxy_threads() == []
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    hooks = dict(on_connect=lambda conn: None, on_data=lambda conn, d, data: data,
                 on_close=lambda conn, record: None) if with_hooks else {}
    p = Proxy(listen="127.0.0.1:0", upstreams=[echo_server.addr], engine=engine, workers=2,
              stats="127.0.0.1:0", access_log=str(tmp_path / "access.log"), health_interval=0.2, **hooks)
    p.start()
    address = p.address
    with connect(address) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
    assert fastproxy_threads()
    ref = weakref.ref(p)
    with pytest.warns(ResourceWarning, match="never stopped"):
        del p
        gc.collect()
    assert ref() is None, "the proxy was not collected"
    assert fastproxy_threads() == []
    with pytest.raises(ConnectionRefusedError):
        connect(address).close()
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds_before
