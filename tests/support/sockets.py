"""Client-side socket helpers: addresses, connecting, reading with bounds.

Everything here is bounded in time: sockets carry timeouts, reads take limits.
A socket that fails to connect is closed here, not left to the collector.
"""
import contextlib
import errno
import itertools
import json
import os
import select
import selectors
import socket
import struct
import time

import pytest

MiB = 1024 * 1024


_SLICE = 1000


def _slice_start():
    """This worker's first port under pytest-xdist (gw0 one at a time), or
    None where the ephemeral range starts too low for the slices."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 49152  # IANA's dynamic range: macOS and the BSDs
    start = 10000 + _SLICE * index
    return start if start + _SLICE <= ephemeral else None


_START = _slice_start()
# In turn through the slice from a random place: a port comes back only
# after a thousand others (a test often asks for several).
_offsets = itertools.count(int.from_bytes(os.urandom(2), "big"))


def free_port():
    """A TCP port free for the moment on every IPv4 address (bound, then
    closed), that nothing else in the run will take before the test binds
    it: it is below the kernel's ephemeral range, so no connect() gets it as
    a source port and no bind to port 0 is given it, and under pytest-xdist
    each worker draws from a slice of its own. Where the range leaves no
    room for slices, the kernel's choice."""
    for _ in range(50):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", 0 if _START is None else _START + next(_offsets) % _SLICE))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {_START}..{_START + _SLICE - 1} in 50 tries")


def bind(sock, host, port=0):
    """sock.bind((host, port)); where host is a loopback address this machine
    does not answer for, the test is skipped: Linux answers for all of 127/8,
    macOS only for the addresses given to lo0 (ifconfig lo0 alias 127.0.0.2)."""
    try:
        sock.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL and host.rpartition(":")[2].startswith("127."):
            sock.close()   # no caller closes a socket whose test is skipped
            pytest.skip("%s is not an address of this machine's loopback" % host)
        raise


def fmt_addr(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def parse_addr(text):
    """'127.0.0.1:80' / '[::1]:80' / ':80' -> (host, port)."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def ipv6_available():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect(addr, timeout=5.0):
    host, port = addr[0], addr[1]
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def connect_from(addr, src_host, timeout=5.0):
    """Connect to addr from a chosen source address (bind before connect):
    IPv4, IPv6, or ::ffff:a.b.c.d (an IPv6 socket that may carry IPv4)."""
    family = socket.AF_INET6 if ":" in src_host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if family == socket.AF_INET6 and src_host.startswith("::ffff:"):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        bind(s, src_host)
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def recv_exact(sock, n):
    chunks, got = [], 0
    while got < n:
        data = sock.recv(min(n - got, 1 << 20))
        if not data:
            raise EOFError("EOF after %d of %d bytes" % (got, n))
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv_until_eof(sock, limit=256 * MiB):
    chunks, got = [], 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        got += len(data)
        if got > limit:
            raise AssertionError("more than %d bytes before EOF" % limit)


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


def closed_by_peer(sock, timeout):
    """Wait up to timeout for the peer to close: returns 'eof', 'reset' or None (still open).
    Data that arrives meanwhile is discarded."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return None
        except (ConnectionResetError, ConnectionAbortedError):
            return "reset"
        if not data:
            return "eof"


def how_closed(addr, send=b"", timeout=3.0):
    """Connect, send `send`, and wait up to timeout for the peer to close:
    'eof', 'reset' or None. A proxy that resets a client at once (a refused
    upstream) may do so before connect() returns, which then reports it."""
    s = socket.socket(family_of(addr[0]), socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((addr[0], addr[1]))
        if send:
            s.sendall(send)
        return closed_by_peer(s, timeout)
    except (ConnectionResetError, ConnectionAbortedError):
        return "reset"
    finally:
        s.close()


def readable(sock):
    """True when the socket has data or EOF (or an error) waiting; consumes nothing."""
    return bool(select.select([sock], [], [], 0)[0])


def set_linger0(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reserve_refusing_port(host="127.0.0.1", port=0):
    """A socket bound to a port but not listening: connects to it are refused, and
    nobody else can take the port while the socket lives."""
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        bind(s, host, port)
    except BaseException:
        s.close()
        raise
    return s


@contextlib.contextmanager
def refusing_port_on(*hosts):
    """One port, reserved (bound, not listening) on every host: connects to
    any of them are refused. The port the kernel gives the first host may
    be in use on another (a connection from there, in TIME_WAIT, used it as
    its source port): then another port is tried."""
    for _ in range(20):
        held = []
        try:
            held.append(reserve_refusing_port(hosts[0]))
            port = held[0].getsockname()[1]
            for host in hosts[1:]:
                held.append(reserve_refusing_port(host, port))
        except OSError as e:
            for s in held:
                s.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        try:
            yield port
        finally:
            for s in held:
                s.close()
        return
    raise RuntimeError("no port free on all of %r in 20 tries" % (hosts,))


def blackhole_listener():
    """A listener with backlog 0 that never accepts, its queue filled first, so the
    kernel drops further SYNs: a connect to it neither succeeds nor is refused."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    addr = lst.getsockname()
    fillers = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(16):
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex(addr)
            fillers.append(s)
            if err == 0:
                continue
            assert err in (errno.EINPROGRESS, errno.EAGAIN), err
            sel.register(s, selectors.EVENT_WRITE)
            ready = sel.select(0.3)
            sel.unregister(s)
            if not ready:
                return lst, fillers  # this SYN was dropped: the queue is full
        raise AssertionError("could not fill the listen queue")
    finally:
        sel.close()


def open_many(addr, n, timeout=10.0):
    """Open n TCP connections to addr concurrently (non-blocking connects).
    Returns the list of connected sockets (blocking, with a 5 s timeout)."""
    host, port = addr
    sel = selectors.DefaultSelector()
    pending, done = {}, []
    try:
        for _ in range(n):
            s = socket.socket(family_of(host), socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            if err in (0, errno.EISCONN):
                done.append(s)
            elif err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
                pending[s.fileno()] = s
                sel.register(s, selectors.EVENT_WRITE)
            else:
                s.close()
                raise OSError(err, os.strerror(err))
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                s = pending.pop(key.fd)
                sel.unregister(s)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    s.close()
                else:
                    done.append(s)
        for s in pending.values():
            s.close()
    finally:
        sel.close()
    for s in done:
        s.setblocking(True)
        s.settimeout(5.0)
    return done


def echo_roundtrip(addr, payload, timeout=5.0):
    """Connect, send payload, half-close, read the echo until EOF."""
    with connect(addr, timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_until_eof(s)


def round_trip_ms(addr, payload=b"ping"):
    """One request and its echo on a new connection, in milliseconds."""
    with connect(addr) as s:
        start = time.perf_counter()
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
        return (time.perf_counter() - start) * 1000


def stats_over_unix(path):
    """GET /stats from a stats endpoint on Unix socket `path`, parsed."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"GET /stats HTTP/1.0\r\nHost: tests\r\n\r\n")
        data = recv_until_eof(s)
    return json.loads(data.split(b"\r\n\r\n", 1)[1])
