"""`fastproxy demo`: the proxy at work in one command, on loopback only.

Three echo upstreams (threads of this process) with weights 1, 2 and 3, a
Proxy in front balancing round robin, and a few seconds of client traffic
(short echo exchanges and some bulk streams) while the live view shows it;
then a summary: each upstream's share of the connections against its
weight, bytes moved, throughput. `--forever` then keeps serving until
Ctrl-C or SIGTERM. Every port is picked by the OS.

Needs nothing beyond the package: without rich (the `top` extra) the view
is plain text.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

from .flags import Once, OnceParser
from .proxy import Proxy
from .values import ConfigError, format_address, parse_duration
from .view import build_view, format_bytes, render_rich, render_text

EXIT_USAGE = 2
WEIGHTS = (1, 2, 3)
SHORT_CLIENTS = 4
BULK_CLIENTS = 2
BULK_STREAM = 8 << 20       # bytes each way per bulk connection, at most
CHUNK = 64 << 10
CLIENT_TIMEOUT = 5.0


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30.0)
        try:
            while True:
                data = sock.recv(CHUNK)
                if not data:
                    # Half-close back, so the client's read ends cleanly.
                    sock.shutdown(socket.SHUT_WR)
                    return
                sock.sendall(data)
        except OSError:
            return


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128


class Upstream:
    """An echo server on 127.0.0.1, port picked by the OS, on its own thread."""

    def __init__(self) -> None:
        self.server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
        self.address = format_address("127.0.0.1", self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="demo-upstream", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@dataclass
class Tally:
    """What the clients saw; each thread adds under the lock."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: int = 0
    bytes_sent: int = 0
    errors: int = 0
    last_error: str = ""

    def add(self, sent: int = 0, error: Optional[BaseException] = None) -> None:
        with self.lock:
            if error is None:
                self.connections += 1
                self.bytes_sent += sent
            else:
                self.errors += 1
                self.last_error = str(error) or type(error).__name__


def _short_client(target: Tuple[str, int], until: float, tally: Tally, stop: threading.Event) -> None:
    rng = random.Random()
    while time.monotonic() < until and not stop.is_set():
        payload = os.urandom(rng.randint(16, 4096))
        try:
            with socket.create_connection(target, timeout=CLIENT_TIMEOUT) as sock:
                sock.sendall(payload)
                got = bytearray()
                while len(got) < len(payload):
                    data = sock.recv(len(payload) - len(got))
                    if not data:
                        raise ConnectionError(f"echo ended after {len(got)} of {len(payload)} bytes")
                    got += data
                if bytes(got) != payload:
                    raise ConnectionError("the echo differs from what was sent")
            tally.add(len(payload))
        except OSError as exc:
            tally.add(error=exc)
        # A pause now and then, so the rates move.
        if rng.random() < 0.05:
            time.sleep(0.01)


def _bulk_client(target: Tuple[str, int], until: float, tally: Tally, stop: threading.Event) -> None:
    block = os.urandom(CHUNK)
    while time.monotonic() < until and not stop.is_set():
        sent = [0]
        try:
            with socket.create_connection(target, timeout=CLIENT_TIMEOUT) as sock:
                def send() -> None:
                    try:
                        while sent[0] < BULK_STREAM and time.monotonic() < until and not stop.is_set():
                            sock.sendall(block)
                            sent[0] += len(block)
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass   # the reading side reports the failure
                sender = threading.Thread(target=send, name="demo-bulk-send", daemon=True)
                sender.start()
                received = 0
                while True:
                    data = sock.recv(1 << 18)
                    if not data:
                        break
                    received += len(data)
                sender.join(CLIENT_TIMEOUT)
                if received != sent[0]:
                    raise ConnectionError(f"sent {sent[0]} bytes, {received} came back")
            tally.add(sent[0])
        except OSError as exc:
            tally.add(error=exc)


def _url(address: Any) -> str:
    """The stats endpoint's base URL, whether its address comes as (host,
    port) or as text; a Unix socket's stays its unix: address."""
    if isinstance(address, tuple):
        host = "127.0.0.1" if address[0] in ("", "0.0.0.0") else str(address[0])
        return "http://" + format_address(host, int(address[1]))
    text = str(address)
    if text.startswith(("unix:", "/", "@", "http://")):
        return text
    return "http://" + text


def stats_urls(proxy: Proxy) -> Optional[Tuple[str, str]]:
    """(stats URL, status page URL) when this build serves the stats endpoint."""
    address = getattr(proxy, "stats_address", None)
    if address is None:
        return None
    base = _url(address)
    return base + "/stats", base + "/"


def summary(stats: Dict[str, Any], names: List[str], seconds: float, tally: Tally,
            address: Tuple[str, int], urls: Optional[Tuple[str, str]]) -> str:
    upstreams = stats.get("upstreams", {})
    counts = [int(upstreams.get(n, {}).get("accepted", 0)) for n in names]
    total = sum(counts) or 1
    up, down = int(stats.get("bytes_upstream", 0)), int(stats.get("bytes_downstream", 0))
    lines = [f"fastproxy demo: {sum(counts)} connections through {format_address(*address)} in {seconds:.1f} s "
             f"(roundrobin over {len(names)} upstreams, weights {':'.join(map(str, WEIGHTS))})"]
    for name, weight, count in zip(names, WEIGHTS, counts):
        lines.append(f"  upstream {name}  weight {weight}  connections {count}  share {100 * count / total:.1f}% "
                     f"(weight share {100 * weight / sum(WEIGHTS):.1f}%)")
    lines.append(f"  bytes moved: {format_bytes(up)} up, {format_bytes(down)} down; "
                 f"throughput {format_bytes((up + down) / max(seconds, 1e-9))}/s")
    lines.append(f"  client errors: {tally.errors}" + (f" (last: {tally.last_error})" if tally.errors else ""))
    if urls is not None:
        lines.append(f"  stats: {urls[0]}  status page: {urls[1]}")
    return "\n".join(lines) + "\n"


class _Parser(OnceParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"fastproxy demo: error: {message} (see fastproxy demo -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastproxy demo", usage="fastproxy demo [--duration D] [--forever]",
                description="Three echo upstreams (weights 1, 2, 3) behind a proxy on loopback, a few seconds "
                            "of client traffic shown live, then a summary.")
    p.add_argument("--duration", metavar="D", default="5s", action=Once, help="how long the clients run (default: 5s)")
    p.add_argument("--forever", action="store_true",
                   help="after the traffic, keep the proxy and upstreams serving until Ctrl-C or SIGTERM")
    return p


def _show(duration: float, until: float, proxy: Proxy, tty: bool) -> None:
    """The live view while the clients run: rich on a terminal, else a
    few plain snapshots."""
    snap: Callable[[], Tuple[Dict[str, Any], float]] = lambda: (proxy.stats(), time.monotonic())
    if tty:
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            print("fastproxy demo: the live view needs rich: pip install 'fastproxy-tcp[top]'; "
                  "showing the plain view", file=sys.stderr)
        else:
            before, taken = snap()
            with Live(console=Console(), auto_refresh=False, transient=False) as live:
                while time.monotonic() < until:
                    time.sleep(max(0.0, min(0.5, until - time.monotonic())))
                    stats, now = snap()
                    live.update(render_rich(build_view(stats, before, now - taken), title="fastproxy demo"),
                                refresh=True)
                    before, taken = stats, now
            return
    every = max(1.0, duration / 3)
    before, taken = snap()
    while time.monotonic() < until - 0.05:
        time.sleep(max(0.0, min(every, until - time.monotonic())))
        stats, now = snap()
        sys.stdout.write(f"-- {now - (until - duration):.1f} s\n")
        sys.stdout.write(render_text(build_view(stats, before, now - taken)))
        sys.stdout.flush()
        before, taken = stats, now


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        duration = parse_duration(args.duration, "--duration", allow_zero=False)
    except ConfigError as exc:
        print(f"fastproxy demo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    upstreams = [Upstream() for _ in WEIGHTS]
    names = [u.address for u in upstreams]
    options: Dict[str, Any] = {}
    # The endpoint needs prometheus_client, a dependency; a wheel installed
    # without its dependencies still runs the demo, without the endpoint.
    if importlib.util.find_spec("prometheus_client") is not None:
        options["stats"] = "127.0.0.1:0"
    proxy = Proxy(listen="127.0.0.1:0", upstreams=[f"{n}@{w}" for n, w in zip(names, WEIGHTS)],
                  balance="roundrobin", name="demo", **options)
    stop = threading.Event()
    clients: List[threading.Thread] = []
    tally = Tally()
    # SIGTERM during the traffic ends it the way Ctrl-C does.
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        proxy.start()
        address = proxy.address
        assert isinstance(address, tuple)
        target = ("127.0.0.1", int(address[1]))
        urls = stats_urls(proxy)
        print(f"fastproxy demo: proxy on {format_address(*target)} -> "
              + ", ".join(f"{n} (weight {w})" for n, w in zip(names, WEIGHTS))
              + f"; {SHORT_CLIENTS} short-exchange and {BULK_CLIENTS} bulk clients for {duration:g} s")
        if urls is not None:
            print(f"fastproxy demo: stats {urls[0]}, status page {urls[1]}")
        sys.stdout.flush()
        started = time.monotonic()
        until = started + duration
        for i in range(SHORT_CLIENTS + BULK_CLIENTS):
            body = _short_client if i < SHORT_CLIENTS else _bulk_client
            t = threading.Thread(target=body, args=(target, until, tally, stop), name="demo-client", daemon=True)
            t.start()
            clients.append(t)
        _show(duration, until, proxy, sys.stdout.isatty())
        for t in clients:
            t.join(CLIENT_TIMEOUT + 1)
        seconds = time.monotonic() - started
        sys.stdout.write(summary(proxy.stats(), names, seconds, tally, target, urls))
        sys.stdout.flush()
        if tally.connections == 0:
            print(f"fastproxy demo: no client connection succeeded ({tally.last_error})", file=sys.stderr)
            return 1
        if args.forever:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
                previous_term = None
            host, port = target
            print(f"fastproxy demo: serving until Ctrl-C or SIGTERM. Through the proxy to an echo upstream:\n"
                  f"  curl --http0.9 -s http://{host}:{port}/   (the echo is curl's own request)\n"
                  f"  echo hello | nc -q1 {host} {port}")
            if urls is not None:
                print(f"  status page: {urls[1]}  live view: fastproxy top {urls[0].split('/')[2]}")
            sys.stdout.flush()
            proxy.serve_forever()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop.set()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        proxy.stop(0.0)
        for u in upstreams:
            u.close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
