"""The `toxicbulk` test: one bulk stream through fastproxy with a fault on
it, done two ways: by a data-plane toxic (no Python per chunk, splice kept)
and by an `on_data` hook doing the same in Python per chunk (a hook thread
sleeping `latency`, or pacing to `rate`). Throughput and the proxy's CPU
seconds per GB, against the same proxy with no fault.

Toxics are set at run time, not on the command line, so the proxy here is
this file run as a program (`python toxicbulk.py proxy CASE LISTEN
UPSTREAM`), embedding fastproxy.Proxy; the sender and the sink are
unixbulk.py's (Python moving 1 MiB per call, the same in every case).
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unixbulk  # noqa: E402

LATENCY_MS = 5
RATE_KBPS = 100_000          # toxiproxy's KB/s (1000 bytes): 100 MB/s

CASES = ("none", "latency_toxic", "latency_hook", "bandwidth_toxic", "bandwidth_hook")


def _proxy(case: str, listen: str, upstream: str) -> None:
    from fastproxy import Direction, Proxy, toxic
    kw: Dict[str, object] = {}
    if case == "latency_hook":
        def on_data(conn: object, direction: object, data: memoryview) -> None:
            if direction == Direction.UPSTREAM:
                time.sleep(LATENCY_MS / 1000)
        kw["on_data"] = on_data
    elif case == "bandwidth_hook":
        def on_data(conn: object, direction: object, data: memoryview) -> None:
            if direction == Direction.UPSTREAM:
                time.sleep(len(data) / (RATE_KBPS * 1000))
        kw["on_data"] = on_data
    p = Proxy(listen=listen, upstream=upstream, workers=2, **kw)  # type: ignore[arg-type]
    p.start()
    if case == "latency_toxic":
        p.add_toxic(toxic("latency", "upstream", latency=LATENCY_MS))
    elif case == "bandwidth_toxic":
        p.add_toxic(toxic("bandwidth", "upstream", rate=RATE_KBPS))
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    p.stop(1.0)


def _env() -> Dict[str, str]:
    # This checkout's fastproxy (built in place) before any installed one.
    src = str(Path(__file__).resolve().parents[2] / "src")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send(target: str, seconds: float) -> Dict[str, float]:
    import json
    out = subprocess.run([sys.executable, unixbulk.__file__, "send", target, str(seconds)], check=True,
                         capture_output=True, text=True, timeout=seconds + 120).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def run(seconds: float, reps: int, proxy_cpus: Optional[Set[int]]) -> Dict[str, object]:
    """Per case, medians of MB/s and of the proxy's CPU seconds per GB."""
    sink_addr = f"127.0.0.1:{_free_port()}"
    sink = subprocess.Popen([sys.executable, unixbulk.__file__, "sink", sink_addr],
                            stdout=subprocess.PIPE, text=True)
    pre: Optional[Callable[[], None]] = (lambda: os.sched_setaffinity(0, proxy_cpus)) if proxy_cpus else None
    runs: Dict[str, List[Dict[str, float]]] = {c: [] for c in CASES}
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        for _ in range(reps):
            for case in CASES:
                listen = f"127.0.0.1:{_free_port()}"
                proxy = subprocess.Popen([sys.executable, __file__, "proxy", case, listen, sink_addr],
                                         stdout=subprocess.PIPE, text=True, preexec_fn=pre, env=_env())
                try:
                    assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
                    cpu0 = _cpu_seconds(proxy.pid)
                    r = _send(listen, seconds)
                    cpu = _cpu_seconds(proxy.pid) - cpu0
                    runs[case].append({"mbps": r["bytes"] / r["seconds"] / 1e6,
                                       "cpu_s_per_gb": cpu / (r["bytes"] / 1e9)})
                finally:
                    unixbulk._stop(proxy)
    finally:
        unixbulk._stop(sink)

    def med(xs: List[float]) -> float:
        return sorted(xs)[len(xs) // 2]
    return {
        "latency_ms": LATENCY_MS, "rate_kbps": RATE_KBPS, "seconds": seconds, "reps": reps,
        "cases": {c: {"mbps": round(med([r["mbps"] for r in v]), 1),
                      "cpu_s_per_gb": round(med([r["cpu_s_per_gb"] for r in v]), 3)}
                  for c, v in runs.items()},
        "runs": runs,
    }


def render(r: Dict[str, object]) -> str:
    cases = r["cases"]
    assert isinstance(cases, dict)
    lines = [f"latency {r['latency_ms']} ms, bandwidth {r['rate_kbps']} KB/s (upstream stream); "
             f"{r['reps']} rep(s) of {r['seconds']} s",
             "| case | MB/s | proxy CPU s/GB |", "|---|---|---|"]
    lines += [f"| {c} | {v['mbps']:.1f} | {v['cpu_s_per_gb']:.3f} |" for c, v in cases.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1] == "proxy":
        _proxy(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit("usage: toxicbulk.py proxy CASE LISTEN UPSTREAM (run by benchmarks/run.py --tests toxicbulk)")
