"""Parsing and validation of what users give: addresses, durations, counts.

Every mistake becomes a ConfigError naming the field and the value, in one
line; the CLI prints it as is and exits 2, the API raises it.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Set, Tuple, Union

__all__ = [
    "ConfigError",
    "Config",
    "parse_duration",
    "parse_address",
    "parse_size",
    "format_address",
]

Duration = Union[int, float, str]
Address = Tuple[str, int]

ENGINE_CHOICES = ("auto", "epoll", "poll")


class ConfigError(ValueError):
    """A user mistake in the configuration: `field` names where it is."""

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field}: {value!r}: {problem}")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Duration, field: str, *, allow_zero: bool = True) -> float:
    """'5', '5s', '500ms', '2m', '1h' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(field, value, "is not a duration (use 5, 5s, 500ms, 2m, 1h)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ConfigError(field, value, "is not a duration (use 5, 5s, 500ms, 2m, 1h)")
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        raise ConfigError(field, value, "must be a finite duration >= 0")
    if seconds == 0 and not allow_zero:
        raise ConfigError(field, value, "must be longer than 0")
    return seconds


_SIZE = re.compile(r"(\d+)\s*(k|kib|m|mib)?", re.IGNORECASE)
_SIZE_UNIT = {None: 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}


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
        size = int(match.group(1)) * _SIZE_UNIT[(match.group(2) or "").lower() or None]
    if not low <= size <= high:
        raise ConfigError(field, value, f"must be from {low} to {high} bytes")
    return size


def parse_address(value: str, field: str, *, listen: bool = False) -> Address:
    """'host:port', '[v6]:port' or, to listen, ':port' -> (host, port).

    The host of ':port' is '' (every interface). Port 0 is only for
    listening (the kernel picks a free one)."""
    if not isinstance(value, str):
        raise ConfigError(field, value, "expected a string like HOST:PORT")
    text = value.strip()
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
    if not port_text.isdigit():
        raise ConfigError(field, value, f"port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if listen else 1
    if not low <= port <= 65535:
        raise ConfigError(field, value, f"port {port} is out of range ({low}-65535)")
    if not host and not listen:
        raise ConfigError(field, value, "needs a host")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive_int(value: object, field: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise ConfigError(field, value, "must be a whole number") from None
    if value < low:
        raise ConfigError(field, value, f"must be at least {low}")
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
        cpus = []
        for part in value.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise ConfigError(field, value, "must be CPU numbers and ranges, e.g. 0,2-3")
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
# poll engine copies and is bound by its own CPU, so sending more from it
# only slows it: off there unless asked for.
DEFAULT_NOTSENT_LOWAT = 1 << 20


def default_notsent_lowat(engine: str) -> int:
    """What notsent_lowat=None means for this engine on this platform."""
    if engine == "epoll" and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        return DEFAULT_NOTSENT_LOWAT
    return 0


def parse_notsent_lowat(value: object, field: str) -> Optional[int]:
    if value is None:   # the engine's default, resolved at start
        return None
    size = parse_size(value, field)
    if size and not hasattr(socket, "TCP_NOTSENT_LOWAT"):
        raise ConfigError(field, value, "cannot be used here: this platform has no TCP_NOTSENT_LOWAT")
    return size


def _count_or_none(value: object, field: str) -> Optional[int]:
    return None if value is None else _positive_int(value, field)


def _choice(value: object, field: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(field, value, f"must be one of {', '.join(choices)}")
    return str(value)


@dataclass(frozen=True)
class Config:
    """One listener's validated configuration (immutable)."""

    listen: Address
    upstreams: Tuple[Any, ...]            # fastproxy.Upstream
    workers: int
    connect_timeout: float = 5.0
    drain_timeout: float = 10.0
    half_close_timeout: float = 300.0
    engine: str = "auto"
    busy_poll: float = 0.0                # workers poll without sleeping this long after traffic
    worker_cpus: Optional[Tuple[int, ...]] = None  # worker i runs on worker_cpus[i % len]; None: unpinned
    notsent_lowat: Optional[int] = None   # TCP_NOTSENT_LOWAT on a bridge's sockets; 0: off; None: the engine's default
    # balancing and upstream health
    balance: str = "roundrobin"
    retries: Optional[int] = None         # None: one try per other upstream
    max_fails: int = 3
    fail_timeout: float = 10.0
    health_interval: Optional[float] = None
    health_timeout: float = 2.0
    health_rise: int = 2
    health_fall: int = 3
    # limits
    max_connections: Optional[int] = None  # None: derived from the fd budget
    max_connections_per_ip: Optional[int] = None
    on_limit: str = "queue"
    queue_size: int = 1024
    queue_timeout: float = 30.0

    @property
    def retry_count(self) -> int:
        return len(self.upstreams) - 1 if self.retries is None else self.retries

    @classmethod
    def build(
        cls,
        listen: str,
        upstream: Optional[Any] = None,
        upstreams: Optional[Sequence[Any]] = None,
        workers: Optional[int] = None,
        connect_timeout: Duration = 5.0,
        drain_timeout: Duration = 10.0,
        half_close_timeout: Duration = 300.0,
        engine: str = "auto",
        busy_poll: Duration = 0.0,
        worker_cpus: Optional[Union[str, Sequence[int]]] = None,
        notsent_lowat: Optional[Union[int, str]] = None,
        balance: str = "roundrobin",
        retries: Optional[int] = None,
        max_fails: int = 3,
        fail_timeout: Duration = 10.0,
        health_interval: Optional[Duration] = None,
        health_timeout: Duration = 2.0,
        health_rise: int = 2,
        health_fall: int = 3,
        max_connections: Optional[int] = None,
        max_connections_per_ip: Optional[int] = None,
        on_limit: str = "queue",
        queue_size: int = 1024,
        queue_timeout: Duration = 30.0,
    ) -> "Config":
        from .upstreams import parse_balance, parse_upstreams

        if upstream is not None and upstreams is not None:
            raise ConfigError("upstreams", upstreams, "give either upstream or upstreams, not both")
        if upstream is not None:
            group = parse_upstreams([upstream], "upstream")
        elif upstreams is not None:
            group = parse_upstreams(upstreams, "upstreams")
        else:
            raise ConfigError("upstream", None, "an upstream HOST:PORT is required")
        return cls(
            listen=parse_address(listen, "listen", listen=True),
            upstreams=group,
            workers=default_workers() if workers is None else _positive_int(workers, "workers"),
            connect_timeout=parse_duration(connect_timeout, "connect_timeout", allow_zero=False),
            drain_timeout=parse_duration(drain_timeout, "drain_timeout"),
            half_close_timeout=parse_duration(half_close_timeout, "half_close_timeout", allow_zero=False),
            engine=_choice(engine, "engine", ENGINE_CHOICES),
            busy_poll=parse_duration(busy_poll, "busy_poll"),
            worker_cpus=parse_cpus(worker_cpus, "worker_cpus"),
            notsent_lowat=parse_notsent_lowat(notsent_lowat, "notsent_lowat"),
            balance=parse_balance(balance, "balance"),
            retries=None if retries is None else _positive_int(retries, "retries", 0),
            max_fails=_positive_int(max_fails, "max_fails", 0),
            fail_timeout=parse_duration(fail_timeout, "fail_timeout", allow_zero=False),
            health_interval=None if health_interval is None
            else parse_duration(health_interval, "health_interval", allow_zero=False),
            health_timeout=parse_duration(health_timeout, "health_timeout", allow_zero=False),
            health_rise=_positive_int(health_rise, "health_rise"),
            health_fall=_positive_int(health_fall, "health_fall"),
            max_connections=_count_or_none(max_connections, "max_connections"),
            max_connections_per_ip=_count_or_none(max_connections_per_ip, "max_connections_per_ip"),
            on_limit=_choice(on_limit, "on_limit", ("queue", "reject")),
            queue_size=_positive_int(queue_size, "queue_size"),
            queue_timeout=parse_duration(queue_timeout, "queue_timeout", allow_zero=False),
        )
