"""Hostile hooks and API use, each with a defined outcome: no crash, no
deadlock, bounded memory, and the proxy serving the next client. What
tests/test_hooks_boundary.py and test_hooks_isolation.py cover already
(hooks that raise BaseExceptions, block, stop() from inside a hook,
hook_timeout) is not repeated: here, answers of the wrong type, huge
replacements, hooks calling back into the proxy (stats, bridges,
close_bridge of their own bridge, upstream control, reload), and many
threads reading stats while traffic flows."""
import socket
import threading
import time

import pytest

from fastproxy import CloseReason, Proxy
from support.hooks import Recorder
from support.sockets import MiB, connect, echo_roundtrip, read_all, recv_exact
from support.traffic import StreamLoad, VerifyingServer
from support.waits import stop_bounded, wait_for

WRONG = [42, 1.5, True, b"127.0.0.1:1", ["127.0.0.1:1"], {"a": 1}, object()]


def _first_then(first, then=None):
    """A hook answering `first` on its first call and `then` afterwards."""
    calls = []

    def hook(*args):
        calls.append(args)
        return first if len(calls) == 1 else then
    return hook


@pytest.mark.parametrize("answer", WRONG[:1] + WRONG[3:], ids=lambda a: type(a).__name__)
def test_on_connect_answering_a_wrong_type_refuses_that_client_only(make_proxy, echo_server, answer):
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=_first_then(answer), on_close=rec)
    with connect(p.address) as c:
        c.sendall(b"hello")
        data, how = read_all(c, timeout=3)
    assert data == b"" and how in ("eof", "reset"), (data, how)
    assert rec.one().reason == CloseReason.HOOK_ERROR
    assert echo_roundtrip(p.address, b"next") == b"next"
    assert p.stats()["hook_errors"] == 1


@pytest.mark.parametrize("answer", WRONG[:3] + ["text", [b"x"]], ids=lambda a: type(a).__name__)
def test_on_data_answering_a_wrong_type_closes_that_bridge_only(make_proxy, echo_server, answer):
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_data=_first_then(answer), on_close=rec)
    with connect(p.address) as c:
        c.sendall(b"hello")
        data, how = read_all(c, timeout=3)
    assert data == b"", data
    assert rec.one().reason == CloseReason.HOOK_ERROR
    assert echo_roundtrip(p.address, b"next") == b"next"
    assert p.stats()["hook_errors"] == 1


def test_a_huge_replacement_arrives_whole_and_is_let_go(make_proxy, echo_server):
    """A 4-byte answer replaced by 32 MiB: the client reads all of it, in
    order (backpressure holds the rest in the proxy, not a copy per
    chunk), and the bridge ends normally."""
    size = 32 * MiB
    big = bytes(range(256)) * (size // 256)

    def inflate(conn, direction, data):
        return big if direction.name == "DOWNSTREAM" else None

    rec = Recorder()
    p = make_proxy(echo_server.addr, on_data=inflate, on_close=rec)
    with connect(p.address) as c:
        c.sendall(b"ping")
        got = recv_exact(c, size)
        assert got == big
        c.shutdown(socket.SHUT_WR)
        rest, how = read_all(c, timeout=5)
    assert (rest, how) == (b"", "eof")
    record = rec.one()
    assert record.bytes_downstream == size, record
    assert p.stats()["hook_errors"] == 0


def test_hooks_that_call_back_into_the_proxy(make_proxy, echo_server):
    """on_connect reads stats(), bridges() and upstreams() and drains and
    readies an upstream; on_data closes its own bridge with close_bridge():
    that bridge ends ADMIN_CLOSED once its call is answered, others go on."""
    box = {"seen": []}

    def on_connect(conn):
        p = box["proxy"]
        st = p.stats()
        listed = [b["id"] for b in p.bridges()]
        control = p.upstream(echo_server.addr)
        control.drain()
        control.ready()
        box["seen"].append((st["accepted"], conn.id in listed, sorted(p.upstreams())))
        return None

    def on_data(conn, direction, data):
        if data.startswith(b"close me"):
            t0 = time.monotonic()
            box["closed"] = box["proxy"].close_bridge(conn.id)
            box["close_took"] = time.monotonic() - t0
        return None

    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=on_connect, on_data=on_data, on_close=rec)
    box["proxy"] = p
    assert echo_roundtrip(p.address, b"first") == b"first"
    with connect(p.address) as c:
        c.sendall(b"close me")
        data, how = read_all(c, timeout=5)
    assert how == "eof", (data, how)
    # The worker closes the bridge before close_bridge() hears it did.
    assert wait_for(lambda: "closed" in box, 5)
    assert box["closed"] is True and box["close_took"] < 2, box
    reasons = sorted(r.reason.name for r in rec.wait(2))
    assert reasons == ["ADMIN_CLOSED", "CLIENT_CLOSED"], reasons
    assert len(box["seen"]) == 2 and all(seen[1] for seen in box["seen"]), box["seen"]
    assert echo_roundtrip(p.address, b"after") == b"after"
    assert wait_for(lambda: p.stats()["active"] == 0, 5), p.stats()
    assert p.stats()["hook_errors"] == 0


@pytest.mark.parametrize("hook", ["on_connect", "on_data", "on_close"])
def test_reload_from_inside_a_hook(engine, echo_server, hook):
    """reload() from a hook thread (or the close-record thread) replaces
    the listener's block (its limit changes) while that very client waits
    for the hook's answer: the reload returns, the client is served by the
    block that accepted it, and the next client by the new one."""
    box = {"took": []}

    def reloader(*args):
        t0 = time.monotonic()
        p = box["proxy"]
        n = len(box["took"])
        p.reload([p.config.__class__.build(listen="%s:%d" % p.address, upstreams=[echo_server.addr],
                                           engine=engine, workers=2, max_connections=100 + n)])
        box["took"].append(time.monotonic() - t0)
        return None

    p = Proxy("127.0.0.1:0", upstream=echo_server.addr, engine=engine, workers=2, **{hook: reloader})
    box["proxy"] = p
    p.start()
    try:
        for payload in (b"one", b"two"):
            assert echo_roundtrip(p.address, payload) == payload
        # on_data is called once per direction: at least one reload per client.
        assert wait_for(lambda: len(box["took"]) >= 2, 5), box
        assert max(box["took"]) < 5, box
        assert p.stats()["hook_errors"] == 0
    finally:
        stop_bounded(p, limit=20)


@pytest.mark.slow
def test_many_threads_reading_stats_while_traffic_flows(make_proxy):
    """8 threads call stats(), bridges() and upstreams() as fast as they can
    while 100 bridges stream: every call answers, nothing is lost."""
    with VerifyingServer() as srv:
        p = make_proxy(srv.addr, workers=2)
        stop = threading.Event()
        calls, errors = [0] * 8, []

        def reader(i):
            while not stop.is_set():
                try:
                    st = p.stats()
                    assert st["active"] >= 0
                    p.bridges(50)
                    p.upstreams()
                    calls[i] += 1
                except BaseException as e:  # noqa: B902 - reported below
                    errors.append(e)
                    return

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        try:
            with StreamLoad(p.address, n=100, server=srv, seed=37) as load:
                result = load.wait(90)
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads)
        assert min(calls) > 10, calls
        result.assert_all_ok()
        wait_for(lambda: not srv.bad() and not srv.active, 10)
        srv.assert_all_ok()
