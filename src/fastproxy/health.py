"""Active health checks: the control plane probes each upstream from a
background thread and tells the data plane (set_health) when one goes down
or comes back. Nothing here is on the forwarding path.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from .values import format_address, unix_path, unix_sockaddr

__all__ = ["HealthChecker", "tcp_check"]

log = logging.getLogger(__name__)

Check = Callable[[str, int], bool]


def tcp_check(host: str, port: int, timeout: float) -> bool:
    """Up when a TCP connection opens within `timeout` seconds (for a
    'unix:PATH' host, a connection to that socket)."""
    path = unix_path(host)
    try:
        if path is None:
            socket.create_connection((host, port), timeout=timeout).close()
        else:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(unix_sockaddr(path))
    except OSError:
        return False
    return True


class HealthChecker:
    """Checks each of `targets` [(host, port), ...] every `interval` seconds.

    An upstream that is up goes down after `fall` failed checks in a row,
    and one that is down comes back after `rise` passed checks in a row;
    each such transition calls set_health(index, up) and logs one line.
    Every upstream starts up, or as `up` says (the verdicts carried into a
    group that replaced another). A check is a TCP connect, or check(host, port)
    -> bool (an exception is a failure); either way it has `timeout`
    seconds, after which it counts as failed. A check still running from an
    earlier round (a hung callable) counts as failed and is not started
    again until it returns.
    """

    def __init__(
        self,
        targets: Sequence[Tuple[str, int]],
        set_health: Callable[[int, bool], object],
        *,
        interval: float,
        timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        check: Optional[Check] = None,
        names: Optional[Sequence[str]] = None,
        up: Optional[Sequence[bool]] = None,
    ) -> None:
        if interval <= 0 or timeout <= 0 or rise < 1 or fall < 1:
            raise ValueError("health checks need interval > 0, timeout > 0, rise >= 1, fall >= 1")
        self.targets = [(str(h), int(p)) for h, p in targets]
        self.names = list(names) if names is not None else [format_address(*t) for t in self.targets]
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.rise = rise
        self.fall = fall
        self._set_health = set_health
        self._check = check
        n = len(self.targets)
        self._up = list(up) if up is not None else [True] * n
        if len(self._up) != n:
            raise ValueError(f"{len(self._up)} verdicts for {n} targets")
        self._streak = [0] * n  # results in a row that contradict _up
        self._busy = [False] * n  # a check of this upstream is still running
        self._round = 0
        self._results: "queue.Queue[Optional[Tuple[int, int, bool]]]" = queue.Queue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def up(self) -> Tuple[bool, ...]:
        return tuple(self._up)

    def start(self) -> "HealthChecker":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fastproxy-health", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the checks; returns within `timeout` seconds (a hung check
        callable is left behind on its daemon thread)."""
        self._stop.set()
        self._results.put(None)  # wakes a round waiting for results
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        next_round = time.monotonic()
        while not self._stop.is_set():
            self.check_once()
            # Rounds start every interval; a late round does not bunch up
            # the next ones to catch up.
            next_round = max(next_round + self.interval, time.monotonic())
            if self._stop.wait(next_round - time.monotonic()):
                return

    def check_once(self) -> None:
        """One round: check every upstream at once, wait for the answers at
        most `timeout` seconds, count them. Runs on the calling thread."""
        self._round += 1
        self._collect(0, 0, 0.0)  # late answers of earlier rounds free their upstream
        started = 0
        for i in range(len(self.targets)):
            if not self._busy[i]:
                self._busy[i] = True
                started += 1
                threading.Thread(target=self._probe, args=(self._round, i),
                                 name=f"fastproxy-health-{i}", daemon=True).start()
        results = self._collect(self._round, started, time.monotonic() + self.timeout)
        if self._stop.is_set():
            return  # an interrupted round proves nothing
        for i in range(len(self.targets)):
            self._count(i, results.get(i, False))

    def _probe(self, rnd: int, i: int) -> None:
        host, port = self.targets[i]
        try:
            ok = bool(self._check(host, port)) if self._check else tcp_check(host, port, self.timeout)
        except Exception:
            log.debug("health check of %s raised", self.names[i], exc_info=True)
            ok = False
        self._results.put((rnd, i, ok))

    def _collect(self, rnd: int, expected: int, deadline: float) -> Dict[int, bool]:
        # Answers of round `rnd` until `expected` came or the deadline passed;
        # any answer frees its upstream for the next check. With expected 0,
        # takes what is already there.
        results: Dict[int, bool] = {}
        while not self._stop.is_set():
            try:
                item = self._results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                break
            got_round, i, ok = item
            self._busy[i] = False
            if got_round == rnd:
                results[i] = ok
                if len(results) == expected:
                    break
        return results

    def _count(self, i: int, ok: bool) -> None:
        if ok == self._up[i]:
            self._streak[i] = 0
            return
        self._streak[i] += 1
        if self._streak[i] < (self.rise if ok else self.fall):
            return
        self._streak[i] = 0
        self._up[i] = ok
        if ok:
            log.info("upstream %s is up: %d health checks passed in a row", self.names[i], self.rise)
        else:
            log.warning("upstream %s is down: %d health checks failed in a row", self.names[i], self.fall)
        try:
            self._set_health(i, ok)
        except Exception:
            log.exception("set_health(%d, %s) failed", i, ok)
