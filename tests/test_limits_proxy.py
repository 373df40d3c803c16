"""Connection limits end to end: global, per-upstream and per-IP limits under
concurrency, and the wait queue (arrival order, timeout, hang-ups, full) vs
on_limit="reject", through real proxies on loopback, both engines."""
import socket
import time
from collections import Counter

from support.balance import all_at_once, ustats
from support.servers import Gauge, Servers, open_tagged
from support.sockets import closed_by_peer, connect, read_line, readable
from support.waits import wait_for

HOLD = 0.05


def visit(addr, source=None, hold=HOLD):
    """A client that gets an upstream, holds the bridge a moment, leaves cleanly."""
    s, name = open_tagged(addr, source, timeout=10)
    with s:
        time.sleep(hold)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(64) == b""
    return name


def test_global_limit_is_exact_under_concurrency(make_proxy):
    limit = 8
    gauge = Gauge()
    with Servers(2, gauge=gauge) as srv:
        p = make_proxy(upstreams=[s.addr for s in srv], max_connections=limit, workers=2)
        got = all_at_once(visit, [(p.address,)] * (4 * limit))
        assert all(name in ("A", "B") for name in got), got  # every client served
        st = p.stats()
        assert st["peak_active"] == limit, st       # reached, never exceeded
        assert gauge.peak <= limit, gauge.peak      # as the upstreams saw it
        assert st["rejected"] == 0 and st["queue_timeouts"] == 0


def test_per_upstream_limit_is_exact_under_concurrency(make_proxy):
    with Servers(2) as srv:
        p = make_proxy(upstreams=[srv["A"].addr + ",max-connections=2",
                                  srv["B"].addr + ",max-connections=3"], workers=2)
        got = all_at_once(visit, [(p.address,)] * 20)
        assert all(name in ("A", "B") for name in got), got  # every client served
        assert ustats(p, srv["A"])["peak_active"] == 2
        assert ustats(p, srv["B"])["peak_active"] == 3
        assert (srv["A"].gauge.peak, srv["B"].gauge.peak) == (2, 3)
        assert p.stats()["rejected"] == 0


def test_per_ip_limit_with_two_source_addresses(make_proxy):
    with Servers(1) as srv:
        p = make_proxy(upstreams=[srv["A"].addr], max_connections_per_ip=2, workers=2)
        sources = ["127.0.0.2"] * 5 + ["127.0.0.3"] * 5
        got = all_at_once(open_tagged, [(p.address, src, 3) for src in sources])
        held = [(src, r[0]) for src, r in zip(sources, got) if isinstance(r, tuple)]
        refused = [r for r in got if not isinstance(r, tuple)]
        assert Counter(src for src, _ in held) == {"127.0.0.2": 2, "127.0.0.3": 2}, got
        assert all(isinstance(e, (EOFError, ConnectionError)) for e in refused), refused
        assert p.stats()["rejected"] == 6 and srv["A"].accepted == 4
        # 127.0.0.2 gives one back: it may have one more.
        next(s for src, s in held if src == "127.0.0.2").close()
        assert wait_for(lambda: p.stats()["active"] == 3, 3), p.stats()
        s, _ = open_tagged(p.address, "127.0.0.2")
        held.append(("127.0.0.2", s))
        for _, s in held:
            s.close()


def queue_up(p, count, start=0):
    """`count` clients that wait in line, in this order."""
    waiting = []
    for k in range(count):
        c = connect(p.address)
        waiting.append(c)
        assert wait_for(lambda: p.stats()["queued"] == start + k + 1, 3, 0.001), p.stats()
    return waiting


ROUNDS = 16


def test_queue_serves_in_arrival_order_and_drops_hangups(make_proxy):
    # Two workers: waiters accepted by either are served in one line. A few
    # rounds, since an overtaking waiter is a race.
    with Servers(1) as srv:
        p = make_proxy(upstreams=[srv["A"].addr], max_connections=1, workers=2)
        for rnd in range(ROUNDS):
            first, _ = open_tagged(p.address)
            waiting = queue_up(p, 6)
            waiting.pop(2).close()  # hangs up while waiting: dropped from the line
            assert wait_for(lambda: p.stats()["queued"] == 5, 3), p.stats()
            current, step = first, 0
            while waiting:
                current.close()
                current = waiting.pop(0)
                step += 1
                assert wait_for(lambda: readable(current) or any(map(readable, waiting)), 3, 0.001)
                overtook = [k + 1 for k, c in enumerate(waiting) if readable(c)]
                assert not overtook, "round %d: waiter %d served before waiter %d" % (
                    rnd, step + overtook[0], step)
                assert read_line(current) == "A"
                assert p.stats()["active"] == 1
            current.close()
            assert wait_for(lambda: p.stats()["active"] == 0, 3, 0.001), p.stats()
        st = p.stats()
        assert srv["A"].accepted == ROUNDS * 6 and st["peak_active"] == 1 and st["queue_timeouts"] == 0


def test_queue_timeout_closes_the_waiter(make_proxy):
    with Servers(1) as srv:
        p = make_proxy(upstreams=[srv["A"].addr], max_connections=1, queue_timeout=0.3)
        held, _ = open_tagged(p.address)
        (late,) = queue_up(p, 1)
        t0 = time.monotonic()
        assert closed_by_peer(late, 3) in ("eof", "reset")
        assert 0.25 <= time.monotonic() - t0 < 2
        st = p.stats()
        assert (st["queue_timeouts"], st["queued"], srv["A"].accepted) == (1, 0, 1), st
        held.sendall(b"still here")  # the bridge holding the slot is untouched
        assert held.recv(64) == b"still here"
        held.close()
        late.close()


def test_queue_full_rejects_at_once(make_proxy):
    with Servers(1) as srv:
        p = make_proxy(upstreams=[srv["A"].addr], max_connections=1, queue_size=2)
        held, _ = open_tagged(p.address)
        waiting = queue_up(p, 2)
        with connect(p.address) as extra:
            assert closed_by_peer(extra, 1.0) in ("eof", "reset")
        st = p.stats()
        assert (st["rejected"], st["queued"]) == (1, 2), st
        assert not any(readable(c) for c in waiting)
        held.close()
        assert read_line(waiting[0]) == "A"
        waiting[0].close()
        assert read_line(waiting[1]) == "A"
        waiting[1].close()


def test_on_limit_reject_closes_at_once(make_proxy):
    with Servers(1) as srv:
        p = make_proxy(upstreams=[srv["A"].addr], max_connections=1, on_limit="reject")
        held, _ = open_tagged(p.address)
        for _ in range(3):
            with connect(p.address) as c:
                c.sendall(b"hello")
                t0 = time.monotonic()
                assert closed_by_peer(c, 1.0) in ("eof", "reset")
                assert time.monotonic() - t0 < 0.5
        st = p.stats()
        assert (st["rejected"], st["queued"], st["peak_active"]) == (3, 0, 1), st
        assert srv["A"].accepted == 1
        held.close()
        assert wait_for(lambda: p.stats()["active"] == 0, 3)
        s, name = open_tagged(p.address)  # a free slot serves again
        s.close()


def test_half_closed_waiter_keeps_its_place_and_silent_one_is_dropped(make_proxy, echo_server):
    """TCP cannot tell a close from a half-close: a waiter that sent a request
    and then shutdown(SHUT_WR) is still served; one that sent nothing and hung
    up has given up and leaves the queue."""
    import socket
    import time
    from support.sockets import connect, recv_exact, recv_until_eof
    from support.waits import wait_for

    p = make_proxy(echo_server.addr, max_connections=1, workers=1)
    holder = connect(p.address)
    holder.sendall(b"h")
    assert recv_exact(holder, 1) == b"h"
    asking = connect(p.address)
    asking.sendall(b"request")
    asking.shutdown(socket.SHUT_WR)
    silent = connect(p.address)
    assert wait_for(lambda: p.stats()["queued"] == 2, 3), p.stats()
    silent.close()
    assert wait_for(lambda: p.stats()["queued"] == 1, 3), "a silent waiter that hung up stayed queued"
    time.sleep(0.3)
    assert p.stats()["queued"] == 1, "the half-closed waiter was dropped"
    holder.close()
    assert recv_until_eof(asking) == b"request"
    asking.close()
