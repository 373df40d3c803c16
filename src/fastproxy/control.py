"""Run-time control of a running Proxy: an upstream's admin state (ready,
drain, maint) and weight, and the live bridges (list, close one). The
Python API (Proxy.upstream, Proxy.bridges, Proxy.close_bridge) and the admin
HTTP handler (admin.py) both come here; the data plane does the work
(UpstreamGroup.set_admin/set_weight, DataPlane.bridges/close_bridge)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .values import ConfigError

if TYPE_CHECKING:
    from .listener import Listener
    from .proxy import Proxy

__all__ = ["ADMIN_STATES", "UnknownNameError", "UpstreamControl", "check_state", "check_weight"]

log = logging.getLogger(__name__)

ADMIN_STATES = ("ready", "drain", "maint")
MAX_WEIGHT = 256


class UnknownNameError(ConfigError):
    """A listener, upstream or bridge that does not exist. A ConfigError,
    so a ValueError naming the field and the value (as every mistake in
    what a caller asks is), rather than a LookupError: callers that catch
    ConfigError for bad input catch this too."""


def check_state(state: object) -> str:
    if not isinstance(state, str) or state not in ADMIN_STATES:
        raise ConfigError("state", state, f"expected one of {', '.join(ADMIN_STATES)}")
    return state


def check_weight(weight: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ConfigError("weight", weight, f"expected an integer from 0 to {MAX_WEIGHT}")
    return weight


def _index(lst: "Listener", route: Optional[str] = None) -> Dict[str, int]:
    # The upstreams of the listener's own group, or of route `route`'s.
    group = lst.group_of(route)
    return group.index if group is not None else {}


def _of(name: str, route: Optional[str]) -> str:
    return name if route is None else f"{name} of route {route}"


def find_upstream(listeners: List["Listener"], name: str, listener: Optional[str],
                  route: Optional[str] = None) -> "Listener":
    """The listener whose current group has upstream `name` (in `listener`
    when given; in its route `route`'s group when given). Raises
    UnknownNameError, or ConfigError when the name is in several listeners
    and `listener` is not given."""
    if listener is not None:
        matches = [lst for lst in listeners if lst.name == listener]
        if not matches:
            raise UnknownNameError("listener", listener, "no such listener")
        if route is not None and matches[0].group_of(route) is None:
            raise UnknownNameError("route", route, f"not a route of listener {listener}")
        if name not in _index(matches[0], route):
            raise UnknownNameError("upstream", name, f"not an upstream of listener {listener}"
                                                     + ("" if route is None else f", route {route}"))
        return matches[0]
    matches = [lst for lst in listeners if name in _index(lst, route)]
    if not matches:
        raise UnknownNameError("upstream", name, "not an upstream of any listener"
                                                 + ("" if route is None else f" in a route {route}"))
    if len(matches) > 1:
        raise ConfigError("listener", None, f"upstream {name} is in listeners "
                          f"{', '.join(lst.name for lst in matches)}: name one (listener=)")
    return matches[0]


class UpstreamControl:
    """One upstream of one listener, for run-time control
    (Proxy.upstream()). It names the upstream, not a group: after a reload
    that keeps the upstream in the listener, it controls the new group's.

    drain(): no new clients; live bridges go on; health checks go on.
    maint(): the same, and reported as "maint" (live bridges are not cut:
    close them with Proxy.close_bridge if that is wanted).
    ready(): back to normal (waiting clients get a retry at once).
    set_weight(w): 0-256, what balancing uses from now on (0 drains)."""

    def __init__(self, proxy: "Proxy", listener: str, name: str, route: Optional[str] = None) -> None:
        self._proxy = proxy
        self.listener = listener
        self.name = name
        self.route = route

    def __repr__(self) -> str:
        route = "" if self.route is None else f", route={self.route!r}"
        return f"UpstreamControl(listener={self.listener!r}, name={self.name!r}{route})"

    def drain(self) -> None:
        self._proxy._set_upstream(self.listener, self.name, state="drain", route=self.route)

    def maint(self) -> None:
        self._proxy._set_upstream(self.listener, self.name, state="maint", route=self.route)

    def ready(self) -> None:
        self._proxy._set_upstream(self.listener, self.name, state="ready", route=self.route)

    def set_weight(self, weight: int) -> None:
        self._proxy._set_upstream(self.listener, self.name, weight=weight, route=self.route)

    @property
    def state(self) -> Dict[str, Any]:
        """Its stats entry: state (up, down, drained, maint), admin, weight,
        health, counters."""
        return self._proxy._upstream_state(self.listener, self.name, self.route)


def set_upstream(lst: "Listener", name: str, state: Optional[str], weight: Optional[int],
                 route: Optional[str] = None) -> Tuple[str, int]:
    """Applies an admin state and/or a weight (both checked first) to
    upstream `name` of listener `lst`'s current group (route `route`'s
    group when given); waiting clients get a retry when it became more
    available. Returns (admin, weight) now."""
    if state is not None:
        check_state(state)
    if weight is not None:
        check_weight(weight)
    handle = lst.handle
    if handle is None:
        raise UnknownNameError("listener", lst.name, "is not serving")
    group = lst.group_of(route)
    i = group.index.get(name) if group is not None else None
    if group is None or i is None:
        raise UnknownNameError("upstream", name, f"not an upstream of listener {lst.name}"
                                                 + ("" if route is None else f", route {route}"))
    opened = False
    before = (group.admin(i), group.weight(i))
    if state is not None:
        opened = group.set_admin(i, state) or opened
    if weight is not None:
        opened = group.set_weight(i, weight) or opened
    after = (group.admin(i), group.weight(i))
    if opened:
        handle.kick_waiters()
    if after != before:
        log.info("listener %s: upstream %s: admin %s, weight %d (was %s, %d)", lst.name, _of(name, route),
                 after[0], after[1], before[0], before[1])
    return after
