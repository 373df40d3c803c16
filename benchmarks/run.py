#!/usr/bin/env python3
"""fastproxy benchmark runner.

Measures, side by side in one run, `direct` (no proxy), fastproxy with both
engines and, when installed, haproxy with and without splicing: bulk
throughput (iperf3), new connections per second, ping-pong latency, and the
CPU the proxy spends on each. See docs/benchmarks.md for the method.

    python benchmarks/run.py            # full run (3 interleaved reps)
    python benchmarks/run.py --quick    # smoke run, under 2 minutes

Stdlib only, Python 3.9+, Linux only (epoll, /proc, sched_setaffinity).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
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
from typing import Callable, Dict, Iterator, List, Optional, Set

BENCH_DIR = Path(__file__).resolve().parent
LOADGEN_SRC = BENCH_DIR / "loadgen.c"
LOADGEN_BIN = BENCH_DIR / "build" / "loadgen"
RESULTS_DIR = BENCH_DIR / "results"

HOST = "127.0.0.1"  # loopback only, by design (loadgen refuses anything else)
READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 3.0
IPERF_ATTEMPTS = 3


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
    cpu: bool = False      # proxy CPU cost: meaningless relative to `direct`
    ratio: bool = True     # shown in the ratio tables


METRICS = [
    Metric("bulk1_gbps", "bulk 1 Gbit/s", 2),
    Metric("bulk8_gbps", "bulk 8 Gbit/s", 2),
    Metric("conn_per_s", "conn/s", 0),
    Metric("conn_errors", "conn err", 0, ratio=False),
    Metric("ping_p50_us", "ping p50 µs", 1),
    Metric("ping_p99_us", "ping p99 µs", 1),
    Metric("bulk1_cpu_s_per_gb", "CPU-s/GB 1", 3, cpu=True),
    Metric("bulk8_cpu_s_per_gb", "CPU-s/GB 8", 3, cpu=True),
    Metric("cpu_us_per_conn", "CPU µs/conn", 1, cpu=True),
    Metric("cpu_us_per_ping", "CPU µs/ping", 1, cpu=True),
]


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
        cpus = self.cpus
        # Pin in the child before exec so no thread ever runs elsewhere.
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        with open(self.log_path, "ab") as logf:
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    start_new_session=True, preexec_fn=pin)
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


def run_json(argv: List[str], timeout: float) -> dict:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
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


def group_stats(pgid: int) -> List[List[str]]:
    """/proc/PID/stat fields (after the command name) of every process in a
    process group: [0] state, [2] pgrp, [11] utime, [12] stime."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            found.append(fields)
    return found


def live_group_members(pgid: int) -> int:
    # Zombies stay in the group until someone reaps them; they hold nothing.
    return sum(1 for f in group_stats(pgid) if f[0] != "Z")


def group_ticks(pgid: int) -> int:
    """utime+stime of a process group; threads count in their process."""
    return sum(int(f[11]) + int(f[12]) for f in group_stats(pgid))


class CpuMeter:
    """CPU used while one test ran.

    Pinned (split): busy time of the proxy's CPUs from /proc/stat. That also
    counts the softirq work of loopback TCP done on those CPUs, which is real
    cost of putting a proxy in the path. Unpinned: utime+stime of the proxy's
    process group (no softirq, so lower)."""

    def __init__(self, env: "Env", proxy: Optional[Service]):
        self.env, self.proxy = env, proxy

    def __enter__(self) -> "CpuMeter":
        self.t0, self.stat0 = time.monotonic(), proc_stat()
        self.ticks0 = self._group()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.t0
        stat1, ticks1 = proc_stat(), self._group()
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
                "wall_s": r(self.wall)}


# ----------------------------------------------------------- contenders

ProxyCommand = Callable[[int, int, Path], List[str]]


@dataclass
class Contender:
    name: str
    command: Optional[ProxyCommand]  # None: clients talk to the backend itself
    desc: str                        # for the JSON, so a result says what ran
    missing: str = ""                # why it cannot run here, if it cannot
    clean_exits: tuple = (0,)        # exit codes that count as a clean stop


HAPROXY_CFG = """\
global
    nbthread {threads}
defaults
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


def haproxy_command(threads: int, splice: bool) -> ProxyCommand:
    options = "    option splice-request\n    option splice-response\n" if splice else ""

    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(threads=threads, splice=options, host=HOST,
                                          listen=listen, upstream=upstream))
        return ["haproxy", "-db", "-f", str(cfg)]  # -db: stay in the foreground
    return command


def fastproxy_command(template: str, workers: int, engine: str) -> ProxyCommand:
    base = shlex.split(template.format(python=sys.executable))

    def command(listen: int, upstream: int, workdir: Path) -> List[str]:
        return base + ["--listen", f"{HOST}:{listen}", "--upstream", f"{HOST}:{upstream}",
                       "--workers", str(workers), "--engine", engine]
    return command


def fastproxy_missing(template: str) -> str:
    argv = shlex.split(template.format(python=sys.executable))
    if not argv or not shutil.which(argv[0]):
        return f"'{argv[0] if argv else template}' not found"
    if argv[:3] == [sys.executable, "-m", "fastproxy"] and not importlib.util.find_spec("fastproxy"):
        return "module fastproxy is not importable (not installed yet?)"
    return ""


def all_contenders(args: argparse.Namespace) -> List[Contender]:
    no_haproxy = "" if shutil.which("haproxy") else "haproxy not on PATH"
    fp_missing = fastproxy_missing(args.fastproxy_cmd)
    w = args.workers

    def fp(engine: str) -> Contender:
        desc = (f"{args.fastproxy_cmd} --listen ... --upstream ... "
                f"--workers {w} --engine {engine}")
        return Contender(f"fastproxy{'' if engine == 'epoll' else '-' + engine}",
                         fastproxy_command(args.fastproxy_cmd, w, engine), desc, fp_missing)

    return [
        Contender("direct", None, "clients connect to the backend itself"),
        fp("epoll"),
        fp("poll"),
        # haproxy -db dies by the SIGTERM itself; that is its normal stop.
        Contender("haproxy", haproxy_command(w, splice=False),
                  f"haproxy -db, mode tcp, nbthread {w}, no splice", no_haproxy,
                  (0, -signal.SIGTERM)),
        Contender("haproxy-splice", haproxy_command(w, splice=True),
                  f"haproxy -db, mode tcp, nbthread {w}, option splice-request "
                  "+ splice-response", no_haproxy, (0, -signal.SIGTERM)),
    ]


def pick_contenders(args: argparse.Namespace) -> List[Contender]:
    known = {c.name: c for c in all_contenders(args)}
    wanted = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(known)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        sys.exit(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(known)}")
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
    tmp: Path
    tests: Set[str]


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
def proxied(env: Env, c: Contender, upstream: int, notes: dict):
    """Yield (port clients should use, proxy Service or None)."""
    if c.command is None:
        yield upstream, None
        return
    listen = free_port()
    wd = workdir(env, c.name)
    proxy = Service("proxy", c.command(listen, upstream, wd), wd, env.proxy_cpus)
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


def echo_group(env: Env, c: Contender, out: dict, notes: dict) -> None:
    a = env.args
    backend_port = free_port()
    server = Service("echo-server", [str(LOADGEN_BIN), "echo-server", str(backend_port)],
                     workdir(env, "echo"))
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


def cpu_note(cpu: CpuMeter) -> str:
    if cpu.proxy_pct is None:
        return ""
    load = f", load CPU {cpu.load_pct:.0f}%" if cpu.load_pct is not None else ""
    return f"(proxy CPU {cpu.proxy_pct:.0f}%{load})"


def noise_check(c: Contender, cpu: CpuMeter, notes: dict) -> None:
    """With no proxy the proxy CPU should idle; if it does not, something
    else on the machine is running there and every figure of this rep is
    suspect. Noted in the JSON and under the tables."""
    if c.command is None and cpu.proxy_pct is not None and cpu.proxy_pct > 15:
        notes.setdefault("noise", []).append(round(cpu.proxy_pct))
        log(f"    warning: proxy CPU {cpu.proxy_pct:.0f}% busy with no proxy: "
            "other load on the machine")


def run_contender(env: Env, c: Contender) -> dict:
    """One repetition of every test for one contender. A failing group is
    recorded and skipped so one broken contender cannot sink the run."""
    out: dict = {}
    notes: Dict[str, dict] = {}
    groups = []
    if "bulk" in env.tests:
        groups.append(("bulk", bulk_group))
    if env.tests & {"connrate", "ping"}:
        groups.append(("echo", echo_group))
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
            log(f"[rep {rep}/{reps}] {c.name}")
            runs[c.name].append(run_contender(env, c))
    return runs


# ------------------------------------------------------------ reporting

def summarize(runs: Dict[str, List[dict]]) -> Dict[str, Dict[str, dict]]:
    summary: Dict[str, Dict[str, dict]] = {}
    for name, reps in runs.items():
        summary[name] = {}
        for m in METRICS:
            vals = [r["metrics"][m.key] for r in reps if r["metrics"].get(m.key) is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            spread = 100 * (max(vals) - min(vals)) / med if med else None
            summary[name][m.key] = {"median": med, "spread_pct": spread, "n": len(vals)}
    return summary


def fmt(v: Optional[float], digits: int) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def md_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def absolute_table(summary: dict, names: List[str]) -> str:
    rows = [[n] + [fmt(summary[n].get(m.key, {}).get("median"), m.digits) for m in METRICS]
            for n in names]
    return md_table(["contender"] + [m.header for m in METRICS], rows)


def spread_table(summary: dict, names: List[str]) -> str:
    # direct's CPU figures are idle noise; their relative spread means nothing.
    rows = [[n] + [fmt(None if m.cpu and n == "direct" else
                       summary[n].get(m.key, {}).get("spread_pct"), 0) for m in METRICS]
            for n in names]
    return md_table(["spread %"] + [m.header for m in METRICS], rows)


def ratio_table(summary: dict, names: List[str], ref: str) -> str:
    metrics = [m for m in METRICS if m.ratio and not (ref == "direct" and m.cpu)]
    rows = []
    for n in names:
        row = [n]
        for m in metrics:
            v = summary[n].get(m.key, {}).get("median")
            r = summary[ref].get(m.key, {}).get("median")
            meaningless = m.cpu and n == "direct"  # it has no proxy to cost anything
            row.append(f"{v / r:.2f}×" if v is not None and r and not meaningless else "—")
        rows.append(row)
    return md_table([f"÷ {ref}"] + [m.header for m in metrics], rows)


def render(result: dict) -> str:
    summary, names = result["summary"], list(result["summary"])
    cfg = result["config"]
    parts = [
        f"## fastproxy benchmarks — {result['started']}",
        "",
        f"pin={cfg['pin']} (proxy CPUs {cfg['proxy_cpus']}, load CPUs {cfg['load_cpus']}), "
        f"reps={cfg['reps']}, iperf3 -t {cfg['duration']}, connrate {cfg['conn_duration']} s "
        f"× {cfg['concurrency']}, {cfg['pings']} pings, workers/nbthread {cfg['workers']}. "
        f"Medians over reps; CPU = proxy CPU ({'busy time of its CPUs' if cfg['pin'] == 'split' else 'process tree utime+stime'}).",
        "",
        absolute_table(summary, names),
    ]
    if cfg["reps"] > 1:
        parts += ["", "Spread over reps, (max−min)/median:", "", spread_table(summary, names)]
    refs = [r for r in ("direct", "haproxy") if r in summary and len(names) > 1]
    if refs:
        parts += ["", "Ratios (throughput, conn/s: >1 is better; latency, CPU: <1 is better):"]
    for ref in refs:
        parts += ["", ratio_table(summary, [n for n in names if n != ref], ref)]
    errors = [f"- {n} rep {i + 1}, {group} tests: {gn['error']}"
              for n, reps in result["runs"].items() for i, rep in enumerate(reps)
              for group, gn in rep["notes"].items() if "error" in gn]
    if errors:
        parts += ["", "Failures:", ""] + errors
    if any("noise" in gn for rep in result["runs"].get("direct", [])
           for gn in rep["notes"].values()):
        parts += ["", "Warning: the proxy CPU was busy during `direct` tests (other "
                      "load on the machine); treat this run as noisy."]
    return "\n".join(parts) + "\n"


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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    multi_cpu = len(os.sched_getaffinity(0)) >= 2
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 rep, -t 2, connrate 1 s, 2000 pings (under 2 minutes)")
    p.add_argument("--only", default=None,
                   help="comma-separated contenders (direct is always added): "
                        "direct,fastproxy,fastproxy-poll,haproxy,haproxy-splice")
    p.add_argument("--tests", default="bulk,connrate,ping", help="which measurements")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians reported")
    p.add_argument("--duration", type=int, default=5, help="iperf3 -t seconds")
    p.add_argument("--conn-duration", type=int, default=4, help="connrate seconds")
    p.add_argument("--concurrency", type=int, default=64, help="connrate connections in flight")
    p.add_argument("--pings", type=int, default=10000, help="round trips (+10%% warm-up)")
    p.add_argument("--workers", type=int, default=2,
                   help="fastproxy --workers and haproxy nbthread")
    p.add_argument("--fastproxy-cmd", default="{python} -m fastproxy",
                   help="fastproxy command; --listen/--upstream/--workers/--engine are appended")
    p.add_argument("--pin", choices=("split", "none"), default="split" if multi_cpu else "none",
                   help="split: proxy on --proxy-cpus, load and backends on --load-cpus")
    p.add_argument("--proxy-cpus", default="1", help="CPU list for the proxy (--pin split)")
    p.add_argument("--load-cpus", default="0", help="CPU list for clients and backends")
    p.add_argument("--out", type=Path, help="JSON path instead of results/<timestamp>.json")
    p.add_argument("--report", type=Path, help="re-print the tables of an earlier JSON and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.conn_duration, args.pings = 1, 2, 1, 2000
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(render(json.loads(args.report.read_text())), end="")
        return 0

    tests = {t.strip() for t in args.tests.split(",") if t.strip()}
    if "bulk" in tests and not shutil.which("iperf3"):
        log("iperf3 not found: skipping the bulk tests (apt-get install iperf3)")
        tests.discard("bulk")
    build_loadgen()
    contenders = pick_contenders(args)
    proxy_cpus, load_cpus = pinning(args)
    started = time.strftime("%Y%m%d-%H%M%S")
    idle = background_busy()
    if max(idle.values()) > 10:
        log(f"warning: the machine is not idle (busy % per CPU: {idle}); expect noise")

    # SIGTERM/SIGHUP take the same path as Ctrl-C so the finally below runs.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastproxy-bench-") as tmp:
        try:
            runs = run_all(Env(args, proxy_cpus, load_cpus, Path(tmp), tests), contenders)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            stop_everything()  # before the temp dir (their logs) goes away

    result = {
        "started": started,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "config": {
            "pin": args.pin, "proxy_cpus": sorted(proxy_cpus or []),
            "load_cpus": sorted(load_cpus or []), "reps": args.reps,
            "duration": args.duration, "conn_duration": args.conn_duration,
            "concurrency": args.concurrency, "pings": args.pings, "workers": args.workers,
            "tests": sorted(tests), "fastproxy_cmd": args.fastproxy_cmd,
        },
        "background_busy_pct": idle,
        "system": {
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "haproxy": tool_version(["haproxy", "-v"]) if shutil.which("haproxy") else None,
            "iperf3": tool_version(["iperf3", "--version"]) if shutil.which("iperf3") else None,
        },
        "contenders": {c.name: c.desc for c in contenders},
        "summary": summarize(runs),
        "runs": runs,
    }
    out = args.out or unused_path(RESULTS_DIR, started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"done in {result['elapsed_s']:.0f} s; JSON: {out}")
    print(render(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
