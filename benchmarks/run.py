#!/usr/bin/env python3
"""fastproxy benchmark runner.

Measures, side by side in one run, `direct` (no proxy), fastproxy with both
engines and, when installed, haproxy with and without splicing, nginx's stream
module and small asyncio / uvloop proxies (peers/asyncio_proxy.py): bulk
throughput (iperf3), new connections per second, ping-pong latency (split
pinning and all on one CPU), memory per idle bridge, and the CPU the proxy
spends on each. See docs/benchmarks.md for the method.

    python benchmarks/run.py            # full run (3 interleaved reps)
    python benchmarks/run.py --quick    # smoke run, under 2 minutes

Stdlib only (matplotlib, if importable, draws the PNG), Python 3.9+, Linux
only (epoll, /proc, sched_setaffinity).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN_SRC = BENCH_DIR / "loadgen.c"
LOADGEN_BIN = BENCH_DIR / "build" / "loadgen"
RESULTS_DIR = BENCH_DIR / "results"
PEERS_DIR = BENCH_DIR / "peers"

HOST = "127.0.0.1"  # loopback only, by design (loadgen refuses anything else)
READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 3.0
IPERF_ATTEMPTS = 3
FDS_PER_BRIDGE = 2    # a proxy holds the client and the upstream socket
FD_RESERVE = 200      # listeners, epoll, pipes, logs... below the hard limit


class BenchError(Exception):
    """A test could not produce a number; the run records it and goes on."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------- metrics

@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    digits: int
    cpu: bool = False      # proxy cost: meaningless relative to `direct`
    ratio: bool = True     # shown in the ratio tables
    table: str = "speed"   # "speed": throughput and latency; "cost": CPU, memory
    of: str = ""           # shown as "value/of" (e.g. alive/requested)


METRICS = [
    Metric("bulk1_gbps", "bulk 1 Gbit/s", 2),
    Metric("bulk8_gbps", "bulk 8 Gbit/s", 2),
    Metric("conn_per_s", "conn/s", 0),
    Metric("conn_errors", "conn err", 0, ratio=False),
    Metric("ping_p50_us", "ping p50 µs", 1),
    Metric("ping_p99_us", "ping p99 µs", 1),
    Metric("ping1_p50_us", "ping p50 µs 1 CPU", 1),
    Metric("ping1_p99_us", "ping p99 µs 1 CPU", 1),
    Metric("bulk1_cpu_s_per_gb", "CPU-s/GB 1", 3, cpu=True, table="cost"),
    Metric("bulk8_cpu_s_per_gb", "CPU-s/GB 8", 3, cpu=True, table="cost"),
    Metric("cpu_us_per_conn", "CPU µs/conn", 1, cpu=True, table="cost"),
    Metric("cpu_us_per_ping", "CPU µs/ping", 1, cpu=True, table="cost"),
    Metric("ping1_cpu_us_per_ping", "CPU µs/ping 1 CPU", 1, cpu=True, table="cost"),
    Metric("rss_kib_per_bridge", "RSS KiB/idle bridge", 2, cpu=True, table="cost"),
    Metric("idle_alive", "idle alive", 0, ratio=False, table="cost", of="idle_requested"),
    Metric("idle_open_s", "idle open s", 1, ratio=False, table="cost"),
    Metric("idle_requested", "idle requested", 0, ratio=False, table="hidden"),
]
TABLES = {"speed": "Throughput and latency", "cost": "Proxy cost (CPU, memory)"}


# ------------------------------------------------------------- processes

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


# ----------------------------------------------------------- CPU meter

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

    def __init__(self, env: "Env", proxy: Optional[Service]):
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
        if self.env.proxy_cpus:
            self.proxy_s = self._busy(d, self.env.proxy_cpus)
            self.proxy_pct = 100 * self.proxy_s / self.wall / len(self.env.proxy_cpus)
            self.load_pct = (100 * self._busy(d, self.env.load_cpus)
                             / self.wall / len(self.env.load_cpus))
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

    def summary(self) -> dict:
        r = lambda v: None if v is None else round(v, 2)
        return {"proxy_cpu_s": r(self.proxy_s), "proxy_cpu_pct": r(self.proxy_pct),
                "load_cpu_pct": r(self.load_pct), "steal_pct": r(self.steal_pct),
                "foreign_cpu_pct": r(self.foreign_pct), "wall_s": r(self.wall)}


# ----------------------------------------------------------- contenders

ProxyCommand = Callable[[int, int, Path], List[str]]


@dataclass
class Contender:
    name: str
    command: Optional[ProxyCommand]  # None: clients talk to the backend itself
    desc: str                        # for the JSON, so a result says what ran
    missing: str = ""                # why it cannot run here, if it cannot
    clean_exits: tuple = (0,)        # exit codes that count as a clean stop


def placeholders(listen: int, upstream: int, workdir: Path) -> Dict[str, str]:
    """What a command template may use (see --contender), shell-quoted."""
    values = {"listen_host": HOST, "listen_port": str(listen), "upstream_host": HOST,
              "upstream_port": str(upstream), "workdir": str(workdir),
              "python": sys.executable, "bench": str(BENCH_DIR)}
    return {k: shlex.quote(v) for k, v in values.items()}


def template_command(template: str) -> ProxyCommand:
    """Any shell command template; it must stay in the foreground."""
    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        return ["sh", "-c", "exec " + template.format(**placeholders(listen, upstream, workdir))]
    return command


# fastproxy-busypoll's window: longer than the load CPU's scheduler slices,
# so that a worker spins through the gaps while the load side takes turns.
BUSY_POLL = "100ms"

HAPROXY_CFG = """\
global
    nbthread {threads}
{busy}defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
{splice}
frontend bench
    bind {host}:{listen}
    default_backend upstream
backend upstream
    server s1 {host}:{upstream}
"""


def haproxy_command(threads: int, splice: bool, busy: bool = False) -> ProxyCommand:
    options = "    option splice-request\n    option splice-response\n" if splice else ""
    busy_polling = "    busy-polling\n" if busy else ""

    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(threads=threads, splice=options, busy=busy_polling, host=HOST,
                                          listen=listen, upstream=upstream))
        return ["haproxy", "-db", "-f", str(cfg)]  # -db: stay in the foreground
    return command


# Debian's nginx defaults otherwise (no reuseport, accept_mutex off). Without
# proxy_half_close (off by default in 1.22) a client's shutdown(SHUT_WR)
# ends the session and the reply is lost. Every connection counts twice
# against worker_connections (client + upstream), and one worker may end up
# with most of the idle bridges, so both limits are the whole fd budget.
NGINX_CFG = """\
{load_module}
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{
    worker_connections {nofile};
}}
stream {{
    server {{
        listen {host}:{listen} backlog=4096;
        proxy_pass {host}:{upstream};
        proxy_half_close on;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }}
}}
"""
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def nginx_stream() -> Tuple[str, str]:
    """(load_module line or "", why nginx cannot run here or "")."""
    if not shutil.which("nginx"):
        return "", "nginx not on PATH (apt-get install nginx libnginx-mod-stream)"
    try:
        p = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", f"nginx -V failed: {e}"
    flags = (p.stdout + p.stderr).split()
    if "--with-stream" in flags:
        return "", ""
    if "--with-stream=dynamic" in flags and NGINX_STREAM_MODULE.exists():
        return f"load_module {NGINX_STREAM_MODULE};", ""
    return "", "nginx has no stream module (apt-get install libnginx-mod-stream)"


def nginx_command(workers: int) -> ProxyCommand:
    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        cfg = workdir / "nginx.conf"
        cfg.write_text(NGINX_CFG.format(
            load_module=nginx_stream()[0], workers=workers, workdir=workdir, host=HOST,
            listen=listen, upstream=upstream,
            nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        # -e: start-up errors to our log rather than /var/log/nginx
        return ["nginx", "-e", "stderr", "-p", str(workdir), "-c", str(cfg)]
    return command


def peer_command(loop: str) -> ProxyCommand:
    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        return [sys.executable, str(PEERS_DIR / "asyncio_proxy.py"), "--loop", loop,
                "--listen", f"{HOST}:{listen}", "--upstream", f"{HOST}:{upstream}"]
    return command


def fastproxy_command(template: str, workers: int, engine: str,
                      extra: str = "") -> ProxyCommand:
    base = shlex.split(template.format(python=sys.executable))

    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        flags = shlex.split(extra.format(**placeholders(listen, upstream, workdir)))
        return base + ["--listen", f"{HOST}:{listen}", "--upstream", f"{HOST}:{upstream}",
                       "--workers", str(workers), "--engine", engine] + flags
    return command


def fastproxy_missing(template: str) -> str:
    argv = shlex.split(template.format(python=sys.executable))
    if not argv or not shutil.which(argv[0]):
        return f"'{argv[0] if argv else template}' not found"
    if argv[:3] == [sys.executable, "-m", "fastproxy"] and not importlib.util.find_spec("fastproxy"):
        return "module fastproxy is not importable (not installed yet?)"
    return ""


def name_value(text: str, option: str) -> Tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        sys.exit(f"{option} wants NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def all_contenders(args: argparse.Namespace) -> List[Contender]:
    """Every known contender, in table order. To compare a new variant add a
    row here, or from the command line: --contender NAME=TEMPLATE for any
    command, --fastproxy-variant NAME=FLAGS for fastproxy with extra flags."""
    no_haproxy = "" if shutil.which("haproxy") else "haproxy not on PATH"
    fp_missing = fastproxy_missing(args.fastproxy_cmd)
    no_uvloop = "" if importlib.util.find_spec("uvloop") else "uvloop is not importable (pip install uvloop)"
    w = args.workers

    def fp(name: str, engine: str, extra: str = "") -> Contender:
        desc = (f"{args.fastproxy_cmd} --listen ... --upstream ... "
                f"--workers {w} --engine {engine} {extra}").strip()
        return Contender(name, fastproxy_command(args.fastproxy_cmd, w, engine, extra),
                         desc, fp_missing)

    contenders = [
        Contender("direct", None, "clients connect to the backend itself"),
        fp("fastproxy", "epoll"),
        fp("fastproxy-poll", "poll"),
        fp("fastproxy-busypoll", "epoll", f"--busy-poll {BUSY_POLL}"),
    ]
    # Variants take their flags after the defaults, so they may override
    # them (argparse keeps the last --engine, for instance).
    for spec in args.fastproxy_variant:
        name, flags = name_value(spec, "--fastproxy-variant")
        contenders.append(fp(name, "epoll", flags))
    contenders += [
        # haproxy -db dies by the SIGTERM itself; that is its normal stop.
        Contender("haproxy", haproxy_command(w, splice=False),
                  f"haproxy -db, mode tcp, nbthread {w}, no splice", no_haproxy,
                  (0, -signal.SIGTERM)),
        Contender("haproxy-splice", haproxy_command(w, splice=True),
                  f"haproxy -db, mode tcp, nbthread {w}, option splice-request "
                  "+ splice-response", no_haproxy, (0, -signal.SIGTERM)),
        Contender("haproxy-busypoll", haproxy_command(w, splice=True, busy=True),
                  "haproxy-splice plus global busy-polling", no_haproxy, (0, -signal.SIGTERM)),
        Contender("nginx", nginx_command(w),
                  f"nginx stream module, worker_processes {w}, proxy_half_close on",
                  nginx_stream()[1]),
        Contender("uvloop", peer_command("uvloop"),
                  "peers/asyncio_proxy.py --loop uvloop (streams API, 64 KiB reads)",
                  no_uvloop),
        Contender("asyncio", peer_command("asyncio"),
                  "peers/asyncio_proxy.py --loop asyncio (streams API, 64 KiB reads)"),
    ]
    for spec in args.contender:
        name, template = name_value(spec, "--contender")
        argv0 = shlex.split(template)[0] if shlex.split(template) else ""
        contenders.append(Contender(
            name, template_command(template), template,
            "" if "{" in argv0 or shutil.which(argv0) else f"'{argv0}' not found"))
    names = [c.name for c in contenders]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        sys.exit(f"contender names must be unique: {', '.join(sorted(dup))}")
    return contenders


def pick_contenders(args: argparse.Namespace) -> List[Contender]:
    known = {c.name: c for c in all_contenders(args)}
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(known)
    skip = {n.strip() for n in (args.skip or "").split(",") if n.strip()}
    unknown = [n for n in wanted + sorted(skip) if n not in known]
    if unknown:
        sys.exit(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(known)}")
    wanted = [n for n in wanted if n not in skip or n == "direct"]
    if "direct" not in wanted:
        wanted.insert(0, "direct")  # every ratio is taken against it
    chosen = []
    for name in wanted:
        if known[name].missing:
            log(f"skipping {name}: {known[name].missing}")
        else:
            chosen.append(known[name])
    return chosen

# ----------------------------------------------------------------- tests

@dataclass
class Env:
    args: argparse.Namespace
    proxy_cpus: Optional[Set[int]]  # None: no pinning
    load_cpus: Optional[Set[int]]
    one_cpu: Set[int]               # the 1-CPU ping test puts everything here
    tmp: Path
    tests: Set[str]
    idle_count: int


def workdir(env: Env, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=env.tmp))


@contextlib.contextmanager
def running(svc: Service, port: int, notes: dict) -> Iterator[Service]:
    """Start a service, wait until its port accepts, always stop it."""
    try:
        svc.start()
        notes[f"{svc.name}_ready_s"] = round(wait_accepting(port, svc), 3)
        yield svc
    finally:
        notes[f"{svc.name}_stop"] = svc.stop()


@contextlib.contextmanager
def proxied(env: Env, c: Contender, upstream: int, notes: dict,
            cpus: Optional[Set[int]] = None):
    """Yield (port clients should use, proxy Service or None). The proxy runs
    on `cpus`, by default the proxy CPUs."""
    if c.command is None:
        yield upstream, None
        return
    listen = free_port()
    wd = workdir(env, c.name)
    proxy = Service("proxy", c.command(listen, upstream, wd), wd, cpus or env.proxy_cpus)
    failed = False
    try:
        with running(proxy, listen, notes):
            time.sleep(0.1)  # let the readiness probe's upstream leg settle
            yield listen, proxy
    except BaseException:
        failed = True  # already reported; an unclean exit then is no news
        raise
    finally:
        # Graceful shutdown is part of the proxy's contract, so check it.
        stop = notes.get("proxy_stop")
        if stop:
            stop["clean"] = (stop["exit_code"] in c.clean_exits
                             and not stop["killed"] and not stop["leftover_children"])
            if not stop["clean"] and not failed:
                log(f"    note: {c.name} did not stop cleanly: {stop}")


def iperf3_once(env: Env, port: int, streams: int) -> dict:
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(env.args.duration), "-J"]
    if streams > 1:
        argv += ["-P", str(streams)]
    return run_json(argv, timeout=env.args.duration + 30)


def bulk_group(env: Env, c: Contender, out: dict, notes: dict) -> None:
    backend_port = free_port()
    server = Service("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(backend_port)],
                     workdir(env, "iperf3"))
    with running(server, backend_port, notes), \
            proxied(env, c, backend_port, notes) as (port, proxy):
        for streams in (1, 8):
            for attempt in range(1, IPERF_ATTEMPTS + 1):
                try:
                    with CpuMeter(env, proxy) as cpu:
                        data = iperf3_once(env, port, streams)
                    break
                except BenchError as e:
                    log(f"    iperf3 -P {streams} attempt {attempt} failed: {e}")
                    if attempt == IPERF_ATTEMPTS:
                        raise
                    # A wedged iperf3 server is the usual cause; the proxy
                    # keeps forwarding to the same port.
                    server.restart()
                    wait_accepting(backend_port, server)
            received = data["end"]["sum_received"]
            gbps = received["bits_per_second"] / 1e9
            out[f"bulk{streams}_gbps"] = gbps
            out[f"bulk{streams}_cpu_s_per_gb"] = cpu.per(received["bytes"], 1e9)
            notes[f"bulk{streams}"] = dict(cpu.summary(), attempts=attempt)
            noise_check(c, cpu, notes)
            log(f"    bulk {streams}: {gbps:.2f} Gbit/s  {cpu_note(cpu)}")


def echo_backend(env: Env, name: str) -> Tuple["Service", int]:
    """A loadgen echo server on a free port (not started yet)."""
    port = free_port()
    return Service("echo-server", [str(LOADGEN_BIN), "echo-server", str(port)],
                   workdir(env, name)), port


def echo_group(env: Env, c: Contender, out: dict, notes: dict) -> None:
    a = env.args
    server, backend_port = echo_backend(env, "echo")
    with running(server, backend_port, notes), \
            proxied(env, c, backend_port, notes) as (port, proxy):
        if "connrate" in env.tests:
            with CpuMeter(env, proxy) as cpu:
                r = run_json([str(LOADGEN_BIN), "connrate", HOST, str(port),
                              str(a.conn_duration), str(a.concurrency)],
                             timeout=a.conn_duration + 30)
            out["conn_per_s"] = r["conn_per_s"]
            out["conn_errors"] = r["errors"]
            out["cpu_us_per_conn"] = cpu.per(r["completed"], 1e6)
            notes["connrate"] = dict(cpu.summary(), loadgen=r)
            noise_check(c, cpu, notes)
            log(f"    connrate: {r['conn_per_s']:.0f} conn/s, {r['errors']} errors, "
                f"p99 {r['p99_us']} µs  {cpu_note(cpu)}")
        if "ping" in env.tests:
            with CpuMeter(env, proxy) as cpu:
                r = run_json([str(LOADGEN_BIN), "pingpong", HOST, str(port), str(a.pings)],
                             timeout=120)
            out["ping_p50_us"] = r["p50_us"]
            out["ping_p99_us"] = r["p99_us"]
            out["cpu_us_per_ping"] = cpu.per(r["round_trips"], 1e6)
            notes["ping"] = dict(cpu.summary(), loadgen=r)
            noise_check(c, cpu, notes)
            log(f"    ping: p50 {r['p50_us']:.1f} µs, p99 {r['p99_us']:.1f} µs  {cpu_note(cpu)}")


def ping1_group(env: Env, c: Contender, out: dict, notes: dict) -> None:
    """Ping-pong with proxy, echo backend and client all on one CPU, so no
    round trip pays for cross-CPU wake-ups (tens of µs on this VM). Proxy CPU
    is the on-CPU time of its threads (schedstat): the CPU's own busy time
    here is mostly client and backend."""
    a, cpus = env.args, env.one_cpu
    backend_port = free_port()
    server = Service("echo-server", [str(LOADGEN_BIN), "echo-server", str(backend_port)],
                     workdir(env, "echo1"), cpus)
    with running(server, backend_port, notes), \
            proxied(env, c, backend_port, notes, cpus) as (port, proxy):
        foreign0 = foreign_ticks()
        ns0, stat0, t0 = proxy and group_task_ns(proxy.proc.pid), proc_stat(), time.monotonic()
        r = run_json([str(LOADGEN_BIN), "pingpong", HOST, str(port), str(a.pings)],
                     timeout=120, cpus=cpus)
        wall = time.monotonic() - t0
        ns = proxy and group_task_ns(proxy.proc.pid) - ns0
        stat1 = proc_stat()
        foreign_pct = 100 * foreign_delta(foreign0, foreign_ticks()) / HZ / wall
    busy = sum(stat1[cpu][i] - stat0[cpu][i] for cpu in cpus for i in BUSY) / HZ
    out["ping1_p50_us"] = r["p50_us"]
    out["ping1_p99_us"] = r["p99_us"]
    if proxy:
        out["ping1_cpu_us_per_ping"] = ns / 1e3 / r["round_trips"]
    notes["ping1"] = {"cpu": sorted(cpus), "wall_s": round(wall, 2),
                      "proxy_task_s": None if ns is None else round(ns / 1e9, 4),
                      "cpu_busy_s": round(busy, 2),
                      "cpu_busy_us_per_ping": round(busy * 1e6 / r["round_trips"], 2),
                      "foreign_cpu_pct": round(foreign_pct, 2), "loadgen": r}
    if foreign_pct > NOISE_PCT:
        notes.setdefault("noise", []).append(f"other processes {foreign_pct:.0f}% CPU")
        log(f"    warning: other processes used {foreign_pct:.0f}% of a CPU during this test")
    cost = "" if ns is None else f"  (proxy {ns / 1e3 / r['round_trips']:.1f} µs/ping)"
    log(f"    ping 1 CPU: p50 {r['p50_us']:.1f} µs, p99 {r['p99_us']:.1f} µs{cost}")


class LineReader:
    """Lines from a child's stdout, each awaited with a deadline."""

    def __init__(self, proc: subprocess.Popen, what: str):
        self.fd, self.proc, self.what, self.buf = proc.stdout.fileno(), proc, what, b""

    def json(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.what}: no answer within {timeout:.0f} s")
            if select.select([self.fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    self.proc.wait(5)
                    raise BenchError(f"{self.what} exited with {self.proc.returncode}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise BenchError(f"{self.what}: bad output {line[:200]!r}")


def wait_fd_drain(proxy: Service, baseline: int, timeout: float) -> Tuple[float, int]:
    """After the clients closed: seconds until the proxy's fd count is back
    near its baseline, and how many above it remain at the timeout."""
    t0 = time.monotonic()
    while True:
        extra = group_fds(proxy.proc.pid) - baseline
        if extra <= 8 or time.monotonic() - t0 > timeout or not proxy.alive():
            return round(time.monotonic() - t0, 2), max(extra, 0)
        time.sleep(0.1)


def idle_group(env: Env, c: Contender, out: dict, notes: dict) -> None:
    """RSS per idle bridge: hold N idle, verified connections through the
    proxy (loadgen hold: opened one at a time, each pinged once), read the
    proxy tree's VmRSS growth, then ping every held connection again."""
    n = env.idle_count
    # Backend and hold client are separate processes: each holds N fds.
    server, backend_port = echo_backend(env, "echo-idle")
    with running(server, backend_port, notes), \
            proxied(env, c, backend_port, notes) as (port, proxy):
        rss0 = proxy and group_rss_kib(proxy.proc.pid)
        fds0 = proxy and group_fds(proxy.proc.pid)
        budget = 120 + n // 20
        wd = workdir(env, "hold")
        with open(wd / "hold.log", "wb") as err:
            hold = subprocess.Popen(
                [str(LOADGEN_BIN), "hold", HOST, str(port), str(n), str(budget)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True)
        try:
            lines = LineReader(hold, "loadgen hold")
            held = lines.json(budget)
            time.sleep(0.2)  # let the last bridge's bookkeeping finish
            rss1 = proxy and group_rss_kib(proxy.proc.pid)
            fds1 = proxy and group_fds(proxy.proc.pid)
            try:
                hold.stdin.write(b"check\n")
                hold.stdin.flush()
            except BrokenPipeError:
                raise BenchError(f"loadgen hold exited early ({hold.poll()})")
            checked = lines.json(60 + n // 100)
            hold.wait(30)
        finally:
            if hold.poll() is None:
                os.killpg(hold.pid, signal.SIGKILL)
                hold.wait()
            for pipe in (hold.stdin, hold.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
        drain = wait_fd_drain(proxy, fds0, env.args.fd_drain_wait) if proxy else None
    out["idle_alive"] = checked["alive"]
    out["idle_requested"] = n
    out["idle_open_s"] = held["open_s"]
    if proxy and held["held"]:
        out["rss_kib_per_bridge"] = (rss1 - rss0) / held["held"]
    notes["idle"] = {"hold": held, "check": checked, "rss_kib_before": rss0,
                     "rss_kib_held": rss1, "fds_before": fds0, "fds_held": fds1,
                     "fd_drain_s": drain and drain[0], "fds_left_after_drain": drain and drain[1]}
    rss = f", RSS {out['rss_kib_per_bridge']:.2f} KiB/bridge" if "rss_kib_per_bridge" in out else ""
    left = (f", {drain[1]} fds still open after {drain[0]} s"
            if drain and drain[0] >= env.args.fd_drain_wait else "")
    log(f"    idle: held {held['held']}/{n} in {held['open_s']:.1f} s, "
        f"alive {checked['alive']}{rss}{left}")


def cpu_note(cpu: CpuMeter) -> str:
    if cpu.proxy_pct is None:
        return ""
    load = f", load CPU {cpu.load_pct:.0f}%" if cpu.load_pct is not None else ""
    return f"(proxy CPU {cpu.proxy_pct:.0f}%{load})"


NOISE_PCT = 10.0  # other processes' CPU during a test, % of one CPU


def noise_check(c: Contender, cpu: CpuMeter, notes: dict) -> None:
    """Other work during a test makes its figures suspect: processes that
    are not ours used CPU (any contender), or, with no proxy, the proxy CPU
    did not idle. Noted in the JSON; run_all repeats a noisy rep."""
    if cpu.foreign_pct > NOISE_PCT:
        notes.setdefault("noise", []).append(f"other processes {cpu.foreign_pct:.0f}% CPU")
        log(f"    warning: other processes used {cpu.foreign_pct:.0f}% of a CPU "
            "during this test")
    if c.command is None and cpu.proxy_pct is not None and cpu.proxy_pct > 15:
        notes.setdefault("noise", []).append(f"proxy CPU {cpu.proxy_pct:.0f}% busy")
        log(f"    warning: proxy CPU {cpu.proxy_pct:.0f}% busy with no proxy: "
            "other load on the machine")


def run_contender(env: Env, c: Contender, rep: int, idle: bool = True) -> dict:
    """One repetition of every test for one contender. A failing group is
    recorded and skipped so one broken contender cannot sink the run."""
    out: dict = {}
    notes: Dict[str, dict] = {}
    groups = []
    if "bulk" in env.tests:
        groups.append(("bulk", bulk_group))
    if env.tests & {"connrate", "ping"}:
        groups.append(("echo", echo_group))
    if "ping1" in env.tests:
        groups.append(("ping1", ping1_group))
    if idle and "idle" in env.tests and rep <= env.args.idle_reps:
        groups.append(("idle", idle_group))
    for name, group in groups:
        notes[name] = {}
        try:
            group(env, c, out, notes[name])
        except BenchError as e:
            notes[name]["error"] = str(e)
            log(f"    {name} tests failed: {e}")
    return {"metrics": out, "notes": notes}


def run_all(env: Env, contenders: List[Contender]) -> Dict[str, List[dict]]:
    # Interleaved: rep 1 of everyone, then rep 2..., so slow drifts of the
    # machine (thermal, neighbours, page cache) hit all contenders alike.
    runs: Dict[str, List[dict]] = {c.name: [] for c in contenders}
    reps = env.args.reps
    for rep in range(1, reps + 1):
        for c in contenders:
            runs[c.name].append(attempt_rep(env, c, rep, reps, 1))
    # Other load comes in bursts (a test suite, a build): a rep it spoiled is
    # made up at the end, when the burst is likely over, at most
    # --noise-retries times. The latest attempt is kept.
    for attempt in range(2, env.args.noise_retries + 2):
        spoiled = [(c, i) for c in contenders for i, r in enumerate(runs[c.name]) if noisy(r)]
        if not spoiled:
            break
        log(f"making up {len(spoiled)} rep(s) spoiled by other load (pass {attempt - 1})")
        for c, i in spoiled:
            first = runs[c.name][i]
            result = attempt_rep(env, c, i + 1, reps, attempt, idle=False)
            # Memory does not suffer from other load, and the idle test is
            # slow through some proxies: keep the first one.
            if "idle" in first["notes"]:
                result["notes"]["idle"] = first["notes"]["idle"]
                result["metrics"].update({k: v for k, v in first["metrics"].items()
                                          if k.startswith(("idle_", "rss_"))})
            runs[c.name][i] = result
    return runs


def attempt_rep(env: Env, c: Contender, rep: int, reps: int, attempt: int,
                idle: bool = True) -> dict:
    log(f"[rep {rep}/{reps}] {c.name}" + (f" (attempt {attempt})" if attempt > 1 else ""))
    waited, busy = wait_quiet(env.args.wait_idle)
    if max(busy.values()) > QUIET_PCT:
        log(f"    warning: the machine is still busy after {waited:.0f} s "
            f"(busy % per CPU: {busy})")
    elif waited >= 1:
        log(f"    waited {waited:.0f} s for the machine to go idle")
    result = run_contender(env, c, rep, idle)
    result["notes"]["before"] = {"waited_s": waited, "busy_pct": busy}
    result["attempt"] = attempt
    return result


def noisy(result: dict) -> bool:
    return any("noise" in group for group in result["notes"].values()
               if isinstance(group, dict))


QUIET_PCT = 10.0


def wait_quiet(max_wait: float) -> Tuple[float, Dict[int, float]]:
    """Other work on the machine (another agent's test suite, a build) lands
    in the figures. Before each contender's rep, wait until no CPU was more
    than QUIET_PCT busy over half a second, at most max_wait seconds.
    Returns the wait and the last sample."""
    t0 = time.monotonic()
    while True:
        busy = background_busy(0.5)
        waited = time.monotonic() - t0
        if max(busy.values()) <= QUIET_PCT or waited >= max_wait:
            return round(waited, 1), busy


# ------------------------------------------------------------ reporting

def summarize(runs: Dict[str, List[dict]]) -> Dict[str, Dict[str, dict]]:
    summary: Dict[str, Dict[str, dict]] = {}
    for name, reps in runs.items():
        summary[name] = {}
        # A rep still spoiled by other load after the make-ups counts only
        # when no clean rep has the figure.
        clean = [r for r in reps if not noisy(r)]
        for m in METRICS:
            vals = [r["metrics"][m.key] for r in clean if r["metrics"].get(m.key) is not None]
            if not vals:
                vals = [r["metrics"][m.key] for r in reps if r["metrics"].get(m.key) is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            spread = 100 * (max(vals) - min(vals)) / med if med else None
            summary[name][m.key] = {"median": med, "spread_pct": spread, "n": len(vals),
                                    "min": min(vals), "max": max(vals)}
    return summary


def fmt(v: Optional[float], digits: int) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def median(summary: dict, name: str, key: str) -> Optional[float]:
    return summary[name].get(key, {}).get("median")


def cell(summary: dict, name: str, m: Metric) -> str:
    v = median(summary, name, m.key)
    if m.of and v is not None:
        return f"{fmt(v, m.digits)}/{fmt(median(summary, name, m.of), m.digits)}"
    return fmt(v, m.digits)


def table_metrics(table: str) -> List[Metric]:
    return [m for m in METRICS if m.table == table]


def absolute_table(summary: dict, names: List[str], metrics: List[Metric]) -> str:
    rows = [[n] + [cell(summary, n, m) for m in metrics] for n in names]
    return md_table(["contender"] + [m.header for m in metrics], rows)


def spread_table(summary: dict, names: List[str], metrics: List[Metric]) -> str:
    # direct's CPU figures are idle noise; their relative spread means nothing.
    metrics = [m for m in metrics if not m.of]
    rows = [[n] + [fmt(None if m.cpu and n == "direct" else
                       summary[n].get(m.key, {}).get("spread_pct"), 0) for m in metrics]
            for n in names]
    return md_table(["spread %"] + [m.header for m in metrics], rows)


def ratio_table(summary: dict, names: List[str], ref: str, metrics: List[Metric]) -> str:
    rows = []
    for n in names:
        row = [n]
        for m in metrics:
            v, r = median(summary, n, m.key), median(summary, ref, m.key)
            meaningless = m.cpu and n == "direct"  # it has no proxy to cost anything
            row.append(f"{v / r:.2f}×" if v is not None and r and not meaningless else "—")
        if any(c != "—" for c in row[1:]):
            rows.append(row)
    return md_table([f"÷ {ref}"] + [m.header for m in metrics], rows)


def saturation_table(result: dict, names: List[str]) -> Optional[str]:
    """Median CPU % of the proxy's and of the load's CPUs during bulk tests:
    when the load side is at ~100 % and the proxy is not, the figure is a
    lower bound of what the proxy can do."""
    rows = []
    for n in names:
        row = [n]
        for test in ("bulk1", "bulk8"):
            for key in ("proxy_cpu_pct", "load_cpu_pct"):
                vals = [rep["notes"].get("bulk", {}).get(test, {}).get(key)
                        for rep in result["runs"][n]]
                vals = [v for v in vals if v is not None]
                row.append(fmt(statistics.median(vals), 0) if vals else "—")
        rows.append(row)
    if all(c == "—" for r in rows for c in r[1:]):
        return None
    return md_table(["bulk CPU %", "1 stream: proxy", "1 stream: load",
                     "8 streams: proxy", "8 streams: load"], rows)


def render(result: dict) -> str:
    summary, names = result["summary"], list(result["summary"])
    cfg = result["config"]
    idle = (f", {cfg['idle_count']} idle bridges in {cfg.get('idle_reps', cfg['reps'])} rep(s)"
            if cfg.get("idle_count") else "")
    parts = [
        f"## fastproxy benchmarks — {result['started']}",
        "",
        f"pin={cfg['pin']} (proxy CPUs {cfg['proxy_cpus']}, load CPUs {cfg['load_cpus']}), "
        f"reps={cfg['reps']}, iperf3 -t {cfg['duration']}, connrate {cfg['conn_duration']} s "
        f"× {cfg['concurrency']}, {cfg['pings']} pings{idle}, workers/nbthread "
        f"{cfg['workers']}. Medians over reps (clean ones first); CPU = proxy CPU "
        f"({'busy time of its CPUs' if cfg['pin'] == 'split' else 'process tree utime+stime'}; "
        "1-CPU ping: on-CPU time of the proxy's threads).",
    ]
    for table, title in TABLES.items():
        metrics = [m for m in table_metrics(table)
                   if any(m.key in summary[n] for n in names)]
        if not metrics:
            continue
        parts += ["", f"### {title}", "", absolute_table(summary, names, metrics)]
        if cfg["reps"] > 1:
            parts += ["", "Spread over reps, (max−min)/median:", "",
                      spread_table(summary, names, metrics)]
        for ref in ("haproxy-splice", "haproxy", "direct"):
            ratio = [m for m in metrics if m.ratio and not (ref == "direct" and m.cpu)]
            if ref in summary and len(names) > 1 and ratio:
                parts += ["", f"Ratio to {ref} (throughput, conn/s: >1 is better; "
                              "latency, CPU, memory: <1 is better):", "",
                          ratio_table(summary, [n for n in names if n != ref], ref, ratio)]
    sat = saturation_table(result, names)
    if sat:
        parts += ["", "### Which side was saturated in the bulk tests", "", sat]
    errors = [f"- {n} rep {i + 1}, {group} tests: {gn['error']}"
              for n, reps in result["runs"].items() for i, rep in enumerate(reps)
              for group, gn in rep["notes"].items() if "error" in gn]
    if errors:
        parts += ["", "Failures:", ""] + errors
    noise = [f"{n} rep {i + 1}" for n, reps in result["runs"].items()
             for i, rep in enumerate(reps) if noisy(rep)]
    if noise:
        parts += ["", "Other load on the machine spoiled " + ", ".join(noise) +
                      " (see `noise` in the JSON); medians use the other reps where "
                      "they have the figure."]
    retried = sum(rep.get("attempt", 1) - 1 for reps in result["runs"].values() for rep in reps)
    if retried:
        parts += ["", f"{retried} rep(s) spoiled by other load were run again at the end."]
    if result.get("plot"):
        parts += ["", f"Plot: {result['plot']}"]
    return "\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> Optional[str]:
    """Bulk throughput and proxy CPU-s per GB by contender, as a PNG.
    Returns why not, if it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable (pip install matplotlib): no plot"
    summary = result["summary"]
    names = [n for n in summary if "bulk1_gbps" in summary[n] or "bulk8_gbps" in summary[n]]
    if not names:
        return "no bulk figures to plot"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [(axes[0], "gbps", "Gbit/s (higher is better)", "Bulk throughput", names),
              (axes[1], "cpu_s_per_gb", "proxy CPU-s per GB (lower is better)",
               "Proxy CPU per GB forwarded", [n for n in names if n != "direct"])]
    width = 0.38
    for ax, suffix, ylabel, title, shown in panels:
        xs = range(len(shown))
        for i, streams in enumerate((1, 8)):
            key = f"bulk{streams}_{suffix}"
            meds = [median(summary, n, key) or 0 for n in shown]
            lo = [m - summary[n].get(key, {}).get("min", m) for n, m in zip(shown, meds)]
            hi = [summary[n].get(key, {}).get("max", m) - m for n, m in zip(shown, meds)]
            bars = ax.bar([x + (i - 0.5) * width for x in xs], meds, width,
                          yerr=[lo, hi], capsize=3,
                          label=f"{streams} stream{'s' if streams > 1 else ''}")
            ax.bar_label(bars, fmt="%.2f" if suffix != "gbps" else "%.1f", fontsize=7,
                         padding=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(shown, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    cfg = result["config"]
    fig.suptitle(f"fastproxy benchmarks {result['started']} — medians of {cfg['reps']} "
                 f"rep(s), bars show min–max; pin={cfg['pin']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

# ----------------------------------------------------------------- setup

def build_loadgen() -> None:
    """Rebuild only when the source is newer than the binary."""
    if LOADGEN_BIN.exists() and LOADGEN_BIN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    LOADGEN_BIN.parent.mkdir(exist_ok=True)
    log(f"building {LOADGEN_BIN.relative_to(BENCH_DIR.parent)}")
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(LOADGEN_BIN), str(LOADGEN_SRC)], check=True)


def pinning(args: argparse.Namespace) -> tuple:
    if args.pin == "none":
        return None, None
    avail = os.sched_getaffinity(0)
    proxy = {int(c) for c in args.proxy_cpus.split(",")}
    load = {int(c) for c in args.load_cpus.split(",")}
    if not (proxy | load) <= avail or proxy & load:
        sys.exit(f"--pin split needs disjoint CPU sets within {sorted(avail)}: "
                 f"proxy {sorted(proxy)}, load {sorted(load)}")
    # Everything this process starts inherits the load CPUs; only the proxy
    # is moved to its own CPUs (in Service.start).
    os.sched_setaffinity(0, load)
    return proxy, load


def background_busy(seconds: float = 1.0) -> Dict[int, float]:
    """Busy % per CPU while we do nothing: other work on the box (builds,
    a second benchmark) lands in the proxy CPU's busy time and in the
    throughput figures, so say so up front."""
    a = proc_stat()
    time.sleep(seconds)
    b = proc_stat()
    return {c: round(100 * sum(b[c][i] - a[c][i] for i in BUSY) / HZ / seconds, 1) for c in b}


def unused_path(directory: Path, stem: str) -> Path:
    path, n = directory / f"{stem}.json", 1
    while path.exists():  # two runs within one second
        n += 1
        path = directory / f"{stem}-{n}.json"
    return path


def tool_version(argv: List[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return ""


def one_cpu(args: argparse.Namespace, proxy_cpus: Optional[Set[int]]) -> Set[int]:
    avail = os.sched_getaffinity(0) | (proxy_cpus or set())
    cpu = args.one_cpu if args.one_cpu is not None else (
        min(proxy_cpus) if proxy_cpus else max(avail))
    if cpu not in avail:
        sys.exit(f"--one-cpu {cpu} is not one of {sorted(avail)}")
    return {cpu}


def idle_budget(wanted: int) -> int:
    """How many idle bridges fit: the proxy needs FDS_PER_BRIDGE fds each
    within the hard RLIMIT_NOFILE, which only privileges could raise."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # children inherit it; loadgen raises its own anyway
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard == resource.RLIM_INFINITY:
        return wanted
    fit = max((hard - FD_RESERVE) // FDS_PER_BRIDGE, 1)
    if wanted > fit:
        log(f"idle test: {wanted} bridges need {wanted * FDS_PER_BRIDGE} proxy fds, the hard "
            f"limit is {hard}: holding {fit}")
    return min(wanted, fit)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return ""


def module_version(name: str) -> Optional[str]:
    if not importlib.util.find_spec(name):
        return None
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "?"


def fastproxy_revision() -> Optional[str]:
    """The commit the benchmarked tree is on, '+dirty' if src/ has changes:
    the figures belong to that data plane."""
    root = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    multi_cpu = len(os.sched_getaffinity(0)) >= 2
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 rep, -t 2, connrate 1 s, 2000 pings, 500 idle "
                        "bridges (under 2 minutes)")
    p.add_argument("--only", default=None,
                   help="comma-separated contenders (direct is always added); see --list")
    p.add_argument("--skip", default=None, help="comma-separated contenders to leave out")
    p.add_argument("--list", action="store_true", help="show the contenders and exit")
    p.add_argument("--contender", action="append", default=[], metavar="NAME=TEMPLATE",
                   help="extra contender: a shell command that stays in the foreground, "
                        "listens on {listen_host}:{listen_port} and forwards to "
                        "{upstream_host}:{upstream_port}; also {workdir} (fresh temp dir), "
                        "{python}, {bench} (this folder). Repeatable")
    p.add_argument("--fastproxy-variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="extra fastproxy contender with FLAGS appended to its command line "
                        "(e.g. hooks=\'--hooks {bench}/hooks.py\'); same placeholders. "
                        "Repeatable")
    p.add_argument("--tests", default="bulk,connrate,ping,ping1,idle",
                   help="which measurements")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians reported")
    p.add_argument("--duration", type=int, default=5, help="iperf3 -t seconds")
    p.add_argument("--conn-duration", type=int, default=4, help="connrate seconds")
    p.add_argument("--concurrency", type=int, default=64, help="connrate connections in flight")
    p.add_argument("--pings", type=int, default=10000, help="round trips (+10%% warm-up)")
    p.add_argument("--idle-count", type=int, default=9900,
                   help="idle bridges to hold (capped by the fd limit)")
    p.add_argument("--idle-reps", type=int, default=1,
                   help="run the idle test in the first N reps only (memory barely "
                        "varies, and holding ~10k bridges takes a while)")
    p.add_argument("--fd-drain-wait", type=float, default=15,
                   help="seconds to wait for the proxy to close its fds after the idle test")
    p.add_argument("--wait-idle", type=float, default=None,
                   help="before each contender's rep, wait up to this many seconds for "
                        "the machine to go idle (0: only sample it; default 60, --quick 5)")
    p.add_argument("--noise-retries", type=int, default=None,
                   help="run a contender's rep again (up to N times) when other processes "
                        "used CPU during it (default 2, --quick 0)")
    p.add_argument("--workers", type=int, default=2,
                   help="fastproxy --workers, haproxy nbthread, nginx worker_processes")
    p.add_argument("--fastproxy-cmd", default="{python} -m fastproxy",
                   help="fastproxy command; --listen/--upstream/--workers/--engine are appended")
    p.add_argument("--pin", choices=("split", "none"), default="split" if multi_cpu else "none",
                   help="split: proxy on --proxy-cpus, load and backends on --load-cpus")
    p.add_argument("--proxy-cpus", default="1", help="CPU list for the proxy (--pin split)")
    p.add_argument("--load-cpus", default="0", help="CPU list for clients and backends")
    p.add_argument("--one-cpu", type=int, default=None,
                   help="CPU for the 1-CPU ping test (default: the first proxy CPU)")
    p.add_argument("--out", type=Path, help="JSON path instead of results/<timestamp>.json")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG path (default: next to the JSON, same name)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--report", type=Path,
                   help="re-print the tables of an earlier JSON (and draw --plot) and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.conn_duration, args.pings = 1, 2, 1, 2000
        args.idle_count, args.fd_drain_wait = min(args.idle_count, 500), 5
    if args.wait_idle is None:
        args.wait_idle = 5 if args.quick else 60
    if args.noise_retries is None:
        args.noise_retries = 0 if args.quick else 2
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        if args.plot:
            why = plot(result, args.plot)
            log(why or f"plot: {args.plot}")
        print(render(result), end="")
        return 0
    if args.list:
        for c in all_contenders(args):
            state = f"  [skipped: {c.missing}]" if c.missing else ""
            print(f"{c.name:16} {c.desc}{state}")
        return 0

    tests = {t.strip() for t in args.tests.split(",") if t.strip()}
    unknown = tests - {"bulk", "connrate", "ping", "ping1", "idle"}
    if unknown:
        sys.exit(f"unknown test(s) {', '.join(sorted(unknown))}")
    if "bulk" in tests and not shutil.which("iperf3"):
        log("iperf3 not found: skipping the bulk tests (apt-get install iperf3)")
        tests.discard("bulk")
    build_loadgen()
    contenders = pick_contenders(args)
    proxy_cpus, load_cpus = pinning(args)
    single = one_cpu(args, proxy_cpus)
    idle_count = idle_budget(args.idle_count) if "idle" in tests else 0
    started = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or unused_path(RESULTS_DIR, started)
    png = None if args.no_plot else (args.plot or out.with_suffix(".png"))
    idle = background_busy()
    if max(idle.values()) > 10:
        log(f"warning: the machine is not idle (busy % per CPU: {idle}); expect noise")

    # SIGTERM/SIGHUP take the same path as Ctrl-C so the finally below runs.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastproxy-bench-") as tmp:
        try:
            runs = run_all(Env(args, proxy_cpus, load_cpus, single, Path(tmp), tests,
                               idle_count), contenders)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            stop_everything()  # before the temp dir (their logs) goes away

    result = {
        "started": started,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "command": " ".join(["python"] + [shlex.quote(a) for a in sys.argv]),
        "config": {
            "pin": args.pin, "proxy_cpus": sorted(proxy_cpus or []),
            "load_cpus": sorted(load_cpus or []), "one_cpu": sorted(single),
            "reps": args.reps, "duration": args.duration,
            "conn_duration": args.conn_duration, "concurrency": args.concurrency,
            "pings": args.pings, "idle_count": idle_count, "wait_idle": args.wait_idle,
            "noise_retries": args.noise_retries,
            "idle_reps": min(args.idle_reps, args.reps), "workers": args.workers,
            "tests": sorted(tests), "fastproxy_cmd": args.fastproxy_cmd,
        },
        "background_busy_pct": idle,
        "system": {
            "kernel": platform.release(), "os": os_release(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "python": platform.python_version(),
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "haproxy": tool_version(["haproxy", "-v"]) if shutil.which("haproxy") else None,
            "nginx": tool_version(["nginx", "-v"]) if shutil.which("nginx") else None,
            "iperf3": tool_version(["iperf3", "--version"]) if shutil.which("iperf3") else None,
            "uvloop": module_version("uvloop"),
            "fastproxy": module_version("fastproxy"), "fastproxy_git": fastproxy_revision(),
        },
        "contenders": {c.name: c.desc for c in contenders},
        "summary": summarize(runs),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if png:
        why = plot(result, png)
        if why:
            log(why)
        else:
            result["plot"] = png.name if png.parent == out.parent else str(png)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"done in {result['elapsed_s']:.0f} s; JSON: {out}" +
        (f", plot: {png}" if result.get("plot") else ""))
    print(render(result), end="")
    return 0

if __name__ == "__main__":
    sys.exit(main())
