"""The admin handler of the stats endpoint: run-time control over HTTP.

The endpoint's server calls handle_admin for every path under /admin/ when
`stats_admin` is on; this module only turns a Request into a Response
(httpapi.py), so it is tested without a socket. Routes (JSON both ways):

    GET  /admin/upstreams                        every listener's upstreams
    POST /admin/upstreams/{listener}/{upstream}  {"state": "drain"|"maint"|"ready", "weight": N}
    POST /admin/routes/{listener}/{route}/{upstream}  the same, in a route's group (route = sni)
    GET  /admin/bridges[?limit=N]                the live bridges
    POST /admin/bridges/{id}/close               close one (FIN both ways)

Names are URL-escaped path segments: an upstream "10.0.0.1:5432" may be
written as is or as 10.0.0.1%3A5432; a "/" in a name (a Unix listener's
"unix:/run/fp.sock") must be %2F.

Who may: with `stats_token` set, every request must carry
`Authorization: Bearer TOKEN` (compared in constant time), from loopback
too (401 otherwise): a token that local processes could skip would not
protect against the local ones (another user, a request forgery through a
local service). Without a token, only loopback peers (127.0.0.0/8, ::1) and
the Unix socket may (403 otherwise). Either way a browser's request from a
page of another origin, or (without a token) one whose Host is not a
loopback address or localhost, is 403: docs/operations.md, "Run-time
control".
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

from .control import UnknownNameError, check_state, check_weight
from .httpapi import Request, Response
from .values import ConfigError, is_digits, plain_ip

if TYPE_CHECKING:
    from .proxy import Proxy

__all__ = ["handle_admin", "peer_is_local"]

log = logging.getLogger(__name__)

PREFIX = "/admin/"
MAX_LIMIT = 100000


class _Refusal(Exception):
    def __init__(self, status: int, message: str, headers: Tuple[Tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _json(status: int, value: Any, headers: Tuple[Tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(value, indent=1, sort_keys=False).encode() + b"\n"
    return Response(status, body, "application/json", (("Cache-Control", "no-store"),) + headers)


def _error(status: int, message: str, headers: Tuple[Tuple[str, str], ...] = ()) -> Response:
    return _json(status, {"error": message, "status": status}, headers)


def peer_is_local(peer: Any) -> bool:
    """True for the Unix socket ("unix") and loopback TCP peers
    (127.0.0.0/8, ::1, and IPv4-mapped 127/8)."""
    if peer == "unix":
        return True
    if not isinstance(peer, (tuple, list)) or not peer or not isinstance(peer[0], str):
        return False
    ip = plain_ip(peer[0])
    return ip is not None and ip.is_loopback


def _refuse_browsers(request: Request, token: Optional[str]) -> None:
    # "Loopback only" does not keep out a web page open in a browser on the
    # same host: a cross-site POST with a text/plain body is a CORS "simple
    # request" the browser sends without asking, and a page whose name
    # resolves to 127.0.0.1 (DNS rebinding) is even same-origin. Browsers
    # say where a request comes from; command-line clients say nothing.
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    if site and site not in ("same-origin", "none"):
        raise _Refusal(403, f"admin requests from a web page of another site are refused (Sec-Fetch-Site: {site})")
    origin = request.headers.get("origin")
    host = request.headers.get("host", "").strip().lower()
    if origin is not None:
        parsed = urlsplit(origin.strip().lower())
        if parsed.scheme not in ("http", "https") or parsed.netloc != host:
            raise _Refusal(403, f"admin requests from a web page of another origin are refused (Origin: {origin.strip()!r})")
    if not token and host and request.peer != "unix" and not _host_is_local(host):
        raise _Refusal(403, f"admin requests without stats_token must name a loopback address or localhost "
                            f"as Host, not {host!r} (a web page's name that resolves to loopback)")


def _host_is_local(host: str) -> bool:
    name = urlsplit("//" + host).hostname or ""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    ip = plain_ip(name)
    return ip is not None and ip.is_loopback


def _authorize(request: Request, token: Optional[str]) -> None:
    _refuse_browsers(request, token)
    if token:
        given = ""
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                given = value
        scheme, _, credential = given.strip().partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape"))
        if not ok:
            why = "a wrong bearer token" if given else "no bearer token (Authorization: Bearer TOKEN)"
            raise _Refusal(401, f"admin requests need the stats_token; this one has {why}",
                           (("WWW-Authenticate", 'Bearer realm="fastproxy admin"'),))
        return
    if not peer_is_local(request.peer):
        raise _Refusal(403, "admin requests come from loopback or the Unix socket unless stats_token is set; "
                            f"peer {_peer_text(request.peer)} is neither")


def _peer_text(peer: Any) -> str:
    if isinstance(peer, (tuple, list)) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _body_object(request: Request) -> Dict[str, Any]:
    if not request.body.strip():
        raise _Refusal(400, "expected a JSON object in the body")
    try:
        value = json.loads(request.body.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Refusal(400, "the body is not UTF-8") from None
    except ValueError as exc:
        raise _Refusal(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _Refusal(400, f"expected a JSON object in the body, not {type(value).__name__}")
    return value


# ---- routes

def _get_upstreams(proxy: "Proxy", request: Request, args: List[str]) -> Response:
    return _json(200, {"listeners": proxy.upstreams()})


def _post_upstream(proxy: "Proxy", request: Request, args: List[str]) -> Response:
    listener, upstream = args
    return _set_upstream(proxy, request, listener, upstream, None)


def _post_route_upstream(proxy: "Proxy", request: Request, args: List[str]) -> Response:
    listener, route, upstream = args
    return _set_upstream(proxy, request, listener, upstream, route)


def _set_upstream(proxy: "Proxy", request: Request, listener: str, upstream: str,
                  route: Optional[str]) -> Response:
    body = _body_object(request)
    unknown = sorted(set(body) - {"state", "weight"})
    if unknown:
        raise ConfigError(unknown[0], body[unknown[0]], "is not a field here (state, weight)")
    if not body:
        raise _Refusal(400, "expected state and/or weight in the body")
    state = check_state(body["state"]) if "state" in body else None
    weight = check_weight(body["weight"]) if "weight" in body else None
    control = proxy.upstream(upstream, listener=listener, route=route)
    if state is not None:
        {"drain": control.drain, "maint": control.maint, "ready": control.ready}[state]()
    if weight is not None:
        control.set_weight(weight)
    named = {"listener": listener} if route is None else {"listener": listener, "route": route}
    return _json(200, {**named, "upstream": upstream, **control.state})


def _get_bridges(proxy: "Proxy", request: Request, args: List[str]) -> Response:
    limit = 10000
    given = request.query.get("limit")
    if given:
        text = given[-1]
        if not is_digits(text) or len(text) > 20 or not 0 <= int(text) <= MAX_LIMIT:
            raise ConfigError("limit", text, f"expected an integer from 0 to {MAX_LIMIT}")
        limit = int(text)
    found = proxy.bridges(limit)
    for b in found:
        b["client"] = _peer_text(b["client"]) if isinstance(b["client"], tuple) else b["client"]
        if isinstance(b.get("route"), tuple):
            b["route"] = _peer_text(b["route"])
    return _json(200, {"bridges": found, "count": len(found)})


def _post_close(proxy: "Proxy", request: Request, args: List[str]) -> Response:
    text = args[0]
    if not is_digits(text) or len(text) > 20:
        raise _Refusal(404, f"no live bridge {text!r}: ids are integers (GET /admin/bridges)")
    bridge_id = int(text)
    if not proxy.close_bridge(bridge_id):
        raise _Refusal(404, f"no live bridge {bridge_id}")
    return _json(200, {"closed": bridge_id})


Handler = Callable[["Proxy", Request, List[str]], Response]

# (path pattern, {method: handler}); "*" matches one path segment.
_ROUTES: Tuple[Tuple[Tuple[str, ...], Dict[str, Handler]], ...] = (
    (("upstreams",), {"GET": _get_upstreams}),
    (("upstreams", "*", "*"), {"POST": _post_upstream}),
    (("routes", "*", "*", "*"), {"POST": _post_route_upstream}),
    (("bridges",), {"GET": _get_bridges}),
    (("bridges", "*", "close"), {"POST": _post_close}),
)


def _route(path: str) -> Tuple[Optional[Dict[str, Handler]], List[str]]:
    if not path.startswith(PREFIX):
        return None, []
    rest = path[len(PREFIX):]
    if rest.endswith("/"):
        rest = rest[:-1]
    # Split first, unescape after: a %2F is part of a name.
    segments = [unquote(s, errors="strict") for s in rest.split("/")] if rest else []
    for pattern, methods in _ROUTES:
        if len(pattern) == len(segments) and all(p in ("*", s) for p, s in zip(pattern, segments)):
            return methods, [s for p, s in zip(pattern, segments) if p == "*"]
    return None, []


def handle_admin(proxy: "Proxy", request: Request, *, token: Optional[str]) -> Response:
    """Answer one admin request (see the module's docstring). Never raises:
    every refusal or mistake is a status with a JSON body
    {"error": ..., "status": ...}: 400 bad body or value (naming the field
    and value), 401 token missing or wrong, 403 not allowed, 404 unknown
    route, listener, upstream or bridge, 405 wrong method, 409 ambiguous
    name, 503 proxy not running, 500 a bug (logged)."""
    try:
        _authorize(request, token)
        if not proxy.config.process.stats_admin:
            raise _Refusal(403, "run-time control is off (stats_admin)")
        try:
            methods, args = _route(request.path)
        except UnicodeDecodeError:
            raise _Refusal(400, f"path {request.path!r} is not UTF-8 once unescaped") from None
        if methods is None:
            raise _Refusal(404, f"no admin route {request.path!r} (GET /admin/upstreams, "
                                "POST /admin/upstreams/LISTENER/UPSTREAM, POST /admin/routes/LISTENER/ROUTE/UPSTREAM, "
                                "GET /admin/bridges, "
                                "POST /admin/bridges/ID/close)")
        handler = methods.get(request.method.upper())
        if handler is None:
            allow = ", ".join(sorted(methods))
            raise _Refusal(405, f"{request.method} is not allowed on {request.path} (allowed: {allow})",
                           (("Allow", allow),))
        return handler(proxy, request, args)
    except _Refusal as refusal:
        return _error(refusal.status, refusal.message, refusal.headers)
    except ConfigError as exc:
        if isinstance(exc, UnknownNameError):
            return _error(404, str(exc))
        if exc.field == "listener":
            return _error(409, str(exc))
        return _error(400, str(exc))
    except RuntimeError as exc:
        return _error(503, str(exc))
    except Exception:
        log.exception("admin request %s %s failed", request.method, request.path)
        return _error(500, "internal error (logged)")
