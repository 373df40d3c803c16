#!/usr/bin/env python3
"""How each engine scales with idle bridges (docs/architecture.md, Engines):
a new client's connect + 64 B echo + close latency (p50, p99) while N
idle bridges are held open, for each N in --idle, and the time to open
--open bridges; both engines side by side, poll also as a ratio to epoll.

    PYTHONPATH=src python benchmarks/poll_scale.py --idle 0,1000,5000 --open 5000

Each engine gets a fresh `fastproxy` process (default settings and the
flags after --) in front of an echo backend process; the bridges are
opened in waves of --wave connections (connect all, send 64 B on each,
read each echo back), so the open time is what the proxy needs, not
one round trip after another. Stdlib only, Linux only.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bridge_cost import start_proxy  # noqa: E402

MSG = b"x" * 63 + b"\n"
# The proxy may not mark its backend down when the machine is busy: the
# figures are the proxy's latency, not a health check's verdict.
PROXY_FLAGS = ["--max-fails", "0", "--connect-timeout", "10s"]

ECHO = r"""
import os, selectors, socket, sys
lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(4096)
lsock.setblocking(False)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(lsock.getsockname()[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
sel = selectors.DefaultSelector()
sel.register(lsock, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is lsock:
            while True:
                try:
                    conn, _ = lsock.accept()
                except (BlockingIOError, ConnectionError):
                    break
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
        else:
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if data:
                key.fileobj.send(data)   # 64 B: always fits
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"""


def start_backend(tmp: Path) -> "Tuple[subprocess.Popen[bytes], int]":
    port_file = tmp / "echo.port"
    if port_file.exists():
        port_file.unlink()
    proc = subprocess.Popen([sys.executable, "-c", ECHO, str(port_file)])
    deadline = time.monotonic() + 10
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("echo backend did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def echo_once(s: socket.socket) -> None:
    s.sendall(MSG)
    got = 0
    while got < len(MSG):
        chunk = s.recv(len(MSG) - got)
        if not chunk:
            raise RuntimeError("a bridge closed before its echo")
        got += len(chunk)


def open_bridges(port: int, n: int, wave: int, held: List[socket.socket]) -> None:
    while n > 0:
        batch = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(min(wave, n))]
        for s in batch:
            s.sendall(MSG)
        for s in batch:
            got = 0
            while got < len(MSG):
                chunk = s.recv(len(MSG) - got)
                if not chunk:
                    raise RuntimeError("a bridge closed before its echo")
                got += len(chunk)
        held.extend(batch)
        n -= len(batch)


def latencies(port: int, count: int) -> Tuple[float, float]:
    samples: List[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            echo_once(s)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples) * 1e3, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3


def run_engine(engine: str, idle: List[int], n_open: int, samples: int, wave: int,
               extra: List[str], tmp: Path) -> Dict[str, float]:
    out: Dict[str, float] = {}
    echo, echo_port = start_backend(tmp)
    try:
        proxy, port = start_proxy(echo_port, ["--engine", engine, *PROXY_FLAGS, *extra])
        try:
            time.sleep(0.3)
            held: List[socket.socket] = []
            for n in sorted(idle):
                open_bridges(port, n - len(held), wave, held)
                time.sleep(0.2)
                out[f"p50@{n}"], out[f"p99@{n}"] = latencies(port, samples)
            for s in held:
                s.close()
        finally:
            proxy.terminate()
            proxy.wait(60)
        # The open time on a fresh proxy: idle bridges of the runs above
        # would still be closing in it.
        proxy, port = start_proxy(echo_port, ["--engine", engine, *PROXY_FLAGS, *extra])
        try:
            time.sleep(0.3)
            held = []
            t0 = time.perf_counter()
            open_bridges(port, n_open, wave, held)
            out[f"open@{n_open}"] = time.perf_counter() - t0
            for s in held:
                s.close()
        finally:
            proxy.terminate()
            proxy.wait(60)
    finally:
        echo.terminate()
        echo.wait(30)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", default="0,1000,5000", help="idle bridge counts (default 0,1000,5000)")
    ap.add_argument("--open", type=int, default=5000, help="bridges to open for the open time (default 5000)")
    ap.add_argument("--samples", type=int, default=300, help="new clients per latency figure (default 300)")
    ap.add_argument("--wave", type=int, default=200, help="connections opened at once (default 200)")
    ap.add_argument("--engines", default="epoll,poll", help="engines to compare (default epoll,poll)")
    ap.add_argument("proxy_args", nargs="*", help="more fastproxy flags, after --")
    args = ap.parse_args()
    idle = [int(x) for x in args.idle.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(max(idle), args.open) + 256
    if hard < need:
        sys.exit(f"the hard open-file limit {hard} is too low (need {need})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # children inherit it
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"poll-scale-{os.getpid()}"
    tmp.mkdir()
    try:
        engines = args.engines.split(",")
        res = {e: run_engine(e, idle, args.open, args.samples, args.wave, args.proxy_args, tmp)
               for e in engines}
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    keys = [k for n in sorted(idle) for k in (f"p50@{n}", f"p99@{n}")] + [f"open@{args.open}"]
    head = "| figure | " + " | ".join(engines) + (" | poll / epoll |" if {"poll", "epoll"} <= set(engines) else " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for k in keys:
        unit = "s" if k.startswith("open") else "ms"
        cells = [f"{res[e][k]:.2f} {unit}" for e in engines]
        ratio = ""
        if {"poll", "epoll"} <= set(engines):
            ratio = f" {res['poll'][k] / res['epoll'][k]:.1f}x |"
        name = k.replace("@", " with ") + (" idle" if not k.startswith("open") else " bridges")
        print(f"| {name} | " + " | ".join(cells) + " |" + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
