"""What the control plane asks of the OS before the data plane starts:
the listening socket, resolved upstream addresses, the fd budget."""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Dict, List, Optional, Tuple

from .values import UNIX_PREFIX, Address, ConfigError, format_address, plain_ip, unix_path, unix_sockaddr

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
    """All addresses of one upstream, in getaddrinfo's order (tried in turn);
    a Unix one is its single (AF_UNIX, (path,)), resolved by nothing."""
    host, port = addr
    path = unix_path(host)
    if path is not None:
        return [(socket.AF_UNIX, (unix_sockaddr(path),))]
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


# What identifies the file a Unix listener bound: its path (absolute, so a
# later chdir does not matter), device and inode. At stop the proxy removes
# the file only if it is still that one: another process may have replaced it.
UnixFile = Tuple[str, int, int]


def _clear_stale_socket(path: str, shown: str) -> None:
    # A socket file outlives the process that bound it. One nobody listens
    # on refuses connections: it is stale and replaced. One that accepts (or
    # whose backlog is full: EAGAIN) belongs to a live process.
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError("listen", shown, exc.strerror or str(exc)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("listen", shown, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        err = probe.connect_ex(path)
    finally:
        probe.close()
    if err == errno.ECONNREFUSED:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError("listen", shown, f"a stale socket file cannot be removed "
                                               f"({exc.strerror or exc})") from None
        return
    if err in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise ConfigError("listen", shown, "address already in use (a process is listening on it)")
    raise ConfigError("listen", shown, os.strerror(err))


def _set_owner(path: str, mode: Optional[int], user: Optional[int], group: Optional[int],
               given: Dict[str, object]) -> None:
    if mode is not None:
        os.chmod(path, mode)
    for name, uid, gid in (("unix_user", user, -1), ("unix_group", -1, group)):
        if uid is None or gid is None:
            continue
        try:
            os.chown(path, uid, gid)
        except OSError as exc:
            raise ConfigError(name, given[name], f"chown not permitted ({exc.strerror or exc})") from None


def bound_as(listen: Address, bound: object) -> bool:
    """Whether a listen address, however spelled (a name, another form of
    an IP), is the (host, port) a socket is bound to: a reload keeps that
    socket rather than fail to bind it again."""
    host, port = listen
    if not isinstance(bound, tuple) or port == 0 or port != bound[1] or not host or unix_path(host) is not None:
        return False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    except (OSError, UnicodeError):
        return False
    here = plain_ip(str(bound[0]))
    return here is not None and any(plain_ip(str(info[4][0])) == here for info in infos)


def reown_unix_file(path: str, mode: Optional[int], user: Optional[int], group: Optional[int],
                    given: Dict[str, object]) -> Optional[Tuple[int, int, int]]:
    """Gives a kept listener's socket file (a reload, a takeover) the mode
    and owner its configuration asks for now. Returns what the file had, to
    put back if the reload is abandoned, or None when nothing changed; an
    option left out keeps what the file has."""
    st = os.stat(path)
    before = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    want = (before[0] if mode is None else mode, before[1] if user is None else user,
            before[2] if group is None else group)
    if want == before:
        return None
    try:
        _set_owner(path, mode, user, group, given)
    except BaseException:
        restore_unix_file(path, before)
        raise
    return before


def restore_unix_file(path: str, before: Tuple[int, int, int]) -> None:
    try:
        os.chmod(path, before[0])
        os.chown(path, before[1], before[2])
    except OSError:
        pass   # best effort: the reload is being refused for another reason


def listen_unix(addr: Address, *, mode: Optional[int] = None, user: Optional[int] = None,
                group: Optional[int] = None,
                given: Optional[Dict[str, object]] = None) -> Tuple[socket.socket, Optional[UnixFile]]:
    """A bound, listening, non-blocking Unix socket for ('unix:PATH', 0),
    with its file's mode and owner set before it listens (no client can
    connect before), and the file's identity (None for an abstract name)."""
    host = addr[0]
    path = unix_path(host)
    assert path is not None
    abstract = path.startswith("@")
    if not abstract:
        _clear_stale_socket(path, host)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    made: Optional[UnixFile] = None
    try:
        try:
            sock.bind(unix_sockaddr(path))
        except OSError as exc:
            reason = {
                errno.EADDRINUSE: "address already in use",
                errno.ENOENT: "its directory does not exist",
                errno.EACCES: "permission denied",
            }.get(exc.errno or 0, exc.strerror or str(exc))
            raise ConfigError("listen", host, reason) from None
        if not abstract:
            st = os.stat(path)
            made = (os.path.abspath(path), st.st_dev, st.st_ino)
            _set_owner(path, mode, user, group, given or {})
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if made is not None:
            remove_unix_file(made)
        raise
    return sock, made


def unix_file_of(sock: socket.socket) -> Optional[UnixFile]:
    """The socket file a Unix listening socket is bound to (taken over from
    another process: this one removes it at stop from now on), or None."""
    if sock.family != socket.AF_UNIX:
        return None
    path = sock.getsockname()
    if not isinstance(path, str) or not path or path.startswith("\0"):
        return None   # abstract: no file
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino)


def close_listening(sock: socket.socket, unix_file: Optional[UnixFile]) -> None:
    """Close a listening socket this process bound, and remove its socket
    file (if it has one and it is still that file)."""
    sock.close()
    if unix_file is not None:
        remove_unix_file(unix_file)


def remove_unix_file(made: UnixFile) -> None:
    """Removes the socket file a listener bound, if it is still that file."""
    path, dev, ino = made
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except OSError:
        pass


def listen_socket(addr: Address) -> socket.socket:
    """A bound, listening, non-blocking TCP socket for `addr` ('' = every interface)."""
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


def accepts_connections(sock: socket.socket) -> bool:
    """Whether the socket listens (SO_ACCEPTCONN; True where unknown)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # pragma: no cover - platforms without SO_ACCEPTCONN
        return True


def check_listening(sock: object, field: str = "sock") -> Address:
    """The address of an application's socket, once it is known to be a
    bound, listening TCP or Unix stream socket (a Unix one as ('unix:PATH', 0))."""
    if not isinstance(sock, socket.socket):
        raise ConfigError(field, sock, "expected a socket.socket")
    if sock.fileno() < 0:
        raise ConfigError(field, sock, "is closed")
    if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or sock.type != socket.SOCK_STREAM:
        raise ConfigError(field, sock, "must be a stream socket (AF_INET, AF_INET6 or AF_UNIX, SOCK_STREAM)")
    if not accepts_connections(sock):
        raise ConfigError(field, sock, "must be bound and listening (call listen() first)")
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        if isinstance(name, bytes):   # an abstract name, NUL first
            name = "@" + os.fsdecode(name[1:])
        if not name:
            raise ConfigError(field, sock, "must be bound and listening (call listen() first)")
        return UNIX_PREFIX + name, 0
    host, port = sock.getsockname()[:2]
    return host, port


def adopt_socket(sock: socket.socket, field: str = "sock") -> socket.socket:
    """A duplicate of an application's bound, listening TCP or Unix socket (systemd
    socket activation, tests, privilege separation). The proxy closes its
    duplicate at stop; the application keeps and closes its own. The
    duplicate shares the socket's file status, so the application's socket
    becomes non-blocking too."""
    check_listening(sock, field)
    dup = sock.dup()
    dup.setblocking(False)
    return dup
