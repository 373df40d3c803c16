"""The `unixbulk` test: one bulk stream through a Unix-socket upstream
against the same through a TCP upstream (and a direct Unix connection
against a direct TCP one), as ratios.

iperf3 speaks TCP only, so the sender and the sink are this file run as
a program (`python unixbulk.py sink ADDR` / `send ADDR SECONDS`): Python
moving 1 MiB per call, the same on both sides of every ratio. fastproxy runs
as the command (`--fastproxy-cmd`) on the proxy CPUs; sender and sink on
the load CPUs, as in the other tests.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

CHUNK = 1 << 20


def _sockaddr(addr: str):
    if addr.startswith("unix:"):
        return socket.AF_UNIX, addr[5:]
    host, _, port = addr.rpartition(":")
    return socket.AF_INET, (host, int(port))


def _sink(addr: str) -> None:
    family, sa = _sockaddr(addr)
    srv = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(sa)
    srv.listen(16)
    print("ready", flush=True)
    buf = bytearray(CHUNK)
    while True:
        conn, _ = srv.accept()
        with conn:
            while conn.recv_into(buf):
                pass


def _send(addr: str, seconds: float) -> None:
    family, sa = _sockaddr(addr)
    data = b"\0" * CHUNK
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect(sa)
        sent = 0
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            s.sendall(data)
            sent += CHUNK
        s.shutdown(socket.SHUT_WR)
        s.recv(1)   # the sink's close: everything went through
        elapsed = time.monotonic() - t0
    print(json.dumps({"bytes": sent, "seconds": elapsed}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_connect(addr: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    family, sa = _sockaddr(addr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited early ({proc.returncode}): {proc.args}")
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.connect(sa)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not accepting within {timeout}s: {addr}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _on(cpus: Optional[Set[int]]):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _gbps(target: str, seconds: float) -> float:
    out = subprocess.run([sys.executable, __file__, "send", target, str(seconds)], check=True,
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    r = json.loads(out)
    return r["bytes"] * 8 / r["seconds"] / 1e9


def run(fastproxy_cmd: str, workers: int, seconds: float, reps: int,
        proxy_cpus: Optional[Set[int]]) -> Dict[str, object]:
    """Medians in Gbit/s per case, and the two ratios."""
    tmp = Path(tempfile.mkdtemp(prefix="fp-unixbulk-"))
    tcp_sink = f"127.0.0.1:{_free_port()}"
    unix_sink = f"unix:{tmp}/sink.sock"
    sinks = [subprocess.Popen([sys.executable, __file__, "sink", a], stdout=subprocess.PIPE, text=True)
             for a in (tcp_sink, unix_sink)]
    try:
        for s in sinks:
            assert s.stdout is not None and s.stdout.readline().strip() == "ready"
        cases: Dict[str, List[float]] = {"direct_tcp": [], "direct_unix": [],
                                         "proxy_tcp_upstream": [], "proxy_unix_upstream": []}
        for _ in range(reps):   # interleaved, as run_all does
            cases["direct_tcp"].append(_gbps(tcp_sink, seconds))
            cases["direct_unix"].append(_gbps(unix_sink, seconds))
            for case, upstream in (("proxy_tcp_upstream", tcp_sink), ("proxy_unix_upstream", unix_sink)):
                listen = f"127.0.0.1:{_free_port()}"
                argv = shlex.split(fastproxy_cmd.format(python=shlex.quote(sys.executable))) + [
                    "--listen", listen, "--upstream", upstream, "--workers", str(workers),
                    "--log-level", "warning"]
                proxy = subprocess.Popen(argv, preexec_fn=_on(proxy_cpus))
                try:
                    _wait_connect(listen, proxy)
                    time.sleep(0.1)
                    cases[case].append(_gbps(listen, seconds))
                finally:
                    _stop(proxy)
    finally:
        for s in sinks:
            _stop(s)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in cases.items()}
    return {
        "gbps": {k: round(v, 2) for k, v in med.items()},
        "runs": cases,
        "unix_vs_tcp_upstream": round(med["proxy_unix_upstream"] / med["proxy_tcp_upstream"], 3),
        "direct_unix_vs_tcp": round(med["direct_unix"] / med["direct_tcp"], 3),
        "proxy_unix_vs_direct_unix": round(med["proxy_unix_upstream"] / med["direct_unix"], 3),
        "proxy_tcp_vs_direct_tcp": round(med["proxy_tcp_upstream"] / med["direct_tcp"], 3),
    }


def render(r: Dict[str, object]) -> str:
    g = r["gbps"]
    assert isinstance(g, dict)
    lines = ["| case | Gbit/s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in g.items()]
    lines += ["", f"through the proxy, Unix upstream / TCP upstream: {r['unix_vs_tcp_upstream']:.3f}",
              f"direct Unix / direct TCP: {r['direct_unix_vs_tcp']:.3f}",
              f"proxy / direct, Unix: {r['proxy_unix_vs_direct_unix']:.3f}; "
              f"TCP: {r['proxy_tcp_vs_direct_tcp']:.3f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "sink":
        _sink(sys.argv[2])
    elif sys.argv[1] == "send":
        _send(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit("usage: unixbulk.py sink ADDR | send ADDR SECONDS")
