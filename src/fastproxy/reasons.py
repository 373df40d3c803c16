"""Why a client got no bridge, or a bridge ended early: the listener
counters behind it, grouped once for every view of them (the
fastproxy_refused_total metric, the status page, `fastproxy top`), so that
"refused" is the same sum wherever it is shown. docs/observability.md
describes each counter."""

from __future__ import annotations

from typing import Any, Mapping, Tuple

__all__ = ["REFUSAL_REASONS", "LOSSES", "ROUTE_ONLY", "count", "refusals", "losses"]

# Turned away by a policy or a limit the user set: (fastproxy_refused_total's
# reason label, the listener's stats key).
REFUSAL_REASONS: Tuple[Tuple[str, str], ...] = (
    ("limit", "rejected"),
    ("queue_timeout", "queue_timeouts"),
    ("deny", "denied"),
    ("rate_limit", "rate_limited"),
    ("time_window", "outside_window"),
    ("proxy_header", "proxy_header_errors"),
    ("hook", "hook_refused"),
    ("route", "route_refused"),
    ("route_timeout", "route_timeouts"),
)

# Lost with no policy behind it: for want of file descriptors or memory, or
# a client that left before its TLS ClientHello was whole. Each has a metric
# of its own (fastproxy_fd_exhausted_total, ...), not a refused_total reason.
LOSSES: Tuple[str, ...] = ("fd_exhausted", "no_memory", "route_aborted")

# Counted only by a listener that routes by TLS server name (route = "sni");
# its stats then carry "routes". Elsewhere they would be rows of zeros.
ROUTE_ONLY = frozenset(("route_refused", "route_timeouts", "route_aborted"))


def count(figures: Mapping[str, Any], key: str) -> int:
    """A counter of a stats dict; 0 where it is missing or not a number
    (a snapshot from another version)."""
    value = figures.get(key, 0)
    return int(value) if isinstance(value, (int, float)) else 0


def _shown(figures: Mapping[str, Any], keys: Tuple[str, ...]) -> Tuple[Tuple[str, int], ...]:
    routes = "routes" in figures
    return tuple((k, count(figures, k)) for k in keys if routes or k not in ROUTE_ONLY)


def refusals(figures: Mapping[str, Any]) -> Tuple[Tuple[str, int], ...]:
    """A listener's refusals by stats key, as its stats dict gives them."""
    return _shown(figures, tuple(k for _, k in REFUSAL_REASONS))


def losses(figures: Mapping[str, Any]) -> Tuple[Tuple[str, int], ...]:
    """A listener's losses by stats key, as its stats dict gives them."""
    return _shown(figures, LOSSES)
