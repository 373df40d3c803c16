"""File descriptors: nothing leaks over many connections; EMFILE is survived."""
import selectors
import threading
import time

import pytest

from support.procfs import (TCP_CLOSE_WAIT, proc_fds, proc_nofile_limits, proc_socket_inodes,
                            tcp_sockets)
from support.sockets import connect, echo_roundtrip, open_many, recv_exact, set_linger0
from support.waits import wait_for

CONCURRENCY = 4


def _short_connection(addr, i):
    """One short connection; i selects its shape (clean echo, connect-and-close, reset)."""
    kind = i % 4
    if kind in (0, 1):
        msg = b"short %d" % i
        assert echo_roundtrip(addr, msg) == msg
    elif kind == 2:
        connect(addr).close()
    else:
        s = connect(addr)
        s.sendall(b"reset me %d" % i)
        set_linger0(s)
        s.close()


def _hammer(addr, n, concurrency=CONCURRENCY):
    errors = []

    def run(start):
        try:
            for i in range(start, n, concurrency):
                _short_connection(addr, i)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "clients still running after 120 s"
    assert not errors, errors[:5]


def _split_fds(pid):
    fds = proc_fds(pid)
    sockets = sum(1 for t in fds.values() if t.startswith("socket:"))
    return sockets, len(fds) - sockets


def _close_wait(pid, proxy_port, upstream_port):
    inodes = proc_socket_inodes(pid)
    return [r for r in tcp_sockets()
            if r["state"] == TCP_CLOSE_WAIT and (r["inode"] in inodes
                                                 or r["local_port"] == proxy_port
                                                 or r["remote_port"] == upstream_port)]


@pytest.mark.slow
@pytest.mark.linux_only
def test_no_fd_leak_after_10000_short_connections(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr)
    addr = proxy.connect_addr()
    _hammer(addr, 200)  # warm up lazily created state
    time.sleep(0.5)
    sock0, other0 = _split_fds(proxy.pid)

    accepted0 = echo_server.accepted
    _hammer(addr, 10000)
    # The clean-echo half all went through the proxy to the upstream.
    assert echo_server.accepted - accepted0 >= 5000

    # Idle proxy: exactly the sockets it had before; pipes may stay pooled, a few.
    slack = 4 * (CONCURRENCY + 2) + 8
    settled = wait_for(lambda: _split_fds(proxy.pid)[0] == sock0
                       and _split_fds(proxy.pid)[1] <= other0 + slack, 15)
    sock1, other1 = _split_fds(proxy.pid)
    assert settled, ("fds leaked: sockets %d -> %d, other fds %d -> %d (slack %d)"
                     % (sock0, sock1, other0, other1, slack))
    assert not _close_wait(proxy.pid, addr[1], echo_server.port), "proxy sockets left in CLOSE_WAIT"
    assert proxy.alive()
    assert echo_roundtrip(addr, b"still fine") == b"still fine"


@pytest.mark.slow
@pytest.mark.linux_only
def test_emfile_survived_and_recovered(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      rlimit_nofile=64)
    addr = proxy.connect_addr()
    assert echo_roundtrip(addr, b"before") == b"before"
    base_fds = proxy.fd_count()

    clients = open_many(addr, 100, timeout=10)
    try:
        assert len(clients) >= 90, "kernel refused clients? only %d connected" % len(clients)
        want = {}
        sel = selectors.DefaultSelector()
        for i, c in enumerate(clients):
            want[c] = b"client %03d\n" % i
            try:
                c.sendall(want[c])
            except OSError:
                continue  # already closed by the proxy: allowed
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
        got = {c: b"" for c in clients}
        served, dropped = set(), set()
        t0 = time.monotonic()
        cpu0 = None
        while time.monotonic() - t0 < 4.0:
            if cpu0 is None and time.monotonic() - t0 >= 1.0:
                cpu0 = proxy.cpu()
            for key, _ in sel.select(0.1):
                c = key.fileobj
                try:
                    data = c.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    dropped.add(c)
                    sel.unregister(c)
                    continue
                got[c] += data
                if got[c] == want[c]:
                    served.add(c)
                    sel.unregister(c)
        cpu = proxy.cpu() - cpu0
        sel.close()
        assert proxy.alive(), "proxy died at the fd limit:\n" + proxy.stderr.text()
        # 3 s at the fd limit: a proxy spinning on EMFILE burns ~1 s of CPU per second.
        assert cpu < 0.6, "proxy used %.2f s CPU in 3 s at the fd limit (spinning?)" % cpu
        assert served, "no client was served at the fd limit"
        assert all(got[c] == want[c] for c in served)
        assert len(served) < len(clients), "all 100 served with 64 fds? the limit did not apply"
    finally:
        for c in clients:
            c.close()

    # The fds come back and new clients are served, byte-exact.
    assert wait_for(lambda: proxy.fd_count() <= base_fds + 16, 15), \
        "proxy fds did not return: %d (was %d)" % (proxy.fd_count(), base_fds)
    for i in range(20):
        msg = b"after %d" % i
        assert echo_roundtrip(addr, msg, timeout=5) == msg
    assert proxy.alive()
    assert "Traceback" not in proxy.stderr.text()


@pytest.mark.linux_only
def test_no_fd_leak_on_failed_upstream_connects(cli_proxy):
    from support.sockets import how_closed, reserve_refusing_port
    hole = reserve_refusing_port()
    try:
        proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream",
                          "127.0.0.1:%d" % hole.getsockname()[1])
        addr = proxy.connect_addr()
        assert how_closed(addr) == "reset"
        sock0, other0 = _split_fds(proxy.pid)
        for _ in range(500):
            assert how_closed(addr, send=b"x") == "reset"
        assert wait_for(lambda: _split_fds(proxy.pid) == (sock0, other0), 10), \
            "fds after 500 refused upstream connects: %r, before %r" % (_split_fds(proxy.pid),
                                                                       (sock0, other0))
        assert not _close_wait(proxy.pid, addr[1], hole.getsockname()[1])
    finally:
        hole.close()


@pytest.mark.linux_only
def test_startup_raises_soft_fd_limit_to_hard(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      rlimit_nofile=(100, 4096))
    assert proc_nofile_limits(proxy.pid) == (4096, 4096)
    assert "4096" in proxy.ready_line or "budget" in proxy.ready_line.lower(), proxy.ready_line


@pytest.mark.linux_only
def test_idle_bridges_hold_no_pipes(cli_proxy, echo_server):
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr)
    addr = proxy.connect_addr()

    def pipes():
        return sum(1 for t in proc_fds(proxy.pid).values() if t.startswith("pipe:"))

    pipes0 = pipes()
    clients = []
    try:
        for i in range(60):
            c = connect(addr)
            clients.append(c)
            msg = b"idle-%02d" % i
            c.sendall(msg)
            assert recv_exact(c, len(msg)) == msg
        time.sleep(0.3)
        # 60 idle bridges; with a pipe pair kept per bridge this would be +240 fds.
        assert pipes() - pipes0 <= 24, "idle bridges hold pipes: %d -> %d" % (pipes0, pipes())
        sockets = sum(1 for t in proc_fds(proxy.pid).values() if t.startswith("socket:"))
        assert sockets >= 120  # the bridges are really there
    finally:
        for c in clients:
            c.close()


def test_more_waiting_clients_than_half_the_fd_limit(cli_proxy, echo_server):
    """40 clients wait in the queue of a proxy limited to 64 fds: the poll loop
    must not hand poll() more entries than RLIMIT_NOFILE (EINVAL killed its
    worker), and every waiter is served once the two slots free up."""
    proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                      "--max-connections", "2", "--workers", "1", rlimit_nofile=64)
    addr = proxy.connect_addr()
    holders = [connect(addr) for _ in range(2)]
    for h in holders:
        h.sendall(b"h")
        assert recv_exact(h, 1) == b"h"
    waiters = [connect(addr) for _ in range(40)]
    for i, c in enumerate(waiters):
        c.sendall(b"w%02d" % i)
    time.sleep(0.5)
    assert proxy.alive()
    for h in holders:
        h.close()
    for i, c in enumerate(waiters):     # one slot each time a waiter leaves
        assert recv_exact(c, 3) == b"w%02d" % i
        c.close()
    assert echo_roundtrip(addr, b"after") == b"after"
    assert "Traceback" not in proxy.stderr.text()
