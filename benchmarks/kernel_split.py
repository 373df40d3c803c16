#!/usr/bin/env python3
"""Where an `--engine kernel` bulk transfer's bytes went: redirected by the
verdict inside the kernel, or passed to the worker (issue 18).

Runs one iperf3 transfer through fastproxy --engine kernel (proxy pinned to
--proxy-cpu, iperf3 client and server to --load-cpu, as benchmarks/run.py's
split pinning), then, before the proxy stops, sums the verdict's per-socket
counters (struct fp_sm_state in sockmap.h: forwarded, passed, trimmed) over
the state map the proxy created, read with bpftool. Also prints Gbit/s, the
two CPUs' busy split (/proc/stat) and all-CPU seconds per GB.

    python benchmarks/kernel_split.py                    # 1 stream, 3 s
    python benchmarks/kernel_split.py -P 8 --flags "--notsent-lowat 0"

Linux, root (the engine needs CAP_BPF + CAP_NET_ADMIN), iperf3, bpftool.
Stdlib only. Run it under `flock /tmp/bench.lock` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
HZ = os.sysconf("SC_CLK_TCK")
STATE_SIZE = 64           # sizeof(struct fp_sm_state)
STATE = struct.Struct("<IIQQQQQQII")   # peer flags forwarded passed drained budget adj trimmed next pad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    # Not by connecting: iperf3 -s takes any connection for a test client.
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if f":{port} " in out:
            return
        time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


def cpu_ticks() -> dict:
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                fields = line.split()
                out[int(fields[0][3:])] = [int(v) for v in fields[1:]]
    return out


def bpf_maps() -> list:
    out = subprocess.run(["bpftool", "map", "show", "-j"], capture_output=True, text=True).stdout
    return json.loads(out or "[]")


def state_totals(after_id: int) -> dict:
    """Sums of the verdict's counters over the state map created after
    after_id (the proxy's: an mmap-able array of fp_sm_state)."""
    maps = [m for m in bpf_maps() if m.get("type") == "array" and m.get("bytes_value") == STATE_SIZE
            and m["id"] > after_id]
    if not maps:
        sys.exit("no state map found: did the proxy fall back to epoll? (see its log)")
    m = max(maps, key=lambda m: m["id"])
    out = subprocess.run(["bpftool", "map", "dump", "id", str(m["id"]), "-j"], capture_output=True, text=True)
    totals = dict(forwarded=0, passed=0, trimmed=0, sockets=0)
    for entry in json.loads(out.stdout or "[]"):
        raw = bytes(int(b, 16) for b in entry["value"])
        _, _, forwarded, passed, _, _, _, trimmed, _, _ = STATE.unpack(raw[:STATE.size])
        if forwarded or passed:
            totals["sockets"] += 1
        totals["forwarded"] += forwarded
        totals["passed"] += passed
        totals["trimmed"] += trimmed
    return totals


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("-t", "--seconds", type=int, default=3, help="iperf3 -t")
    ap.add_argument("-P", "--streams", type=int, default=1, help="iperf3 -P")
    ap.add_argument("--flags", default="", help="extra fastproxy flags")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--proxy-cpu", type=int, default=1)
    ap.add_argument("--load-cpu", type=int, default=0)
    a = ap.parse_args()

    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    backend, listen = free_port(), free_port()
    first_map = max((m["id"] for m in bpf_maps()), default=0)
    load = ["taskset", "-c", str(a.load_cpu)]
    server = subprocess.Popen(load + ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(backend)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = None
    try:
        wait_listening(backend)
        proxy = subprocess.Popen(["taskset", "-c", str(a.proxy_cpu), sys.executable, "-m", "fastproxy",
                                  "--listen", f"127.0.0.1:{listen}", "--upstream", f"127.0.0.1:{backend}",
                                  "--workers", str(a.workers), "--engine", "kernel", "--log-level", "warning"]
                                 + shlex.split(a.flags),
                                 env=env, stdout=subprocess.DEVNULL)
        wait_listening(listen)
        t0, s0 = time.monotonic(), cpu_ticks()
        out = subprocess.run(load + ["iperf3", "-c", "127.0.0.1", "-p", str(listen), "-t", str(a.seconds),
                                     "-P", str(a.streams), "-J"], capture_output=True, text=True).stdout
        wall, s1 = time.monotonic() - t0, cpu_ticks()
        result = json.loads(out)
        if "error" in result:
            sys.exit("iperf3: " + result["error"])
        totals = state_totals(first_map)
    finally:
        if proxy is not None:
            stop(proxy)
        stop(server)
    received = result["end"]["sum_received"]
    gb = received["bytes"] / 1e9
    d = {c: [b - a for a, b in zip(s0[c], s1[c])] for c in s1}
    busy = {c: {part: round(100 * d[c][i] / HZ / wall) for part, i in
                (("user", 0), ("system", 2), ("softirq", 6))} for c in (a.load_cpu, a.proxy_cpu)}
    all_s = sum(d[c][i] for c in (a.load_cpu, a.proxy_cpu) for i in (0, 1, 2, 5, 6)) / HZ
    moved = totals["forwarded"] + totals["passed"]
    print(json.dumps(dict(
        gbps=round(received["bits_per_second"] / 1e9, 2),
        all_cpu_s_per_gb=round(all_s / gb, 3),
        load_cpu=busy[a.load_cpu], proxy_cpu=busy[a.proxy_cpu],
        forwarded=totals["forwarded"], passed=totals["passed"], trimmed=totals["trimmed"],
        passed_share=round(totals["passed"] / moved, 3) if moved else None)))


if __name__ == "__main__":
    main()
