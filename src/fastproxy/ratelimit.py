"""Per-client-address rate limits: '20/1s' -> (count, seconds), enforced
in the data plane (fastproxy._core.RateLimiter, a bounded GCRA table)."""

from __future__ import annotations

import re
from typing import Tuple

from .values import MAX_DURATION, ConfigError, parse_count, parse_duration

__all__ = ["parse_rate"]

_RATE = re.compile(r"(\d+)\s*/\s*(\S+)", re.ASCII)   # \d: [0-9] only
RATE_HINT = "use COUNT/DURATION: 20/1s, 600/1m"
MAX_RATE_COUNT = 2**31 - 1
MAX_RATE_PERIOD = MAX_DURATION


def parse_rate(value: object, field: str) -> Tuple[int, float]:
    """'20/1s', '600/1m', '5/s' or (count, seconds) -> (count, seconds):
    `count` new connections per client per period."""
    match = _RATE.fullmatch(value.strip()) if isinstance(value, str) else None
    count: object
    period: object
    if isinstance(value, tuple) and len(value) == 2:
        count, period = value
    elif match is not None:
        count, period = match.groups()
        if period in ("ms", "s", "m", "h"):
            period = "1" + period
    else:
        raise ConfigError(field, value, f"is not a rate ({RATE_HINT})")
    try:
        count = parse_count(count, field, high=MAX_RATE_COUNT)
    except ConfigError as e:
        raise ConfigError(field, value, f"the count {e.problem}") from None
    try:
        seconds = parse_duration(period, field, allow_zero=False)
    except ConfigError as e:
        raise ConfigError(field, value, f"the period {e.problem}") from None
    if seconds > MAX_RATE_PERIOD:
        raise ConfigError(field, value, "the period must be at most a year")
    return int(count), seconds
