"""What the control plane asks of the OS before the data plane starts:
the listening socket, resolved upstream addresses, the fd budget."""

from __future__ import annotations

import errno
import socket
from typing import List, Tuple

from .values import Address, ConfigError, format_address

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

LISTEN_BACKLOG = 4096


def fd_budget(raise_limit: bool) -> int:
    """The open-file budget: the soft limit, first raised to the hard one
    if asked (the command does; an embedding program decides)."""
    if resource is None:  # pragma: no cover
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_limit and hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def resolve_upstream(addr: Address, field: str = "upstream") -> List[Tuple[int, tuple]]:
    """All addresses of one upstream, in getaddrinfo's order (tried in turn)."""
    host, port = addr
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(field, format_address(host, port), f"does not resolve ({exc})") from None
    seen: List[Tuple[int, tuple]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    if not seen:
        raise ConfigError(field, format_address(host, port), "has no IPv4 or IPv6 address")
    return seen


def _dual_stack_socket(port: int) -> socket.socket:
    # ':PORT' means every interface: '::' with IPV6_V6ONLY off takes IPv4
    # too; a host without IPv6 gets '0.0.0.0'.
    if socket.has_ipv6:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            pass
        else:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                _bind(sock, ("::", port), format_address("", port))
                return sock
            except BaseException:
                sock.close()
                raise
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        _bind(sock, ("0.0.0.0", port), format_address("", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, sockaddr: tuple, shown: str) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        reason = {
            errno.EADDRINUSE: "address already in use",
            errno.EADDRNOTAVAIL: "address not available on this host",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise ConfigError("listen", shown, reason) from None


def listen_socket(addr: Address) -> socket.socket:
    """A bound, listening, non-blocking socket for `addr` ('' = every interface)."""
    host, port = addr
    shown = format_address(host, port)
    if not host:
        sock = _dual_stack_socket(port)
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as exc:
            raise ConfigError("listen", shown, f"does not resolve ({exc})") from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _bind(sock, sockaddr, shown)
        except BaseException:
            sock.close()
            raise
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def check_listening(sock: object, field: str = "sock") -> Address:
    """The address of an application's socket, once it is known to be a
    bound, listening TCP socket."""
    if not isinstance(sock, socket.socket):
        raise ConfigError(field, sock, "expected a socket.socket")
    if sock.fileno() < 0:
        raise ConfigError(field, sock, "is closed")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise ConfigError(field, sock, "must be a TCP socket (AF_INET or AF_INET6, SOCK_STREAM)")
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:  # pragma: no cover - platforms without SO_ACCEPTCONN
        listening = 1
    if not listening:
        raise ConfigError(field, sock, "must be bound and listening (call listen() first)")
    host, port = sock.getsockname()[:2]
    return host, port


def adopt_socket(sock: socket.socket, field: str = "sock") -> socket.socket:
    """A duplicate of an application's bound, listening TCP socket (systemd
    socket activation, tests, privilege separation). The proxy closes its
    duplicate at stop; the application keeps and closes its own. The
    duplicate shares the socket's file status, so the application's socket
    becomes non-blocking too."""
    check_listening(sock, field)
    dup = sock.dup()
    dup.setblocking(False)
    return dup
