"""The stats endpoint (`stats=ADDR`): /metrics (Prometheus), /stats (JSON),
a status page at /, and /admin/ handed to fastproxy.admin when run-time
control is on.

One asyncio loop on a thread of its own reads and writes every connection;
handlers run on a few threads of a pool, so a slow one holds neither the
loop nor a worker. Every read has a deadline (a client sending a byte a
second is cut when its request head is late), heads and bodies have caps,
and connections past a cap are answered 503 and closed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.resources
import json
import logging
import math
import socket
import threading
from typing import Any, Callable, Dict, Optional, Set, Tuple
from urllib.parse import parse_qs, urlsplit

from . import metrics
from .httpapi import Request, Response
from .sockets import UnixFile, close_listening, listen_socket, listen_unix
from .statuspage import status_page
from .values import ConfigError, format_address, is_digits, unix_path

log = logging.getLogger(__name__)

__all__ = ["StatsServer", "admin_handler", "bind_stats"]

# Deadlines and caps. Module attributes so that tests can shorten them.
HEAD_TIMEOUT = 10.0       # the request line and headers, from their first byte
IDLE_TIMEOUT = 30.0       # a kept-alive connection's wait for its next request
BODY_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024      # admin requests are small JSON documents
MAX_CONNECTIONS = 64
HANDLER_THREADS = 4

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}

STATIC = {"status.js": "text/javascript; charset=utf-8", "status.css": "text/css; charset=utf-8"}



def json_safe(value: Any) -> Any:
    """stats() with every non-finite float as None: RFC 8259 has no
    Infinity, and a histogram's last bound is +Inf (`null` in /stats, "no
    upper bound"); strict parsers (JavaScript's, Go's) refuse the bare word."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str, **more: Any) -> Response:
    body = json.dumps({"error": message, **more}).encode() + b"\n"
    return Response(status, body)


def bind_stats(addr: Tuple[str, int]) -> Tuple[socket.socket, Optional[UnixFile]]:
    """The endpoint's listening socket (bound now, so that start() fails
    with a clear error before serving anything). Raises ConfigError naming
    `stats`."""
    shown = format_address(*addr)
    try:
        if unix_path(addr[0]) is not None:
            return listen_unix(addr)
        return listen_socket(addr), None
    except ConfigError as exc:
        raise ConfigError("stats", shown, exc.problem) from None


def _static(name: str) -> bytes:
    return importlib.resources.files("fastproxy").joinpath("static", name).read_bytes()


# ---- the server

# Loop rounds a stop lets run before it cuts connections (see _finish).
FINISH_ROUNDS = 8

class StatsServer:
    """Serves `sock` (bound and listening) on its own thread until stop().
    `stats` gives the figures (Proxy.stats); `admin` answers /admin/
    (None: run-time control is off)."""

    def __init__(self, sock: socket.socket, *, stats: Callable[[], Dict[str, Any]],
                 admin: Optional[Callable[[Request], Response]] = None,
                 admin_off: Tuple[int, str] = (403, "run-time control is off (stats_admin)"),
                 unix_file: Optional[UnixFile] = None) -> None:
        self.sock = sock
        self.unix_file = unix_file
        self._stats = stats
        self._admin = admin
        self._admin_off = admin_off
        self.registry = metrics.make_registry(stats)
        self._static: Dict[str, bytes] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="fastproxy-stats")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._writers: Set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._failed: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="fastproxy-stats", daemon=True)

    @property
    def has_admin(self) -> bool:
        return self._admin is not None

    @property
    def address(self) -> Any:
        if self.sock.family == socket.AF_UNIX:
            name = self.sock.getsockname()
            return "@" + name[1:].decode() if isinstance(name, bytes) else name
        host, port = self.sock.getsockname()[:2]
        return (host, port)

    def address_text(self) -> str:
        address = self.address
        return "unix:" + address if isinstance(address, str) else format_address(*address)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10.0)
        if self._failed is not None:
            raise self._failed

    def stop(self, timeout: float = 5.0) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(self._shutdown)
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        close_listening(self.sock, self.unix_file)
        self.unix_file = None

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:
            self._failed = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
            # Stopped: cut what is open and let every connection's task
            # see it (_finish), so nothing is left pending when the loop closes.
            loop.run_until_complete(self._finish())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    async def _finish(self) -> None:
        # Clients accepted before the stop are a few callbacks away from
        # _serve (the accept's task, connection_made, its task's first
        # step): let them get there, so that each is cut with the others
        # rather than its task cancelled before it started (asyncio logs
        # that, and nothing would close its transport). Only then is the
        # server closed: a transport made after Server.close() fails to
        # attach, and asyncio drops it with its socket still open, which a
        # client then waits on until the garbage collector runs.
        for _ in range(FINISH_ROUNDS):
            await asyncio.sleep(0)
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        # An aborted transport closes its socket in a callback of a later
        # round: let those run before the loop closes.
        for _ in range(FINISH_ROUNDS):
            await asyncio.sleep(0)

    async def _open(self) -> None:
        if self.sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(self._serve, sock=self.sock, limit=MAX_HEAD)
        else:
            self._server = await asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEAD)

    def _shutdown(self) -> None:
        # Accept no more (an accept already queued for this round is
        # cancelled with the reader); _finish closes the server.
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        self._loop.stop()

    # ---- one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            await self._refuse(reader, writer)
            return
        self._writers.add(writer)
        peername = writer.get_extra_info("peername")
        peer: Any = (peername[0], peername[1]) if isinstance(peername, tuple) else "unix"
        try:
            first = True
            while True:
                try:
                    request, keep = await self._read(reader, peer, first)
                except BadRequest as exc:
                    await self._answer_and_close(reader, writer, error(exc.status, exc.message))
                    break
                if request is None:
                    break
                first = False
                response = await asyncio.get_running_loop().run_in_executor(self._pool, self._dispatch, request)
                self._write(writer, response, close=not keep, head=request.method == "HEAD")
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, RuntimeError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._answer_and_close(reader, writer, error(503, "too many connections to the stats endpoint"))
        finally:
            writer.close()

    async def _answer_and_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                response: Response) -> None:
        # Closing over an unread request would reset the connection and
        # lose the answer: send it, half-close, and read what the client
        # still sends until it closes, for a second at most.
        try:
            self._write(writer, response, close=True)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            deadline = asyncio.get_running_loop().time() + 1.0
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0 or not await asyncio.wait_for(reader.read(MAX_HEAD), left):
                    break
        except (OSError, asyncio.TimeoutError):
            pass

    async def _read(self, reader: asyncio.StreamReader, peer: Any,
                    first: bool) -> Tuple[Optional[Request], bool]:
        # A kept-alive connection may idle; once a request's first byte
        # came, its head must all come within HEAD_TIMEOUT.
        try:
            start = await asyncio.wait_for(reader.read(1), IDLE_TIMEOUT if not first else HEAD_TIMEOUT)
        except asyncio.TimeoutError:
            if first:
                raise BadRequest(408, "the request did not come in time") from None
            return None, False
        if not start:
            return None, False
        try:
            head = start + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.TimeoutError:
            raise BadRequest(408, "the request head did not come in time") from None
        except asyncio.LimitOverrunError:
            raise BadRequest(431, f"the request head is longer than {MAX_HEAD} bytes") from None
        except asyncio.IncompleteReadError:
            return None, False
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
            raise BadRequest(400, f"malformed request line: {lines[0][:200]!r}")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            if version.startswith("HTTP/"):
                raise BadRequest(505, f"HTTP version {version} is not served (HTTP/1.0 and 1.1 are)")
            raise BadRequest(400, f"malformed request line: {lines[0][:200]!r}")
        headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest(400, f"malformed header line: {line[:200]!r}")
            key = name.lower()
            if key == "content-length" and headers.get(key, value.strip()) != value.strip():
                # Which one frames the body? A front that read the other
                # would see the next request where this server sees body.
                raise BadRequest(400, "two Content-Length headers that differ")
            headers[key] = value.strip()
        if "transfer-encoding" in headers:
            raise BadRequest(501, "Transfer-Encoding is not accepted: send a Content-Length")
        length_text = headers.get("content-length", "0")
        if not is_digits(length_text) or len(length_text) > 20:
            raise BadRequest(400, f"Content-Length: {length_text[:40]!r} is not a length")
        length = int(length_text)
        if length > MAX_BODY:
            raise BadRequest(413, f"the body ({length} bytes) is larger than {MAX_BODY} bytes")
        try:
            body = await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT) if length else b""
        except asyncio.TimeoutError:
            raise BadRequest(408, "the request body did not come in time") from None
        connection = headers.get("connection", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        url = urlsplit(target)
        request = Request(method=method.upper(), path=url.path or "/", query=parse_qs(url.query),
                          headers=headers, body=body, peer=peer)
        return request, keep

    def _write(self, writer: asyncio.StreamWriter, response: Response, *, close: bool, head: bool = False) -> None:
        reason = REASONS.get(response.status, "")
        lines = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}", "Connection: " + ("close" if close else "keep-alive")]
        lines += [f"{name}: {value}" for name, value in response.headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else response.body))

    # ---- handlers (on the pool's threads)

    def _dispatch(self, request: Request) -> Response:
        try:
            if request.path.startswith("/admin/") or request.path == "/admin":
                return self._admin_request(request)
            route = self._route(request.path)
            if route is None:
                return error(404, "not found", path=request.path)
            if request.method not in ("GET", "HEAD"):
                return Response(405, json.dumps({"error": f"{request.method} is not allowed on {request.path}"})
                                .encode() + b"\n", headers=(("Allow", "GET, HEAD"),))
            return route(request)
        except Exception:
            log.exception("stats endpoint: %s %s failed", request.method, request.path)
            return error(500, "internal error (logged)")

    def _route(self, path: str) -> Optional[Callable[[Request], Response]]:
        if path == "/metrics":
            return self._metrics
        if path == "/stats":
            return self._json
        if path in ("/", "/index.html"):
            return self._page
        if path.startswith("/static/") and path[len("/static/"):] in STATIC:
            return self._asset
        return None

    def _metrics(self, request: Request) -> Response:
        return Response(200, metrics.render(self.registry), metrics.CONTENT_TYPE_LATEST)

    def _json(self, request: Request) -> Response:
        body = json.dumps(json_safe(self._stats()), indent=None, sort_keys=False, allow_nan=False).encode() + b"\n"
        return Response(200, body, "application/json", (("Cache-Control", "no-store"),))

    def _page(self, request: Request) -> Response:
        return Response(200, status_page(self._stats()), "text/html; charset=utf-8",
                        (("Cache-Control", "no-store"),))

    def _asset(self, request: Request) -> Response:
        name = request.path[len("/static/"):]
        data = self._static.get(name)
        if data is None:
            data = self._static[name] = _static(name)
        return Response(200, data, STATIC[name], (("Cache-Control", "max-age=300"),))

    def _admin_request(self, request: Request) -> Response:
        if self._admin is None:
            return error(*self._admin_off)
        return self._admin(request)


AdminHandler = Callable[[Request], Response]


def admin_handler(proxy: Any, enabled: bool) -> Tuple[Optional[AdminHandler], Tuple[int, str]]:
    """The /admin/ handler: fastproxy.admin's handle_admin when run-time
    control is on and that module is there; else None, with the status and
    message /admin/ answers."""
    if not enabled:
        return None, (403, "run-time control is off (start with stats_admin / --stats-admin to allow it)")
    try:
        module = importlib.import_module("fastproxy.admin")
        handle = module.handle_admin
    except (ImportError, AttributeError):
        return None, (404, "run-time control is off: this build of fastproxy has no admin handler")

    def admin(request: Request) -> Response:
        # Read per request: a reload that changes the token revokes the old one.
        return handle(proxy, request, token=proxy.config.process.stats_token)  # type: ignore[no-any-return]
    return admin, (0, "")
