"""Parsing and validation of the values users give: durations, sizes,
addresses, counts, choices, CPU lists.

Every mistake becomes a ConfigError naming the field and the value, in one
line; the CLI prints it as is and exits 2, the API raises it. Options are
declared in options.py, each with one of these parsers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import sys
from typing import Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

from . import _core

__all__ = [
    "ConfigError",
    "MAX_CONNECTIONS",
    "MAX_COUNT",
    "MAX_DURATION",
    "Keepalive",
    "clip",
    "is_digits",
    "parse_count",
    "parse_choice",
    "parse_cpus",
    "parse_duration",
    "parse_address",
    "parse_size",
    "parse_tcp_keepalive",
    "parse_tcp_user_timeout",
    "parse_unix",
    "plain_ip",
    "quote",
    "refuse_nul",
    "format_address",
    "unix_path",
    "unix_sockaddr",
]

Duration = Union[int, float, str]
Address = Tuple[str, int]


class ConfigError(ValueError):
    """A user mistake in the configuration: `field` names where it is;
    `listener`, when set, the name of the listener whose option it is (a
    process of several listeners tells them apart by it)."""

    listener: Optional[str] = None

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{clip(field)}: {quote(value)}: {problem}")


@contextlib.contextmanager
def naming_listener(name: str) -> Iterator[None]:
    """A ConfigError raised within is about listener `name` (unless it
    already names one)."""
    try:
        yield
    except ConfigError as exc:
        if exc.listener is None:
            exc.listener = name
        raise


def plain_ip(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The IP address `text` is (a zone after "%" left out), an IPv4-mapped
    IPv6 address as the IPv4 one it maps: what a dual-stack socket shows
    for an IPv4 peer is that peer. None when `text` is no IP address."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


MAX_QUOTE = 120


def quote(value: object) -> str:
    """repr(value), cut to about MAX_QUOTE characters: an error line quotes
    what the user gave, not a megabyte of it."""
    return clip(repr(value), len(value) if isinstance(value, str) else None)


def clip(text: str, size: Optional[int] = None) -> str:
    """text cut to about MAX_QUOTE characters, saying how long it was
    (`size`, else its own length): what quote() does for a value, for what
    an error line shows as it is (a key path)."""
    if len(text) <= MAX_QUOTE:
        return text
    return f"{text[:MAX_QUOTE - 20]}... ({len(text) if size is None else size} characters)"


def refuse_nul(value: Union[str, bytes], field: str, what: str = "path") -> None:
    """A path or a name goes to the system as a C string, which a NUL would
    end early; Python refuses it with a bare ValueError (a traceback), so
    it is refused here first, as the user's mistake."""
    if "\0" in value if isinstance(value, str) else b"\0" in value:
        raise ConfigError(field, value, f"a {what} cannot hold a NUL byte")


# The longest duration any option takes: a year (366 days). Longer is a
# typo, and the data plane keeps deadlines in int64 nanoseconds.
MAX_DURATION = 366 * 86400.0
# The largest count an option takes where no tighter bound applies: the
# data plane keeps counts in C ints.
MAX_COUNT = 2**31 - 1
# Live bridges a listener or an upstream may be limited to: more than any
# fd limit allows, and small enough that the tables sized by it (the per-IP
# counts) stay allocatable.
MAX_CONNECTIONS = 1 << 24


def is_digits(text: str) -> bool:
    """ASCII decimal digits only: str.isdigit() and int() also take other
    scripts' digits ('\uff18\uff10', full-width 80), which no user means as a number."""
    return text.isascii() and text.isdigit()


# re.ASCII: \d is then [0-9], not every script's digits.
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?", re.ASCII)
_UNIT = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, field: str, *, allow_zero: bool = True) -> float:
    """'5', '5s', '500ms', '2m', '1h' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(field, value, "is not a duration (use 5, 5s, 500ms, 2m, 1h)")
    if isinstance(value, (int, float)):
        # An int may be too large for a float: bounded before converting.
        seconds = float(max(-1, min(value, 2 * MAX_DURATION))) if isinstance(value, int) else float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ConfigError(field, value, "is not a duration (use 5, 5s, 500ms, 2m, 1h)")
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ConfigError(field, value, "must be a finite duration >= 0")
    if seconds > MAX_DURATION:
        raise ConfigError(field, value, "is longer than the longest duration allowed (366 days)")
    if seconds == 0 and not allow_zero:
        raise ConfigError(field, value, "must be longer than 0")
    return seconds


_SIZE = re.compile(r"(\d+)\s*(k|kib|m|mib)?", re.IGNORECASE | re.ASCII)
_SIZE_UNIT = {None: 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}


# More digits than any size here has: int() of thousands of digits is
# refused by Python (ValueError) and slow before that.
_MAX_DIGITS = 30


def parse_size(value: object, field: str, *, low: int = 0, high: int = 1 << 30) -> int:
    """'256k', '1m', '65536' or a number of bytes -> bytes (k and m are 1024-based)."""
    if isinstance(value, bool):
        raise ConfigError(field, value, "is not a size (use 65536, 256k, 1m)")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value).strip())
        if not match:
            raise ConfigError(field, value, "is not a size (use 65536, 256k, 1m)")
        if len(match.group(1).lstrip("0")) > _MAX_DIGITS:
            raise ConfigError(field, value, f"must be from {low} to {high} bytes")
        size = int(match.group(1)) * _SIZE_UNIT[(match.group(2) or "").lower() or None]
    if not low <= size <= high:
        raise ConfigError(field, value, f"must be from {low} to {high} bytes")
    return size


UNIX_PREFIX = "unix:"
SRV_PREFIX = "srv:"
# A DNS name: labels of letters, digits, '-' and '_' (SRV owners such as
# _postgres._tcp start with '_'), 63 bytes at most each, 253 in all.
_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def parse_srv(value: str, field: str) -> str:
    """'srv:_service._proto.name' -> its host form 'srv:NAME' (lower case,
    no final dot); carried with port 0 like a Unix address."""
    name = value.strip()[len(SRV_PREFIX):].rstrip(".").lower()
    if not name:
        raise ConfigError(field, value, "needs a DNS name after srv: (srv:_service._proto.name)")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ConfigError(field, value, "is not a DNS name (labels of letters, digits, '-' and '_')")
    return SRV_PREFIX + name


def unix_path(host: str) -> Optional[str]:
    """The socket path of a Unix address's host ('unix:/run/x.sock' ->
    '/run/x.sock', 'unix:@name' -> '@name'), None for an IP host."""
    return host[len(UNIX_PREFIX):] if host.startswith(UNIX_PREFIX) else None


def unix_sockaddr(path: str) -> str:
    """What socket.bind/connect take for a path: '@name' is the abstract
    name, a leading NUL on Linux."""
    return "\0" + path[1:] if path.startswith("@") else path


def parse_unix(value: str, field: str) -> Address:
    """'unix:/path' or 'unix:@name' -> ('unix:/path', 0): a Unix address is
    its text as host with port 0, so that it goes wherever (host, port) does."""
    path = value.strip()[len(UNIX_PREFIX):]
    if not path or path == "@":
        raise ConfigError(field, value, "needs a path after unix: (unix:/PATH or unix:@NAME)")
    if "\0" in path:
        raise ConfigError(field, value, "a Unix socket path cannot contain NUL")
    if path.startswith("@") and not sys.platform.startswith("linux"):
        raise ConfigError(field, value, "abstract Unix socket names (unix:@NAME) are Linux only")
    size = len(os.fsencode(path[1:] if path.startswith("@") else path))
    if size > _core.UNIX_PATH_MAX:
        raise ConfigError(field, value, f"is {size} bytes long: a Unix socket path has at most "
                                        f"{_core.UNIX_PATH_MAX}")
    return UNIX_PREFIX + path, 0


def parse_address(value: str, field: str, *, listen: bool = False) -> Address:
    """'host:port', '[v6]:port', 'unix:/path', 'unix:@name' or, to listen,
    ':port' -> (host, port).

    The host of ':port' is '' (every interface). Port 0 is only for
    listening (the kernel picks a free one); a Unix address is
    ('unix:PATH', 0) (parse_unix)."""
    if not isinstance(value, str):
        raise ConfigError(field, value, "expected a string like HOST:PORT")
    text = value.strip()
    if text.startswith(UNIX_PREFIX):
        return parse_unix(text, field)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":") or ":" not in host:
            raise ConfigError(field, value, "expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(field, value, "expected HOST:PORT" + (" or :PORT" if listen else ""))
        if ":" in host:
            raise ConfigError(field, value, "an IPv6 address needs brackets: [ADDR]:PORT")
    if not is_digits(port_text) or len(port_text) > 5:
        raise ConfigError(field, value, f"port {port_text[:16]!r} is not a number from 0 to 65535")
    port = int(port_text)
    low = 0 if listen else 1
    if not low <= port <= 65535:
        raise ConfigError(field, value, f"port {port} is out of range ({low}-65535)")
    if not host and not listen:
        raise ConfigError(field, value, "needs a host")
    if not host.isprintable() or any(c.isspace() for c in host):
        # getaddrinfo would read "127.0.0.1\x00junk" as 127.0.0.1.
        raise ConfigError(field, value, "the host cannot contain spaces or control characters")
    return host, port


def format_address(host: str, port: int) -> str:
    if host.startswith((UNIX_PREFIX, SRV_PREFIX)):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_count(value: object, field: str, *, low: int = 1, high: int = MAX_COUNT) -> int:
    """A whole number from low to high (MAX_COUNT unless the option has a
    tighter bound): an int, or its decimal text (from the CLI or a file).
    bool is an int to Python, but True is a mistake."""
    if isinstance(value, bool) or not isinstance(value, int):
        text = value.strip() if isinstance(value, str) else None
        if text is None or not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ConfigError(field, value, "is not a whole number")
        # Past 40 digits the number is out of range whatever it is: not
        # converted (int() of a huge text is slow) nor echoed in full.
        number = int(text, 10) if len(text) <= 40 else (high + 1 if text[0] != "-" else low - 1)
    else:
        number = value
    if not low <= number <= high:
        raise ConfigError(field, value, f"is out of range ({low}-{high})")
    return number



def parse_choice(value: object, field: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(field, value, f"must be one of {', '.join(choices)}")
    return value


def usable_cpus() -> Optional[Set[int]]:
    """The CPUs this process may run on (containers and taskset restrict
    them); None where the platform cannot tell or pin threads to them."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return None


def default_workers() -> int:
    # One per CPU this process may run on, not per CPU of the machine.
    usable = usable_cpus()
    return len(usable) if usable is not None else os.cpu_count() or 1


def parse_cpus(value: object, field: str) -> Optional[Tuple[int, ...]]:
    """'0,2-3' or a sequence of CPU numbers -> (0, 2, 3), in the order given;
    each must be one this process may run on."""
    if value is None:
        return None
    if isinstance(value, str):
        cpus: List[int] = []
        for part in value.split(","):
            m = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", part, re.ASCII)
            if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise ConfigError(field, value, "must be CPU numbers (0-99999) and ranges, e.g. 0,2-3")
            cpus.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    elif isinstance(value, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        cpus = list(value)
    else:
        raise ConfigError(field, value, "must be CPU numbers and ranges, e.g. 0,2-3")
    if not cpus:
        raise ConfigError(field, value, "must name at least one CPU")
    usable = usable_cpus()
    if usable is None:
        raise ConfigError(field, value, "cannot be used here: this platform cannot pin threads to CPUs")
    outside = sorted(set(cpus) - usable)
    if outside:
        raise ConfigError(field, value, f"CPU {outside[0]} is not one this process may use "
                                        f"({','.join(map(str, sorted(usable)))})")
    return tuple(cpus)


# Measured on loopback with the epoll engine (docs/benchmarks.md): 8 streams
# gain about a fifth, one stream loses at most about a tenth, and the proxy
# pays in CPU per GB for the sending it now does itself. Smaller values move
# more of the sending onto the proxy's CPU, which costs one stream more. The
# poll engine has it too: without it a client that never reads pins a whole
# autotuned send buffer (4 MiB) in the kernel, and 500 of them took a host
# past tcp_mem's hard limit; its cost to poll's throughput was inside the
# noise of a loaded 2-CPU machine (docs/architecture.md, "Unsent bytes").
DEFAULT_NOTSENT_LOWAT = 1 << 20


def default_notsent_lowat(engine: str) -> int:
    """What notsent_lowat=None means on this platform (either engine)."""
    # The extension sets the option, so what it was built with decides, not
    # the socket module: a portable build on Linux has it in neither sense.
    return DEFAULT_NOTSENT_LOWAT if _core.HAVE_NOTSENT_LOWAT else 0


# socket_buffer="auto" on a loopback leg: enough for any rate a loopback
# path moves (the round trip is tens of microseconds), small enough that
# the bytes in flight stay in the CPU's caches (docs/benchmarks.md).
LOOPBACK_SOCKET_BUFFER = 262144


def parse_socket_buffer(value: object, field: str) -> Union[int, str]:
    """SO_SNDBUF/SO_RCVBUF for both sockets of a bridge; 0 leaves them to the
    kernel's autotuning; "auto" sets LOOPBACK_SOCKET_BUFFER on a socket
    whose peer is a loopback address and leaves the others to the kernel."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    size = parse_size(value, field)
    # Below a page the kernel raises it to its own minimum anyway: a typo.
    if 0 < size < 4096:
        raise ConfigError(field, value, "must be 0 (the kernel's autotuning) or at least 4k")
    return size


# TCP_CA_NAME_MAX (include/net/tcp.h), with its NUL.
CONGESTION_NAME_MAX = 15
AVAILABLE_CONGESTION = "/proc/sys/net/ipv4/tcp_available_congestion_control"
# What "auto" sets on a socket whose peer is a loopback address: BBR's
# pacing there reorders the proxy's own sending (docs/benchmarks.md).
LOOPBACK_CONGESTION = "cubic"


def parse_congestion_control(value: object, field: str) -> Optional[str]:
    """TCP_CONGESTION for both sockets of a bridge: an algorithm this
    kernel has loaded; "auto" (LOOPBACK_CONGESTION where the peer is a
    loopback address, the host's elsewhere); None ("host") keeps the
    host's everywhere."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(field, value, "is not an algorithm name")
    name = value.strip()
    if name.lower() == "host":
        return None
    if name.lower() == "auto":
        return "auto"
    if not name or len(name) > CONGESTION_NAME_MAX or not name.replace("_", "").isalnum():
        raise ConfigError(field, value, f"is not an algorithm name (letters, digits, _; at most "
                          f"{CONGESTION_NAME_MAX})")
    if not _core.HAVE_TCP_CONGESTION:
        raise ConfigError(field, value, "cannot be used here: this build has no TCP_CONGESTION")
    try:
        with open(AVAILABLE_CONGESTION) as f:
            available = f.read().split()
    except OSError:
        available = None   # no /proc to ask: the start-up probe decides
    if available is not None and name not in available:
        raise ConfigError(field, value, f"is not available here (tcp_available_congestion_control: "
                          f"{' '.join(available)}; modprobe tcp_{name} may load it)")
    return name


# The kernel's bounds (net/ipv4/tcp.c): MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL, MAX_TCP_KEEPCNT.
MAX_KEEPALIVE_SECONDS = 32767
MAX_KEEPALIVE_COUNT = 127


class Keepalive(NamedTuple):
    """tcp_keepalive: SO_KEEPALIVE with TCP_KEEPIDLE and TCP_KEEPINTVL in
    seconds and TCP_KEEPCNT (COUNT); 0 leaves that one to the kernel."""
    idle: int
    interval: int
    probes: int   # not `count`: tuple.count

    def __str__(self) -> str:
        if not any(self):
            return "on"
        parts = [f"{self.idle}s" if self.idle else "", f"{self.interval}s" if self.interval else "",
                 str(self.probes) if self.probes else ""]
        return ":".join(parts).rstrip(":")


_KEEPALIVE_USAGE = "is not IDLE[:INTERVAL[:COUNT]] (use 60s:10s:6, 2m, on or off)"


def parse_tcp_keepalive(value: object, field: str) -> Optional[Keepalive]:
    """'off' (None), 'on' (the kernel's timers) or IDLE[:INTERVAL[:COUNT]]:
    whole-second durations and a probe count, as nginx's so_keepalive; an
    empty part leaves that one to the kernel."""
    if isinstance(value, Keepalive):
        return value
    if value is None or value is False:
        return None
    if value is True:
        return Keepalive(0, 0, 0)
    if not isinstance(value, (str, int, float)):
        raise ConfigError(field, value, _KEEPALIVE_USAGE)
    text = str(value).strip().lower()   # a number: IDLE in seconds
    if text in ("off", "none", "0", ""):
        return None
    if text == "on":
        return Keepalive(0, 0, 0)
    parts = text.split(":")
    if len(parts) > 3:
        raise ConfigError(field, value, _KEEPALIVE_USAGE)
    parts += [""] * (3 - len(parts))
    numbers = []
    for i, part in enumerate(parts):
        part = part.strip()
        if not part:
            numbers.append(0)
            continue
        if i == 2:
            if not is_digits(part) or len(part.lstrip("0")) > 3 or not 1 <= int(part) <= MAX_KEEPALIVE_COUNT:
                raise ConfigError(field, value, f"COUNT must be a number of probes from 1 to {MAX_KEEPALIVE_COUNT}")
            numbers.append(int(part))
            continue
        what = "IDLE" if i == 0 else "INTERVAL"
        try:
            seconds = parse_duration(part, field)
        except ConfigError:
            if _DURATION.fullmatch(part):   # a duration, but too long for one
                seconds = float("inf")
            else:
                raise ConfigError(field, value, _KEEPALIVE_USAGE) from None
        # The kernel counts these in whole seconds: 1500ms would silently be 1s.
        if not 1 <= seconds <= MAX_KEEPALIVE_SECONDS or seconds != int(seconds):
            raise ConfigError(field, value, f"{what} must be whole seconds from 1s to {MAX_KEEPALIVE_SECONDS}s")
        numbers.append(int(seconds))
    keepalive = Keepalive(*numbers)
    if any(keepalive) and not _core.HAVE_KEEPALIVE_TIMERS:
        raise ConfigError(field, value, "cannot be used here: this build has no TCP_KEEPIDLE, TCP_KEEPINTVL "
                          "and TCP_KEEPCNT (use on: SO_KEEPALIVE with the system's timers)")
    return keepalive


# TCP_USER_TIMEOUT is an int of milliseconds in the kernel (a negative one
# is refused): about 24.8 days.
MAX_USER_TIMEOUT_MS = (1 << 31) - 1


def parse_tcp_user_timeout(value: object, field: str) -> Optional[float]:
    """tcp_user_timeout: 'off' or 0 (None), or a duration in whole
    milliseconds up to MAX_USER_TIMEOUT_MS -> seconds."""
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in ("off", "none", ""):
        return None
    seconds = parse_duration(value, field)
    if seconds == 0:
        return None
    ms = seconds * 1000
    # The kernel counts milliseconds: 1.5ms would silently be 1ms. (Within
    # a float's error of whole: 36ms is 0.036 s, and 0.036 * 1000 is not 36.)
    if abs(ms - round(ms)) > 1e-6 or round(ms) > MAX_USER_TIMEOUT_MS:
        raise ConfigError(field, value, f"must be whole milliseconds from 1ms to {MAX_USER_TIMEOUT_MS}ms "
                          "(about 24 days), or off")
    if not _core.HAVE_TCP_USER_TIMEOUT:
        raise ConfigError(field, value, "cannot be used here: this build has no TCP_USER_TIMEOUT")
    return round(ms) / 1000


def parse_notsent_lowat(value: object, field: str) -> Optional[int]:
    if value is None:   # the engine's default, resolved at start
        return None
    size = parse_size(value, field)
    if size and not _core.HAVE_NOTSENT_LOWAT:
        raise ConfigError(field, value, "cannot be used here: this build has no TCP_NOTSENT_LOWAT")
    return size
