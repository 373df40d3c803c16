"""Helpers for the end-to-end balancing, health and limit tests: upstream
servers that say who they are, and clients that ask which upstream they got.

A TagServer sends "<name>\\n" to each connection it accepts, answers "PING\\n"
with "PONG\\n" (or "SICK\\n" when not healthy), echoes anything else, and closes
a connection once its peer half-closed. It counts the connections it holds and
their peak, and can stop listening and listen again on the same port.
"""
import select
import selectors
import socket
import threading
import time

from .sockets import family_of, fmt_addr, wait_for


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


class TagServer:
    def __init__(self, name, host="127.0.0.1", gauge=None):
        self.name = name
        self.host = host
        self.port = 0
        self.healthy = True
        self.accepted = 0
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
        s.bind((self.host, self.port))
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
                            s, _ = key.fileobj.accept()
                        except OSError:
                            break
                        self.accepted += 1
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

    def close(self):
        self._stop = True
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


def ping_pong(host, port, timeout=1.0):
    """A health check callable: the server must answer PING with PONG."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        f.readline()                    # the server's name
        s.sendall(b"PING\n")
        return f.readline() == b"PONG\n"


def read_line(sock, limit=64):
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            raise EOFError("EOF after %r" % buf)
        buf += data
        if len(buf) > limit:
            raise AssertionError("no line: %r" % buf)
    return buf[:-1].decode()


def open_tagged(addr, source=None, timeout=5.0):
    """Connect (from `source` when given) and read which upstream answered:
    (socket, name). The socket stays open: the bridge is held."""
    host, port = addr[0], addr[1]
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source is not None:
            s.bind((source, 0))
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


def wait_idle(proxy, timeout=5.0):
    """Until the proxy holds no bridge."""
    assert wait_for(lambda: proxy.stats()["active"] == 0, timeout), proxy.stats()


def readable(sock):
    """True when the socket has data or EOF (or an error) waiting; consumes nothing."""
    return bool(select.select([sock], [], [], 0)[0])


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


def elapsed(t0):
    return time.monotonic() - t0
