"""Helpers for the hook tests: a collector for on_close records, a tagging server
that says which upstream a client reached, and clients with a chosen source address.

Every wait is bounded.
"""
import socket
import threading
import time

from .sockets import connect, fmt_addr, recv_exact

# on_close records arrive in batches shortly after a bridge ends.
RECORD_WAIT_S = 3.0


class Recorder:
    """An on_close hook that keeps every (conn, record) it is given."""

    def __init__(self):
        self._cond = threading.Condition()
        self.calls = []  # (conn, record)

    def __call__(self, conn, record):
        with self._cond:
            self.calls.append((conn, record))
            self._cond.notify_all()

    @property
    def records(self):
        with self._cond:
            return [r for _, r in self.calls]

    def wait(self, n=1, timeout=RECORD_WAIT_S):
        """Wait until at least n records came; return all records (fails if fewer)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.calls) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%d on_close record(s) after %.1f s, want %d: %r"
                                         % (len(self.calls), timeout, n, self.calls))
                self._cond.wait(left)
            return [r for _, r in self.calls]

    def one(self, timeout=RECORD_WAIT_S):
        """Wait for the first record and return it; fail if a second one follows soon."""
        recs = self.wait(1, timeout)
        time.sleep(0.05)
        recs = self.records
        assert len(recs) == 1, "want one on_close record, got %r" % (recs,)
        return recs[0]


def connect_from(addr, src_host, timeout=5.0):
    """Connect to addr from a chosen loopback source address (bind before connect)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src_host, 0))
    s.connect(addr)
    return s


def read_all(sock, timeout=5.0):
    """Read until EOF or reset (bounded): (data, 'eof' | 'reset' | None for still open)."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), None
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), None
        except (ConnectionResetError, ConnectionAbortedError):
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)


class TagServer:
    """On each connection: send TAG + b"\\n", then echo until EOF, then close.
    Remembers the peer address of every accepted connection."""

    def __init__(self, tag, host="127.0.0.1"):
        self.tag = tag.encode() if isinstance(tag, str) else tag
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.peers = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return fmt_addr(self.host, self.port)

    @property
    def accepted(self):
        return len(self.peers)

    def _run(self):
        while not self._stop:
            try:
                c, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        c.settimeout(10)
        try:
            with c:
                c.sendall(self.tag + b"\n")
                while True:
                    data = c.recv(65536)
                    if not data:
                        c.shutdown(socket.SHUT_WR)
                        return
                    c.sendall(data)
        except OSError:
            pass

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tag_of(addr, src_host="127.0.0.1", payload=b"ping"):
    """Connect (from src_host), read the server's tag line, check one echo, close.
    Returns the tag (bytes)."""
    with connect_from(addr, src_host) as s:
        line = b""
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b:
                raise EOFError("closed before the tag line: %r" % line)
            line += b
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
        return line[:-1]


def wait_stat(proxy, key, value, timeout=3.0):
    """Wait until proxy.stats()[key] == value; return the last stats dict."""
    deadline = time.monotonic() + timeout
    while True:
        st = proxy.stats()
        if st.get(key) == value or time.monotonic() >= deadline:
            return st
        time.sleep(0.02)


__all__ = ["Recorder", "connect_from", "read_all", "TagServer", "tag_of", "wait_stat",
           "RECORD_WAIT_S", "connect"]
