"""Peers that misbehave on purpose, and the kernel figures that show what
they cost.

FloodServer      an upstream that sends to every connection as fast as the
                 connection takes it and never reads; its own send buffer is
                 small, so what piles up is the proxy's
tcp_mem_pages    /proc/net/sockstat's TCP `mem`: the pages the kernel holds
                 for every TCP socket of the host (not per network namespace)
"""
import selectors
import socket
import threading

from .sockets import family_of, fmt_addr

KiB = 1024


def tcp_mem_pages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    raise AssertionError("no TCP line in /proc/net/sockstat")


class FloodServer:
    def __init__(self, host="127.0.0.1", sndbuf=4 * KiB, chunk=64 * KiB):
        self._listen = socket.socket(family_of(host), socket.SOCK_STREAM)
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind((host, 0))
        self._listen.listen(4096)
        self._listen.setblocking(False)
        self._sndbuf = sndbuf
        self._chunk = b"\xa5" * chunk
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ)
        self._conns = []
        self._stop = threading.Event()
        self.sent = 0           # bytes the proxy took, written by the loop only
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return fmt_addr(*self._listen.getsockname()[:2])

    def _accept(self):
        while True:
            try:
                c, _ = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            if self._sndbuf:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
            c.setblocking(False)
            self._conns.append(c)
            self.accepted += 1
            self._sel.register(c, selectors.EVENT_WRITE)

    def _run(self):
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                if key.fileobj is self._listen:
                    self._accept()
                    continue
                try:
                    while True:
                        self.sent += key.fileobj.send(self._chunk)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._sel.unregister(key.fileobj)
        self._sel.close()
        for c in self._conns:
            c.close()
        self._listen.close()

    def close(self):
        self._stop.set()
        self._thread.join(5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
