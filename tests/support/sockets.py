"""Shared helpers for the fastproxy test suite: servers, clients, /proc readers,
and a runner for the ``fastproxy`` CLI in a subprocess.

Everything here is bounded in time: sockets carry timeouts, waits take deadlines.
"""
import errno
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time

import fastproxy

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_CLOSE_WAIT = 0x08


# --------------------------------------------------------------------- addresses

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


def wait_for(pred, timeout, interval=0.02):
    """Poll pred() until it returns a truthy value or timeout passes; return last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def connect(addr, timeout=5.0):
    host, port = addr[0], addr[1]
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
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


def set_linger0(sock):
    import struct
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reserve_refusing_port(host="127.0.0.1", port=0):
    """A socket bound to a port but not listening: connects to it are refused, and
    nobody else can take the port while the socket lives."""
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


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


# --------------------------------------------------------------------- servers

class Listener:
    """A listening socket; the test drives the accepted sockets itself."""

    def __init__(self, host="127.0.0.1", backlog=128, port=0):
        self.sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((host, port))
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


class EchoServer:
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

    def close(self):
        self._stop = True
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def echo_roundtrip(addr, payload, timeout=5.0):
    """Connect, send payload, half-close, read the echo until EOF."""
    with connect(addr, timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_until_eof(s)


# --------------------------------------------------------------------- /proc

def proc_cpu_seconds(pid):
    """utime + stime of a whole process (all threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_fds(pid):
    """{fd: link target} of a process."""
    out = {}
    base = "/proc/%d/fd" % pid
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(os.path.join(base, name))
        except OSError:
            pass
    return out


def proc_context_switches(pid):
    """Voluntary context switches of all of a process's threads."""
    total = 0
    base = "/proc/%d/task" % pid
    for tid in os.listdir(base):
        try:
            with open(os.path.join(base, tid, "status")) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except OSError:
            pass   # a thread that ended meanwhile
    return total


def proc_nofile_limits(pid):
    """(soft, hard) RLIMIT_NOFILE of a running process."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                parts = line.split()
                return int(parts[3]), int(parts[4])
    raise AssertionError("no 'Max open files' in /proc/%d/limits" % pid)


def proc_fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def proc_socket_inodes(pid):
    inodes = set()
    for target in proc_fds(pid).values():
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(int(m.group(1)))
    return inodes


def tcp_sockets():
    """All TCP sockets of the host (network namespace): list of dicts with
    local_port, remote_port, state, inode."""
    rows = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            rows.append({
                "local_port": int(parts[1].rsplit(":", 1)[1], 16),
                "remote_port": int(parts[2].rsplit(":", 1)[1], 16),
                "state": int(parts[3], 16),
                "inode": int(parts[9]),
            })
    return rows


# --------------------------------------------------------------------- CLI

def subprocess_env(extra=None):
    """Environment for child Pythons: import the same fastproxy as this process."""
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastproxy.__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("FASTPROXY_ENGINE", None)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


class LineReader:
    """Collects a pipe's lines on a thread; wait_line(regex, timeout) looks for one."""

    def __init__(self, pipe):
        self.lines = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe):
        for raw in iter(pipe.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, pattern, timeout):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(left)

    def text(self):
        with self._cond:
            return "\n".join(self.lines)

    def join(self, timeout):
        self._thread.join(timeout)


LISTEN_RX = r"listening on (\[[0-9a-fA-F:.]*\]:\d+|[^\s,;]*:\d+)"


def cli_command(args, rlimit_nofile=None):
    """argv for ``python -m fastproxy ARGS``; with rlimit_nofile, exec'ed through a tiny
    wrapper that lowers RLIMIT_NOFILE soft and hard (so the proxy cannot raise it back;
    this also avoids preexec_fn in a threaded parent)."""
    cmd = [sys.executable, "-m", "fastproxy"] + list(args)
    if rlimit_nofile is None:
        return cmd
    soft, hard = rlimit_nofile if isinstance(rlimit_nofile, tuple) else (rlimit_nofile,) * 2
    wrapper = ("import os, resource, sys\n"
               "resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d))\n"
               "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
               % (soft, hard))
    return [sys.executable, "-c", wrapper] + cmd[1:]


class CliProxy:
    """``python -m fastproxy ARGS`` in a subprocess, ready once it logged 'listening on'."""

    def __init__(self, args, env=None, ready_timeout=20.0, rlimit_nofile=None):
        self.cmd = cmd = cli_command(args, rlimit_nofile)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=subprocess_env(env))
        self.pid = self.proc.pid
        self.stderr = LineReader(self.proc.stderr)
        self.stdout = LineReader(self.proc.stdout)
        m = self.stderr.wait_line(LISTEN_RX, ready_timeout)
        if m is None:
            self.kill()
            raise AssertionError("proxy did not log 'listening on' within %.0fs; rc=%r stderr:\n%s"
                                 % (ready_timeout, self.proc.poll(), self.stderr.text()))
        self.ready_line = m.string
        self.address = parse_addr(m.group(1))
        assert self.address[1] != 0, "listening line shows port 0: %r" % m.string

    def connect_addr(self, host=None):
        h, port = self.address
        return (host or ("127.0.0.1" if h in ("", "0.0.0.0", "::") else h), port)

    def cpu(self):
        return proc_cpu_seconds(self.pid)

    def fd_count(self):
        return proc_fd_count(self.pid)

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stderr.join(2)
        self.stdout.join(2)


def run_cli(args, timeout=30.0, env=None, rlimit_nofile=None):
    """Run the CLI to completion: (returncode, stdout, stderr)."""
    cp = subprocess.run(cli_command(args, rlimit_nofile),
                        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                        env=subprocess_env(env))
    return cp.returncode, cp.stdout.decode(errors="replace"), cp.stderr.decode(errors="replace")


def stop_bounded(proxy, timeout=None, limit=30.0):
    """proxy.stop(timeout) on a thread; fail if it does not return within limit seconds.
    Returns the seconds stop() took."""
    result = {}

    def run():
        t0 = time.monotonic()
        try:
            proxy.stop(timeout) if timeout is not None else proxy.stop()
        except BaseException as e:  # noqa: B902 - reported to the caller
            result["error"] = e
        result["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        raise AssertionError("Proxy.stop() did not return within %.0fs" % limit)
    if "error" in result:
        raise result["error"]
    return result["took"]


def assert_one_line_error(rc, out, err, *needles):
    """A user mistake: exit code 2, exactly one line on stderr naming each needle."""
    assert rc == 2, "exit code %r (want 2); stderr:\n%s" % (rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, "want exactly one line on stderr, got:\n%s" % err
    for needle in needles:
        assert needle in lines[0], "error line does not name %r: %r" % (needle, lines[0])
