"""The tests (bulk, connection rate, pings, many-connection pings, redis,
idle bridges) and the interleaved repetitions that run them."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

from .common import HOST, IPERF_ATTEMPTS, LOADGEN_BIN, BenchError, log
from .procfs import (
    BUSY,
    HZ,
    CpuMeter,
    background_busy,
    foreign_delta,
    foreign_ticks,
    group_fds,
    group_rss_kib,
    group_task_ns,
    proc_stat,
)
from .procs import Service, free_port, run_json, wait_accepting
from .contenders import Contender
from .tcpstats import TcpStats


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


class Scraper:
    """GET /metrics from a proxy's stats endpoint every `interval` seconds
    on a thread of this (load-side) process, while a test runs: what a
    scrape costs the proxy shows in its figures and CPU. Counts scrapes,
    failures and the slowest answer."""

    def __init__(self, path: Path, interval: float):
        self.path, self.interval = path, interval
        self.scrapes = 0
        self.errors: List[str] = []
        self.slowest_ms = 0.0
        self.total_ms = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _once(self) -> None:
        t0 = time.monotonic()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.path))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise BenchError(f"scrape answered {answer[:40]!r}")
        ms = (time.monotonic() - t0) * 1e3
        self.scrapes += 1
        self.total_ms += ms
        self.slowest_ms = max(self.slowest_ms, ms)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self._once()
            except (OSError, BenchError) as e:
                self.errors.append(str(e))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def summary(self) -> dict:
        return {"scrapes": self.scrapes, "errors": len(self.errors), "first_errors": self.errors[:3],
                "mean_ms": round(self.total_ms / self.scrapes, 2) if self.scrapes else None,
                "slowest_ms": round(self.slowest_ms, 2)}

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@contextlib.contextmanager
def scraping(env: Env, c: Contender, proxy: Optional[Service], notes: dict, key: str) -> Iterator[None]:
    """Scrape the proxy during the block if the contender asks for it."""
    if not c.scrape or proxy is None or env.args.scrape_interval <= 0:
        yield
        return
    with Scraper(proxy.workdir / "stats.sock", env.args.scrape_interval) as scraper:
        yield
    notes[f"{key}_scrapes"] = scraper.summary()
    log(f"    scraped /metrics {scraper.scrapes} times (slowest {scraper.slowest_ms:.1f} ms, "
        f"{len(scraper.errors)} failed)")


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
        legs = ({"client_proxy": port, "proxy_server": backend_port} if proxy
                else {"client_server": port})
        for streams in (1, 8):
            for attempt in range(1, IPERF_ATTEMPTS + 1):
                try:
                    with scraping(env, c, proxy, notes, f"bulk{streams}"), CpuMeter(env, proxy) as cpu, \
                            tcp_stats(env, legs, proxy) as tcp:
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
            out[f"bulk{streams}_all_cpu_s_per_gb"] = cpu.per_all(received["bytes"], 1e9)
            notes[f"bulk{streams}"] = dict(cpu.summary(), attempts=attempt)
            if tcp:
                notes[f"bulk{streams}"]["tcp"] = tcp.summary(received["bytes"] / 1e9)
            noise_check(c, cpu, notes)
            log(f"    bulk {streams}: {gbps:.2f} Gbit/s  {cpu_note(cpu)}{tcp_note(tcp, received['bytes'])}")


@contextlib.contextmanager
def tcp_stats(env: Env, legs: Dict[str, int], proxy: Optional[Service]) -> Iterator[Optional[TcpStats]]:
    """With --tcp-stats, TCP's counters around the block, and its legs'
    sockets sampled 80 % of the way through the transfer."""
    if not env.args.tcp_stats:
        yield None
        return
    with TcpStats(legs, 0.8 * env.args.duration, proxy and proxy.proc.pid) as tcp:
        yield tcp


def tcp_note(tcp: Optional[TcpStats], received: int) -> str:
    if tcp is None:
        return ""
    s = tcp.summary(received / 1e9)
    sw = f", proxy {s['proxy_switches_per_gb']:.0f} cs/GB" if "proxy_switches_per_gb" in s else ""
    return f"  [{s['retrans_per_gb']:.0f} retrans/GB, {s['ofo_per_gb']:.0f} ofo/GB{sw}]"


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
            with scraping(env, c, proxy, notes, "connrate"), CpuMeter(env, proxy) as cpu:
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
        if "mping" in env.tests:
            mping(env, c, port, proxy, out, notes)


def mping(env: Env, c: Contender, port: int, proxy: Optional[Service], out: dict,
          notes: dict) -> None:
    """Many-connection ping-pong: small requests on --mping-conns
    connections at once, the traffic of a pooled client and a cache
    server, where the proxy's per-request cost is the limit."""
    a = env.args
    with CpuMeter(env, proxy) as cpu:
        r = run_json([str(LOADGEN_BIN), "mpingpong", HOST, str(port), str(a.mping_conns),
                      str(a.mping_seconds)], timeout=a.mping_seconds + 30)
    if r["errors"]:
        notes["mping"] = dict(cpu.summary(), loadgen=r)
        raise BenchError(f"mpingpong: {r['errors']} of {r['conns']} connections failed")
    out["mping_per_s"] = r["req_per_s"]
    out["mping_cpu_us_per_req"] = cpu.per(r["round_trips"], 1e6)
    out["mping_all_cpu_us_per_req"] = cpu.per_all(r["round_trips"], 1e6)
    notes["mping"] = dict(cpu.summary(), loadgen=r)
    noise_check(c, cpu, notes)
    log(f"    mping: {r['req_per_s']:,.0f} req/s over {r['conns']} connections, "
        f"p50 {r['p50_us']} µs, p99 {r['p99_us']} µs  {cpu_note(cpu)}")


def redis_group(env: Env, c: Contender, out: dict, notes: dict) -> None:
    """redis-benchmark's GET and SET, 50 connections, against a redis-server
    with no persistence on the load CPUs: a real client and server, where
    mping is a model of them."""
    a = env.args
    port, wd = free_port(), workdir(env, "redis")
    server = Service("redis-server", ["redis-server", "--port", str(port), "--bind", HOST,
                                      "--save", "", "--appendonly", "no", "--dir", str(wd)], wd)
    with running(server, port, notes), proxied(env, c, port, notes) as (pport, proxy):
        argv = ["redis-benchmark", "-h", HOST, "-p", str(pport), "-c", "50",
                "-n", str(a.redis_requests), "-t", "get,set", "-q", "--csv"]
        with CpuMeter(env, proxy) as cpu:
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                   stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise BenchError("redis-benchmark timed out after 120 s")
    rps = redis_csv(p.stdout)
    if p.returncode or set(rps) != {"GET", "SET"}:
        raise BenchError(f"redis-benchmark exit {p.returncode}: "
                         f"{(p.stderr or p.stdout).strip()[-300:]}")
    out["redis_get_per_s"], out["redis_set_per_s"] = rps["GET"], rps["SET"]
    out["redis_cpu_us_per_req"] = cpu.per(2 * a.redis_requests, 1e6)
    out["redis_all_cpu_us_per_req"] = cpu.per_all(2 * a.redis_requests, 1e6)
    notes["redis"] = dict(cpu.summary(), csv=p.stdout)
    noise_check(c, cpu, notes)
    log(f"    redis: GET {rps['GET']:,.0f}/s, SET {rps['SET']:,.0f}/s  {cpu_note(cpu)}")


def redis_csv(text: str) -> Dict[str, float]:
    """{"GET": requests/s, ...} from redis-benchmark --csv."""
    rps = {}
    for row in csv.reader(text.splitlines()):
        if len(row) >= 2 and row[0] != "test":
            with contextlib.suppress(ValueError):
                rps[row[0]] = float(row[1])
    return rps


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
    if env.tests & {"connrate", "ping", "mping"}:
        groups.append(("echo", echo_group))
    if "ping1" in env.tests:
        groups.append(("ping1", ping1_group))
    if "redis" in env.tests:
        groups.append(("redis", redis_group))
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


def rotated(items: list, rep: int, reps: int) -> list:
    """items in rep `rep`'s order (1-based): rotated so that over `reps`
    reps each starts at evenly spaced places."""
    shift = ((rep - 1) * len(items)) // max(reps, 1) % max(len(items), 1)
    return items[shift:] + items[:shift]


def run_all(env: Env, contenders: List[Contender]) -> Dict[str, List[dict]]:
    # Interleaved: rep 1 of everyone, then rep 2..., so slow drifts of the
    # machine (thermal, neighbours, page cache) hit all contenders alike.
    # Each rep also starts at another place in the list: a contender's
    # place within a rep moved its figures by 4-14 % (two identical
    # fastproxy configurations, one right after haproxy-splice, one last:
    # docs/benchmarks.md), which a fixed order pins on the same contender.
    runs: Dict[str, List[dict]] = {c.name: [] for c in contenders}
    reps = env.args.reps
    for rep in range(1, reps + 1):
        for c in rotated(contenders, rep, reps):
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
    settle(env.args.settle)
    waited, busy = wait_quiet(env.args.wait_idle)
    if max(busy.values()) > QUIET_PCT:
        log(f"    warning: the machine is still busy after {waited:.0f} s "
            f"(busy % per CPU: {busy})")
    elif waited >= 1:
        log(f"    waited {waited:.0f} s for the machine to go idle")
    result = run_contender(env, c, rep, idle)
    _last_stop[0] = time.monotonic()
    result["notes"]["before"] = {"waited_s": waited, "busy_pct": busy}
    result["attempt"] = attempt
    return result


_last_stop = [0.0]


def settle(seconds: float) -> None:
    """The previous contender leaves the kernel in a state that lingers
    after its process exits: a splicing proxy right after haproxy moved
    about 30 % less in bulk for some 20 s, whatever ran it (measured and
    described in docs/benchmarks.md, Position effect). Wait it out."""
    if _last_stop[0]:
        left = seconds - (time.monotonic() - _last_stop[0])
        if left > 0:
            time.sleep(left)


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
