"""Swapping the upstream group while workers serve (DataPlane.swap_group), and
the counters of hook-chosen routes. Real sockets on loopback, both engines."""
import gc
import os
import socket
import threading
import time

from fastproxy import Proxy, Upstream
from fastproxy._core import UpstreamGroup, live_group_blocks
from fastproxy.sockets import resolve_upstream

from support.servers import Servers, open_tagged, which
from support.sockets import read_line, recv_exact, recv_until_eof
from support.waits import stop_bounded, wait_for, wait_idle


def group_of(*upstreams, **kw):
    """A group for an engine: Upstreams (or TagServers), resolved."""
    ups = [u if isinstance(u, Upstream) else Upstream(u.addr) for u in upstreams]
    return UpstreamGroup(ups, [resolve_upstream((u.host, u.port)) for u in ups], **kw)


def echo_through(sock, size):
    """`size` random bytes up and their echo back down, compared."""
    data = os.urandom(size)
    t = threading.Thread(target=sock.sendall, args=(data,))
    t.start()
    got = recv_exact(sock, size)
    t.join(10)
    assert got == data
    return size


def leave(sock):
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    sock.close()


def listener_totals(p):
    st = p.stats()
    return st["accepted"], st["bytes_upstream"], st["bytes_downstream"]


def test_swap_live_bridge_keeps_its_group_until_it_ends(engine):
    gc.collect()
    blocks = live_group_blocks()
    with Servers(names=["S1", "S2", "S3"]) as srv:
        p = Proxy(listen="127.0.0.1:0", engine=engine, upstream=srv["S1"].addr, workers=2).start()
        try:
            eng = p._listeners[0].handle
            a = eng.group
            c1, name = open_tagged(p.address)
            assert name == "S1"
            sent = echo_through(c1, 300_000)
            assert a.live_bridges == 1 and a.refs == 3   # a's object, the engine, the bridge
            assert live_group_blocks() == blocks + 1

            b = group_of(srv["S2"])
            eng.swap_group(b)
            assert eng.group is b and a.refs == 2 and b.refs == 2
            assert [which(p.address) for _ in range(6)] == ["S2"] * 6
            assert set(p.stats()["upstreams"]) == {srv["S2"].addr}
            # The bridge through S1 goes on, on its own group.
            sent += echo_through(c1, 500_000)
            assert a.live_bridges == 1
            before = listener_totals(p)
            leave(c1)
            assert wait_for(lambda: a.live_bridges == 0, 5)
            assert a.refs == 1                       # only the object here: still readable
            s1 = a.state(0)
            assert (s1["accepted"], s1["active"]) == (1, 0)
            assert s1["bytes_upstream"] == sent
            assert s1["bytes_downstream"] == sent + len("S1\n")
            after = listener_totals(p)
            assert all(x >= y for x, y in zip(after, before))
            assert after[0] == 7 and after[1] >= sent
            assert p.stats()["upstreams"][srv["S2"].addr]["accepted"] == 6

            # Nobody but its last bridge holds B: B goes when that bridge ends.
            c2, name = open_tagged(p.address)
            assert name == "S2"
            eng.swap_group(group_of(srv["S3"]))
            del b
            gc.collect()
            assert live_group_blocks() == blocks + 3   # a (object), B (bridge), the current one
            del a   # (the state watcher lets go of a group within STATE_POLL_S)
            assert wait_for(lambda: gc.collect() is not None and live_group_blocks() == blocks + 2, 5)
            echo_through(c2, 200_000)                 # B's memory is still in use, and alive
            assert which(p.address) == "S3"
            assert live_group_blocks() == blocks + 2
            leave(c2)
            assert wait_for(lambda: live_group_blocks() == blocks + 1, 5), live_group_blocks()
            wait_idle(p)
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)
        del p, eng
        gc.collect()
        assert live_group_blocks() == blocks


def test_swap_under_concurrent_clients(engine):
    gc.collect()
    blocks = live_group_blocks()
    with Servers(names=["S1", "S2"]) as srv:
        p = Proxy(listen="127.0.0.1:0", engine=engine, upstream=srv["S1"].addr, workers=2).start()
        errors, seen, done = [], set(), threading.Event()
        counts = [0] * 4

        def client(k):
            while not done.is_set():
                try:
                    s, name = open_tagged(p.address)
                    seen.add(name)
                    with s:
                        echo_through(s, 1000 + 997 * (counts[k] % 40))
                        s.shutdown(socket.SHUT_WR)
                        assert recv_until_eof(s) == b""
                    counts[k] += 1
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(repr(e))
                    return

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        try:
            for t in threads:
                t.start()
            groups = [(srv["S2"],), (srv["S1"], srv["S2"]), (srv["S1"],), (srv["S2"],),
                      (srv["S1"], srv["S2"]), (srv["S1"],)]
            for members in groups:
                time.sleep(0.25)
                p._listeners[0].handle.swap_group(group_of(*members, balance="leastconn"))
            time.sleep(0.25)
        finally:
            done.set()
            for t in threads:
                t.join(20)
        try:
            assert not errors, errors[:3]
            assert seen == {"S1", "S2"} and min(counts) > 0, (seen, counts)
            wait_idle(p)
            st = p.stats()
            assert st["connect_failures"] == 0 and st["accepted"] == sum(counts)
            gc.collect()
            # Every retired group went with its last bridge.
            assert wait_for(lambda: live_group_blocks() == blocks + 1, 5), live_group_blocks()
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)
        del p
        gc.collect()
        assert live_group_blocks() == blocks


def test_swap_gives_waiting_clients_the_new_group(engine):
    with Servers(names=["S1", "S2"]) as srv:
        p = Proxy(listen="127.0.0.1:0", engine=engine, workers=2,
                  upstreams=[Upstream(srv["S1"].addr, max_connections=1)]).start()
        try:
            c1, name = open_tagged(p.address)
            assert name == "S1"
            c2 = socket.create_connection(p.address, timeout=5)
            assert wait_for(lambda: p.stats()["queued"] == 1, 5), p.stats()
            p._listeners[0].handle.swap_group(group_of(srv["S2"]))
            # Not by c1 freeing its slot: it still holds it.
            assert read_line(c2) == "S2"
            leave(c2)
            leave(c1)
            wait_idle(p)
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)


def test_on_connect_names_an_upstream_of_the_group_current_when_it_answers(engine):
    # The hook answers after a swap that moved S1 to another index: the name,
    # not the index it had in the first group, decides.
    with Servers(names=["S1", "S2"]) as srv:
        p = Proxy(listen="127.0.0.1:0", engine=engine, workers=2, upstream=srv["S1"].addr)
        called, go = threading.Event(), threading.Event()

        @p.on_connect
        def route(conn):
            called.set()
            assert go.wait(5)
            return srv["S1"].addr

        p.start()
        try:
            c = socket.create_connection(p.address, timeout=5)
            assert called.wait(5)
            p._listeners[0].handle.swap_group(group_of(srv["S2"], srv["S1"]))
            go.set()
            assert read_line(c) == "S1"
            leave(c)
            wait_idle(p)
            st = p.stats()
            assert st["upstreams"][srv["S1"].addr]["accepted"] == 1
            assert st["routed"]["accepted"] == 0
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)


def test_routed_bridges_have_counters(engine):
    with Servers(names=["S1", "OUT"]) as srv:
        p = Proxy(listen="127.0.0.1:0", engine=engine, workers=2, upstream=srv["S1"].addr)
        p.on_connect(lambda conn: srv["OUT"].addr)
        p.start()
        try:
            c, name = open_tagged(p.address)
            assert name == "OUT"
            assert wait_for(lambda: p.stats()["routed"]["active"] == 1, 5)
            sent = echo_through(c, 100_000)
            leave(c)
            wait_idle(p)
            st = p.stats()
            routed = st["routed"]
            # Run-time control (admin, weight) is an upstream's, not a route's.
            assert set(routed) == set(st["upstreams"][srv["S1"].addr]) - {"admin", "weight"}
            assert (routed["accepted"], routed["active"], routed["peak_active"]) == (1, 0, 1)
            assert routed["bytes_upstream"] == sent
            assert routed["bytes_downstream"] == sent + len("OUT\n")
            assert st["upstreams"][srv["S1"].addr]["accepted"] == 0
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)


def test_on_connect_answer_meets_a_swap_on_its_way_to_the_worker(engine, monkeypatch):
    # The hook thread looked the name up in the old group; the group is
    # swapped before the worker takes the answer. The worker follows the
    # name: to its index in the new group, or, when the new group lacks it,
    # to its addresses as a route (counted in `routed`).
    import fastproxy.dispatch as dispatch

    with Servers(names=["S1", "S2"]) as srv:
        p = Proxy(listen="127.0.0.1:0", engine=engine, workers=2, upstream=srv["S1"].addr)
        p.on_connect(lambda conn: srv["S1"].addr)
        next_groups = [group_of(srv["S2"], srv["S1"]), group_of(srv["S2"])]
        looked_up = dispatch.route_target

        def then_swap(result, names, *a):
            answer = looked_up(result, names, *a)
            p._listeners[0].handle.swap_group(next_groups.pop(0))
            return answer

        monkeypatch.setattr(dispatch, "route_target", then_swap)
        p.start()
        try:
            for expect_routed in (0, 1):
                c, name = open_tagged(p.address)
                assert name == "S1"
                leave(c)
                wait_idle(p)
                assert p.stats()["routed"]["accepted"] == expect_routed
            assert not next_groups
            assert p.stats()["upstreams"][srv["S2"].addr]["accepted"] == 0
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)
