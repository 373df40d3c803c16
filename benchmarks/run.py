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
    python benchmarks/run.py --quick --tests unixbulk   # Unix vs TCP upstream
    python benchmarks/run.py --tests sniconn   # connection CPU, route = sni over 1,000 names vs plain
    python benchmarks/run.py --tests toxicbulk # a latency / bandwidth toxic vs the same in an on_data hook
    python benchmarks/run.py --tests mping,redis # small requests on 50 connections: loadgen, redis-benchmark

Stdlib only (matplotlib, if importable, draws the PNG), Python 3.9+, Linux
only (epoll, /proc, sched_setaffinity). The parts are in bench/ (see
docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional, Set

from bench.common import (
    BENCH_DIR,
    FDS_PER_BRIDGE,
    FD_RESERVE,
    LOADGEN_BIN,
    LOADGEN_SRC,
    RESULTS_DIR,
    log,
)
from bench.procfs import background_busy
from bench.measure import Env, run_all
from bench.procs import stop_everything
from bench.contenders import all_contenders, pick_contenders
from bench.report import plot, render, summarize
from bench import congestion, sniconn, toxicbulk, unixbulk


# ----------------------------------------------------------------- setup

def build_loadgen() -> None:
    """Rebuild only when the source is newer than the binary."""
    if LOADGEN_BIN.exists() and LOADGEN_BIN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    LOADGEN_BIN.parent.mkdir(exist_ok=True)
    log(f"building {LOADGEN_BIN.relative_to(BENCH_DIR.parent)}")
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(LOADGEN_BIN), str(LOADGEN_SRC)], check=True)


# The CPUs this run may use, read once: pinning() narrows this process to
# the load CPUs, and a later part of the run (--congestion-control LIST)
# must still see the proxy's.
START_AFFINITY = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def pinning(args: argparse.Namespace) -> tuple:
    if args.pin == "none":
        return None, None
    avail = START_AFFINITY
    proxy = {int(c) for c in args.proxy_cpus.split(",")}
    load = {int(c) for c in args.load_cpus.split(",")}
    if not (proxy | load) <= avail or proxy & load:
        sys.exit(f"--pin split needs disjoint CPU sets within {sorted(avail)}: "
                 f"proxy {sorted(proxy)}, load {sorted(load)}")
    # Everything this process starts inherits the load CPUs; only the proxy
    # is moved to its own CPUs (in Service.start).
    os.sched_setaffinity(0, load)
    return proxy, load


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
                   help="which measurements (also: mping, redis, unixbulk, sniconn, toxicbulk)")
    p.add_argument("--scrape-interval", type=float, default=0.1, metavar="SECONDS",
                   help="how often fastproxy-scraped's /metrics is fetched during bulk and connrate "
                        "(0: not at all)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians reported")
    p.add_argument("--duration", type=int, default=5, help="iperf3 -t seconds")
    p.add_argument("--conn-duration", type=int, default=4, help="connrate seconds")
    p.add_argument("--concurrency", type=int, default=64, help="connrate connections in flight")
    p.add_argument("--pings", type=int, default=10000, help="round trips (+10%% warm-up)")
    p.add_argument("--mping-conns", type=int, default=50, help="mping connections")
    p.add_argument("--mping-seconds", type=int, default=5, help="mping seconds")
    p.add_argument("--redis-requests", type=int, default=200000,
                   help="redis-benchmark -n, per command (GET and SET)")
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
    p.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                   help="before each contender's rep but the first, wait this long after the "
                        "previous one stopped (default 25, --quick 0): a splicing proxy run "
                        "right after haproxy moved about 30 %% less for some 20 s "
                        "(docs/benchmarks.md, Position effect)")
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
    p.add_argument("--congestion-control", metavar="LIST", default=None,
                   help="run everything once under each of these TCP congestion controls "
                        "(e.g. bbr,cubic), set system-wide (needs root) and the old one put "
                        "back afterwards; default: the host's as it is")
    p.add_argument("--tcp-stats", action="store_true",
                   help="record TCP's counters (retransmits, out-of-order packets, segment "
                        "sizes, context switches) during each bulk test, and print them")
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
        args.mping_seconds, args.redis_requests = 2, 50000
    if args.wait_idle is None:
        args.wait_idle = 5 if args.quick else 60
    if args.settle is None:
        args.settle = 0 if args.quick else 25
    if args.noise_retries is None:
        args.noise_retries = 0 if args.quick else 2
    return args


def result_path(args: argparse.Namespace, stem: str) -> Path:
    """--out, or a fresh name in results/; under --congestion-control each
    algorithm's results get its name as a suffix."""
    suffix = getattr(args, "cc_suffix", "")
    if args.out:
        return args.out.with_name(args.out.stem + suffix + args.out.suffix) if suffix else args.out
    return unused_path(RESULTS_DIR, stem + suffix)


def _report(args: argparse.Namespace, name: str, module: Any, result: dict) -> dict:
    """A single-test run's result: stamped, saved as JSON next to the
    others (or to --out), its table printed."""
    result["command"] = " ".join(["python"] + [shlex.quote(a) for a in sys.argv])
    result["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    result["congestion_control"] = congestion.active()
    out = result_path(args, name + "-" + time.strftime("%Y%m%d-%H%M%S"))
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(module.render(result), end="")
    log(f"{name}: {out}")
    return result


def run_unixbulk(args: argparse.Namespace) -> dict:
    """The unixbulk test: printed as a table and saved next to the other results."""
    proxy_cpus, _ = pinning(args)
    log("unixbulk: one stream through a Unix upstream vs a TCP upstream, and direct")
    result = unixbulk.run(args.fastproxy_cmd, args.workers, args.duration, args.reps, proxy_cpus)
    return _report(args, "unixbulk", unixbulk, result)


def run_sniconn(args: argparse.Namespace) -> dict:
    """The sniconn test: printed as a table and saved next to the other results."""
    proxy_cpus, load_cpus = pinning(args)
    log(f"sniconn: connections carrying a TLS ClientHello, route = sni over {sniconn.ROUTES} names vs plain")
    result = sniconn.run(args.fastproxy_cmd, args.workers, args.conn_duration, args.concurrency, args.reps,
                         proxy_cpus, load_cpus)
    return _report(args, "sniconn", sniconn, result)


def run_toxicbulk(args: argparse.Namespace) -> dict:
    """The toxicbulk test: printed as a table and saved next to the other results."""
    proxy_cpus, _ = pinning(args)
    log("toxicbulk: one stream with a latency / bandwidth fault, data-plane toxic vs on_data hook")
    result = toxicbulk.run(args.duration, args.reps, proxy_cpus)
    return _report(args, "toxicbulk", toxicbulk, result)


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
    unknown = tests - {"bulk", "connrate", "ping", "ping1", "mping", "redis", "idle", "unixbulk",
                       "sniconn", "toxicbulk"}
    if unknown:
        sys.exit(f"unknown test(s) {', '.join(sorted(unknown))}")
    try:
        algorithms = congestion.parse_list(args.congestion_control) if args.congestion_control else []
    except congestion.CongestionError as e:
        log(str(e))
        return 2
    # SIGTERM/SIGHUP take the same path as Ctrl-C, so that the finally
    # blocks below run: proxies stopped, the congestion control put back.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    if not algorithms:
        return run_tests(args, set(tests))
    try:
        for name in algorithms:
            log(f"congestion control: {name} (system-wide for this part of the run)")
            with congestion.switched(name):
                args.cc_suffix = f"-{name}"
                rc = run_tests(args, set(tests))
            if rc:
                return rc
    except congestion.CongestionError as e:
        log(str(e))
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        log(f"congestion control back to {congestion.active()}")
    return 0


def run_tests(args: argparse.Namespace, tests: Set[str]) -> int:
    """Every test asked for, under the congestion control active now."""
    if "unixbulk" in tests:
        # fastproxy alone (no other contender has Unix upstreams here), with
        # its own sender and sink: bench/unixbulk.py.
        tests.discard("unixbulk")
        run_unixbulk(args)
        if not tests:
            return 0
    if "toxicbulk" in tests:
        # fastproxy alone, embedded (toxics are set at run time): bench/toxicbulk.py.
        tests.discard("toxicbulk")
        run_toxicbulk(args)
        if not tests:
            return 0
    if "sniconn" in tests:
        # fastproxy alone, plain against route = sni: bench/sniconn.py.
        tests.discard("sniconn")
        build_loadgen()
        run_sniconn(args)
        if not tests:
            return 0
    if "bulk" in tests and not shutil.which("iperf3"):
        log("iperf3 not found: skipping the bulk tests (apt-get install iperf3)")
        tests.discard("bulk")
    if "redis" in tests and not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        log("redis-server or redis-benchmark not found: skipping the redis test "
            "(apt-get install redis-server)")
        tests.discard("redis")
    if not tests:
        return 0
    build_loadgen()
    contenders = pick_contenders(args)
    proxy_cpus, load_cpus = pinning(args)
    single = one_cpu(args, proxy_cpus)
    idle_count = idle_budget(args.idle_count) if "idle" in tests else 0
    started = time.strftime("%Y%m%d-%H%M%S")
    out = result_path(args, started)
    algorithm = congestion.active()
    log(f"congestion control: {algorithm or 'unknown'}")
    png = None if args.no_plot else (args.plot or out.with_suffix(".png"))
    idle = background_busy()
    if max(idle.values()) > 10:
        log(f"warning: the machine is not idle (busy % per CPU: {idle}); expect noise")

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
            "pings": args.pings, "mping_conns": args.mping_conns,
            "mping_seconds": args.mping_seconds, "redis_requests": args.redis_requests,
            "idle_count": idle_count, "wait_idle": args.wait_idle,
            "noise_retries": args.noise_retries,
            "idle_reps": min(args.idle_reps, args.reps), "workers": args.workers,
            "tests": sorted(tests), "fastproxy_cmd": args.fastproxy_cmd,
            "congestion_control": algorithm, "tcp_stats": args.tcp_stats,
        },
        "background_busy_pct": idle,
        "system": {
            "kernel": platform.release(), "os": os_release(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "python": platform.python_version(),
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "haproxy": tool_version(["haproxy", "-v"]) if shutil.which("haproxy") else None,
            "nginx": tool_version(["nginx", "-v"]) if shutil.which("nginx") else None,
            "iperf3": tool_version(["iperf3", "--version"]) if shutil.which("iperf3") else None,
            "redis": (tool_version(["redis-server", "--version"])
                      if shutil.which("redis-server") else None),
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
