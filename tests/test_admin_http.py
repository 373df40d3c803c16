"""Run-time control over the stats endpoint, end to end: real HTTP from
loopback, and from a peer that is not loopback (a network namespace the
test makes, joined by a veth pair), with and without the token."""
import json
import sys
import urllib.parse
import urllib.request
import uuid

import pytest

from fastproxy import Proxy
from support.netns import HOST_SIDE, ip
from support.servers import Servers, open_tagged, which
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
