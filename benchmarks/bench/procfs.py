"""/proc readers: CPU busy time per CPU and per process group, RSS, fds,
and the meter that turns them into a proxy's CPU cost."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Set, Tuple

if TYPE_CHECKING:  # annotations only: measure and procs import this module
    from .measure import Env
    from .procs import Service


HZ = os.sysconf("SC_CLK_TCK")
BUSY = (0, 1, 2, 5, 6)  # /proc/stat: user nice system irq softirq
IDLE = (3, 4)           # idle iowait
STEAL = 7


def proc_stat() -> Dict[int, List[int]]:
    cpus = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                cpus[int(name[3:])] = [int(v) for v in vals]
    return cpus


def proc_stats() -> Iterator[Tuple[int, List[str]]]:
    """(pid, /proc/PID/stat fields after the command name) of every process:
    [0] state, [1] ppid, [2] pgrp, [11] utime, [12] stime."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        yield int(entry), fields


def group_stats(pgid: int) -> List[List[str]]:
    """proc_stats fields of every process in a process group."""
    return [fields for _, fields in proc_stats() if int(fields[2]) == pgid]


def live_group_members(pgid: int) -> int:
    # Zombies stay in the group until someone reaps them; they hold nothing.
    return sum(1 for f in group_stats(pgid) if f[0] != "Z")


def group_ticks(pgid: int) -> int:
    """utime+stime of a process group; threads count in their process."""
    return sum(int(f[11]) + int(f[12]) for f in group_stats(pgid))


def group_pids(pgid: int) -> List[str]:
    return [e for e in os.listdir("/proc") if e.isdigit() and _pgrp(e) == pgid]


def _pgrp(pid: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def group_rss_kib(pgid: int) -> int:
    """Sum of VmRSS over a process group (KiB). For multi-process proxies
    shared pages count once per process; the test uses the growth only."""
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def group_fds(pgid: int) -> int:
    total = 0
    for pid in group_pids(pgid):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def group_task_ns(pgid: int) -> int:
    """On-CPU nanoseconds of every thread of a process group, from
    /proc/PID/task/TID/schedstat (exact, unlike the 10 ms ticks of
    /proc/stat). Without CONFIG_IRQ_TIME_ACCOUNTING this includes the softirq
    work (loopback TCP receive) run in those threads' context."""
    total = 0
    for pid in group_pids(pgid):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return total


def foreign_ticks() -> Dict[int, int]:
    """CPU ticks (utime+stime+cutime+cstime) of every user-space process that
    is not this runner or one of its descendants: other work on the machine.
    Kernel threads are left out (some of their work is ours)."""
    procs: Dict[int, Tuple[int, int]] = {}
    for pid, fields in proc_stats():
        ppid = int(fields[1])
        if pid == 2 or ppid == 2:  # kthreadd and kernel threads
            continue
        procs[pid] = (ppid, sum(int(v) for v in fields[11:15]))
    ours, todo = set(), [os.getpid()]
    children: Dict[int, List[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo.extend(children.get(pid, ()))
    return {pid: t for pid, (_, t) in procs.items() if pid not in ours}


def foreign_delta(before: Dict[int, int], after: Dict[int, int]) -> int:
    # A process that exited is gone from `after`; its time moves into its
    # parent's cutime/cstime once reaped, which is then counted.
    return sum(max(t - before.get(pid, 0), 0) for pid, t in after.items())


class CpuMeter:
    """CPU used while one test ran.

    Pinned (split): busy time of the proxy's CPUs from /proc/stat. That also
    counts the softirq work of loopback TCP done on those CPUs, which is real
    cost of putting a proxy in the path. Unpinned: utime+stime of the proxy's
    process group (no softirq, so lower)."""

    def __init__(self, env: "Env", proxy: Optional["Service"]):
        self.env, self.proxy = env, proxy

    def __enter__(self) -> "CpuMeter":
        self.foreign0 = foreign_ticks()
        self.t0, self.stat0 = time.monotonic(), proc_stat()
        self.ticks0 = self._group()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.t0
        stat1, ticks1 = proc_stat(), self._group()
        # Other work during the test, in % of one CPU.
        self.foreign_pct = 100 * foreign_delta(self.foreign0, foreign_ticks()) / HZ / self.wall
        d = {c: [b - a for a, b in zip(self.stat0[c], stat1[c])] for c in stat1}
        self.all_s = self.proxy_split = None
        if self.env.proxy_cpus:
            self.proxy_s = self._busy(d, self.env.proxy_cpus)
            self.all_s = self._busy(d, self.env.proxy_cpus | self.env.load_cpus)
            self.proxy_pct = 100 * self.proxy_s / self.wall / len(self.env.proxy_cpus)
            self.load_pct = (100 * self._busy(d, self.env.load_cpus)
                             / self.wall / len(self.env.load_cpus))
            # Where the proxy CPU's time went: a copying proxy shows in
            # user, the kernel's TCP work (its own and the ACK-clocked
            # sending) in system and softirq.
            self.proxy_split = {
                part: round(100 * sum(d[c][i] for c in self.env.proxy_cpus) / HZ / self.wall
                            / len(self.env.proxy_cpus), 1)
                for part, i in (("user", 0), ("system", 2), ("softirq", 6))}
        else:
            self.proxy_s = None if self.ticks0 is None else (ticks1 - self.ticks0) / HZ
            self.proxy_pct = None if self.proxy_s is None else 100 * self.proxy_s / self.wall
            self.load_pct = None
        all_ticks = sum(sum(v[i] for i in BUSY + IDLE + (STEAL,)) for v in d.values())
        self.steal_pct = 100 * sum(v[STEAL] for v in d.values()) / max(all_ticks, 1)

    def _group(self) -> Optional[int]:
        if self.env.proxy_cpus or self.proxy is None:
            return None
        return group_ticks(self.proxy.proc.pid)

    @staticmethod
    def _busy(d: Dict[int, List[int]], cpus: Set[int]) -> float:
        return sum(d[c][i] for c in cpus for i in BUSY) / HZ

    def per(self, units: float, scale: float) -> Optional[float]:
        if self.proxy_s is None or not units:
            return None
        return self.proxy_s * scale / units

    def per_all(self, units: float, scale: float) -> Optional[float]:
        """Busy time of the proxy's and the load's CPUs together, per unit
        (pinned runs only)."""
        if self.all_s is None or not units:
            return None
        return self.all_s * scale / units

    def summary(self) -> dict:
        r = lambda v: None if v is None else round(v, 2)
        return {"proxy_cpu_s": r(self.proxy_s), "proxy_cpu_pct": r(self.proxy_pct),
                "load_cpu_pct": r(self.load_pct), "steal_pct": r(self.steal_pct),
                "foreign_cpu_pct": r(self.foreign_pct), "wall_s": r(self.wall),
                "proxy_cpu_split_pct": self.proxy_split}


def background_busy(seconds: float = 1.0) -> Dict[int, float]:
    """Busy % per CPU while we do nothing: other work on the box (builds,
    a second benchmark) lands in the proxy CPU's busy time and in the
    throughput figures, so say so up front."""
    a = proc_stat()
    time.sleep(seconds)
    b = proc_stat()
    return {c: round(100 * sum(b[c][i] - a[c][i] for i in BUSY) / HZ / seconds, 1) for c in b}
