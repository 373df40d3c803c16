"""A slow reader throttles the writer; the stalled proxy does not spin."""
import hashlib
import random
import socket
import threading
import time

import pytest

from fastproxy import _core
from support.servers import Listener
from support.sockets import MiB, recv_exact

TOTAL = 96 * MiB
STALL_S = 3.0


class _Writer(threading.Thread):
    """Upstream server side: sends TOTAL bytes as fast as the socket takes them."""

    def __init__(self, conn, data):
        super().__init__(daemon=True)
        self.conn, self.data = conn, data
        self.sent = 0
        self.error = None

    def run(self):
        view = memoryview(self.data)
        try:
            while self.sent < len(self.data):
                n = self.conn.send(view[self.sent:self.sent + 65536])
                self.sent += n
            self.conn.shutdown(socket.SHUT_WR)
        except Exception as e:
            self.error = e


@pytest.mark.slow
@pytest.mark.linux_only   # the proxy's CPU time, from /proc
@pytest.mark.parametrize("direction,flags", [
    ("downstream", ()), ("upstream", ()), ("upstream", ("--notsent-lowat", "0")),
    pytest.param("upstream", ("--notsent-lowat", "64k"), marks=pytest.mark.skipif(
        not _core.HAVE_NOTSENT_LOWAT, reason="this build has no TCP_NOTSENT_LOWAT"))])
def test_slow_reader_blocks_writer_without_spinning(cli_proxy, direction, flags):
    """downstream: the upstream writes, the client stalls; upstream: the
    reverse. With --notsent-lowat (by default 1m) the
    proxy's sockets refuse unsent bytes past the limit, so what they cannot
    take waits in the proxy; with 0 it piles up in the socket instead.
    Neither may spin."""
    data = random.Random(1234).randbytes(TOTAL)
    with Listener() as srv:
        proxy = cli_proxy("--listen", "127.0.0.1:0", "--upstream", srv.addr, *flags)
        # Small buffers on the test's own sockets, so what piles up is the proxy's.
        srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        c.settimeout(30)
        c.connect(proxy.address)
        s = srv.accept(timeout=10)
        s.settimeout(30)
        wsock, rsock = (s, c) if direction == "downstream" else (c, s)
        wsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
        writer = _Writer(wsock, data)
        writer.start()
        try:
            h = hashlib.sha256()
            first = recv_exact(rsock, 1 * MiB)
            h.update(first)
            # Reader stalls. Let the buffers fill (the writer stops for 0.5 s; at most
            # 5 s on a loaded machine), then watch for STALL_S-1 s.
            deadline = time.monotonic() + 5.0
            last = -1
            while writer.sent != last and time.monotonic() < deadline:
                last = writer.sent
                time.sleep(0.5)
            cpu0, sent0 = proxy.cpu(), writer.sent
            time.sleep(STALL_S - 1.0)
            cpu1, sent1 = proxy.cpu(), writer.sent
            assert proxy.alive()
            assert cpu1 - cpu0 < 0.3, "proxy burned %.2f s CPU while the reader stalled" % (cpu1 - cpu0)
            assert sent1 - sent0 < 1 * MiB, \
                "writer kept sending during the stall: %d -> %d bytes" % (sent0, sent1)
            # What the writer got out is what fits in socket buffers and pipes (~7 MiB
            # seen here); without backpressure it would be all of TOTAL.
            assert sent1 < 24 * MiB, \
                "writer got %d of %d bytes out with the reader stalled: no backpressure" % (sent1, TOTAL)
            # Resume: everything arrives, intact.
            got = len(first)
            while True:
                chunk = rsock.recv(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            assert got == TOTAL
            assert h.digest() == hashlib.sha256(data).digest(), "bytes corrupted"
            writer.join(10)
            assert writer.error is None and writer.sent == TOTAL
        finally:
            c.close()
            s.close()
