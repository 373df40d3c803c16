"""Servers for the proxy to forward to: a bare listener the test drives, an
echo server for thousands of connections, and TagServer, an upstream that says
which one a client reached; with the clients that ask it.

Every server runs on a daemon thread and stops within a bounded time.
"""
import selectors
import socket
import threading

from .sockets import bind, connect_from, family_of, fmt_addr, read_line, recv_exact


class Listener:
    """A listening socket; the test drives the accepted sockets itself."""

    def __init__(self, host="127.0.0.1", backlog=128, port=0):
        self.sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        bind(self.sock, host, port)
        self.sock.listen(backlog)
        self.host = host
        self.port = self.sock.getsockname()[1]

    @property
    def addr(self):
        return fmt_addr(self.host, self.port)

    def accept(self, timeout=5.0):
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(timeout)
        return conn

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Background:
    """A server whose loop runs on self._thread until close() sets _stop."""

    def close(self):
        self._stop = True
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EchoServer(_Background):
    """Echo server on one thread with a selector, for thousands of connections.
    On EOF from a peer it flushes what is pending, then shuts down its write side and
    closes, so the proxy sees a clean half-close."""

    def __init__(self, host="127.0.0.1", backlog=4096, port=0):
        self.listener = Listener(host, backlog, port)
        self.listener.sock.setblocking(False)
        self.host, self.port = host, self.listener.port
        self.accepted = 0
        self.errors = []
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._conns = {}
        self._sel.register(self.listener.sock, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="echo", daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return fmt_addr(self.host, self.port)

    @property
    def open_connections(self):
        return len(self._conns)

    def _close(self, s):
        self._conns.pop(s, None)
        try:
            self._sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()

    def _run(self):
        while not self._stop:
            for key, mask in self._sel.select(timeout=0.05):
                if key.data is None:
                    for _ in range(256):
                        try:
                            s, _ = self.listener.sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as e:  # EMFILE etc.: report, keep going
                            self.errors.append(repr(e))
                            break
                        s.setblocking(False)
                        self.accepted += 1
                        self._conns[s] = [bytearray(), False]  # pending out, eof seen
                        self._sel.register(s, selectors.EVENT_READ, "c")
                    continue
                s = key.fileobj
                state = self._conns.get(s)
                if state is None:
                    continue
                try:
                    if mask & selectors.EVENT_READ and not state[1]:
                        data = s.recv(262144)
                        if data:
                            state[0] += data
                        else:
                            state[1] = True
                    if state[0]:
                        n = s.send(state[0])
                        del state[0][:n]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._close(s)
                    continue
                if state[1] and not state[0]:
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self._close(s)
                    continue
                want = (0 if state[1] else selectors.EVENT_READ) | \
                    (selectors.EVENT_WRITE if state[0] else 0)
                self._sel.modify(s, want, "c")
        for s in list(self._conns):
            self._close(s)
        self._sel.close()
        self.listener.close()



class Gauge:
    """A live count and its peak, shared by several servers."""

    def __init__(self):
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, n):
        with self._lock:
            self.now += n
            self.peak = max(self.peak, self.now)


class TagServer(_Background):
    """An upstream that says who it is: sends NAME + b"\\n" to each connection
    it accepts, answers b"PING\\n" with b"PONG\\n" (b"SICK\\n" when not
    healthy), echoes anything else, and closes a connection once its peer
    half-closed. It counts the connections it holds and their peak, remembers
    each client's address (`peers`), and can stop listening and listen again
    on the same port."""

    def __init__(self, name, host="127.0.0.1", gauge=None, port=0):
        self.name = name
        self.host = host
        self.port = port
        self.healthy = True
        self.accepted = 0
        self.peers = []                # (host, port, ...) of each accepted client
        self.gauge = Gauge()           # this server's own connections
        self.shared = gauge            # optionally, a gauge over several servers
        self._sel = selectors.DefaultSelector()
        self._lst = None
        self._conns = {}
        self._todo = []                # callables run on the server thread
        self._stop = False
        self._listen()
        self._thread = threading.Thread(target=self._run, name="tag-" + name, daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return fmt_addr(self.host, self.port)

    def _listen(self):
        s = socket.socket(family_of(self.host), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind(s, self.host, self.port)
        s.listen(512)
        s.setblocking(False)
        self.port = s.getsockname()[1]
        self._lst = s
        self._sel.register(s, selectors.EVENT_READ, None)

    def _unlisten(self):
        if self._lst is not None:
            self._sel.unregister(self._lst)
            self._lst.close()
            self._lst = None

    def _call(self, fn):
        done = threading.Event()
        self._todo.append((fn, done))
        assert done.wait(5), "server thread did not answer"

    def stop_listening(self):
        """Close the listening socket: connects to the port are refused."""
        self._call(self._unlisten)

    def listen_again(self):
        self._call(self._listen)

    def _count(self, n):
        self.gauge.add(n)
        if self.shared is not None:
            self.shared.add(n)

    def _drop(self, s):
        if self._conns.pop(s, None) is not None:
            # Counted before the close: the proxy may free the slot (and
            # connect a waiter to another server) as soon as it sees it.
            self._count(-1)
            self._sel.unregister(s)
            s.close()

    def _run(self):
        while not self._stop:
            while self._todo:
                fn, done = self._todo.pop(0)
                fn()
                done.set()
            for key, _ in self._sel.select(timeout=0.01):
                if key.data is None:
                    for _ in range(64):
                        try:
                            s, peer = key.fileobj.accept()
                        except OSError:
                            break
                        self.accepted += 1
                        self.peers.append(peer)
                        self._count(1)
                        self._conns[s] = True
                        s.setblocking(False)
                        self._sel.register(s, selectors.EVENT_READ, "c")
                        self._send(s, self.name.encode() + b"\n")
                    continue
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._drop(s)
                elif data == b"PING\n":
                    self._send(s, b"PONG\n" if self.healthy else b"SICK\n")
                else:
                    self._send(s, data)
        for s in list(self._conns):
            self._drop(s)
        self._unlisten()
        self._sel.close()

    def _send(self, s, data):
        try:
            s.setblocking(True)
            s.settimeout(2)
            s.sendall(data)
            s.setblocking(False)
        except OSError:
            self._drop(s)



class Servers:
    """Several TagServers, named A, B, C... (or as given), closed together."""

    def __init__(self, n=None, names=None, gauge=None, host="127.0.0.1"):
        names = names or [chr(ord("A") + i) for i in range(n)]
        self.list = [TagServer(nm, host, gauge) for nm in names]
        self.by_name = {s.name: s for s in self.list}
        self.by_addr = {s.addr: s for s in self.list}

    def __getitem__(self, i):
        return self.list[i] if isinstance(i, int) else self.by_name[i]

    def __iter__(self):
        return iter(self.list)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in self.list:
            s.close()


def open_tagged(addr, source=None, timeout=5.0):
    """Connect (from `source` when given) and read which upstream answered:
    (socket, name). The socket stays open: the bridge is held."""
    host, port = addr[0], addr[1]
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source is not None:
            bind(s, source)
        s.connect((host, port))
        return s, read_line(s)
    except BaseException:
        s.close()
        raise


def which(addr, source=None, timeout=5.0):
    """The name of the upstream a new client is sent to; the client then
    leaves cleanly (half-close, then the upstream's EOF)."""
    s, name = open_tagged(addr, source, timeout)
    with s:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(64) == b"", "data after the name"
    return name


def tag_of(addr, src_host="127.0.0.1", payload=b"ping"):
    """Connect (from src_host), read the server's tag line, check one echo, close.
    Returns the tag (bytes)."""
    with connect_from(addr, src_host) as s:
        tag = read_line(s).encode()
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
        return tag
