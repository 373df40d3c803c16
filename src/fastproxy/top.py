"""`fastproxy top [ADDR]`: the live view of a running proxy, read from its
stats endpoint (`--stats ADDR`: GET /stats, JSON).

On a terminal it redraws in place every --interval (rich, the `top` extra;
without it, the plain view redrawn) until `q` or Ctrl-C. Otherwise it prints
--count plain snapshots --interval apart (rates from the second on) and
exits 0.

Exit codes: 0 done; 2 a usage problem, which includes an ADDR that does not
answer /stats at the first fetch (nothing is serving there: the address is
wrong, or the proxy runs without --stats); 1 the endpoint went away after
answering (in the non-terminal mode; the live view shows the error and
retries).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import sys
import time
from types import TracebackType
from typing import Any, Dict, List, NoReturn, Optional, TextIO, Type

from .flags import Once, OnceParser
from .values import ConfigError, parse_address, unix_path, unix_sockaddr
from .view import build_view, render_rich, render_text

EXIT_USAGE = 2
EXIT_LOST = 1
FETCH_TIMEOUT = 5.0
INSTALL_HINT = "pip install 'fastproxy-tcp[top]'"


class StatsError(Exception):
    """The endpoint did not give a stats dict; the message says why."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(unix_sockaddr(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Endpoint:
    """Where /stats is: HOST:PORT, :PORT (this host), [V6]:PORT, unix:PATH or
    unix:@NAME; an http:// prefix and a trailing path are allowed, so that a
    URL the demo printed works as it is."""

    def __init__(self, text: str) -> None:
        spec = text.strip()
        if spec.startswith("http://"):
            spec = spec[len("http://"):].split("/", 1)[0]
        host, port = parse_address(spec, "ADDR", listen=True)
        if not host.startswith("unix:") and port == 0:
            raise ConfigError("ADDR", text, "needs a port other than 0")
        self.text = text
        self.path = unix_path(host)
        self.host = host if host else "127.0.0.1"
        self.port = port

    @property
    def url(self) -> str:
        if self.path is not None:
            return f"unix:{self.path} /stats"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/stats"

    def fetch(self, timeout: float = FETCH_TIMEOUT) -> Dict[str, Any]:
        conn: http.client.HTTPConnection
        if self.path is not None:
            conn = _UnixHTTPConnection(self.path, timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", "/stats", headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise StatsError(f"cannot reach {self.url}: {_reason(exc)}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise StatsError(f"{self.url} answered {resp.status} {resp.reason}")
        try:
            stats = json.loads(body)
        except ValueError:
            raise StatsError(f"{self.url} did not answer JSON") from None
        if not isinstance(stats, dict):
            raise StatsError(f"{self.url} did not answer a JSON object")
        return stats


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Keys:
    """Keys read without blocking: stdin in cbreak mode while inside the
    `with` (so `q` arrives without Enter and is not echoed), restored on
    the way out, whatever ends it. Without a TTY on stdin it only waits."""

    def __init__(self, stream: TextIO) -> None:
        self._fd: Optional[int] = None
        self._saved: Optional[List[Any]] = None
        try:
            if stream.isatty():
                self._fd = stream.fileno()
        except (AttributeError, ValueError, OSError):
            self._fd = None

    def __enter__(self) -> "Keys":
        if self._fd is not None:
            import termios
            import tty
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if self._fd is not None and self._saved is not None:
            import termios
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def wait_quit(self, timeout: float) -> bool:
        """Wait up to timeout; True once q (or Q) was pressed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._fd is None:
                time.sleep(left)
                return False
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                data = os.read(self._fd, 64)
                if not data:
                    # stdin closed: only Ctrl-C can end the view now.
                    self._fd = None
                elif b"q" in data.lower():
                    return True


class _Parser(OnceParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"fastproxy top: error: {message} (see fastproxy top -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastproxy top", usage="fastproxy top [ADDR] [--interval D] [--count N]",
                description="The live view of a running proxy, from its stats endpoint (--stats ADDR). On a "
                            "terminal it refreshes in place until q or Ctrl-C; otherwise it prints --count "
                            "plain snapshots. Exit 2 if ADDR does not answer /stats, 1 if it stops answering.")
    p.add_argument("addr", nargs="?", metavar="ADDR",
                   help="the proxy's --stats address: HOST:PORT, :PORT, unix:PATH "
                        "(default: $FASTPROXY_STATS)")
    p.add_argument("--interval", metavar="D", default="1s", action=Once, help="between refreshes (default: 1s)")
    p.add_argument("--count", metavar="N", type=int, default=None, action=Once,
                   help="without a terminal: how many snapshots (default: 1); on a terminal: stop after N")
    return p


def _error(message: str) -> None:
    print(f"fastproxy top: {message}", file=sys.stderr)


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from .values import parse_duration
    text = args.addr or os.environ.get("FASTPROXY_STATS")
    try:
        if not text:
            raise ConfigError("ADDR", "", "missing: give the proxy's --stats address or set FASTPROXY_STATS")
        endpoint = Endpoint(text)
        interval = parse_duration(args.interval, "--interval", allow_zero=False)
        if args.count is not None and args.count < 1:
            raise ConfigError("--count", args.count, "must be at least 1")
    except ConfigError as exc:
        _error(f"error: {exc}")
        return EXIT_USAGE
    try:
        first = endpoint.fetch()
    except StatsError as exc:
        _error(f"{exc} (is the proxy running with --stats {text}?)")
        return EXIT_USAGE
    try:
        if sys.stdout.isatty():
            return _live(endpoint, first, interval, args.count)
        return _plain(endpoint, first, interval, args.count or 1)
    except KeyboardInterrupt:
        return 0


def _plain(endpoint: Endpoint, first: Dict[str, Any], interval: float, count: int) -> int:
    stats, taken = first, time.monotonic()
    before: Optional[Dict[str, Any]] = None
    before_taken = taken
    for i in range(count):
        if i:
            time.sleep(interval)
            try:
                stats, taken = endpoint.fetch(), time.monotonic()
            except StatsError as exc:
                _error(str(exc))
                return EXIT_LOST
            print()
        view = build_view(stats, before, taken - before_taken if before is not None else None)
        sys.stdout.write(render_text(view))
        sys.stdout.flush()
        before, before_taken = stats, taken
    return 0


def _live(endpoint: Endpoint, first: Dict[str, Any], interval: float, count: Optional[int]) -> int:
    try:
        from rich.console import Console, Group, RenderableType
        from rich.live import Live
        from rich.text import Text
    except ImportError:
        _error(f"the live view needs rich: {INSTALL_HINT}; showing the plain view")
        return _live_plain(endpoint, first, interval, count)
    title = f"fastproxy top  {endpoint.url}  (q quits)"
    console = Console()
    stats, taken = first, time.monotonic()
    shown: RenderableType = render_rich(build_view(stats), title=title)
    drawn = 0
    with Keys(sys.stdin) as keys, Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            live.update(shown, refresh=True)
            drawn += 1
            if (count is not None and drawn >= count) or keys.wait_quit(interval):
                return 0
            try:
                now, now_taken = endpoint.fetch(), time.monotonic()
            except StatsError as exc:
                # The last figures stay, under the error, until it answers again.
                last = render_rich(build_view(stats), title=title)
                shown = Group(Text(f"{exc}; retrying every {interval:g} s", style="bold red"), last)
                continue
            shown = render_rich(build_view(now, stats, now_taken - taken), title=title)
            stats, taken = now, now_taken


def _live_plain(endpoint: Endpoint, first: Dict[str, Any], interval: float, count: Optional[int]) -> int:
    """The plain view redrawn in place (cursor home, clear): a terminal without rich."""
    stats, taken = first, time.monotonic()
    shown = render_text(build_view(stats))
    drawn = 0
    with Keys(sys.stdin) as keys:
        while True:
            sys.stdout.write(f"\x1b[H\x1b[J{endpoint.url}  (q quits)\n{shown}")
            sys.stdout.flush()
            drawn += 1
            if (count is not None and drawn >= count) or keys.wait_quit(interval):
                return 0
            try:
                now, now_taken = endpoint.fetch(), time.monotonic()
            except StatsError as exc:
                shown = f"{exc}; retrying every {interval:g} s\n" + render_text(build_view(stats))
                continue
            shown = render_text(build_view(now, stats, now_taken - taken))
            stats, taken = now, now_taken
