"""The `sniconn` test: what routing by TLS server name costs per connection.

`loadgen connrate` opens connections that each send a canned TLS
ClientHello (captured from Python's ssl for a name in the middle of the
table) and wait for it to come back from `loadgen echo-server`. Two
fastproxy commands take them, in interleaved reps: a plain listener, and a
listener with `route = "sni"` and 1,000 routes (one exact name each, plus a
wildcard each), and one with a single route (the same name): no default
group, so a connection only completes if its name was found. Reported:
connections per second and the proxy's CPU per connection (schedstat of
every proxy thread), and the ratios of CPU per connection; the single
route tells the ClientHello phase's cost from the table's.
"""
from __future__ import annotations

import os
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

from .common import LOADGEN_BIN
from .procfs import group_task_ns
from .unixbulk import _free_port, _on, _stop, _wait_connect

ROUTES = 1000


def client_hello(server_name: str) -> bytes:
    """The first bytes Python's ssl sends for `server_name`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def routes_file(path: Path, listen: str, upstream: str, routes: int, only: Optional[int] = None) -> None:
    lines = [f'[[listeners]]\nlisten = "{listen}"\nroute = "sni"\n']
    for i in range(routes) if only is None else [only]:
        lines.append(f'[[listeners.routes]]\nserver_names = ["host{i}.example", "*.zone{i}.example"]\n'
                     f'upstreams = ["{upstream}"]\n')
    path.write_text("\n".join(lines))


def _connrate(port: int, seconds: int, concurrency: int, payload: Path,
              load_cpus: Optional[Set[int]]) -> Dict[str, float]:
    out = subprocess.run([str(LOADGEN_BIN), "connrate", "127.0.0.1", str(port), str(seconds),
                          str(concurrency), str(payload)], check=True, capture_output=True, text=True,
                         timeout=seconds + 60, preexec_fn=_on(load_cpus)).stdout
    import json
    return json.loads(out)


def run(fastproxy_cmd: str, workers: int, seconds: int, concurrency: int, reps: int,
        proxy_cpus: Optional[Set[int]], load_cpus: Optional[Set[int]],
        routes: int = ROUTES) -> Dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="fp-sniconn-"))
    payload = tmp / "hello.bin"
    payload.write_bytes(client_hello(f"host{routes // 2}.example"))
    echo_port = _free_port()
    echo = subprocess.Popen([str(LOADGEN_BIN), "echo-server", str(echo_port)], stderr=subprocess.DEVNULL,
                            preexec_fn=_on(load_cpus))
    cases: Dict[str, List[Dict[str, float]]] = {"plain": [], "sni": [], "sni_1_route": []}
    try:
        _wait_connect(f"127.0.0.1:{echo_port}", echo)
        base = shlex.split(fastproxy_cmd.format(python=shlex.quote(sys.executable)))
        for _ in range(reps):
            for case in cases:
                port = _free_port()
                listen = f"127.0.0.1:{port}"
                if case == "plain":
                    argv = base + ["--listen", listen, "--upstream", f"127.0.0.1:{echo_port}"]
                else:
                    config = tmp / "routes.toml"
                    routes_file(config, listen, f"127.0.0.1:{echo_port}", routes,
                                only=routes // 2 if case == "sni_1_route" else None)
                    argv = base + ["--config", str(config)]
                argv += ["--workers", str(workers), "--log-level", "warning"]
                proxy = subprocess.Popen(argv, preexec_fn=_on(proxy_cpus), start_new_session=True)
                try:
                    _wait_connect(listen, proxy)
                    time.sleep(0.2)
                    before = group_task_ns(proxy.pid)
                    r = _connrate(port, seconds, concurrency, payload, load_cpus)
                    cpu_ns = group_task_ns(proxy.pid) - before
                finally:
                    _stop(proxy)
                done = max(int(r["completed"]), 1)
                cases[case].append({"conn_per_s": float(r["conn_per_s"]), "errors": float(r["errors"]),
                                    "cpu_us_per_conn": cpu_ns / done / 1000})
    finally:
        _stop(echo)
    med = {case: {key: sorted(run[key] for run in runs)[len(runs) // 2] for key in runs[0]}
           for case, runs in cases.items()}
    return {
        "routes": routes,
        "payload_bytes": payload.stat().st_size,
        "median": med,
        "runs": cases,
        "sni_vs_plain_cpu_per_conn": round(med["sni"]["cpu_us_per_conn"] / med["plain"]["cpu_us_per_conn"], 3),
        "sni_vs_plain_conn_per_s": round(med["sni"]["conn_per_s"] / med["plain"]["conn_per_s"], 3),
        "sni_vs_one_route_cpu_per_conn": round(med["sni"]["cpu_us_per_conn"]
                                               / med["sni_1_route"]["cpu_us_per_conn"], 3),
    }


def render(r: Dict[str, object]) -> str:
    med = r["median"]
    assert isinstance(med, dict)
    lines = ["| listener | conn/s | proxy CPU µs/conn | errors |", "|---|---|---|---|"]
    for case, m in med.items():
        lines.append(f"| {case} | {m['conn_per_s']:.0f} | {m['cpu_us_per_conn']:.1f} | {m['errors']:.0f} |")
    lines += ["", f"route = sni over {r['routes']} routes / plain: CPU per connection "
                  f"{r['sni_vs_plain_cpu_per_conn']:.3f}, connections per second {r['sni_vs_plain_conn_per_s']:.3f}",
              f"{r['routes']} routes / 1 route: CPU per connection {r['sni_vs_one_route_cpu_per_conn']:.3f}"]
    return "\n".join(lines) + "\n"
