"""Helpers for the balancing, health and limit tests: which upstream clients
reach, health checks against TagServers, per-upstream stats, clients released
together."""
import socket
import threading

from .servers import which
from .waits import wait_for


def ping_pong(host, port, timeout=1.0):
    """A health check callable: the server must answer PING with PONG."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        f.readline()                    # the server's name
        s.sendall(b"PING\n")
        return f.readline() == b"PONG\n"


def ask_many(addr, count, source=None, settle=None):
    """`count` clients one after the other; with settle=proxy, each one only
    once the proxy closed the bridge before (so it holds none)."""
    names = []
    for _ in range(count):
        if settle is not None:
            assert wait_for(lambda: settle.stats()["active"] == 0, 5, interval=0.0005), \
                settle.stats()
        names.append(which(addr, source))
    return names


def ustats(proxy, server):
    return proxy.stats()["upstreams"][server.addr]


def all_at_once(fn, args_list):
    """Run fn(*args) for every args in args_list, each on its own thread, all
    released together; returns the results in order (an exception is
    returned in place of its result)."""
    results = [None] * len(args_list)
    barrier = threading.Barrier(len(args_list))

    def run(i):
        try:
            barrier.wait(10)
            results[i] = fn(*args_list[i])
        except Exception as e:  # noqa: BLE001 - reported to the caller
            results[i] = e

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(args_list))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not any(t.is_alive() for t in ts), "client threads did not finish"
    return results
