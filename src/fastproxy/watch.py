"""The control plane's background watchers of one running listener: active
health checks, passive upstream transitions (logged once each) and time
windows (the data plane's admit flag). None is on the forwarding path."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

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
        self.health = self._checker(plane.group)
        self._threads = [threading.Thread(target=self._watch_states, name="fastproxy-states", daemon=True)]
        if windows is not None:
            self.window_open = windows.is_open()
            plane.set_admit(self.window_open)
            self._threads.append(threading.Thread(target=self._watch_windows, name="fastproxy-windows",
                                                  daemon=True))

    def _checker(self, group: "_core.UpstreamGroup") -> Optional[HealthChecker]:
        balancing = self.config.balancing
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
            up=[bool(group.state(i)["health"]) for i in range(len(group))],
        )

    def group_changed(self, group: "_core.UpstreamGroup") -> None:
        """The listener's group was swapped (DNS): check its upstreams from
        now on, starting from the verdicts it carried over."""
        if self.health is None or self.stopped.is_set():
            return
        self.health.stop()
        self.health = self._checker(group)
        if self.health is not None:
            self.health.start()

    def start(self) -> None:
        if self.health is not None:
            self.health.start()
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop; returns within `timeout` (a thread still running then ends
        by itself: it sees `stopped`)."""
        deadline = time.monotonic() + timeout
        self.stopped.set()
        if self.health is not None:
            self.health.stop(timeout)
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
        group = self.plane.group
        seen = group.changes
        last = [group.state(i) for i in range(len(group))]
        while not self.stopped.wait(STATE_POLL_S):
            if self.plane.group is not group:
                group = self.plane.group
                seen = group.changes
                last = [group.state(i) for i in range(len(group))]
                continue
            if group.changes == seen:
                continue
            seen = group.changes
            for i, name in enumerate(group.names):
                now: Any = group.state(i)
                # Admin states and run-time weights (drained, maint) are
                # the control plane's to log, not passive health's.
                passive = now["state"] in ("up", "down") and last[i]["state"] in ("up", "down")
                if passive and now["state"] != last[i]["state"] and now["health"] == last[i]["health"]:
                    if now["state"] == "down":
                        log.warning("upstream %s is down: %d connect failures in a row; skipped for %gs",
                                    name, self.config.balancing.max_fails, self.config.balancing.fail_timeout)
                    else:
                        log.info("upstream %s is up again: a connect succeeded", name)
                last[i] = now
