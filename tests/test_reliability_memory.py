"""What clients that never read can make the kernel and the proxy hold.

Each client connects, sends nothing, reads nothing, and keeps a small
receive buffer (4 KiB asked); the upstream (FloodServer, also with a small
send buffer) sends to every connection as fast as it is taken. Once the
flood stops moving, what is left is held by the proxy's sockets (the
client side's send queue, the upstream side's receive queue), its pipes or
copy buffers. /proc/net/sockstat's TCP `mem` counts every TCP socket of the
host, so the bounds leave room for other processes' traffic.

Measured on a 2-CPU VM (tcp_wmem max 4 MiB, tcp_rmem max 32 MiB), per
client: with the defaults (socket_buffer=0, as for a client that is not on
loopback) about 2.2-3.0 MiB on epoll, and on poll 5.1 MiB
before it had notsent_lowat (a whole autotuned 4 MiB send buffer), about
2.0 MiB after; with socket_buffer=64k about 282 KiB on either engine. The
proxy's RSS grows by 64 KiB per stalled bridge that copies (the poll
engine; epoll too when the socket buffers are too small for a read to fill
its copy buffer and turn it to splice)."""
import socket
import time

import pytest

from fastproxy import _core

from support.hostile import FloodServer, tcp_mem_pages
from support.waits import stop_bounded

KiB = 1024
MiB = 1024 * KiB
PAGE = 4096
SETTLE_S = 30.0

# sockstat's TCP memory is the whole host's: other tests' traffic would
# count against these bounds.
pytestmark = pytest.mark.serial


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _never_reading_clients(addr, n):
    clients = []
    for _ in range(n):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
        c.settimeout(5.0)
        c.connect(addr)
        clients.append(c)
    return clients


def _settle(flood, n):
    """Until every client's bridge took its fill: the flood stops moving."""
    deadline = time.monotonic() + SETTLE_S
    last = -1
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if flood.accepted == n and flood.sent == last:
            return
        last = flood.sent
    raise AssertionError("the flood was still moving after %.0fs (%d of %d accepted, %d bytes)"
                         % (SETTLE_S, flood.accepted, n, flood.sent))


def _pinned(make_proxy, n, **options):
    """Kernel TCP memory (bytes) n never-reading clients pinned, and the bytes the flood got in."""
    with FloodServer() as flood:
        p = make_proxy(flood.addr, workers=2, **options)
        before = tcp_mem_pages()
        clients = _never_reading_clients(p.address, n)
        try:
            _settle(flood, n)
            pinned = (tcp_mem_pages() - before) * PAGE
            assert p.stats()["active"] == n
            return pinned, flood.sent
        finally:
            for c in clients:
                c.close()
            stop_bounded(p, timeout=0.5)


@pytest.mark.slow
@pytest.mark.linux_only
def test_500_never_reading_clients_with_socket_buffer(make_proxy):
    """socket_buffer=64k: at most about 2 x 64 KiB queued each way per
    socket; measured about 282 KiB per client on either engine, bound
    512 KiB (without the option: 2-3 MiB, 5 MiB on poll before this bound)."""
    n = 500
    pinned, sent = _pinned(make_proxy, n, socket_buffer="64k")
    assert sent >= n * 64 * KiB, "the clients' bridges did not fill: %d bytes" % sent
    assert pinned < n * 512 * KiB, "%d never-reading clients pinned %.0f KiB each" % (n, pinned / n / KiB)


@pytest.mark.slow
@pytest.mark.linux_only
@pytest.mark.skipif(not _core.HAVE_NOTSENT_LOWAT, reason="this build has no TCP_NOTSENT_LOWAT (the portable "
                    "build): its defaults do not bound unsent bytes; socket_buffer does")
def test_never_reading_clients_with_defaults_are_bounded_on_both_engines(make_proxy):
    """The default notsent_lowat (1 MiB, both engines) keeps what a
    never-reading client pins to the socket's unsent bytes, not its whole
    autotuned send buffer: poll took 5.1 MiB per client without it. 100
    clients, not 500: with the defaults 500 of them push this host to
    tcp_mem's pressure threshold (about 1.5 GB), which every other TCP
    socket on it would feel. socket_buffer=0: the defaults for a client
    that is not on loopback (here every peer is, and "auto" would bound
    the buffers instead)."""
    n = 100
    pinned, _ = _pinned(make_proxy, n, socket_buffer=0)
    assert pinned < n * 4 * MiB, "%d never-reading clients pinned %.0f KiB each" % (n, pinned / n / KiB)


@pytest.mark.slow
@pytest.mark.linux_only
def test_1000_never_reading_clients_proxy_memory(cli_proxy):
    """The proxy process's own memory (RSS) with 1,000 stalled bridges: at
    most a 64 KiB copy buffer each (measured +64 MiB on poll and on epoll
    with these small buffers); bound 96 KiB per bridge."""
    n = 1000
    with FloodServer() as flood:
        cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", flood.addr,
                       "--workers", "2", "--socket-buffer", "64k", "--max-connections", str(2 * n))
        time.sleep(0.3)
        rss0 = _rss_kib(cp.pid)
        before = tcp_mem_pages()
        clients = _never_reading_clients(cp.connect_addr(), n)
        try:
            _settle(flood, n)
            grown = (_rss_kib(cp.pid) - rss0) * KiB
            pinned = (tcp_mem_pages() - before) * PAGE
            assert cp.alive()
        finally:
            for c in clients:
                c.close()
    print("1000 never-reading clients: proxy RSS +%.0f KiB/bridge, kernel TCP +%.0f KiB/bridge"
          % (grown / n / KiB, pinned / n / KiB))
    assert grown < n * 96 * KiB, "RSS grew %.0f KiB per stalled bridge" % (grown / n / KiB)
    assert pinned < n * 512 * KiB, "kernel TCP memory %.0f KiB per stalled bridge" % (pinned / n / KiB)
