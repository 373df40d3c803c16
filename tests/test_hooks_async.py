"""Under `await proxy.serve()`, async on_connect / on_close run on the event loop."""
import asyncio
import contextlib
import socket
import threading

import pytest

from fastproxy import CloseReason, Proxy
from support.sockets import closed_by_peer, connect, connect_from, echo_roundtrip, read_all
from support.waits import stop_bounded, wait_for


async def _started(proxy, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return proxy.address
        except RuntimeError:
            if loop.time() > deadline:
                raise AssertionError("serve() did not start the proxy")
            await asyncio.sleep(0.01)


def _refused_from(addr, src):
    with connect_from(addr, src) as c:
        return closed_by_peer(c, 3)


def test_serve_awaits_async_hooks_on_its_loop(engine, echo_server):
    result = {}

    async def main():
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        closed = asyncio.Queue()
        where = []

        async def on_connect(conn):
            await asyncio.sleep(0.02)  # e.g. ask an auth service
            where.append((threading.get_ident(), asyncio.get_running_loop()))
            return conn.client_address[0] != "127.0.0.3"

        async def on_close(conn, record):
            where.append((threading.get_ident(), asyncio.get_running_loop()))
            await closed.put(record)

        p = Proxy("127.0.0.1:0", echo_server.addr, engine=engine,
                  on_connect=on_connect, on_close=on_close)
        task = asyncio.create_task(p.serve())
        try:
            addr = await _started(p)
            assert await asyncio.to_thread(echo_roundtrip, addr, b"async") == b"async"
            r1 = await asyncio.wait_for(closed.get(), 3)
            how = await asyncio.to_thread(_refused_from, addr, "127.0.0.3")
            assert how is not None, "async on_connect returning False did not refuse"
            r2 = await asyncio.wait_for(closed.get(), 3)
            result["records"] = (r1, r2)
            result["where"] = list(where)
            result["loop"] = (loop_thread, loop)
            # A live bridge when serve() is cancelled: serve() drains then stops.
            live = await asyncio.to_thread(connect, addr)
            await asyncio.to_thread(live.sendall, b"x")
            assert await asyncio.to_thread(live.recv, 1) == b"x"
            live.shutdown(socket.SHUT_WR)
            task.cancel()
            # The drain lets the live bridge finish: the echo server closes after our FIN.
            data, how = await asyncio.to_thread(read_all, live, 5)
            assert how == "eof"
            live.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
            result["final"] = p.stats()
        finally:
            if not task.done():
                task.cancel()
            await asyncio.to_thread(stop_bounded, p, 2.0, 20.0)

    asyncio.run(asyncio.wait_for(main(), 30))
    r1, r2 = result["records"]
    assert r1.reason in (CloseReason.CLIENT_CLOSED, CloseReason.UPSTREAM_CLOSED)
    assert r1.bytes_upstream == 5
    assert r2.reason == CloseReason.REFUSED
    thread, loop = result["loop"]
    assert len(result["where"]) >= 4
    for t, lp in result["where"]:
        assert t == thread and lp is loop, "async hook ran off the serve() loop"
    assert result["final"]["accepted"] == 3


def test_serve_with_sync_hooks_and_cancel_stops(engine, echo_server):
    async def main():
        seen = []
        p = Proxy("127.0.0.1:0", echo_server.addr, engine=engine,
                  on_connect=lambda conn: seen.append(conn.id))
        task = asyncio.create_task(p.serve())
        try:
            addr = await _started(p)
            assert await asyncio.to_thread(echo_roundtrip, addr, b"sync") == b"sync"
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
            assert len(seen) == 1

            def refused():
                try:
                    with connect(addr, timeout=2) as c:
                        return closed_by_peer(c, 2) is not None
                except OSError:
                    return True

            assert await asyncio.to_thread(refused), "still serving after serve() was cancelled"
        finally:
            if not task.done():
                task.cancel()
            await asyncio.to_thread(stop_bounded, p, 2.0, 20.0)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_async_with_starts_without_blocking_the_loop(any_engine, echo_server, monkeypatch):
    """`async with Proxy(...)`: the start (here a slow name resolution) runs
    off the loop, `.address` is valid once it returns, async hooks run on
    the loop, and leaving the block stops the proxy."""
    import fastproxy.discovery as proxy_module

    real_resolve = proxy_module.resolve_upstream

    def slow_resolve(*args, **kwargs):
        threading.Event().wait(0.3)
        return real_resolve(*args, **kwargs)

    monkeypatch.setattr(proxy_module, "resolve_upstream", slow_resolve)
    result = {}

    async def main():
        ticks = 0
        stop_ticking = asyncio.Event()

        async def heartbeat():
            nonlocal ticks
            while not stop_ticking.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        seen_on = []

        async def on_connect(conn):
            seen_on.append(asyncio.get_running_loop())

        beat = asyncio.create_task(heartbeat())
        async with Proxy("127.0.0.1:0", echo_server.addr, engine=any_engine, on_connect=on_connect) as p:
            result["ticks_during_start"] = ticks
            addr = p.address
            assert await asyncio.to_thread(echo_roundtrip, addr, b"embedded") == b"embedded"
            result["hook_loop_is_ours"] = seen_on == [asyncio.get_running_loop()]
        result["stats"] = p.stats()
        stop_ticking.set()
        await beat
        result["refused_after"] = await asyncio.to_thread(_connect_refused, addr)

    asyncio.run(main())
    # 0.3 s of resolving: a blocked loop would not have ticked at all.
    assert result["ticks_during_start"] >= 10, result
    assert result["hook_loop_is_ours"]
    assert result["stats"]["accepted"] == 1 and result["stats"]["active"] == 0
    assert result["refused_after"]


def _connect_refused(addr):
    try:
        socket.create_connection(addr, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_cancel_while_starting_stops_what_started(any_engine, echo_server, monkeypatch):
    """serve() cancelled while start() still runs on its thread (here: a slow
    name resolution) must not leave a proxy serving that nothing stops."""
    import fastproxy.discovery as listener_module

    real_resolve = listener_module.resolve_upstream
    resolving = threading.Event()

    def slow_resolve(*args, **kwargs):
        resolving.set()
        threading.Event().wait(0.5)
        return real_resolve(*args, **kwargs)

    monkeypatch.setattr(listener_module, "resolve_upstream", slow_resolve)
    p = Proxy("127.0.0.1:0", echo_server.addr, engine=any_engine)

    async def main():
        task = asyncio.create_task(p.serve())
        assert await asyncio.to_thread(resolving.wait, 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)

    asyncio.run(asyncio.wait_for(main(), 30))
    # The start finished after the cancel; the stop waited for it.
    assert wait_for(lambda: p._stopped.is_set() and p._plane is None, 10)
    with pytest.raises(OSError):
        with connect(p.address, timeout=1) as c:
            assert closed_by_peer(c, 1) is None
