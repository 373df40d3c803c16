"""Background processes (proxies, servers) in their own sessions, and the
helpers that start, wait for and pin them."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Optional, Set

from .common import HOST, READY_TIMEOUT_S, STOP_GRACE_S, BenchError
from .procfs import live_group_members


_live: Set["Service"] = set()


class Service:
    """A background process in its own session, so that stopping it reaches
    every process it forked (multi-process proxies, worker pools)."""

    def __init__(self, name: str, argv: List[str], workdir: Path,
                 cpus: Optional[Set[int]] = None):
        self.name, self.argv, self.workdir, self.cpus = name, argv, workdir, cpus
        self.log_path = workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Service":
        # Pin in the child before exec so no thread ever runs elsewhere.
        with open(self.log_path, "ab") as logf:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    start_new_session=True, preexec_fn=pin_to(self.cpus))
            except OSError as e:
                raise BenchError(f"cannot start {self.name} ({self.argv[0]}): {e}")
        _live.add(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    def _signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def stop(self) -> dict:
        """SIGTERM the group, SIGKILL after STOP_GRACE_S. Returns how it went,
        because a proxy that needs SIGKILL or leaves children is a bug."""
        if self.proc is None:
            return {}
        _live.discard(self)
        t0 = time.monotonic()
        self._signal_group(signal.SIGTERM)
        killed = False
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()
            killed = True
        # The leader may exit while forked children linger in the group.
        leftover = False
        deadline = time.monotonic() + STOP_GRACE_S
        while live_group_members(self.proc.pid):
            if time.monotonic() > deadline:
                leftover = self._signal_group(signal.SIGKILL)
                break
            time.sleep(0.02)
        return {"exit_code": self.proc.returncode, "killed": killed,
                "leftover_children": leftover,
                "stop_s": round(time.monotonic() - t0, 3)}

    def restart(self) -> None:
        self.stop()
        self.start()


def stop_everything() -> None:
    for svc in list(_live):
        svc.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_accepting(port: int, svc: Optional[Service]) -> float:
    """Block until HOST:port accepts a connection; fail early if the process
    behind it died. Returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < READY_TIMEOUT_S:
        if svc is not None and not svc.alive():
            raise BenchError(f"{svc.name} exited with {svc.proc.returncode} "
                             f"during start-up: {svc.log_tail()}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return time.monotonic() - t0
        except OSError:
            time.sleep(0.02)
    tail = svc.log_tail() if svc else ""
    raise BenchError(f"port {port} not accepting after {READY_TIMEOUT_S:.0f} s {tail}")


def pin_to(cpus: Optional[Set[int]]) -> Optional[Callable[[], None]]:
    """A preexec_fn that pins the child before exec (None: inherit ours)."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def run_json(argv: List[str], timeout: float, cpus: Optional[Set[int]] = None) -> dict:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, preexec_fn=pin_to(cpus))
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(argv[0]).name} timed out after {timeout:.0f} s")
    try:
        data = json.loads(p.stdout)
    except ValueError:
        data = None
    # iperf3 -J reports its failures inside the JSON, with a non-zero exit.
    if p.returncode != 0 or not isinstance(data, dict) or data.get("error"):
        why = (data or {}).get("error") if isinstance(data, dict) else None
        why = why or p.stderr.strip()[-300:] or f"exit {p.returncode}"
        raise BenchError(f"{Path(argv[0]).name} {argv[1]}: {why}")
    return data
