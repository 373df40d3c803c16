"""Run-time control over the stats endpoint, end to end: real HTTP from
loopback, and from a peer that is not loopback (a network namespace the
test makes, joined by a veth pair), with and without the token."""
import http.client
import json
import socket
import sys
import urllib.parse
import urllib.request
import uuid

import pytest

from fastproxy import Proxy
from support.netns import HOST_SIDE, ip
from support.servers import Servers, open_tagged, which
from support.sockets import recv_exact
from support.waits import stop_bounded, wait_for

pytestmark = pytest.mark.linux_only

REQUEST = """
import json, sys, urllib.request, urllib.error
url, body, token = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, data=body.encode() if body else None, method="POST" if body else "GET")
if token:
    req.add_header("Authorization", "Bearer " + token)
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"""


def from_namespace(ns, url, body="", token=""):
    out = ip("netns", "exec", ns, sys.executable, "-c", REQUEST, url, body, token).stdout
    status, _, text = out.partition(" ")
    return int(status), json.loads(text)


def request(url, body=None, token=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def base_url(p):
    host, port = p.stats_address
    return f"http://{host}:{port}"


def upstream_url(p, listener, upstream):
    q = urllib.parse.quote
    return f"{base_url(p)}/admin/upstreams/{q(listener, safe='')}/{q(upstream, safe='')}"


def test_drain_over_http_from_loopback_moves_new_clients_and_keeps_live_ones(engine):
    with Servers(names=["A", "B"]) as srv:
        p = Proxy(listen="127.0.0.1:0", upstreams=[srv["A"].addr, srv["B"].addr], engine=engine,
                  stats="127.0.0.1:0", stats_admin=True).start()
        try:
            live = [open_tagged(p.address) for _ in range(4)]
            on_a = [c for c, name in live if name == "A"]
            assert on_a, "round robin sent no client to A"
            status, body = request(upstream_url(p, p._listeners[0].name, srv["A"].addr), {"state": "drain"})
            assert status == 200, body
            assert [which(p.address) for _ in range(6)] == ["B"] * 6
            for c in on_a:   # A's live bridges go on
                c.sendall(b"still there\n")
                assert c.recv(64) == b"still there\n"
            status, listed = request(base_url(p) + "/admin/upstreams")
            assert status == 200 and json.dumps(listed).count('"drain"') == 1
            assert request(upstream_url(p, p._listeners[0].name, srv["A"].addr), {"state": "ready"})[0] == 200
            assert "A" in {which(p.address) for _ in range(6)}
            for c, _ in live:
                c.close()
        finally:
            stop_bounded(p)


def test_admin_from_a_peer_that_is_not_loopback_needs_the_token(netns, echo_server):
    token = "t-" + uuid.uuid4().hex
    for configured in (None, token):
        p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, stats=f"{HOST_SIDE}:0", stats_admin=True,
                  stats_token=configured).start()
        try:
            url = upstream_url(p, p._listeners[0].name, echo_server.addr)
            body = json.dumps({"state": "drain"})
            status, answer = from_namespace(netns, url, body)
            assert status in (401, 403), answer
            assert p.stats()["upstreams"][echo_server.addr]["admin"] == "ready"
            status, answer = from_namespace(netns, url, body, token="wrong")
            assert status in (401, 403), answer
            if configured:
                status, answer = from_namespace(netns, url, body, token=token)
                assert status == 200, answer
                assert wait_for(lambda: p.stats()["upstreams"][echo_server.addr]["admin"] == "drain", 5)
            # Reading stats needs no token, from anywhere the endpoint is bound.
            status, stats = from_namespace(netns, base_url(p) + "/stats")
            assert status == 200 and stats["accepted"] == p.stats()["accepted"]
        finally:
            stop_bounded(p)


def raw_request(p, method, path, headers, body=b""):
    # http.client, so the test sets Host, Origin and Sec-Fetch-* as a browser would.
    host, port = p.stats_address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"


def test_a_web_page_cannot_drive_admin_from_a_browser_on_the_host(echo_server):
    # What fetch(url, {method: "POST", mode: "no-cors", body: '{"state":"maint"}'})
    # sends from a page of another site: a CORS simple request, which the
    # browser sends without asking, from loopback.
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, stats="127.0.0.1:0", stats_admin=True).start()
    try:
        host, port = p.stats_address
        here = f"{host}:{port}"
        path = urllib.parse.urlsplit(upstream_url(p, p._listeners[0].name, echo_server.addr)).path
        body = b'{"state":"maint"}'
        forged = [
            # a page of another site (Chrome, Firefox, Safari send both)
            {"Host": here, "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            # an older browser: Origin alone
            {"Host": here, "Origin": "https://evil.example"},
            # another port on localhost is another site too
            {"Host": here, "Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},
            # a sandboxed frame
            {"Host": here, "Origin": "null"},
            # DNS rebinding: evil.example now resolves to 127.0.0.1, so the
            # page is same-origin; only Host tells
            {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
             "Sec-Fetch-Site": "same-origin"},
        ]
        for headers in forged:
            headers = dict(headers, **{"User-Agent": BROWSER, "Content-Type": "text/plain;charset=UTF-8"})
            status, answer = raw_request(p, "POST", path, headers, body)
            assert status == 403, (headers, answer)
            assert "refused" in answer["error"] or "Host" in answer["error"], answer
            assert p.stats()["upstreams"][echo_server.addr]["admin"] == "ready"
        with socket.create_connection(p.address, timeout=5) as c:   # still serving
            c.sendall(b"ping")
            assert recv_exact(c, 4) == b"ping"
        # Reading (GET) from a rebinding page would leak the bridges' clients.
        status, _ = raw_request(p, "GET", "/admin/bridges", {"Host": f"evil.example:{port}"})
        assert status == 403
        # The endpoint's own page (same origin), the address bar, curl and
        # localhost by name still may.
        allowed = [
            {"Host": here, "Origin": f"http://{here}", "Sec-Fetch-Site": "same-origin", "User-Agent": BROWSER},
            {"Host": here, "Sec-Fetch-Site": "none", "User-Agent": BROWSER},
            {"Host": here, "User-Agent": "curl/8.5.0"},
            {"Host": f"localhost:{port}"},
            {},   # HTTP/1.0 style: no Host at all
        ]
        for state, headers in zip(("drain", "ready", "maint", "ready", "drain"), allowed):
            status, answer = raw_request(p, "POST", path, dict(headers, **{"Content-Type": "application/json"}),
                                         json.dumps({"state": state}).encode())
            assert status == 200, (headers, answer)
            assert p.stats()["upstreams"][echo_server.addr]["admin"] == state
    finally:
        stop_bounded(p)


def test_with_a_token_the_host_may_be_any_name_but_browsers_stay_out(echo_server):
    # The token is the rule once set: a rebinding page cannot know it, so
    # any Host is fine; a cross-site page is still refused before the token
    # is even looked at.
    token = "t-" + uuid.uuid4().hex
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, stats="127.0.0.1:0", stats_admin=True,
              stats_token=token).start()
    try:
        port = p.stats_address[1]
        path = urllib.parse.urlsplit(upstream_url(p, p._listeners[0].name, echo_server.addr)).path
        auth = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
        status, answer = raw_request(p, "POST", path, dict(auth, Host=f"proxy.internal:{port}"),
                                     b'{"state": "drain"}')
        assert status == 200, answer
        status, answer = raw_request(p, "POST", path, dict(auth, Host=f"proxy.internal:{port}",
                                                           Origin="https://evil.example"), b'{"state": "ready"}')
        assert status == 403, answer
        assert p.stats()["upstreams"][echo_server.addr]["admin"] == "drain"
    finally:
        stop_bounded(p)


def test_a_reload_rotates_the_token_and_refuses_to_move_the_endpoint(echo_server):
    from fastproxy import ConfigError

    def config(token, stats="127.0.0.1:0", admin=True):
        return {"workers": 1, "stats": stats, "stats_admin": admin, "stats_token": token,
                "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstreams": [echo_server.addr]}]}

    p = Proxy.from_config(config("old")).start()
    try:
        url = base_url(p) + "/admin/upstreams"
        assert request(url, token="old")[0] == 200
        cfg = config("new")
        cfg["listeners"][0]["listen"] = f"127.0.0.1:{p.address[1]}"
        p.reload(cfg)
        assert request(url, token="old")[0] == 401   # revoked
        assert request(url, token="new")[0] == 200
        # Moving the endpoint, or turning admin on, is a restart: refused
        # whole, and the running one answers on.
        with pytest.raises(ConfigError, match="^stats: .*cannot change on reload"):
            p.reload(dict(cfg, stats="127.0.0.1:1"))
        assert request(url, token="new")[0] == 200
        p.reload(dict(cfg, stats_admin=False))   # off applies at once
        assert request(url, token="new")[0] == 403
        p.reload(cfg)   # and on again: it was on at start
        assert request(url, token="new")[0] == 200
    finally:
        stop_bounded(p)
    q = Proxy.from_config(config(None, admin=False)).start()
    try:
        cfg = config(None)
        cfg["listeners"][0]["listen"] = f"127.0.0.1:{q.address[1]}"
        cfg["stats"] = "%s:%d" % q.stats_address
        with pytest.raises(ConfigError, match="^stats_admin: .*restart"):
            q.reload(cfg)
    finally:
        stop_bounded(q)


@pytest.mark.parametrize("token", ["a\0b", "two words", "clé", "tab\there"])
def test_a_token_no_client_could_send_is_refused(echo_server, token):
    # Compared with an Authorization header's text: one with a NUL, a space
    # or non-ASCII could never match, so admin would be locked for good.
    from fastproxy import ConfigError

    with pytest.raises(ConfigError, match="^stats_token: .*visible ASCII without spaces"):
        Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, stats="127.0.0.1:0", stats_admin=True,
              stats_token=token)
