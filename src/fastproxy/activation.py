"""Listening sockets a process is given instead of binding its own:
systemd socket activation (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES), and the
pool both it and a takeover (takeover.py) hand listeners from.

The systemd protocol: the manager binds the sockets, passes them as fds 3,
4, ... and says how many in LISTEN_FDS, for which process in LISTEN_PID,
and optionally their names (FileDescriptorName=) in LISTEN_FDNAMES,
colon-separated. A listener takes the socket named like it, else the one
bound to its address. Read once per process; the variables are removed
after reading so that children (hooks may start processes) do not take the
fds for theirs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from typing import List, MutableMapping, Optional, Tuple

from .values import Address, ConfigError, format_address, is_digits

__all__ = ["ListenerSockets", "systemd_sockets", "inherited", "take", "matches_address"]

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return a == b


def matches_address(sock: socket.socket, address: Address) -> bool:
    """Whether `sock` is bound where a listener configured with `address`
    would bind. Port 0 matches nothing: it asks for a new port."""
    host, port = address
    try:
        bound_host, bound_port = sock.getsockname()[:2]
    except OSError:
        return False
    if port == 0 or port != bound_port:
        return False
    if not host:
        return bound_host in ("::", "0.0.0.0")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return False
    # Only the first answer: listen_socket() binds that one.
    return bool(infos) and _same_host(str(infos[0][4][0]), bound_host)


class ListenerSockets:
    """Listening sockets by name, given to listeners one at a time: by
    name first, else by the address a listener would bind."""

    def __init__(self, source: str, items: Optional[List[Tuple[str, socket.socket]]] = None) -> None:
        self.source = source
        self._items: List[Tuple[str, socket.socket]] = list(items or [])
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> List[str]:
        return [name for name, _ in self._items]

    def take(self, name: Optional[str], address: Address) -> Optional[socket.socket]:
        """The socket for the listener `name` bound to `address`, removed
        from the pool (None: bind a new one)."""
        with self._lock:
            for i, (have, sock) in enumerate(self._items):
                if name is not None and have == name:
                    del self._items[i]
                    return sock
            for i, (have, sock) in enumerate(self._items):
                if matches_address(sock, address):
                    del self._items[i]
                    return sock
        return None

    def close_rest(self) -> List[str]:
        """Close the sockets no listener took; their names."""
        with self._lock:
            items, self._items = self._items, []
        for _, sock in items:
            sock.close()
        return [name for name, _ in items]


def _listening_tcp(fd: int, field: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(field, fd, f"is not an open socket ({exc.strerror or exc})") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()   # not ours to close: the manager passed it for something else
        raise ConfigError(field, fd, "is not a listening TCP socket (fastproxy serves TCP streams only)")
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


def systemd_sockets(environ: MutableMapping[str, str] = os.environ) -> ListenerSockets:
    """The sockets systemd passed this process (an empty pool when none
    were, or they were meant for another process); removes the variables."""
    values = {k: environ.pop(k, None) for k in _VARIABLES}
    pid_text, count_text, names_text = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if count_text is None:
        return ListenerSockets("systemd")
    if pid_text is not None:
        if not is_digits(pid_text.strip()):
            raise ConfigError("LISTEN_PID", pid_text, "is not a process id")
        if int(pid_text) != os.getpid():
            # Inherited from a parent that was activated: not ours.
            log.debug("LISTEN_PID %s is not this process: its sockets are not for us", pid_text)
            return ListenerSockets("systemd")
    if not is_digits(count_text.strip()) or len(count_text.strip()) > 6:
        raise ConfigError("LISTEN_FDS", count_text, "is not a count of sockets")
    count = int(count_text)
    names: List[str] = names_text.split(":") if names_text else []
    if names and len(names) != count:
        raise ConfigError("LISTEN_FDNAMES", names_text, f"names {len(names)} sockets, LISTEN_FDS says {count}")
    items: List[Tuple[str, socket.socket]] = []
    try:
        for i in range(count):
            fd = LISTEN_FDS_START + i
            items.append((names[i] if names else "unknown", _listening_tcp(fd, "LISTEN_FDS")))
    except BaseException:
        for _, sock in items:
            sock.detach()
        raise
    if items:
        log.info("systemd passed %d listening socket%s: %s", len(items), "" if len(items) == 1 else "s",
                 ", ".join(f"{name}={format_address(*s.getsockname()[:2])}" for name, s in items))
    return ListenerSockets("systemd", items)


_inherited: Optional[ListenerSockets] = None
_inherited_lock = threading.Lock()


def inherited() -> ListenerSockets:
    """This process's systemd sockets, read from the environment once."""
    global _inherited
    with _inherited_lock:
        if _inherited is None:
            _inherited = systemd_sockets()
        return _inherited


def take(name: Optional[str], address: Address) -> Optional[socket.socket]:
    """The systemd socket for a listener, if systemd passed one for it."""
    pool = inherited()
    return pool.take(name, address) if len(pool) else None
