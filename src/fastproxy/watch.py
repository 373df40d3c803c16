"""The control plane's background watchers of one running listener: active
health checks, passive upstream transitions (logged once each) and time
windows (the data plane's admit flag). None is on the forwarding path."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import _core
from .config import Config
from .health import HealthChecker
from .timewindows import TimeWindows

log = logging.getLogger(__name__)

STATE_POLL_S = 0.25
# Windows move at minute boundaries; a one-second tick is cheap and follows
# a replaced clock (tests) or a changed system clock.
WINDOW_POLL_S = 1.0


class Watchers:
    def __init__(self, config: Config, windows: Optional[TimeWindows], plane: "_core.ListenerHandle",
                 health_check: Optional[Callable[[str, int], bool]]) -> None:
        self.config = config
        self.windows = windows
        self.plane = plane
        self.health_check = health_check
        self.stopped = threading.Event()
        self.window_open = True
        # One checker per group that asks for checks, by the group's index
        # as swap_group takes it (0: the default group, i: route i), each
        # replaced when a DNS answer swaps its group (a route may set its
        # own health options).
        self.checkers: Dict[int, HealthChecker] = {}
        for index, (group, balancing) in self._groups().items():
            checker = self._checker(group, balancing)
            if checker is not None:
                self.checkers[index] = checker
        self._threads = [threading.Thread(target=self._watch_states, name="fastproxy-states", daemon=True)]
        if windows is not None:
            self.window_open = windows.is_open()
            plane.set_admit(self.window_open)
            self._threads.append(threading.Thread(target=self._watch_windows, name="fastproxy-windows",
                                                  daemon=True))

    def _groups(self) -> Dict[int, Tuple["_core.UpstreamGroup", Any]]:
        # The current groups by index (0: default, i: route i) with their
        # balancing sections.
        from .listener import route_balancing, routes_of
        out: Dict[int, Tuple["_core.UpstreamGroup", Any]] = {}
        if self.plane.group is not None:
            out[0] = (self.plane.group, self.config.balancing)
        for i, (route, group) in enumerate(zip(routes_of(self.config), self.plane.route_groups), 1):
            out[i] = (group, route_balancing(self.config, route))
        return out

    def _checker(self, group: "_core.UpstreamGroup", balancing: Any = None) -> Optional[HealthChecker]:
        # balancing: the group's section (a route's has its own); None: the listener's.
        balancing = balancing if balancing is not None else self.config.balancing
        if balancing.health_interval is None:
            return None
        return HealthChecker(
            [(u.host, u.port) for u in group.upstreams],
            group.set_health,
            interval=balancing.health_interval,
            timeout=balancing.health_timeout,
            rise=balancing.health_rise,
            fall=balancing.health_fall,
            check=self.health_check,
            names=group.names,
            up=[group.state(i)["health"] == "up" for i in range(len(group))],
        )

    def group_changed(self, index: int = 0) -> None:
        """Group `index` (0: the default, i: route i) was swapped (DNS):
        check its upstreams from now on, starting from the verdicts it
        carried over."""
        old = self.checkers.pop(index, None)
        if old is None or self.stopped.is_set():
            return
        old.stop()
        group, balancing = self._groups()[index]
        checker = self._checker(group, balancing)
        if checker is not None:
            self.checkers[index] = checker
            checker.start()

    def start(self) -> None:
        for checker in self.checkers.values():
            checker.start()
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop; returns within `timeout` (a thread still running then ends
        by itself: it sees `stopped`)."""
        deadline = time.monotonic() + timeout
        self.stopped.set()
        for checker in list(self.checkers.values()):
            checker.stop(max(0.0, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ---- time windows

    def check_time_windows(self) -> bool:
        windows = self.windows
        if windows is None:
            return True
        is_open = windows.is_open()
        was_open, self.window_open = self.window_open, is_open
        self.plane.set_admit(is_open)
        if was_open and not is_open:
            log.info("outside the allowed time windows: new clients are refused%s",
                     "; live bridges closed" if self.config.access.close_outside_window else "")
            if self.config.access.close_outside_window:
                self.plane.close_all()
        elif is_open and not was_open:
            log.info("inside an allowed time window: new clients are admitted")
        return is_open

    def _watch_windows(self) -> None:
        while not self.stopped.wait(WINDOW_POLL_S):
            self.check_time_windows()

    # ---- upstream states

    def _watch_states(self) -> None:
        # Passive health changes state in the data plane; this only notices
        # (a counter) and logs each transition once. The health checker
        # logs its own.
        # A swapped group starts afresh: its upstreams are all up.
        watched: Dict[int, Any] = {}
        while True:
            for k, (group, balancing) in self._groups().items():
                if watched.get(k) is None or watched[k][0] is not group:
                    watched[k] = (group, group.changes, [group.state(i) for i in range(len(group))])
                    continue
                _, seen, last = watched[k]
                if group.changes == seen:
                    continue
                watched[k] = (group, group.changes, last)
                self._log_transitions(group, balancing, last)
            if self.stopped.wait(STATE_POLL_S):
                return

    @staticmethod
    def _log_transitions(group: "_core.UpstreamGroup", balancing: Any, last: List[Any]) -> None:
        for i, name in enumerate(group.names):
            now: Any = group.state(i)
            # Admin states and run-time weights (drained, maint) are
            # the control plane's to log, not passive health's.
            passive = now["state"] in ("up", "down") and last[i]["state"] in ("up", "down")
            if passive and now["state"] != last[i]["state"] and now["health"] == last[i]["health"]:
                if now["state"] == "down":
                    log.warning("upstream %s is down: %d connect failures in a row; skipped for %gs",
                                name, balancing.max_fails, balancing.fail_timeout)
                else:
                    log.info("upstream %s is up again: a connect succeeded", name)
            last[i] = now
