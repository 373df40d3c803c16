#!/usr/bin/env python3
"""What one GET /metrics costs an idle fastproxy, in CPU time of its
process (/proc/PID/stat: user + system), and how long the answer takes.

    PYTHONPATH=src python benchmarks/scrape_cost.py --scrapes 500 --listeners 1
    PYTHONPATH=src python benchmarks/scrape_cost.py --scrapes 500 --listeners 16

Stdlib only, Linux only. The run's figures under load are in run.py's
fastproxy-scraped contender (docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])   # utime, stime


def scrape(path: str) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        size = 0
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return size
            size += len(chunk)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scrapes", type=int, default=500)
    p.add_argument("--listeners", type=int, default=1, help="listeners (each one upstream)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "stats.sock")
        cfg = Path(tmp, "fp.toml")
        cfg.write_text(f'workers = {args.workers}\nstats = "unix:{sock}"\n' + "".join(
            f'[[listeners]]\nname = "l{i}"\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:{9000 + i}"]\n'
            for i in range(args.listeners)))
        proc = subprocess.Popen([sys.executable, "-m", "fastproxy", "--config", str(cfg)],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if re.search(r"stats endpoint on", line):
                    break
            else:
                print("fastproxy did not start", file=sys.stderr)
                return 1
            scrape(sock)   # warm: the first scrape imports and builds what later ones reuse
            before = cpu_ticks(proc.pid)
            times = []
            size = 0
            for _ in range(args.scrapes):
                t0 = time.perf_counter()
                size = scrape(sock)
                times.append((time.perf_counter() - t0) * 1e3)
            used = (cpu_ticks(proc.pid) - before) / HZ
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"{args.listeners} listener(s), {args.scrapes} scrapes of {size} bytes: "
          f"proxy CPU {used * 1e3 / args.scrapes:.2f} ms per scrape; answer p50 {statistics.median(times):.2f} ms, "
          f"max {max(times):.2f} ms; at one scrape per 100 ms, {used * 1e3 / args.scrapes / 100 * 100:.1f} % "
          "of a CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
