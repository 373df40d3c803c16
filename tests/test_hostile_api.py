"""Hostile API use found by an adversarial run: routes with NUL bytes,
hooks registered after stop(), stop() while hooks block."""

import threading
import time

import pytest

from fastproxy import CloseReason
from fastproxy.proxy import STOP_GRACE
from support.hooks import Recorder
from support.sockets import connect, read_all
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
