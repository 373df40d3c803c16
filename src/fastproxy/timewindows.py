"""Time windows: when new clients are admitted ('Mon-Fri 08:00-18:00').
The control plane evaluates them every second and sets the data plane's
admit flag (watch.py)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Callable, FrozenSet, Iterable, List, Optional, Set, Tuple, Union

from .values import ConfigError

__all__ = ["Clock", "TimeWindow", "TimeWindows", "load_time_zone", "parse_time_window", "parse_time_windows"]

Clock = Callable[[], Union[float, datetime]]

_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# re.ASCII: \d is [0-9], not every script's digits.
_WINDOW = re.compile(r"(?:(?P<days>\S+)\s+)?(?P<start>\S+?)\s*-\s*(?P<end>\d\S*)", re.ASCII)
_TIME = re.compile(r"(\d{1,2}):(\d{2})", re.ASCII)
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

    def __str__(self) -> str:
        """The window as a user writes it: 'Mon-Fri 08:00-18:00'."""
        runs: List[str] = []
        day = 0
        while day < 7:
            if day not in self.days:
                day += 1
                continue
            last = day
            while last + 1 < 7 and last + 1 in self.days:
                last += 1
            name, last_name = _DAY_NAMES[day][:3].title(), _DAY_NAMES[last][:3].title()
            runs.append(name if last == day else f"{name}-{last_name}")
            day = last + 1
        hours = f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        return hours if len(self.days) == 7 else f"{','.join(runs)} {hours}"

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
        self.windows: Tuple[TimeWindow, ...] = parse_time_windows(windows, "allow_time") or ()
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


def parse_time_windows(values: object, field: str) -> Optional[Tuple[TimeWindow, ...]]:
    """A list of windows (one string is a list of one); None: always open."""
    if values is None:
        return None
    if isinstance(values, (str, TimeWindow)):
        values = [values]
    if not isinstance(values, Iterable):
        raise ConfigError(field, values, f"is not a time window ({WINDOW_HINT})")
    windows = tuple(parse_time_window(w, field) for w in values)
    if not windows:
        raise ConfigError(field, [], "needs at least one window")
    return windows


def parse_time_zone(value: object, field: str) -> Optional[str]:
    """An IANA name, checked now; kept as the name."""
    if value is None:
        return None
    load_time_zone(value, field)
    return str(value).strip()
