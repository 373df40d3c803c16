"""Parsing and validation of access-control input: IP rules, rule files,
rate limits and time windows.

Every mistake becomes a ConfigError naming the field and the value, in one
line. The checks themselves run elsewhere: IP rules and rate limits in the
data plane (fastproxy._core.AccessList, RateLimiter), time windows in the
control plane (TimeWindows.is_open, evaluated about once a minute).
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Callable, FrozenSet, Iterable, List, Optional, Set, Tuple, Union

from .config import ConfigError, Duration, parse_duration

__all__ = [
    "Network",
    "parse_cidr",
    "read_rule_file",
    "parse_rate",
    "TimeWindow",
    "parse_time_window",
    "load_time_zone",
    "TimeWindows",
    "AccessConfig",
    "build_access",
]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Clock = Callable[[], Union[float, datetime]]

CIDR_HINT = "use 10.0.0.0/8, 192.0.2.7, 2001:db8::/32 or ::1"


# ---------------------------------------------------------------- IP rules

def parse_cidr(value: object, field: str) -> Network:
    """'10.0.0.0/8', '2001:db8::/32', or a bare address (/32, /128) -> a
    network. ipaddress networks and addresses pass through."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(value)
    if not isinstance(value, str):
        raise ConfigError(field, value, f"expected an address or network ({CIDR_HINT})")
    text = value.strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(field, value, f"is not an IP address or network ({CIDR_HINT})") from None
    # 10.1.2.3/8 is more likely a typo than a wish for 10.0.0.0/8: say so.
    raise ConfigError(field, value, f"has bits set after the /{loose.prefixlen} prefix; did you mean {loose}?")


def read_rule_file(path: Union[str, os.PathLike], field: str) -> List[Network]:
    """One rule per line; '#' starts a comment; blank lines are skipped.
    A bad line is reported as FILE:LINE."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(field, os.fspath(path), f"cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(field, os.fspath(path), "is not a UTF-8 text file") from None
    rules = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{os.fspath(path)}:{number}"
        if len(text.split()) > 1:
            raise ConfigError(field, where, f"{text!r}: one rule per line")
        try:
            rules.append(parse_cidr(text, field))
        except ConfigError as e:
            raise ConfigError(field, where, f"{text!r} {e.problem}") from None
    return rules


# ---------------------------------------------------------------- rate limits

_RATE = re.compile(r"(\d+)\s*/\s*(\S+)")
RATE_HINT = "use COUNT/DURATION: 20/1s, 600/1m"
MAX_RATE_COUNT = 2**31 - 1
MAX_RATE_PERIOD = 366 * 86400.0


def parse_rate(value: object, field: str) -> Tuple[int, float]:
    """'20/1s', '600/1m', '5/s' or (count, seconds) -> (count, seconds):
    `count` new connections per client per period."""
    if isinstance(value, tuple) and len(value) == 2:
        count, period = value
    elif isinstance(value, str) and (m := _RATE.fullmatch(value.strip())):
        count, period = m.groups()
        if period in ("ms", "s", "m", "h"):
            period = "1" + period
    else:
        raise ConfigError(field, value, f"is not a rate ({RATE_HINT})")
    if isinstance(count, bool) or not str(count).isdigit() or not 1 <= int(count) <= MAX_RATE_COUNT:
        raise ConfigError(field, value, f"the count must be a whole number from 1 to {MAX_RATE_COUNT}")
    try:
        seconds = parse_duration(period, field, allow_zero=False)
    except ConfigError as e:
        raise ConfigError(field, value, f"the period {e.problem}") from None
    if seconds > MAX_RATE_PERIOD:
        raise ConfigError(field, value, "the period must be at most a year")
    return int(count), seconds


# ---------------------------------------------------------------- time windows

_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_WINDOW = re.compile(r"(?:(?P<days>\S+)\s+)?(?P<start>\S+?)\s*-\s*(?P<end>\d\S*)")
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
WINDOW_HINT = "use [DAYS ]HH:MM-HH:MM: 'Mon-Fri 08:00-18:00', 'Sat,Sun 10:00-14:00', '22:00-06:00'"
MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True)
class TimeWindow:
    """Open on `days` (0 = Monday) from `start` to `end`, in minutes after
    local midnight. end <= start crosses midnight: the window belongs to
    the day it starts on and ends the next day."""

    days: FrozenSet[int]
    start: int
    end: int

    def contains(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        return ((weekday in self.days and minute >= self.start)
                or ((weekday - 1) % 7 in self.days and minute < self.end))


def _day(name: str, field: str, value: object) -> int:
    # Three letters or more of a day's English name, any case.
    key = name.lower()
    for i, full in enumerate(_DAY_NAMES):
        if len(key) >= 3 and full.startswith(key):
            return i
    raise ConfigError(field, value, f"unknown day {name!r} (use Mon, Tue, Wed, Thu, Fri, Sat, Sun)")


def _days(text: str, field: str, value: object) -> FrozenSet[int]:
    days: Set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        a = _day(first, field, value)
        b = _day(last, field, value) if dash else a
        # Fri-Mon wraps over the weekend.
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _minute(text: str, field: str, value: object, *, end: bool) -> int:
    match = _TIME.fullmatch(text)
    limit = MINUTES_PER_DAY if end else MINUTES_PER_DAY - 1
    if match:
        hours, minutes = int(match.group(1)), int(match.group(2))
        total = hours * 60 + minutes
        if minutes < 60 and total <= limit:
            return total
    raise ConfigError(field, value, f"{text!r} is not a time of day (00:00-{'24:00' if end else '23:59'})")


def parse_time_window(value: object, field: str) -> TimeWindow:
    """'Mon-Fri 08:00-18:00', 'Sat,Sun 10:00-14:00', '22:00-06:00' (every
    day) -> a TimeWindow. TimeWindow values pass through."""
    if isinstance(value, TimeWindow):
        return value
    if not isinstance(value, str):
        raise ConfigError(field, value, f"is not a time window ({WINDOW_HINT})")
    match = _WINDOW.fullmatch(re.sub(r"\s*,\s*", ",", value.strip()))
    if not match:
        raise ConfigError(field, value, f"is not a time window ({WINDOW_HINT})")
    days = _days(match.group("days"), field, value) if match.group("days") else frozenset(range(7))
    start = _minute(match.group("start"), field, value, end=False)
    end = _minute(match.group("end"), field, value, end=True)
    if end == start:
        raise ConfigError(field, value, "starts when it ends; a whole day is 00:00-24:00")
    return TimeWindow(days, start, end)


def load_time_zone(name: object, field: str = "time_zone") -> tzinfo:
    """An IANA time zone name ('Europe/Berlin', 'UTC') -> a ZoneInfo."""
    import zoneinfo  # Python 3.9+

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(field, name, "expected an IANA time zone name like Europe/Berlin")
    try:
        return zoneinfo.ZoneInfo(name.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(field, name, "is not a known IANA time zone (like Europe/Berlin or UTC; "
                                       "without system zone data, pip install tzdata)") from None


class TimeWindows:
    """When new clients are admitted: inside any of `windows` (strings or
    TimeWindow), in local wall-clock time of `time_zone` (an IANA name;
    None: the system's local time). Wall-clock time makes daylight saving
    what people expect: 08:00-18:00 stays 08:00-18:00, a window inside the
    skipped spring hour never opens that day, one inside the repeated
    autumn hour is open both times.

    `clock` replaces time.time: a callable returning epoch seconds or an
    aware datetime, so tests never wait for wall time.
    """

    def __init__(self, windows: Union[str, TimeWindow, Iterable[Union[str, TimeWindow]]],
                 time_zone: Optional[str] = None, clock: Optional[Clock] = None) -> None:
        if isinstance(windows, (str, TimeWindow)):
            windows = [windows]
        self.windows = tuple(parse_time_window(w, "allow_time") for w in windows)
        if not self.windows:
            raise ConfigError("allow_time", [], "needs at least one window")
        self.time_zone = time_zone
        self._tz = None if time_zone is None else load_time_zone(time_zone)
        self._clock: Clock = clock if clock is not None else time.time

    def local_time(self, now: Union[None, float, datetime] = None) -> datetime:
        """`now` (epoch seconds or an aware datetime; default: the clock)
        as wall-clock time in the configured zone."""
        if now is None:
            now = self._clock()
        if isinstance(now, datetime):
            if now.tzinfo is None:
                raise ValueError("the clock must give an aware datetime or epoch seconds")
            return now.astimezone(self._tz)
        return datetime.fromtimestamp(now, self._tz)

    def is_open(self, now: Union[None, float, datetime] = None) -> bool:
        """Whether new clients are admitted at `now` (default: the clock)."""
        local = self.local_time(now)
        minute = local.hour * 60 + local.minute
        return any(w.contains(local.weekday(), minute) for w in self.windows)


# ---------------------------------------------------------------- one listener's access settings


@dataclass(frozen=True)
class AccessConfig:
    """Validated access-control settings of one listener."""

    allow: Tuple[Network, ...] = ()
    deny: Tuple[Network, ...] = ()
    reject_with: str = "close"
    idle_timeout: Optional[float] = None
    max_lifetime: Optional[float] = None
    windows: Optional[TimeWindows] = None
    close_outside_window: bool = False
    rate: Optional[Tuple[int, float]] = None
    rate_table: int = 65536
    send_proxy: int = 0
    accept_proxy: bool = False
    accept_proxy_from: Tuple[Network, ...] = ()
    proxy_header_timeout: float = 3.0
    proxy_header_max: int = 1024


def _rules(values: Optional[Iterable[object]], files: Optional[Iterable[str]], field: str) -> Tuple[Network, ...]:
    if isinstance(values, (str, bytes)):
        values = [values]
    rules = [parse_cidr(v, field) for v in values or ()]
    for path in files or ():
        rules.extend(read_rule_file(path, field + "_file"))
    return tuple(rules)


def build_access(
    allow: Optional[Iterable[object]] = None,
    deny: Optional[Iterable[object]] = None,
    allow_file: Optional[Iterable[str]] = None,
    deny_file: Optional[Iterable[str]] = None,
    reject_with: str = "close",
    idle_timeout: Optional[Duration] = None,
    max_lifetime: Optional[Duration] = None,
    allow_time: Optional[Iterable[str]] = None,
    time_zone: Optional[str] = None,
    close_outside_window: bool = False,
    clock: Optional[Clock] = None,
    rate_limit_per_ip: Optional[str] = None,
    rate_limit_table: object = 65536,
    send_proxy: Optional[object] = None,
    accept_proxy: bool = False,
    accept_proxy_from: Optional[Iterable[object]] = None,
    proxy_header_timeout: Duration = 3.0,
    proxy_header_max: object = 1024,
) -> AccessConfig:
    if reject_with not in ("close", "reset"):
        raise ConfigError("reject_with", reject_with, "must be close or reset")
    if isinstance(allow_time, str):
        allow_time = [allow_time]
    windows = TimeWindows(list(allow_time), time_zone, clock) if allow_time else None
    if windows is None and time_zone is not None:
        load_time_zone(time_zone)   # still a mistake worth reporting
    if send_proxy in (None, "", 0):
        version = 0
    elif str(send_proxy).lower() in ("v1", "1"):
        version = 1
    elif str(send_proxy).lower() in ("v2", "2"):
        version = 2
    else:
        raise ConfigError("send_proxy", send_proxy, "must be v1 or v2")
    table = _whole_number(rate_limit_table, "rate_limit_table", 1)
    header_max = _whole_number(proxy_header_max, "proxy_header_max", 16)
    return AccessConfig(
        allow=_rules(allow, allow_file, "allow"),
        deny=_rules(deny, deny_file, "deny"),
        reject_with=reject_with,
        idle_timeout=None if idle_timeout is None else parse_duration(idle_timeout, "idle_timeout", allow_zero=False),
        max_lifetime=None if max_lifetime is None else parse_duration(max_lifetime, "max_lifetime", allow_zero=False),
        windows=windows,
        close_outside_window=bool(close_outside_window),
        rate=None if rate_limit_per_ip is None else parse_rate(rate_limit_per_ip, "rate_limit_per_ip"),
        rate_table=table,
        send_proxy=version,
        accept_proxy=bool(accept_proxy) or bool(accept_proxy_from),
        accept_proxy_from=_rules(accept_proxy_from, None, "accept_proxy_from"),
        proxy_header_timeout=parse_duration(proxy_header_timeout, "proxy_header_timeout", allow_zero=False),
        proxy_header_max=header_max,
    )


def _whole_number(value: object, field: str, low: int) -> int:
    try:
        number = int(str(value), 10) if not isinstance(value, int) or isinstance(value, bool) else value
    except ValueError:
        raise ConfigError(field, value, "must be a whole number") from None
    if number < low:
        raise ConfigError(field, value, f"must be at least {low}")
    return number
