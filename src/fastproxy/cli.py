"""The `fastproxy` command: argv -> Config -> Proxy.serve_forever().

A user mistake prints one line naming the flag and the value, and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, NoReturn, Optional

from . import __version__
from .config import ConfigError
from .hooks import load_hooks
from .proxy import Proxy

EXIT_USAGE = 2

# Config fields -> the flag a CLI user typed.
_FLAGS = {"upstreams": "--upstream"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the value is in the message.
        self.exit(EXIT_USAGE, f"fastproxy: error: {message} (see fastproxy -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastproxy",
        description="A TCP proxy that forwards at native speed (epoll + splice, no GIL).",
        epilog="Durations (D) accept 5, 5s, 500ms, 2m, 1h.",
    )
    p.add_argument("--listen", required=True, metavar="ADDR",
                   help="where to accept clients: :PORT (every interface), HOST:PORT, [IPV6]:PORT")
    p.add_argument("--upstream", required=True, action="append", metavar="SPEC",
                   help="a server to forward to: HOST:PORT[@WEIGHT][,max-connections=N][,backup]; "
                        "repeat it for an upstream group")
    p.add_argument("--workers", metavar="N", help="worker threads (default: one per usable CPU)")
    p.add_argument("--connect-timeout", default="5s", metavar="D", help="upstream connect timeout (default 5s)")
    p.add_argument("--drain-timeout", default="10s", metavar="D",
                   help="on stop, how long live bridges may finish (default 10s)")
    p.add_argument("--half-close-timeout", default="5m", metavar="D",
                   help="how long a bridge may stay half-closed (default 5m)")
    p.add_argument("--engine", default="auto", choices=("auto", "epoll", "poll"),
                   help="data plane loop (default auto: epoll where available; env FASTPROXY_ENGINE)")
    p.add_argument("--busy-poll", default="0", metavar="D",
                   help="workers keep polling without sleeping for D after their last event: more "
                        "throughput and less latency for a busy CPU (default 0: off)")
    p.add_argument("--worker-cpus", metavar="LIST",
                   help="pin worker i to the i-th CPU of LIST, e.g. 0,2-3 (round robin when there "
                        "are more workers; default: not pinned)")
    p.add_argument("--notsent-lowat", metavar="SIZE",
                   help="TCP_NOTSENT_LOWAT on both sockets of each bridge: keep at most about SIZE "
                        "unsent bytes in a socket, the rest in the proxy, so the proxy's CPU sends "
                        "them (default: 1m with the epoll engine, off with poll; 0: off)")
    g = p.add_argument_group("balancing and health")
    g.add_argument("--balance", default="roundrobin",
                   help="roundrobin (weighted, smooth), leastconn, random (power of two), source "
                        "(consistent hash of the client IP), first (default roundrobin)")
    g.add_argument("--retries", metavar="N", help="other upstreams to try after a failed connect "
                                                  "(default: upstreams - 1)")
    g.add_argument("--max-fails", default="3", metavar="N",
                   help="consecutive connect failures that mark an upstream down (default 3; 0 = never)")
    g.add_argument("--fail-timeout", default="10s", metavar="D",
                   help="how long an upstream marked down is skipped (default 10s)")
    g.add_argument("--health-interval", metavar="D", help="active health checks every D (default: off)")
    g.add_argument("--health-timeout", default="2s", metavar="D", help="health check timeout (default 2s)")
    g.add_argument("--health-rise", default="2", metavar="N", help="passes to mark an upstream up (default 2)")
    g.add_argument("--health-fall", default="3", metavar="N", help="fails to mark an upstream down (default 3)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-connections", metavar="N",
                   help="live bridges at most (default: from the fd budget)")
    g.add_argument("--max-connections-per-ip", metavar="N", help="live bridges per client IP at most")
    g.add_argument("--on-limit", default="queue", choices=("queue", "reject"),
                   help="past a limit: wait in line (default) or close at once")
    g.add_argument("--queue-size", default="1024", metavar="N", help="clients that may wait (default 1024)")
    g.add_argument("--queue-timeout", default="30s", metavar="D", help="how long a client may wait (default 30s)")
    g = p.add_argument_group("access control")
    g.add_argument("--allow", action="append", metavar="CIDR",
                   help="admit only matching clients (repeatable; IPv4 or IPv6; a bare address is /32 or /128)")
    g.add_argument("--deny", action="append", metavar="CIDR", help="refuse matching clients (repeatable; wins over --allow)")
    g.add_argument("--allow-file", action="append", metavar="FILE", help="--allow rules, one per line, # comments")
    g.add_argument("--deny-file", action="append", metavar="FILE", help="--deny rules, one per line, # comments")
    g.add_argument("--reject-with", default="close", choices=("close", "reset"),
                   help="how refused clients are closed: FIN (default) or RST")
    g.add_argument("--idle-timeout", metavar="D", help="close a bridge with no bytes either way for D (default: never)")
    g.add_argument("--max-lifetime", metavar="D", help="close a bridge D after it was accepted (default: never)")
    g.add_argument("--allow-time", action="append", metavar="WINDOW",
                   help='admit new clients only inside these windows, e.g. "Mon-Fri 08:00-18:00" (repeatable)')
    g.add_argument("--time-zone", metavar="NAME", help="IANA time zone of --allow-time (default: local time)")
    g.add_argument("--close-outside-window", action="store_true",
                   help="also close live bridges when a time window ends")
    g.add_argument("--rate-limit-per-ip", metavar="N/D", help="new clients per address, e.g. 20/1s or 600/1m")
    g.add_argument("--rate-limit-table", default="65536", metavar="N",
                   help="addresses the rate limiter remembers (default 65536; least recently seen evicted)")
    g.add_argument("--send-proxy", choices=("v1", "v2"), help="send a PROXY protocol header to the upstream")
    g.add_argument("--accept-proxy", action="store_true", help="expect a PROXY protocol header (v1 or v2) from clients")
    g.add_argument("--accept-proxy-from", action="append", metavar="CIDR",
                   help="peers that may send a PROXY header (others are refused; implies --accept-proxy)")
    g.add_argument("--proxy-header-timeout", default="3s", metavar="D",
                   help="how long a client may take to send its PROXY header (default 3s)")
    g.add_argument("--proxy-header-max", default="1024", metavar="N",
                   help="longest v2 PROXY header payload accepted, in bytes (default 1024)")
    p.add_argument("--hooks", metavar="SPEC",
                   help="Python hooks: FILE.py[:OBJECT] or MODULE[:OBJECT] defining on_connect/on_data/on_close")
    p.add_argument("--hook-timeout", metavar="D",
                   help="close a bridge whose hook call is not answered within D (HOOK_TIMEOUT; default: never)")
    p.add_argument("--access-log", metavar="FILE|-", help="one JSON line per closed bridge (- = stdout)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--version", action="version", version=f"fastproxy {__version__}")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s fastproxy %(levelname)s %(message)s")
    try:
        hooks = load_hooks(args.hooks) if args.hooks else None
        proxy = Proxy(
            args.listen,
            upstreams=args.upstream,
            workers=args.workers,
            connect_timeout=args.connect_timeout,
            drain_timeout=args.drain_timeout,
            half_close_timeout=args.half_close_timeout,
            engine=args.engine,
            busy_poll=args.busy_poll,
            worker_cpus=args.worker_cpus,
            notsent_lowat=args.notsent_lowat,
            balance=args.balance,
            retries=args.retries,
            max_fails=args.max_fails,
            fail_timeout=args.fail_timeout,
            health_interval=args.health_interval,
            health_timeout=args.health_timeout,
            health_rise=args.health_rise,
            health_fall=args.health_fall,
            max_connections=args.max_connections,
            max_connections_per_ip=args.max_connections_per_ip,
            on_limit=args.on_limit,
            queue_size=args.queue_size,
            queue_timeout=args.queue_timeout,
            allow=args.allow,
            deny=args.deny,
            allow_file=args.allow_file,
            deny_file=args.deny_file,
            reject_with=args.reject_with,
            idle_timeout=args.idle_timeout,
            max_lifetime=args.max_lifetime,
            allow_time=args.allow_time,
            time_zone=args.time_zone,
            close_outside_window=args.close_outside_window,
            rate_limit_per_ip=args.rate_limit_per_ip,
            rate_limit_table=args.rate_limit_table,
            send_proxy=args.send_proxy,
            accept_proxy=args.accept_proxy,
            accept_proxy_from=args.accept_proxy_from,
            proxy_header_timeout=args.proxy_header_timeout,
            proxy_header_max=args.proxy_header_max,
            access_log=args.access_log,
            hook_timeout=args.hook_timeout,
        )
        for name in ("on_connect", "on_data", "on_close"):
            fn = getattr(hooks, name, None)
            if callable(fn):
                getattr(proxy, name)(fn)
        proxy.serve_forever()
    except ConfigError as exc:
        flag = _FLAGS.get(exc.field, "--" + exc.field.replace("_", "-")) if exc.field.islower() else exc.field
        print(f"fastproxy: error: {flag}: {exc.value!r}: {exc.problem}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
