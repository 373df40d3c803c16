"""The hook boundary: answers name their call by an opaque handle that the worker
checks (stale, repeated and forged ones are counted and dropped), every exception
from a hook answers its call, stop() from inside a hook, and hook_timeout."""
import asyncio
import hashlib
import os
import random
import socket
import threading
import time

import pytest

from fastproxy import CloseReason, Proxy
from fastproxy import _core
from fastproxy.dispatch import HookRunner
from fastproxy.hooks import V_CLOSE, V_ERROR, V_REFUSE, V_REPLACE
from support.cli import assert_one_line_error, run_cli
from support.hooks import Recorder
from support.sockets import MiB, connect, connect_from, echo_roundtrip, read_all, recv_exact, recv_until_eof
from support.waits import stop_bounded, wait_for, wait_stat

BLOCK_S = 10.0        # a blocked hook waits at most this long; tests release it sooner
CLOSE_BOUND_S = 3.0   # a bridge past hook_timeout=0.3 is closed well within this
STOP_BOUND_S = 10.0


# ---- handles


def _record_handles(monkeypatch, seen):
    """Keep the handle of every call once it was answered (the original method
    answers before returning)."""
    orig_connect, orig_data = HookRunner._on_connect, HookRunner._on_data

    def on_connect(self, entry, handle, *rest):
        orig_connect(self, entry, handle, *rest)
        seen.append(("connect", handle))

    def on_data(self, entry, handle, *rest):
        orig_data(self, entry, handle, *rest)
        seen.append(("data", handle))

    monkeypatch.setattr(HookRunner, "_on_connect", on_connect)
    monkeypatch.setattr(HookRunner, "_on_data", on_data)


def _pump(addr, payload, result):
    """Send payload through the echo path while reading it back; keep the digest."""
    try:
        with connect(addr, timeout=30) as c:
            def send():
                for i in range(0, len(payload), 65536):
                    c.sendall(payload[i:i + 65536])
                c.shutdown(socket.SHUT_WR)
            t = threading.Thread(target=send, daemon=True)
            t.start()
            got = recv_until_eof(c)
            t.join(30)
            result["digest"] = hashlib.sha256(got).hexdigest()
            result["len"] = len(got)
    except Exception as e:  # reported by the test
        result["error"] = e


def test_stale_repeated_and_forged_answers_are_counted_and_dropped(make_proxy, echo_server, monkeypatch):
    seen = []
    _record_handles(monkeypatch, seen)
    p = make_proxy(echo_server.addr, on_connect=lambda conn: None, on_data=lambda conn, d, data: None,
                   workers=2, hook_threads=2)
    eng = p._plane
    payload = os.urandom(6 * MiB)
    want = hashlib.sha256(payload).hexdigest()
    results = [{} for _ in range(2)]
    pumps = [threading.Thread(target=_pump, args=(p.address, payload, r), daemon=True) for r in results]
    for t in pumps:
        t.start()
    assert wait_for(lambda: sum(k == "data" for k, _ in list(seen)) >= 8, 10), "no data calls answered"

    sent = 0
    rng = random.Random(7)
    deadline = time.monotonic() + 30
    # Keep answering while the bridges flow: every answer below must be dropped,
    # or the streams would be closed (CLOSE, ERROR, REFUSE) or corrupted (REPLACE).
    while any(t.is_alive() for t in pumps) and time.monotonic() < deadline:
        for kind, h in list(seen)[-6:]:
            # An answered call's handle, replayed (stale), then again (repeated).
            for _ in range(2):
                if kind == "connect":
                    eng.answer_connect(h, V_REFUSE)
                else:
                    eng.answer_data(h, V_REPLACE, b"GARBAGE")
                sent += 1
            ident, worker = h >> 64, h & 0xFFFF
            forged = [
                rng.getrandbits(128),                   # random
                (h & ~0xFFFF) | 999,                    # no such worker
                h + (10 ** 9 << 64),                    # no such bridge id
                h ^ (1 << 62),                          # a seq this bridge is far from
                h ^ (3 << 16),                          # a call index that does not exist
                (ident << 64) | (1 << 32) | (1 << 16) | worker,  # a guess at an early seq
                -1,
                1 << 200,
            ]
            for f in forged:
                eng.answer_data(f, V_CLOSE)
                eng.answer_connect(f, V_ERROR)
                sent += 2
        time.sleep(0.005)
    for t in pumps:
        t.join(30)
    for r in results:
        assert "error" not in r, r
        assert r["len"] == len(payload) and r["digest"] == want, "the stream was corrupted"
    assert sent > 100
    st = wait_stat(p, "stale_answers", sent, timeout=5)
    assert st["stale_answers"] == sent, (st["stale_answers"], sent)
    assert st["hook_errors"] == 0
    assert echo_roundtrip(p.address, b"still serving") == b"still serving"


def test_handle_of_wrong_type_raises(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, on_connect=lambda conn: None)
    with pytest.raises(TypeError):
        p._plane.answer_connect("1", V_ERROR)
    with pytest.raises(TypeError):
        p._plane.answer_data(1.0, V_ERROR)
    assert echo_roundtrip(p.address, b"x") == b"x"


# ---- enums


def test_hook_enums_are_defined_once_in_the_core():
    assert CloseReason is _core.CloseReason
    assert issubclass(CloseReason, int)
    assert {m.name: m.value for m in CloseReason} == {
        "CLIENT_CLOSED": 1, "UPSTREAM_CLOSED": 2, "CLIENT_RESET": 3, "UPSTREAM_RESET": 4,
        "CONNECT_FAILED": 5, "REFUSED": 6, "TIMEOUT": 7, "HOOK_CLOSED": 8, "HOOK_ERROR": 9,
        "SHUTDOWN": 10, "HOOK_TIMEOUT": 11, "ADMIN_CLOSED": 12, "TOXIC_CLOSED": 13}
    assert CloseReason(11) is CloseReason.HOOK_TIMEOUT
    assert [m.value for m in _core.Verdict] == list(range(8))
    assert {m.name: m.value for m in _core.HookBit} == {
        "HOOK_CONNECT": 1, "HOOK_DATA_UP": 2, "HOOK_DATA_DOWN": 4, "HOOK_RECORDS": 8}
    for gone in ("CLOSE_REASONS", "VERDICTS", "HOOK_BITS", "EVT_KINDS"):
        assert not hasattr(_core, gone)


# ---- every exception from a hook answers its call

EXC = {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}


def _raise_once(exc, also=None):
    fired = []

    def hook(*args):
        if not fired:
            fired.append(1)
            raise exc()
        if also is not None:
            also(*args)
    return hook


@pytest.mark.parametrize("exc", sorted(EXC))
@pytest.mark.parametrize("hook", ["on_connect", "on_data"])
def test_base_exception_from_hook_closes_bridge_and_thread_serves_on(make_proxy, echo_server, hook, exc):
    rec = Recorder()
    p = make_proxy(echo_server.addr, hook_threads=1, on_close=rec, **{hook: _raise_once(EXC[exc])})
    with connect(p.address) as c:
        c.sendall(b"first")
        data, how = read_all(c, timeout=CLOSE_BOUND_S)
        assert how is not None, "the bridge whose hook raised %s was left open" % exc
        assert data == b""
    assert rec.wait(1)[0].reason == CloseReason.HOOK_ERROR
    assert wait_stat(p, "hook_errors", 1)["hook_errors"] == 1
    # hook_threads=1: a thread killed by the exception would leave this one parked.
    for i in range(3):
        assert echo_roundtrip(p.address, b"next %d" % i, timeout=3) == b"next %d" % i
    assert stop_bounded(p, limit=STOP_BOUND_S) < 5


@pytest.mark.parametrize("exc", sorted(EXC))
def test_base_exception_from_on_close_is_counted_and_records_go_on(make_proxy, echo_server, exc):
    rec = Recorder()
    p = make_proxy(echo_server.addr, hook_threads=1, on_close=_raise_once(EXC[exc], rec))
    assert echo_roundtrip(p.address, b"one") == b"one"
    assert wait_stat(p, "hook_errors", 1)["hook_errors"] == 1
    assert echo_roundtrip(p.address, b"two") == b"two"
    rec.wait(1)
    assert stop_bounded(p, limit=STOP_BOUND_S) < 5


# ---- stop() from inside a hook


def _serve_on_thread(p):
    done = {}

    def run():
        try:
            p.serve_forever()
        except BaseException as e:  # reported by the test
            done["error"] = e
        done["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert wait_for(lambda: p._plane is not None and p._plane.accepting(), 10)
    return t, done


@pytest.mark.parametrize("hook", ["on_connect", "on_data", "on_close"])
def test_stop_from_inside_a_hook(engine, echo_server, hook):
    box = {}

    def stopper(*args):
        t0 = time.monotonic()
        box["proxy"].stop()
        box.setdefault("took", time.monotonic() - t0)

    p = Proxy("127.0.0.1:0", upstream=echo_server.addr, engine=engine, drain_timeout=2.0,
              hook_threads=1, **{hook: stopper})
    box["proxy"] = p
    t, done = _serve_on_thread(p)
    try:
        st = _bye_while_a_hook_stops(p, t, done, box, "serve_forever() after stop() from %s" % hook)
        assert p.stats() == st   # final
    finally:
        stop_bounded(p, limit=STOP_BOUND_S)


def _bye_while_a_hook_stops(p, t, done, box, what):
    """One client says bye and half-closes while a hook calls stop(): the
    serving thread `t` returns, stop() took no drain time inside the hook
    (the drain is 2 s), and the bridge drained. Returns the stats."""
    with connect(p.address) as c:
        c.sendall(b"bye")
        c.shutdown(socket.SHUT_WR)
        data, how = read_all(c, timeout=3)
    t.join(STOP_BOUND_S)
    assert not t.is_alive(), "%s did not return" % what
    assert "error" not in done, done
    assert box["took"] < 1.0, box
    assert (data, how) == (b"bye", "eof")
    st = p.stats()
    assert st["accepted"] == 1 and st["active"] == 0, st
    return st


@pytest.mark.parametrize("hook", ["on_connect", "on_close"])
def test_stop_from_inside_an_async_hook(engine, echo_server, hook):
    box = {}

    async def stopper(*args):
        t0 = time.monotonic()
        box["proxy"].stop()
        box.setdefault("took", time.monotonic() - t0)

    p = Proxy("127.0.0.1:0", upstream=echo_server.addr, engine=engine, drain_timeout=2.0,
              **{hook: stopper})
    box["proxy"] = p
    done = {}

    def run():
        try:
            asyncio.run(p.serve())
        except BaseException as e:  # reported by the test
            done["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: p._plane is not None and p._plane.accepting(), 10)
        _bye_while_a_hook_stops(p, t, done, box, "serve() after stop() from async %s" % hook)
    finally:
        stop_bounded(p, limit=STOP_BOUND_S)


# ---- hook_timeout


def _blocking(entered, release, also=None):
    first = []

    def hook(*args):
        if not first:
            first.append(1)
            entered.set()
            release.wait(BLOCK_S)
        if also is not None:
            return also(*args)
        return None
    return hook


@pytest.mark.parametrize("hook", ["on_connect", "on_data"])
def test_hook_timeout_closes_the_bridge_and_replaces_the_thread(make_proxy, echo_server, hook):
    entered, release = threading.Event(), threading.Event()
    rec = Recorder()
    p = make_proxy(echo_server.addr, hook_threads=1, hook_timeout=0.3, on_close=rec,
                   **{hook: _blocking(entered, release)})
    try:
        with connect(p.address) as c:
            c.sendall(b"stuck")
            assert entered.wait(3)
            t0 = time.monotonic()
            data, how = read_all(c, timeout=CLOSE_BOUND_S)
            assert how is not None, "not closed %.1f s after its hook call passed hook_timeout" % CLOSE_BOUND_S
            assert time.monotonic() - t0 < CLOSE_BOUND_S
            assert data == b""
        r = rec.wait(1)[0]
        assert r.reason == CloseReason.HOOK_TIMEOUT, r
        st = p.stats()
        assert st["hook_timeouts"] == 1 and st["stale_answers"] == 0, st
        # The only hook thread is still blocked: a replacement serves the next clients.
        for i in range(3):
            assert echo_roundtrip(p.address, b"later %d" % i, timeout=3) == b"later %d" % i
        assert not release.is_set()
    finally:
        release.set()
    # The blocked hook returns: its answer is late (stale), and nothing breaks.
    st = wait_stat(p, "stale_answers", 1)
    assert st["stale_answers"] == 1 and st["hook_timeouts"] == 1, st
    assert echo_roundtrip(p.address, b"after", timeout=3) == b"after"
    assert p.stats()["hook_timeouts"] == 1
    assert stop_bounded(p, limit=STOP_BOUND_S) < 5


def test_hook_timeout_takes_back_calls_no_thread_took(make_proxy, echo_server):
    """hook_threads=1: the first stuck thread is replaced, the replacement gets stuck
    too and is not replaced (the bound: one spare per hook thread). A third call then
    waits in the queue: past its deadline it is taken back, never run."""
    release = threading.Event()
    entered = []
    cond = threading.Condition()

    def on_connect(conn):
        with cond:
            entered.append(conn.id)
            cond.notify_all()
        release.wait(BLOCK_S)

    def wait_entered(n):
        with cond:
            return cond.wait_for(lambda: len(entered) >= n, 3)

    rec = Recorder()
    p = make_proxy(echo_server.addr, hook_threads=1, hook_timeout=0.3, on_close=rec, on_connect=on_connect)
    try:
        for n in (1, 2, 3):
            with connect(p.address) as c:
                if n < 3:
                    assert wait_entered(n), "call %d never reached a hook thread" % n
                data, how = read_all(c, timeout=CLOSE_BOUND_S)
                assert how is not None and data == b"", "client %d not closed" % n
        recs = rec.wait(3)
        assert [r.reason for r in recs] == [CloseReason.HOOK_TIMEOUT] * 3, recs
        assert p.stats()["hook_timeouts"] == 3
    finally:
        release.set()
    # Two threads were stuck and answer late; the third call never ran.
    st = wait_stat(p, "stale_answers", 2)
    assert st["stale_answers"] == 2, st
    assert echo_roundtrip(p.address, b"after", timeout=3) == b"after"
    assert len(entered) == 3   # the two stuck calls and this last client's
    assert p.stats()["stale_answers"] == 2


def test_without_hook_timeout_a_slow_hook_is_not_closed(make_proxy, echo_server):
    entered, release = threading.Event(), threading.Event()
    p = make_proxy(echo_server.addr, hook_threads=1, on_connect=_blocking(entered, release))
    try:
        with connect(p.address) as c:
            assert entered.wait(3)
            data, how = read_all(c, timeout=1.0)
            assert how is None and data == b"", "closed without a hook_timeout"
            release.set()
            c.sendall(b"late")
            assert recv_exact(c, 4) == b"late"
    finally:
        release.set()
    st = p.stats()
    assert st["hook_timeouts"] == 0 and st["stale_answers"] == 0, st


def test_hook_timeout_is_checked(engine, echo_server):
    from fastproxy.config import ConfigError
    for bad in (-1, "soon", True):
        with pytest.raises(ConfigError):
            Proxy("127.0.0.1:0", upstream=echo_server.addr, engine=engine, hook_timeout=bad)
    Proxy("127.0.0.1:0", upstream=echo_server.addr, engine=engine, hook_timeout=0)
    Proxy("127.0.0.1:0", upstream=echo_server.addr, engine=engine, hook_timeout="500ms")


SLOW_CONNECT = '''
import time

def on_connect(conn):
    if conn.client_address[0] == "127.0.0.2":
        time.sleep(30)

def on_close(conn, record):
    print("closed %s" % record.reason.name, flush=True)
'''


def test_cli_hook_timeout(cli_proxy, echo_server, tmp_path):
    hooks_file = tmp_path / "slow_hooks.py"
    hooks_file.write_text(SLOW_CONNECT)
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--hooks", str(hooks_file), "--hook-timeout", "300ms")
    with connect_from(proxy.address, "127.0.0.2") as c:
        data, how = read_all(c, timeout=CLOSE_BOUND_S)
        assert how is not None and data == b"", "not closed past --hook-timeout"
    assert proxy.stdout.wait_line(r"^closed HOOK_TIMEOUT$", 3), proxy.stdout.text()
    assert echo_roundtrip(proxy.address, b"next") == b"next"


def test_cli_bad_hook_timeout_one_line_exit_2(engine):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
                            "--engine", engine, "--hook-timeout", "soon"], timeout=15)
    assert_one_line_error(rc, out, err, "--hook-timeout")
