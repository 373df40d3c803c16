"""What every part of the benchmark runner shares: paths, limits, the
metrics and how they are shown, the error a test raises."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


BENCH_DIR = Path(__file__).resolve().parent.parent   # benchmarks/
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
    Metric("mping_per_s", "mping req/s", 0),
    Metric("redis_get_per_s", "redis GET/s", 0),
    Metric("redis_set_per_s", "redis SET/s", 0),
    Metric("bulk1_cpu_s_per_gb", "CPU-s/GB 1", 3, cpu=True, table="cost"),
    Metric("bulk8_cpu_s_per_gb", "CPU-s/GB 8", 3, cpu=True, table="cost"),
    # Both CPUs: loopback TCP runs some of the proxy's sending on the CPU
    # that takes the ACK, so part of a proxy's cost can land on the load CPU.
    Metric("bulk1_all_cpu_s_per_gb", "all CPU-s/GB 1", 3, table="cost"),
    Metric("bulk8_all_cpu_s_per_gb", "all CPU-s/GB 8", 3, table="cost"),
    Metric("cpu_us_per_conn", "CPU µs/conn", 1, cpu=True, table="cost"),
    Metric("cpu_us_per_ping", "CPU µs/ping", 1, cpu=True, table="cost"),
    Metric("ping1_cpu_us_per_ping", "CPU µs/ping 1 CPU", 1, cpu=True, table="cost"),
    Metric("mping_cpu_us_per_req", "CPU µs/mping req", 2, cpu=True, table="cost"),
    Metric("mping_all_cpu_us_per_req", "all CPU µs/mping req", 2, table="cost"),
    Metric("redis_cpu_us_per_req", "CPU µs/redis req", 2, cpu=True, table="cost"),
    Metric("redis_all_cpu_us_per_req", "all CPU µs/redis req", 2, table="cost"),
    Metric("rss_kib_per_bridge", "RSS KiB/idle bridge", 2, cpu=True, table="cost"),
    Metric("idle_alive", "idle alive", 0, ratio=False, table="cost", of="idle_requested"),
    Metric("idle_open_s", "idle open s", 1, ratio=False, table="cost"),
    Metric("idle_requested", "idle requested", 0, ratio=False, table="hidden"),
]
TABLES = {"speed": "Throughput and latency", "cost": "Proxy cost (CPU, memory)"}
