"""Zero-downtime restarts: a new process takes the listening sockets of
the running one over a Unix socket, so no client is refused meanwhile.

The running process serves a takeover endpoint at a path (TakeoverServer).
A new process started with the same path connects there (take_over) and
the two speak, in length-prefixed JSON frames:

    new -> old   {"type": "hello", "version": 1, "pid": N}
    old -> new   {"type": "sockets", "version": 1, "pid": N,
                  "listeners": [{"name": ..., "address": "HOST:PORT"}, ...]}
                 with the listening fds attached (SCM_RIGHTS), in that order
                 (or {"type": "error", "error": "..."})
    new -> old   {"type": "ready"} once its workers accept on them
    old -> new   {"type": "draining"}

Both processes then hold the same kernel sockets: clients waiting in a
backlog are accepted by whichever process takes them first, and the old one
stops accepting only after "ready", when the new one already accepts. The
old one then takes its fds out of its event loops, closes them (the kernel
socket lives on in the new process), drains its live bridges and exits.

Before "ready", the new process publishes its own endpoint at the path (a
socket bound under a temporary name, renamed into place), so the next
upgrade finds it. Anything short of "ready" (the new process failed, sent
something malformed, speaks another version) leaves the old one serving.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .activation import ListenerSockets
from .values import Address, ConfigError, format_address, refuse_nul

__all__ = ["PROTOCOL_VERSION", "Handover", "TakeoverServer", "take_over", "check_path"]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
MAX_FDS = 250            # the kernel passes at most 253 fds in one message
_LENGTH = struct.Struct("!I")
# sun_path holds 107 bytes; the temporary name adds ".PID" to the path.
MAX_PATH = 107 - 8
FIELD = "takeover"
# How long the old process waits for the new one to say it accepts: it
# resolves upstreams and starts its workers meanwhile.
READY_TIMEOUT = 60.0


class ProtocolError(Exception):
    """The peer sent something this side does not understand."""


def check_path(value: Any, field: str = FIELD) -> str:
    """The option's parser: a path a Unix socket can be bound at."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field, value, "expected the path of a Unix socket")
    refuse_nul(value, field)
    if len(os.fsencode(value)) > MAX_PATH:
        raise ConfigError(field, value, f"is longer than {MAX_PATH} bytes (a Unix socket path is at most 107)")
    return value


# ---- frames

def _send(sock: socket.socket, message: Dict[str, Any], fds: Optional[List[int]] = None) -> None:
    body = json.dumps(message).encode()
    frame = _LENGTH.pack(len(body)) + body
    if fds:
        # The fds ride on the frame's first byte: one sendmsg for it all.
        sent = socket.send_fds(sock, [frame], fds)
        if sent < len(frame):
            sock.sendall(frame[sent:])
    else:
        sock.sendall(frame)


def _recv(sock: socket.socket, max_fds: int = 0) -> Tuple[Dict[str, Any], List[int]]:
    """One frame and the fds that came with it (close-on-exec). EOF before
    a frame starts is ConnectionError; anything malformed, ProtocolError."""
    buf = b""
    fds: List[int] = []
    need = _LENGTH.size
    length: Optional[int] = None
    try:
        while True:
            while len(buf) < need:
                space = socket.CMSG_SPACE(max_fds * 4) if max_fds else 0
                data, ancdata, flags, _ = sock.recvmsg(need - len(buf), space, socket.MSG_CMSG_CLOEXEC)
                for level, kind, cdata in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                        fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    raise ProtocolError(f"more than {max_fds} fds sent")
                if not data:
                    if not buf and length is None:
                        raise ConnectionError("the peer closed the connection")
                    raise ProtocolError("the connection ended inside a message")
                buf += data
            if length is not None:
                break
            (length,) = _LENGTH.unpack(buf)
            if not 0 < length <= MAX_FRAME:
                raise ProtocolError(f"a message of {length} bytes")
            buf, need = b"", length
        try:
            message = json.loads(buf.decode())
        except ValueError:
            raise ProtocolError("a message that is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ProtocolError("a message without a type")
        return message, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _expect(message: Dict[str, Any], kind: str) -> None:
    if message.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(f"takeover protocol version {message.get('version')!r}, "
                            f"this fastproxy speaks {PROTOCOL_VERSION}")
    if message["type"] == "error":
        raise ProtocolError(f"it refused: {message.get('error')}")
    if message["type"] != kind:
        raise ProtocolError(f"a {message['type']!r} message where {kind!r} was due")


# ---- the old process's side

class TakeoverServer:
    """The takeover endpoint of a running process.

    `get_sockets()` gives the listening sockets to hand over, by listener
    name (empty: nothing to hand over, e.g. while stopping);
    `on_handover()` is called, on the server's thread, once the new process
    accepts on them: it must stop accepting and drain without blocking.
    bind() checks and reserves the path early (errors are ConfigError);
    publish() puts the endpoint at the path and starts serving; close()
    removes it, unless a newer process has put its own there."""

    def __init__(self, path: str, get_sockets: Callable[[], Dict[str, socket.socket]],
                 on_handover: Callable[[], None], *, ready_timeout: float = READY_TIMEOUT) -> None:
        self.path = check_path(path)
        self._get_sockets = get_sockets
        self._on_handover = on_handover
        self._ready_timeout = ready_timeout
        self._tmp = f"{path}.{os.getpid()}"
        self._sock: Optional[socket.socket] = None
        self._conn: Optional[socket.socket] = None
        self._identity: Optional[Tuple[int, int]] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.handed_over = False

    def bind(self) -> None:
        _check_socket_file(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _unlink_quietly(self._tmp)
            try:
                sock.bind(self._tmp)
            except OSError as exc:
                raise ConfigError(FIELD, self.path, f"cannot create the endpoint ({exc.strerror or exc})") from None
            # Before the rename: nobody reaches it with other modes meanwhile.
            os.chmod(self._tmp, 0o600)
            sock.listen(8)
        except BaseException:
            sock.close()
            _unlink_quietly(self._tmp)
            raise
        self._sock = sock

    def publish(self, replace: bool) -> None:
        """Rename the endpoint into place and serve. `replace`: this process
        took over from the one serving there, whose endpoint it replaces;
        otherwise a live endpoint at the path is an error, a stale one is
        replaced."""
        if self._sock is None:
            self.bind()
        if not replace:
            try:
                _check_not_live(self.path)
            except BaseException:
                self.close()
                raise
        os.rename(self._tmp, self.path)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._thread = threading.Thread(target=self._serve, name="fastproxy-takeover", daemon=True)
        self._thread.start()
        log.info("takeover endpoint at %s", self.path)

    def close(self) -> None:
        """Stop serving; remove the path if it still is this endpoint."""
        self._closed.set()
        with self._lock:
            sock, self._sock = self._sock, None
            conn = self._conn
        if conn is not None:
            _shutdown(conn)   # wakes a wait for "ready"
        if sock is not None:
            _shutdown(sock)
            sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self._identity is None:
            _unlink_quietly(self._tmp)
        elif not self.handed_over:
            # A newer process may have renamed its endpoint over ours: the
            # path is then its, and stays.
            try:
                st = os.stat(self.path)
            except OSError:
                return
            if (st.st_dev, st.st_ino) == self._identity:
                _unlink_quietly(self.path)

    def _serve(self) -> None:
        while not self._closed.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                # A timeout, so close() is seen even where shutdown() does
                # not wake accept().
                sock.settimeout(0.5)
                conn, _ = sock.accept()
            except OSError:
                continue
            with self._lock:
                self._conn = conn
            try:
                with conn:
                    if self._handle(conn):
                        return
            finally:
                with self._lock:
                    self._conn = None

    def _handle(self, conn: socket.socket) -> bool:
        """One takeover attempt; True once the sockets are handed over."""
        conn.settimeout(10.0)
        peer = "?"
        try:
            hello, fds = _recv(conn)
            for fd in fds:
                os.close(fd)
            peer = str(hello.get("pid", "?"))
            try:
                _expect(hello, "hello")
            except ProtocolError as exc:
                _send_error(conn, str(exc))
                raise
            sockets = {name: s for name, s in self._get_sockets().items() if s.fileno() >= 0}
            if not sockets:
                _send_error(conn, "this process is not serving (starting or stopping): nothing to hand over")
                log.warning("takeover by process %s refused: this process is not serving", peer)
                return False
            if len(sockets) > MAX_FDS:
                _send_error(conn, f"more than {MAX_FDS} listeners")
                raise ProtocolError(f"more than {MAX_FDS} listeners to hand over")
            listeners = [{"name": name, "address": format_address(*s.getsockname()[:2])}
                         for name, s in sockets.items()]
            _send(conn, {"type": "sockets", "version": PROTOCOL_VERSION, "pid": os.getpid(),
                         "listeners": listeners}, [s.fileno() for s in sockets.values()])
            log.info("takeover: sent %d listening socket%s to process %s (%s); serving until it is ready",
                     len(sockets), "" if len(sockets) == 1 else "s", peer,
                     ", ".join(str(x["name"]) for x in listeners))
            conn.settimeout(self._ready_timeout)
            ready, fds = _recv(conn)
            for fd in fds:
                os.close(fd)
            _expect(ready, "ready")
            self.handed_over = True
            try:
                _send(conn, {"type": "draining", "version": PROTOCOL_VERSION, "pid": os.getpid()})
            except OSError:
                pass   # it asked; whether it hears the answer does not change what we do
        except (ProtocolError, ConnectionError, OSError) as exc:
            if self._closed.is_set():
                return True
            what = "timed out" if isinstance(exc, socket.timeout) else str(exc)
            log.error("takeover by process %s failed (%s): still serving", peer, what)
            return False
        log.info("takeover: process %s accepts now: stopping accepting and draining", peer)
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()   # no second takeover of sockets we no longer serve
        self._on_handover()
        return True


def _send_error(conn: socket.socket, error: str) -> None:
    try:
        _send(conn, {"type": "error", "version": PROTOCOL_VERSION, "error": error})
    except OSError:
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _check_socket_file(path: str) -> bool:
    """Whether a socket file is at `path`; anything else there is not ours
    to replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(FIELD, path, exc.strerror or str(exc)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(FIELD, path, "exists and is not a socket")
    return True


def _check_not_live(path: str) -> None:
    """A live endpoint at `path` is an error; a stale socket file is fine
    (the rename replaces it)."""
    if not _check_socket_file(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise ConfigError(FIELD, path, "another process serves takeovers there")


# ---- the new process's side

class Handover:
    """Listening sockets taken from the process serving at the path.

    take() gives a listener its socket (by name, else by address); ready()
    tells the old process to stop accepting and drain, and closes the
    sockets no listener took; abort() gives up (the old process keeps
    serving)."""

    def __init__(self, conn: socket.socket, pid: int, listeners: List[Tuple[str, socket.socket]]) -> None:
        self._conn: Optional[socket.socket] = conn
        self.pid = pid
        self._pool = ListenerSockets("takeover", listeners)
        self.sockets: Dict[str, socket.socket] = dict(listeners)

    def take(self, name: Optional[str], address: Address) -> Optional[socket.socket]:
        return self._pool.take(name, address)

    def ready(self, timeout: float = 10.0) -> bool:
        """Our workers accept: the old process may stop. True once it said
        it drains."""
        unused = self._pool.close_rest()
        if unused:
            log.info("takeover: closed listening sockets no listener here takes: %s", ", ".join(unused))
        conn, self._conn = self._conn, None
        if conn is None:
            return False
        with conn:
            try:
                conn.settimeout(timeout)
                _send(conn, {"type": "ready", "version": PROTOCOL_VERSION, "pid": os.getpid()})
                answer, fds = _recv(conn)
                for fd in fds:
                    os.close(fd)
                _expect(answer, "draining")
            except (ProtocolError, ConnectionError, OSError) as exc:
                log.warning("takeover: process %d did not confirm it drains (%s)", self.pid, exc)
                return False
        log.info("takeover: process %d stops accepting and drains; this one serves", self.pid)
        return True

    def abort(self) -> None:
        """Start-up failed: the old process keeps serving."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            log.warning("takeover abandoned: process %d keeps serving", self.pid)
        self._pool.close_rest()


def take_over(path: str, timeout: float = 10.0) -> Optional[Handover]:
    """The listening sockets of the process serving takeovers at `path`;
    None when none does (no file, or a stale one): start fresh."""
    check_path(path)
    _check_socket_file(path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        conn.close()
        log.info("takeover: no process serves at %s (%s): starting fresh", path,
                 "no such file" if isinstance(exc, FileNotFoundError) else "connection refused")
        return None
    except OSError as exc:
        conn.close()
        if exc.errno == errno.ENOTSOCK or exc.errno == errno.ECONNREFUSED:
            raise ConfigError(FIELD, path, "is not a takeover endpoint") from None
        raise ConfigError(FIELD, path, f"cannot connect ({exc.strerror or exc})") from None
    fds: List[int] = []
    try:
        _send(conn, {"type": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid()})
        message, fds = _recv(conn, MAX_FDS)
        _expect(message, "sockets")
        listeners = message.get("listeners")
        pid = message.get("pid")
        if (not isinstance(listeners, list) or len(listeners) != len(fds) or not isinstance(pid, int)
                or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in listeners)):
            raise ProtocolError(f"{len(fds)} fds for a listener list {listeners!r}")
        taken: List[Tuple[str, socket.socket]] = []
        for entry, fd in zip(listeners, fds):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            taken.append((entry["name"], sock))
        fds = []
    except (ProtocolError, ConnectionError, OSError) as exc:
        for fd in fds:
            os.close(fd)
        conn.close()
        what = "it did not answer in time" if isinstance(exc, socket.timeout) else str(exc)
        raise ConfigError(FIELD, path, f"takeover failed: {what}") from None
    log.info("takeover: took %d listening socket%s from process %d (%s)", len(taken),
             "" if len(taken) == 1 else "s", pid,
             ", ".join(f"{x['name']}={x.get('address')}" for x in listeners))
    return Handover(conn, pid, taken)
