"""`fastproxy toxiproxy`: toxiproxy's HTTP API (version 2) served by
fastproxy, so that toxiproxy's clients (Go, Ruby, Python, Java, the
testcontainers modules) drive fastproxy unchanged: the same routes, JSON
shapes, status codes and error bodies ({"error": ..., "status": N}).

Each toxiproxy proxy is a fastproxy Proxy of its own (one listener, one
upstream, one worker): creating, changing or deleting one never touches
another's listener or bridges, and one that fails to bind fails alone
(one Proxy with a listener per toxiproxy proxy would change them by
reload, which is all or nothing across listeners). A disabled proxy is a
down listener (Proxy.set_down): its port stays bound, so enabling it again
gives the same address. docs/toxiproxy.md lists every difference.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Collection, Dict, List, NoReturn, Optional, Tuple
from urllib.parse import unquote, urlsplit

from ._version import __version__
from .control import UnknownNameError
from .flags import Once, OnceParser
from .proxy import Proxy
from .sockets import bound_as
from .toxics import ATTRIBUTES, KINDS, STREAMS, Toxic, ToxicError
from .values import ConfigError, format_address, parse_address, unix_path

__all__ = ["ToxiproxyServer", "ApiError", "main"]

log = logging.getLogger("fastproxy.toxiproxy")

# The toxiproxy release whose API this serves; the build metadata says who.
VERSION = f"2.12.0+fastproxy.{__version__}"
MAX_BODY = 1 << 20
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 100
READ_TIMEOUT_S = 15.0


class ApiError(Exception):
    """An error answered as toxiproxy does: {"error": message, "status": N}."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def bad_body(detail: str) -> ApiError:
    return ApiError(f"bad request body: {detail}", 400)


def missing(field: str) -> ApiError:
    return ApiError(f"missing required field: {field}", 400)


PROXY_NOT_FOUND = ("proxy not found", 404)
PROXY_EXISTS = ("proxy already exists", 409)
INVALID_STREAM = ("stream was invalid, can be either upstream or downstream", 400)
INVALID_TYPE = ("invalid toxic type", 400)
TOXIC_EXISTS = ("toxic already exists", 409)
TOXIC_NOT_FOUND = ("toxic not found", 404)


def _error(pair: Tuple[str, int]) -> ApiError:
    return ApiError(*pair)


def _number(value: float) -> Any:
    # Go writes a float32 that is whole without a point (1, not 1.0).
    return int(value) if float(value).is_integer() else value


def toxic_json(t: Toxic) -> Dict[str, Any]:
    """A toxic as toxiproxy writes it (Go's field order: attributes first)."""
    return {"attributes": dict(t.attributes), "name": t.name, "type": t.kind, "stream": t.stream,
            "toxicity": _number(t.toxicity)}


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_body(str(exc)) from None


def _expect(obj: Any, kind: type, what: str) -> Any:
    if not isinstance(obj, kind):
        raise bad_body(f"expected {what}")
    return obj


def _string_field(obj: Dict[str, Any], key: str, default: str) -> str:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad_body(f"{key}: expected a string, got {json.dumps(value)}")
    return value


def _bool_field(obj: Dict[str, Any], key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_body(f"{key}: expected true or false, got {json.dumps(value)}")
    return value


class _Entry:
    """One toxiproxy proxy: its fields as toxiproxy shows them, and the
    fastproxy Proxy behind it (started once enabled)."""

    def __init__(self, name: str, listen: str, upstream: str, engine: str) -> None:
        self.name = name
        self.listen = listen
        self.upstream = upstream
        self.enabled = False
        self.engine = engine
        self.proxy = self._build(listen, upstream)

    def _build(self, listen: str, upstream: str) -> Proxy:
        try:
            parse_address(listen, "listen", listen=True)
            return Proxy(listen=listen, upstreams=[upstream], engine=self.engine, workers=1)
        except ConfigError as exc:
            raise ApiError(str(exc), 400) from None

    @property
    def started(self) -> bool:
        return self.proxy._plane is not None

    def enable(self) -> None:
        if self.enabled:
            return
        if self.started:
            self.proxy.set_down(False)
        else:
            try:
                self.proxy.start()
            except ConfigError as exc:
                # toxiproxy answers a failed listen with its error, as a 500.
                raise ApiError(str(exc), 500) from None
            address = self.proxy.address
            assert isinstance(address, tuple)
            self.listen = format_address(*address)
        self.enabled = True

    def disable(self) -> None:
        if self.enabled:
            self.proxy.set_down(True, cut=True)
            self.enabled = False

    def listens_at(self, listen: str) -> bool:
        """Whether `listen`, however spelled ("localhost:PORT"), is where
        this proxy listens: as toxiproxy's Differs, which resolves it, so
        that an update or populate naming the same address by a host name
        keeps the proxy, its connections and toxics."""
        if listen == self.listen:
            return True
        try:
            wanted = parse_address(listen, "listen", listen=True)
            bound = parse_address(self.listen, "listen", listen=True)
        except ConfigError:
            return False
        if bound_as(wanted, bound):
            return True
        host, port = wanted
        if host and unix_path(host) is None:
            try:
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                # As Differs: a name that does not resolve is a 500 before
                # the proxy is stopped, not after.
                raise ApiError(f"listen: {listen!r}: does not resolve ({exc})", 500) from None
        return False

    def replace(self, listen: str, upstream: str) -> None:
        # As toxiproxy's Update: stop, take the new addresses, start again
        # if it was enabled; the toxics stay.
        fresh = self._build(listen, upstream)
        fresh.set_toxics(self.proxy.toxics())
        was = self.enabled
        self.close()
        self.proxy, self.listen, self.upstream = fresh, listen, upstream
        if was:
            self.enable()

    def close(self) -> None:
        self.proxy.stop(0)
        self.enabled = False

    def toxics(self) -> List[Toxic]:
        # toxiproxy lists the upstream chain, then the downstream one.
        found = self.proxy.toxics()
        return [t for t in found if t.stream == "upstream"] + [t for t in found if t.stream == "downstream"]

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "listen": self.listen, "upstream": self.upstream, "enabled": self.enabled,
                "toxics": [toxic_json(t) for t in self.toxics()]}


def parse_toxic(obj: Any, taken: Collection[str] = ()) -> Toxic:
    """A new toxic from toxiproxy's JSON, checked in toxiproxy's order
    (the body's shape, stream, type, a name in `taken`, then the values
    of the attributes); unknown keys are ignored, as Go's decoder does."""
    obj = _expect(obj, dict, "a JSON object")
    given = _string_field(obj, "stream", "downstream")
    name = _string_field(obj, "name", "")
    attributes = _expect(obj.get("attributes") or {}, dict, "attributes: a JSON object")
    # toxiproxy lowercases the stream to parse it (stream.ParseDirection),
    # but names the toxic after it as given: "latency_Upstream".
    stream = given.lower()
    if stream not in STREAMS:
        raise _error(INVALID_STREAM)
    kind = _string_field(obj, "type", "")
    if kind not in KINDS:
        raise _error(INVALID_TYPE)
    name = name or f"{kind}_{given}"
    if name in taken:
        raise _error(TOXIC_EXISTS)
    known = {k: v for k, v in attributes.items() if k in ATTRIBUTES[kind]}
    try:
        return Toxic(kind, stream, obj.get("toxicity", 1.0), name, known)
    except ToxicError as exc:
        raise bad_body(str(exc)) from None


class ToxiproxyServer:
    """The HTTP API on (host, port) (port 0: any free one; `address` says
    which). start() serves on a thread; stop() stops the server and every
    proxy. Proxies run on `engine`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8474, *, engine: str = "auto") -> None:
        self.engine = engine
        self.proxies: Dict[str, _Entry] = {}
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer((host, port), _handler_for(self))
        self.http.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self.http.server_address[:2]
        return str(host), int(port)

    def start(self) -> "ToxiproxyServer":
        self._thread = threading.Thread(target=self.http.serve_forever, name="toxiproxy-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.http.shutdown()
            self._thread.join()
            self._thread = None
        self.http.server_close()
        with self.lock:
            for entry in self.proxies.values():
                entry.close()
            self.proxies.clear()

    def __enter__(self) -> "ToxiproxyServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- the routes (each under the lock: one change at a time, as toxiproxy)

    def route(self, method: str, path: str, body: bytes) -> Tuple[int, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        routes: Dict[Tuple[str, ...], Dict[str, Any]] = {
            ("reset",): {"POST": self.reset},
            ("proxies",): {"GET": self.proxy_index, "POST": self.proxy_create},
            ("populate",): {"POST": self.populate},
            ("version",): {"GET": self.version},
        }
        key = tuple(parts)
        handlers: Optional[Dict[str, Any]] = routes.get(key)
        args: List[str] = []
        if handlers is None and len(parts) == 2 and parts[0] == "proxies":
            handlers = {"GET": self.proxy_show, "POST": self.proxy_update, "PATCH": self.proxy_update,
                        "DELETE": self.proxy_delete}
            args = parts[1:]
        elif handlers is None and len(parts) == 3 and parts[0] == "proxies" and parts[2] == "toxics":
            handlers = {"GET": self.toxic_index, "POST": self.toxic_create}
            args = parts[1:2]
        elif handlers is None and len(parts) == 4 and parts[0] == "proxies" and parts[2] == "toxics":
            handlers = {"GET": self.toxic_show, "POST": self.toxic_update, "PATCH": self.toxic_update,
                        "DELETE": self.toxic_delete}
            args = [parts[1], parts[3]]
        if handlers is None or any(not a for a in args):
            return 404, None
        handler = handlers.get(method)
        if handler is None:
            return 405, None
        with self.lock:
            result: Tuple[int, Any] = handler(body, *args)
            return result

    def _get(self, name: str) -> _Entry:
        entry = self.proxies.get(name)
        if entry is None:
            raise _error(PROXY_NOT_FOUND)
        return entry

    def version(self, body: bytes) -> Tuple[int, Any]:
        return 200, ("version", VERSION)

    def proxy_index(self, body: bytes) -> Tuple[int, Any]:
        return 200, {name: self.proxies[name].to_json() for name in sorted(self.proxies)}

    def _new_entry(self, obj: Dict[str, Any], where: str = "", *, unique: bool = False) -> Tuple[_Entry, bool]:
        name = _string_field(obj, "name", "")
        if not name:
            raise missing("name" + where)
        upstream = _string_field(obj, "upstream", "")
        if not upstream:
            raise missing("upstream" + where)
        listen = _string_field(obj, "listen", "") or "127.0.0.1:0"
        enabled = _bool_field(obj, "enabled", True)
        # toxiproxy checks the name before it looks at the addresses.
        if unique and name in self.proxies:
            raise _error(PROXY_EXISTS)
        return _Entry(name, listen, upstream, self.engine), enabled

    def proxy_create(self, body: bytes) -> Tuple[int, Any]:
        obj = _expect(_decode(body), dict, "a JSON object")
        entry, enabled = self._new_entry(obj, unique=True)
        if enabled:
            entry.enable()
        self.proxies[entry.name] = entry
        log.info("proxy %s created: %s -> %s", entry.name, entry.listen, entry.upstream)
        return 201, entry.to_json()

    def populate(self, body: bytes) -> Tuple[int, Any]:
        # Every error, the body's own too, is toxiproxy's populate answer:
        # application/json with "proxies" (null, or those done before a
        # failure), not http.Error's text/plain.
        planned: List[Tuple[_Entry, bool]] = []
        seen = set()
        try:
            items = _expect(_decode(body), list, "a JSON array of proxies")
            for i, obj in enumerate(items):
                obj = _expect(obj, dict, f"proxy {i + 1}: a JSON object")
                entry, enabled = self._new_entry(obj, f" at proxy {i + 1}")
                if entry.name in seen:
                    raise ApiError(f"duplicate proxy name {json.dumps(entry.name)}", 500)
                seen.add(entry.name)
                planned.append((entry, enabled))
        except ApiError as exc:
            return exc.status, {"error": exc.message, "status": exc.status, "proxies": None}
        done: List[_Entry] = []
        try:
            for entry, enabled in planned:
                existing = self.proxies.get(entry.name)
                if existing is not None and existing.listens_at(entry.listen) \
                        and existing.upstream == entry.upstream:
                    done.append(existing)
                    continue
                if existing is not None:
                    existing.close()
                    del self.proxies[entry.name]
                if enabled:
                    entry.enable()
                self.proxies[entry.name] = entry
                done.append(entry)
        except ApiError as exc:
            return exc.status, {"error": exc.message, "status": exc.status,
                                "proxies": [e.to_json() for e in done] or None}
        # Go writes an empty list of proxies as null, so `[]` gets null too.
        return 201, {"proxies": [e.to_json() for e in done] or None}

    def proxy_show(self, body: bytes, name: str) -> Tuple[int, Any]:
        return 200, self._get(name).to_json()

    def proxy_update(self, body: bytes, name: str) -> Tuple[int, Any]:
        entry = self._get(name)
        obj = _expect(_decode(body), dict, "a JSON object")
        listen = _string_field(obj, "listen", entry.listen)
        upstream = _string_field(obj, "upstream", entry.upstream)
        enabled = _bool_field(obj, "enabled", entry.enabled)
        if not entry.listens_at(listen) or upstream != entry.upstream:
            entry.replace(listen, upstream)
        if enabled:
            entry.enable()
        else:
            entry.disable()
        return 200, entry.to_json()

    def proxy_delete(self, body: bytes, name: str) -> Tuple[int, Any]:
        entry = self._get(name)
        entry.close()
        del self.proxies[name]
        return 204, None

    def reset(self, body: bytes) -> Tuple[int, Any]:
        # Toxics first: a client accepted by a proxy enabled here sees none.
        for entry in self.proxies.values():
            if entry.proxy.toxics():
                entry.proxy.set_toxics([])
            entry.enable()
        return 204, None

    def toxic_index(self, body: bytes, name: str) -> Tuple[int, Any]:
        return 200, [toxic_json(t) for t in self._get(name).toxics()]

    def toxic_create(self, body: bytes, name: str) -> Tuple[int, Any]:
        entry = self._get(name)
        made = parse_toxic(_decode(body), {t.name for t in entry.proxy.toxics()})
        entry.proxy.add_toxic(made)
        return 200, toxic_json(made)

    def _toxic(self, entry: _Entry, toxic_name: str) -> Toxic:
        for t in entry.proxy.toxics():
            if t.name == toxic_name:
                return t
        raise _error(TOXIC_NOT_FOUND)

    def toxic_show(self, body: bytes, name: str, toxic_name: str) -> Tuple[int, Any]:
        return 200, toxic_json(self._toxic(self._get(name), toxic_name))

    def toxic_update(self, body: bytes, name: str, toxic_name: str) -> Tuple[int, Any]:
        entry = self._get(name)
        current = self._toxic(entry, toxic_name)
        obj = _expect(_decode(body), dict, "a JSON object")
        attributes = _expect(obj.get("attributes") or {}, dict, "attributes: a JSON object")
        known = {k: v for k, v in attributes.items() if k in ATTRIBUTES[current.kind]}
        try:
            changed = entry.proxy.update_toxic(toxic_name, toxicity=obj.get("toxicity"), **known)
        except UnknownNameError:
            raise _error(TOXIC_NOT_FOUND) from None
        except ToxicError as exc:
            raise bad_body(str(exc)) from None
        return 200, toxic_json(changed)

    def toxic_delete(self, body: bytes, name: str, toxic_name: str) -> Tuple[int, Any]:
        entry = self._get(name)
        try:
            entry.proxy.remove_toxic(toxic_name)
        except UnknownNameError:
            raise _error(TOXIC_NOT_FOUND) from None
        return 204, None


def _handler_for(server: ToxiproxyServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = READ_TIMEOUT_S

        def version_string(self) -> str:
            return f"fastproxy/{__version__}"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
                if content_type.startswith("text/plain"):
                    self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            if self.headers.get("User-Agent", "").startswith("Mozilla/"):
                # As toxiproxy: no browsers, so a web page cannot drive it.
                self._send(403, b"User agent not allowed\n", "text/plain; charset=utf-8")
                return
            body = self._read_body()
            if body is None:
                return
            try:
                status, result = server.route(self.command, urlsplit(self.path).path, body)
            except ApiError as exc:
                self._send_error(exc)
                return
            except Exception as exc:  # a bug must not kill the server: answer 500
                log.exception("toxiproxy API: %s %s failed", self.command, self.path)
                self._send_error(ApiError(f"internal error: {exc}", 500))
                return
            if status == 404 and result is None:
                self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")
            elif status == 405:
                self._send(405, b"", "")
            elif status == 204:
                self._send(204, b"", "")
            elif isinstance(result, tuple) and result[0] == "version":
                self._send(200, ('{"version": "%s"}\n' % result[1]).encode(), "application/json;charset=utf-8")
            else:
                self._send(status, json.dumps(result, separators=(",", ":")).encode(), "application/json")

        def _read_body(self) -> Optional[bytes]:
            """The request's body; None once an error about it is answered,
            and the connection is then closed, since where the next request
            starts is not known."""
            codings = self.headers.get_all("Transfer-Encoding") or []
            if codings:
                # As Go's net/http: one coding, chunked, which overrides any
                # Content-Length; anything else is 501 and the end.
                if len(codings) != 1 or codings[0].strip().lower() != "chunked":
                    self.close_connection = True
                    self._send(501, b"Unsupported transfer encoding", "text/plain; charset=utf-8")
                    return None
                try:
                    return self._read_chunked()
                except ApiError as exc:
                    self.close_connection = True
                    self._send_error(exc)
                    return None
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True
                self._send_error(ApiError("bad request body: Content-Length missing, invalid or over 1 MiB", 400))
                return None
            return self.rfile.read(length) if length else b""

        def _read_chunked(self) -> bytes:
            # HTTP/1.1's chunked coding: HEX[;ext] CRLF, that many bytes, CRLF,
            # ..., a 0 chunk, trailer lines (ignored), an empty line. The
            # body has MAX_BODY's cap, and the lines Go's 4 KiB one.
            malformed = bad_body("malformed chunked encoding")
            body = bytearray()
            while True:
                line = self.rfile.readline(MAX_CHUNK_LINE + 1)
                size_text = line.split(b";", 1)[0].strip()
                if not line.endswith(b"\n") or not size_text or len(size_text) > 16 \
                        or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise malformed
                size = int(size_text, 16)
                if size == 0:
                    break
                if len(body) + size > MAX_BODY:
                    raise bad_body("chunked body over 1 MiB")
                chunk = self.rfile.read(size)
                if len(chunk) < size or self.rfile.read(2) != b"\r\n":
                    raise malformed
                body += chunk
            for _ in range(MAX_TRAILERS + 1):
                line = self.rfile.readline(MAX_CHUNK_LINE + 1)
                if line in (b"\r\n", b"\n"):
                    return bytes(body)
                if not line.endswith(b"\n"):
                    break
            raise malformed

        def _send_error(self, exc: ApiError) -> None:
            # Go's http.Error: the JSON as text/plain, with a newline.
            body = json.dumps({"error": exc.message, "status": exc.status}, separators=(",", ":")) + "\n"
            self._send(exc.status, body.encode(), "text/plain; charset=utf-8")

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

    return Handler


class _Parser(OnceParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        self.exit(2, f"fastproxy toxiproxy: error: {message} (see fastproxy toxiproxy -h)\n")


def main(argv: Optional[List[str]] = None) -> int:
    """fastproxy toxiproxy [--host H] [--port P] [--engine E] [--config FILE]"""
    parser = _Parser(
        prog="fastproxy toxiproxy",
        description="Serve toxiproxy's HTTP API (version 2) with fastproxy proxies behind it; "
                    "toxiproxy's clients work unchanged (docs/toxiproxy.md). The first line out is "
                    "'listening on HOST:PORT'.")
    parser.add_argument("--host", default="127.0.0.1", action=Once, help="address of the API (default: 127.0.0.1)")
    parser.add_argument("--port", default=8474, type=int, action=Once, help="port of the API; 0: any free one (default: 8474)")
    parser.add_argument("--engine", default="auto", choices=("auto", "epoll", "poll"), action=Once,
                        help="the proxies' engine (default: auto)")
    parser.add_argument("--config", metavar="FILE", default=None, action=Once,
                        help="a JSON array of proxies to create at start, as POST /populate")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), action=Once)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s fastproxy %(levelname)s %(message)s")
    if not 0 <= args.port <= 65535:
        print(f"fastproxy toxiproxy: error: --port: {args.port}: expected 0 to 65535", file=sys.stderr)
        return 2
    try:
        server = ToxiproxyServer(args.host, args.port, engine=args.engine)
    except OSError as exc:
        print(f"fastproxy toxiproxy: error: --port: {args.port}: cannot listen on {args.host}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.config is not None:
        try:
            with open(args.config, "rb") as f:
                data = f.read(MAX_BODY + 1)
        except OSError as exc:
            print(f"fastproxy toxiproxy: error: --config: {args.config}: {exc.strerror or exc}", file=sys.stderr)
            server.stop()
            return 2
        status, result = server.route("POST", "/populate", data)
        if status != 201:
            print(f"fastproxy toxiproxy: error: --config: {args.config}: {result['error']}", file=sys.stderr)
            server.stop()
            return 2
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    print(f"listening on {format_address(*server.address)}", flush=True)
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
    return 0
