"""Hooks run on hook threads, never on a worker: with one worker, a hook that blocks
stalls only its own bridge while other bridges keep flowing."""
import os
import socket
import threading
import time

import pytest

from support.procfs import proc_context_switches
from support.sockets import connect, connect_from, recv_exact, recv_until_eof

BLOCK_S = 5.0  # upper bound on how long a hook blocks; the test releases it much sooner


def _echo_rtt(addr, src="127.0.0.1", payload=b"quick"):
    t0 = time.monotonic()
    with connect_from(addr, src, timeout=3) as c:
        c.sendall(payload)
        assert recv_exact(c, len(payload)) == payload
        took = time.monotonic() - t0
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == b""
    return took


def _blocking_on_data(entered, release):
    """An on_data that blocks (like time.sleep(2)) on a chunk starting SLOW."""
    def on_data(conn, direction, data):
        if data.startswith(b"SLOW"):
            entered.set()
            release.wait(BLOCK_S)
        return None
    return on_data


def test_blocking_on_data_stalls_only_its_bridge(make_proxy, echo_server):
    entered, release = threading.Event(), threading.Event()
    on_data = _blocking_on_data(entered, release)

    p = make_proxy(echo_server.addr, on_data=on_data, workers=1)
    with connect(p.address) as slow:
        slow.sendall(b"SLOW request")
        assert entered.wait(3), "on_data never called"
        try:
            for _ in range(3):
                took = _echo_rtt(p.address)
                assert took < 0.5, "another bridge took %.2f s while a hook blocked" % took
            assert not release.is_set()
            slow.settimeout(0.2)
            try:
                early = slow.recv(100)
            except socket.timeout:
                early = None
            assert early is None, "the blocked bridge moved on before its hook answered: %r" % early
        finally:
            release.set()
        slow.settimeout(3)
        assert recv_exact(slow, 12) == b"SLOW request"


def test_blocking_on_connect_stalls_only_its_client(make_proxy, echo_server):
    entered, release = threading.Event(), threading.Event()

    def on_connect(conn):
        if conn.client_address[0] == "127.0.0.2":
            entered.set()
            release.wait(BLOCK_S)

    p = make_proxy(echo_server.addr, on_connect=on_connect, workers=1)
    slow = connect_from(p.address, "127.0.0.2")
    with slow:
        assert entered.wait(3)
        try:
            for _ in range(3):
                took = _echo_rtt(p.address)
                assert took < 0.5, "another client took %.2f s while on_connect blocked" % took
            assert echo_server.accepted == 3, "the blocked client reached the upstream early"
        finally:
            release.set()
        slow.sendall(b"late")
        assert recv_exact(slow, 4) == b"late"


def test_blocking_on_close_does_not_stall_workers(make_proxy, echo_server):
    entered, release = threading.Event(), threading.Event()

    def on_close(conn, record):
        entered.set()
        release.wait(BLOCK_S)

    p = make_proxy(echo_server.addr, on_close=on_close, workers=1)
    try:
        _echo_rtt(p.address)
        assert entered.wait(3)
        for _ in range(5):
            assert _echo_rtt(p.address) < 0.5
    finally:
        release.set()


def test_call_queued_behind_a_hook_that_just_blocked_is_taken(make_proxy, echo_server):
    # A hook thread that has just taken a call takes the next one itself
    # rather than wake a sleeper, so a call queued right behind a call whose
    # hook then blocks would wait for it (or for a sleeper's time-out, up to
    # a second), but for the workers' watch. Two hook threads: one blocks,
    # the other must be woken for the quick call.
    rounds = 5
    entered = threading.Semaphore(0)
    release = [threading.Event() for _ in range(rounds)]

    def on_data(conn, direction, data):
        if data.startswith(b"SLOW"):
            entered.release()
            release[int(data[4:])].wait(BLOCK_S)
        return None

    p = make_proxy(echo_server.addr, on_data=on_data, workers=1, hook_threads=2)
    try:
        for i in range(rounds):
            with connect(p.address) as slow, connect(p.address) as quick:
                time.sleep(0.05)   # both bridges open: the two sends below are back to back
                t0 = time.monotonic()
                slow.sendall(b"SLOW%d" % i)
                quick.sendall(b"quick")
                quick.settimeout(3)
                assert recv_exact(quick, 5) == b"quick"
                took = time.monotonic() - t0
                assert took < 0.25, "a call queued behind a blocked hook took %.2f s" % took
                assert entered.acquire(timeout=3), "on_data never saw SLOW"
                release[i].set()
                slow.settimeout(3)
                assert recv_exact(slow, 5) == b"SLOW%d" % i
    finally:
        for r in release:
            r.set()


@pytest.mark.linux_only
def test_workers_do_not_poll_for_calls_no_thread_can_take(make_proxy, echo_server):
    # Workers look at a queue holding calls every millisecond, for a sleeping
    # hook thread to wake. With every hook thread inside a blocked hook there
    # is none: the workers must sleep, not wake a thousand times a second.
    entered, release = threading.Event(), threading.Event()
    on_data = _blocking_on_data(entered, release)

    p = make_proxy(echo_server.addr, on_data=on_data, workers=1, hook_threads=1)
    with connect(p.address) as slow, connect(p.address) as queued:
        try:
            slow.sendall(b"SLOW")
            assert entered.wait(3), "on_data never saw SLOW"
            queued.sendall(b"waits")   # queued: the only hook thread is blocked
            time.sleep(0.1)
            before = proc_context_switches(os.getpid())
            time.sleep(0.5)
            switches = proc_context_switches(os.getpid()) - before
            assert switches < 100, "%d context switches in 0.5 s with nothing to do" % switches
        finally:
            release.set()
        queued.settimeout(3)
        assert recv_exact(queued, 5) == b"waits"
