"""Run-time control: an upstream's admin state (drain, maint, ready) and
weight, the live bridges (list, close one), their Python API and the admin
HTTP handler (fastproxy.admin.handle_admin, given Request objects; its
effects checked on a real proxy). Real sockets on loopback, both engines."""
import json
import socket
import threading
import time
from collections import Counter

import pytest

from fastproxy import CloseReason, Config, ConfigError, Proxy, UnknownNameError, Upstream
from fastproxy._core import UpstreamGroup
from fastproxy.admin import handle_admin, peer_is_local
from fastproxy.httpapi import Request
from support.balance import ping_pong
from support.servers import Servers, open_tagged, which
from support.traffic import StreamLoad, VerifyingServer
from support.sockets import free_port, read_line, recv_exact, recv_until_eof
from support.waits import stop_bounded, wait_for, wait_idle

T0 = 10**12


def echo(sock, payload):
    sock.sendall(payload)
    return recv_exact(sock, len(payload))


def leave(sock):
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_eof(sock) == b""
    sock.close()


def spread(addr, n):
    return Counter(which(addr) for _ in range(n))


def proxy_over(srv, engine, names=None, **kw):
    ups = [srv[n].addr for n in (names or [s.name for s in srv])]
    return Proxy(listen="127.0.0.1:0", upstreams=ups, engine=engine, workers=2, **kw).start()


# ---- the group, without an engine: every algorithm reads admin and weight

@pytest.mark.parametrize("balance", ["roundrobin", "leastconn", "random", "source", "first"])
def test_drain_and_maint_take_an_upstream_out_of_every_algorithm(balance):
    g = UpstreamGroup([Upstream("a:1"), Upstream("b:1"), Upstream("c:1")], balance=balance, seed=1)

    def picks(n=300):
        got = Counter()
        for k in range(n):
            i = g.acquire(f"10.0.{k // 250}.{k % 250}", now_ns=T0)
            got[i] += 1
            g.release(i)
        return got

    assert set(picks()) == ({0} if balance == "first" else {0, 1, 2})
    assert not g.set_admin(0, "drain")
    assert 0 not in picks() and g.admin(0) == "drain"
    assert g.state(0)["state"] == "drained" and g.state(0)["admin"] == "drain"
    assert not g.set_admin(0, "maint")
    assert 0 not in picks() and g.state(0)["state"] == "maint"
    assert g.set_admin(0, "ready")      # back: the caller kicks the wait queue
    assert 0 in picks() and g.state(0)["state"] == "up"
    g.set_admin(0, "maint"), g.set_admin(1, "drain"), g.set_admin(2, "drain")
    assert g.acquire(now_ns=T0) == -1   # none up
    with pytest.raises(ValueError):
        g.set_admin(0, "gone")


@pytest.mark.parametrize("balance", ["roundrobin", "leastconn", "random", "source", "first"])
def test_run_time_weight_zero_drains_and_back(balance):
    g = UpstreamGroup([Upstream("a:1"), Upstream("b:1", weight=0)], balance=balance, seed=2)
    assert g.state(1)["state"] == "drained" and g.weight(1) == 0
    assert all(g.acquire(f"10.1.0.{k}", now_ns=T0) == 0 for k in range(50))
    assert g.set_weight(1, 4)           # rose: the caller kicks the wait queue
    assert g.state(1)["weight"] == 4 and g.state(1)["state"] == "up"
    assert not g.set_weight(0, 0)
    assert all(g.acquire(f"10.1.0.{k}", now_ns=T0) == 1 for k in range(50))
    assert g.state(0)["state"] == "drained"
    with pytest.raises(ValueError):
        g.set_weight(0, 257)


@pytest.mark.parametrize("balance,tolerance", [("roundrobin", 0), ("random", 40)])
def test_run_time_weight_shifts_a_group_spread(balance, tolerance):
    g = UpstreamGroup([Upstream("a:1"), Upstream("b:1")], balance=balance, seed=3)
    g.set_weight(1, 3)
    got = Counter()
    for _ in range(400):
        i = g.acquire(now_ns=T0)
        got[i] += 1
        g.release(i)
    assert abs(got[0] - 100) <= tolerance and got[0] + got[1] == 400


def test_leastconn_weighs_by_the_run_time_weight():
    g = UpstreamGroup([Upstream("a:1"), Upstream("b:1")], balance="leastconn")
    g.set_weight(0, 3)
    held = Counter(g.acquire(now_ns=T0) for _ in range(40))   # held: never released
    assert held[0] == 30 and held[1] == 10


def test_source_keeps_its_ring_and_moves_only_the_drained_upstreams_clients():
    g = UpstreamGroup([Upstream("a:1"), Upstream("b:1"), Upstream("c:1", weight=0)], balance="source")
    clients = [f"10.2.{k // 200}.{k % 200}" for k in range(400)]

    def owners():
        out = []
        for ip in clients:
            i = g.acquire(ip, now_ns=T0)
            g.release(i)
            out.append(i)
        return out

    before = owners()
    assert set(before) == {0, 1}
    g.set_admin(0, "drain")
    during = owners()
    assert all(d == b for b, d in zip(before, during) if b == 1) and set(during) == {1}
    g.set_admin(0, "ready")
    assert owners() == before
    g.set_weight(2, 1)    # configured 0: its ring points were there, skipped
    assert 2 in set(owners())


def test_carry_admin_by_name_unless_the_configured_weight_changed():
    old = UpstreamGroup([Upstream("a:1"), Upstream("b:1", weight=2), Upstream("c:1")])
    old.set_admin(0, "maint")
    old.set_weight(1, 9)
    old.set_weight(2, 5)
    new = UpstreamGroup([Upstream("c:1", weight=3), Upstream("b:1", weight=2), Upstream("a:1"),
                         Upstream("d:1")])
    new.carry_admin(old)
    assert [new.admin(i) for i in range(4)] == ["ready", "ready", "maint", "ready"]
    # b's configured weight stayed 2: its run-time 9 carries; c's changed: 3 wins.
    assert [new.weight(i) for i in range(4)] == [3, 9, 1, 1]


# ---- a running proxy

def test_drain_under_load_keeps_live_bridges_and_sends_new_clients_elsewhere(engine):
    with Servers(3) as srv:
        p = proxy_over(srv, engine)
        try:
            held = [open_tagged(p.address) for _ in range(9)]
            on_a = [s for s, name in held if name == "A"]
            assert len(on_a) >= 2
            a = p.upstream(srv["A"].addr)
            a.drain()
            st = a.state
            assert (st["state"], st["admin"], st["weight"], st["health"]) == ("drained", "drain", 1, "up")
            assert p.stats()["upstreams"][srv["A"].addr]["state"] == "drained"
            stop = threading.Event()
            moved = Counter()

            def load():
                # Bytes keep flowing through A's live bridges while new
                # clients arrive.
                k = 0
                while not stop.is_set():
                    for s in on_a:
                        payload = b"%d" % k * 500
                        assert echo(s, payload) == payload
                        moved["bytes"] += len(payload)
                    k += 1

            t = threading.Thread(target=load)
            t.start()
            try:
                got = spread(p.address, 40)
            finally:
                stop.set()
                t.join(10)
            assert got["A"] == 0 and got["B"] + got["C"] == 40
            assert moved["bytes"] > 0
            assert a.state["active"] == len(on_a)
            # (The kernel engine folds what it forwarded into the counters
            # every 100 ms.)
            assert wait_for(lambda: a.state["bytes_upstream"] >= moved["bytes"], 2)
            a.ready()
            assert a.state["state"] == "up"
            assert spread(p.address, 30)["A"] >= 5
            for s, _ in held:
                leave(s)
        finally:
            stop_bounded(p)


def test_maint_reports_maint_and_leaves_live_bridges(engine):
    with Servers(2) as srv:
        p = proxy_over(srv, engine)
        try:
            a = p.upstream(srv["A"].addr)
            a.drain()
            a.ready()
            live, name = open_tagged(p.address)
            while name != "A":
                live.close()
                live, name = open_tagged(p.address)
            a.maint()
            assert a.state["state"] == "maint" and a.state["admin"] == "maint"
            assert spread(p.address, 10) == {"B": 10}
            assert echo(live, b"still here") == b"still here"
            assert a.state["active"] == 1
            a.ready()
            assert spread(p.address, 10)["A"] >= 3
            leave(live)
        finally:
            stop_bounded(p)


def test_set_weight_shifts_the_spread_of_200_clients(engine):
    with Servers(2) as srv:
        p = proxy_over(srv, engine)
        try:
            before = spread(p.address, 40)
            assert 14 <= before["A"] <= 26
            p.upstream(srv["A"].addr).set_weight(1)
            p.upstream(srv["B"].addr).set_weight(3)
            assert p.stats()["upstreams"][srv["B"].addr]["weight"] == 3
            got = spread(p.address, 200)
            assert 35 <= got["A"] <= 65 and got["A"] + got["B"] == 200
            p.upstream(srv["B"].addr).set_weight(0)
            assert p.upstream(srv["B"].addr).state["state"] == "drained"
            assert spread(p.address, 10) == {"A": 10}
        finally:
            stop_bounded(p)


def test_ready_and_a_weight_rise_give_waiting_clients_a_retry(engine):
    with Servers(2) as srv:
        p = Proxy(listen="127.0.0.1:0", upstreams=[Upstream(srv["A"].addr, max_connections=1),
                                                   Upstream(srv["B"].addr, weight=0)],
                  engine=engine, workers=2, queue_timeout="20s").start()
        try:
            first, name = open_tagged(p.address)
            assert name == "A"
            # A is full and B weighs 0: the next client waits, until B's
            # weight rises (a retry at once, not at A's release).
            waiting = socket.create_connection(p.address, timeout=10)
            assert wait_for(lambda: p.stats()["queued"] == 1, 5)
            t0 = time.monotonic()
            p.upstream(srv["B"].addr).set_weight(1)
            assert read_line(waiting) == "B" and time.monotonic() - t0 < 5
            # Drained B, A full again: ready gives the waiter its retry.
            p.upstream(srv["B"].addr).drain()
            waiting2 = socket.create_connection(p.address, timeout=10)
            assert wait_for(lambda: p.stats()["queued"] == 1, 5)
            p.upstream(srv["B"].addr).ready()
            assert read_line(waiting2) == "B" and time.monotonic() - t0 < 10
            for s in (first, waiting, waiting2):
                leave(s)
        finally:
            stop_bounded(p)


def test_bridges_lists_ids_bytes_and_close_bridge_closes_exactly_that_one(engine):
    with Servers(2) as srv:
        records = []
        p = Proxy(listen="127.0.0.1:0", upstreams=[srv["A"].addr, srv["B"].addr], engine=engine,
                  workers=2, name="front")
        p.on_close(lambda conn, record: records.append((conn.id, record.reason)))
        p.start()
        try:
            socks = [open_tagged(p.address) for _ in range(3)]
            sizes = [10, 2000, 70000]
            for (s, _), n in zip(socks, sizes):
                assert echo(s, b"z" * n) == b"z" * n
            assert wait_for(lambda: sum(b["bytes_upstream"] for b in p.bridges()) == sum(sizes), 5)
            listed = p.bridges()
            assert len(listed) == 3 and [b["id"] for b in listed] == sorted(b["id"] for b in listed)
            by_client = {b["client"]: b for b in listed}
            for (s, name), n in zip(socks, sizes):
                b = by_client[s.getsockname()[:2]]
                assert b["listener"] == "front" and b["upstream"] == srv[name].addr
                assert b["state"] == "active" and b["route"] is None and b["age"] > 0
                assert b["bytes_upstream"] == n and b["bytes_downstream"] == n + len(name) + 1
            target = by_client[socks[1][0].getsockname()[:2]]["id"]
            assert p.close_bridge(target)
            assert recv_until_eof(socks[1][0]) == b""    # a FIN, not a reset
            socks[1][0].close()
            assert [b["id"] for b in p.bridges()] == [b["id"] for b in listed if b["id"] != target]
            for i in (0, 2):
                assert echo(socks[i][0], b"alive") == b"alive"
            assert not p.close_bridge(target) and not p.close_bridge(10**15) and not p.close_bridge(-1)
            assert wait_for(lambda: (target, CloseReason.ADMIN_CLOSED) in records, 5)
            assert [b["id"] for b in p.bridges(limit=1)] == [min(b["id"] for b in p.bridges())]
            for i in (0, 2):
                leave(socks[i][0])
            assert wait_for(lambda: p.bridges() == [], 5)
        finally:
            stop_bounded(p)


def test_unknown_and_ambiguous_names(engine):
    with Servers(2) as srv:
        pa, pb = free_port(), free_port()
        cfg = [Config.build(listen=f"127.0.0.1:{port}", upstreams=[srv["A"].addr, srv[other].addr],
                            engine=engine, workers=1, name=name)
               for port, name, other in ((pa, "one", "B"), (pb, "two", "B"))]
        p = Proxy.from_config(cfg)
        with pytest.raises(RuntimeError):
            p.upstream(srv["A"].addr)     # not running yet
        p.start()
        try:
            with pytest.raises(UnknownNameError) as e:
                p.upstream("127.0.0.1:1")
            assert isinstance(e.value, ValueError) and e.value.field == "upstream"
            with pytest.raises(ConfigError) as e:
                p.upstream(srv["A"].addr)
            assert e.value.field == "listener" and "one, two" in str(e.value)
            with pytest.raises(UnknownNameError) as e:
                p.upstream(srv["A"].addr, listener="three")
            assert e.value.field == "listener"
            one = p.upstream(srv["A"].addr, listener="one")
            one.drain()
            assert p.upstreams()["one"][srv["A"].addr]["admin"] == "drain"
            assert p.upstreams()["two"][srv["A"].addr]["admin"] == "ready"
            with pytest.raises(ConfigError) as e:
                one.set_weight(257)
            assert e.value.field == "weight" and e.value.value == 257
            with pytest.raises(ConfigError):
                one.set_weight(True)
            assert which(("127.0.0.1", pa)) == "B" and which(("127.0.0.1", pb)) in ("A", "B")
        finally:
            stop_bounded(p)


def test_admin_state_and_weight_survive_a_reload_that_keeps_the_upstream(engine):
    with Servers(3) as srv:
        port = free_port()

        def cfg(*ups, **kw):
            return [Config.build(listen=f"127.0.0.1:{port}", upstreams=list(ups), engine=engine,
                                 workers=2, **kw)]

        p = Proxy.from_config(cfg(srv["A"].addr, srv["B"].addr)).start()
        try:
            addr = ("127.0.0.1", port)
            live, _ = open_tagged(addr)    # keeps the old block draining across the reload
            p.upstream(srv["A"].addr).drain()
            p.upstream(srv["B"].addr).set_weight(7)
            p.reload(cfg(srv["A"].addr, srv["B"].addr, srv["C"].addr, connect_timeout="3s"))
            ups = p.stats()["upstreams"]
            assert ups[srv["A"].addr]["admin"] == "drain" and ups[srv["A"].addr]["state"] == "drained"
            assert ups[srv["B"].addr]["weight"] == 7      # the current block's, not a sum
            assert ups[srv["C"].addr]["admin"] == "ready"
            assert spread(addr, 12)["A"] == 0
            # A configured weight that changes wins over the run-time one.
            p.reload(cfg(srv["A"].addr, Upstream(srv["B"].addr, weight=2), srv["C"].addr))
            ups = p.stats()["upstreams"]
            assert ups[srv["B"].addr]["weight"] == 2 and ups[srv["A"].addr]["admin"] == "drain"
            leave(live)
        finally:
            stop_bounded(p)


def test_scrapes_and_control_under_load_lose_no_byte(engine):
    """100 bridges stream random data both ways while bridges() is scraped,
    admin requests come and go, and an upstream is drained, readied and
    reweighted: every byte arrives and no bridge is cut."""
    with VerifyingServer() as v1, VerifyingServer() as v2:
        p = Proxy(listen="127.0.0.1:0", upstreams=[v1.addr, v2.addr], engine=engine, workers=2,
                  stats_admin=True).start()
        try:
            load = StreamLoad(p.address, n=100, max_pause=0.05, seed=5).start()
            assert load.wait_progress(0.05, 20)
            scrapes = 0
            seen = set()
            while load.bytes_moved() < load.total_bytes * 0.9 and scrapes < 400:
                listed = p.bridges()
                seen.update(b["id"] for b in listed)
                assert all(b["upstream"] in (v1.addr, v2.addr) for b in listed)
                assert handle_admin(p, req("GET", "/admin/bridges"), token=None).status == 200
                u = p.upstream(v1.addr)
                (u.drain, u.ready, u.maint, u.ready)[scrapes % 4]()
                u.set_weight(1 + scrapes % 3)
                assert not p.close_bridge(10**15)
                scrapes += 1
            p.upstream(v1.addr).ready()
            result = load.wait(120)
            result.assert_all_ok()
            wait_for(lambda: not v1.bad() and not v2.bad() and not v1.active and not v2.active, 10)
            v1.assert_all_ok()
            v2.assert_all_ok()
            assert scrapes >= 5 and len(seen) > 10
            assert p.stats()["accepted"] == 100
        finally:
            stop_bounded(p)


def test_health_checks_go_on_while_drained(engine):
    def check(host, port):
        return ping_pong(host, port, timeout=0.5)

    with Servers(2) as srv:
        p = Proxy(listen="127.0.0.1:0", upstreams=[srv["A"].addr, srv["B"].addr], engine=engine, workers=1,
                  health_check=check, health_interval=0.05, health_timeout=0.5, health_fall=2,
                  health_rise=2).start()
        try:
            a = p.upstream(srv["A"].addr)
            a.drain()
            srv["A"].healthy = False
            assert wait_for(lambda: a.state["health"] == "down", 5), a.state
            assert a.state["state"] == "drained"
            a.ready()
            assert a.state["state"] == "down"       # back, but its health says no
            assert spread(p.address, 6) == {"B": 6}
            srv["A"].healthy = True
            assert wait_for(lambda: a.state["state"] == "up", 5), a.state
        finally:
            stop_bounded(p)


def test_a_routed_bridge_is_listed_with_its_route(engine):
    with Servers(names=["S1", "OUT"]) as srv:
        p = Proxy(listen="127.0.0.1:0", upstream=srv["S1"].addr, engine=engine, workers=1)
        p.on_connect(lambda conn: srv["OUT"].addr)
        p.start()
        try:
            c, name = open_tagged(p.address)
            assert name == "OUT"
            (b,) = p.bridges()
            assert b["upstream"] is None and b["route"] == srv["OUT"].addr
            leave(c)
        finally:
            stop_bounded(p)


# ---- the admin HTTP handler

TOKEN = "s3cret-token"


def req(method, path, body=b"", peer=("127.0.0.1", 40000), headers=None, query=None):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return Request(method, path, query or {}, headers or {}, body, peer)


def answer(p, request, token=None):
    r = handle_admin(p, request, token=token)
    assert r.content_type == "application/json"
    return r.status, json.loads(r.body)


@pytest.fixture
def admin_proxy(engine):
    with Servers(2) as srv:
        p = Proxy(listen="127.0.0.1:0", upstreams=[srv["A"].addr, srv["B"].addr], engine=engine,
                  workers=2, name="edge/1", stats_admin=True).start()
        try:
            yield p, srv
        finally:
            stop_bounded(p)


def esc(name):
    from urllib.parse import quote
    return quote(name, safe="")


def test_admin_routes_act_on_the_proxy(admin_proxy):
    p, srv = admin_proxy
    a, b = srv["A"].addr, srv["B"].addr
    status, body = answer(p, req("GET", "/admin/upstreams"))
    assert status == 200 and set(body["listeners"]["edge/1"]) == {a, b}
    assert body["listeners"]["edge/1"][a]["admin"] == "ready" and body["listeners"]["edge/1"][a]["weight"] == 1

    # Names escaped (':' may be left as is; '/' in a name must be %2F).
    status, body = answer(p, req("POST", f"/admin/upstreams/{esc('edge/1')}/{esc(a)}", {"state": "drain"}))
    assert status == 200 and (body["admin"], body["state"], body["upstream"]) == ("drain", "drained", a)
    assert spread(p.address, 6) == {"B": 6}
    status, body = answer(p, req("POST", f"/admin/upstreams/edge%2F1/{a}", {"state": "maint", "weight": 4}))
    assert status == 200 and (body["state"], body["weight"]) == ("maint", 4)
    status, body = answer(p, req("POST", f"/admin/upstreams/edge%2F1/{esc(a)}/", {"state": "ready"}))
    assert status == 200 and body["state"] == "up"
    assert p.upstream(a).state["weight"] == 4

    live, name = open_tagged(p.address)
    status, body = answer(p, req("GET", "/admin/bridges"))
    assert status == 200 and body["count"] == 1
    (entry,) = body["bridges"]
    assert entry["listener"] == "edge/1" and entry["upstream"] == srv[name].addr
    assert entry["client"] == "127.0.0.1:%d" % live.getsockname()[1]
    status, body = answer(p, req("GET", "/admin/bridges", query={"limit": ["0"]}))
    assert status == 200 and body == {"bridges": [], "count": 0}
    status, body = answer(p, req("POST", f"/admin/bridges/{entry['id']}/close"))
    assert status == 200 and body == {"closed": entry["id"]}
    assert recv_until_eof(live) == b""
    live.close()
    status, body = answer(p, req("POST", f"/admin/bridges/{entry['id']}/close"))
    assert status == 404 and str(entry["id"]) in body["error"]


@pytest.mark.parametrize("method,path,body,status,words", [
    ("POST", "/admin/upstreams/edge%2F1/{a}", b"{not json", 400, "not valid JSON"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", b"\xff\xfe", 400, "UTF-8"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", b"", 400, "JSON object"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", [1, 2], 400, "not list"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {}, 400, "state and/or weight"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"state": "down"}, 400, "state: 'down'"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"state": None}, 400, "state: None"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"weight": 257}, 400, "weight: 257"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"weight": -1}, 400, "weight: -1"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"weight": "3"}, 400, "weight: '3'"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"weight": 2.5}, 400, "weight: 2.5"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"weight": True}, 400, "weight: True"),
    ("POST", "/admin/upstreams/edge%2F1/{a}", {"state": "drain", "colour": "red"}, 400, "colour"),
    ("POST", "/admin/upstreams/edge%2F1/127.0.0.1%3A1", {"state": "drain"}, 404, "127.0.0.1:1"),
    ("POST", "/admin/upstreams/nope/{a}", {"state": "drain"}, 404, "listener: 'nope'"),
    ("POST", "/admin/upstreams/edge/1/{a}", {"state": "drain"}, 404, "no admin route"),
    ("POST", "/admin/bridges/123456789/close", b"", 404, "123456789"),
    ("POST", "/admin/bridges/abc/close", b"", 404, "'abc'"),
    ("GET", "/admin/bridges", None, 400, "limit: 'many'"),
    ("GET", "/admin/nothing", b"", 404, "no admin route"),
    ("GET", "/admin/", b"", 404, "no admin route"),
    ("POST", "/admin/upstreams", b"", 405, "POST is not allowed"),
    ("DELETE", "/admin/upstreams/edge%2F1/{a}", b"", 405, "DELETE is not allowed"),
    ("GET", "/admin/bridges/1/close", b"", 405, "GET is not allowed"),
    ("PUT", "/admin/bridges", b"", 405, "PUT is not allowed"),
])
def test_admin_bad_requests_get_a_status_and_a_json_reason(admin_proxy, method, path, body, status, words):
    p, srv = admin_proxy
    query = {"limit": ["many"]} if body is None else {}
    got, answer_body = answer(p, req(method, path.replace("{a}", srv["A"].addr),
                                     b"" if body is None else body, query=query))
    assert got == status and words in answer_body["error"] and answer_body["status"] == status
    if status == 405:
        r = handle_admin(p, req(method, path.replace("{a}", srv["A"].addr)), token=None)
        assert dict(r.headers)["Allow"] in ("GET", "POST")
    # Nothing changed, and the proxy still serves.
    assert p.upstream(srv["A"].addr).state["admin"] == "ready"
    assert which(p.address) in ("A", "B")


def test_admin_access_loopback_unix_or_token(admin_proxy):
    p, srv = admin_proxy
    far = ("192.0.2.1", 5)     # a documentation address: never connected to
    path = f"/admin/upstreams/edge%2F1/{srv['A'].addr}"
    status, body = answer(p, req("GET", "/admin/upstreams", peer=far))
    assert status == 403 and "192.0.2.1" in body["error"] and "stats_token" in body["error"]
    status, _ = answer(p, req("POST", path, {"state": "drain"}, peer=far))
    assert status == 403 and p.upstream(srv["A"].addr).state["admin"] == "ready"
    for peer in ("unix", ("::1", 1, 0, 0), ("127.3.4.5", 1), ("::ffff:127.0.0.1", 1)):
        assert answer(p, req("GET", "/admin/upstreams", peer=peer))[0] == 200
    for peer in (("10.0.0.1", 1), ("::ffff:192.0.2.1", 1), ("not an ip", 1), None, ("0.0.0.0", 1)):
        assert not peer_is_local(peer)
    # With a token: required from everyone, loopback included.
    bearer = {"authorization": f"Bearer {TOKEN}"}
    status, _ = answer(p, req("POST", path, {"state": "drain"}, peer=far, headers=bearer), token=TOKEN)
    assert status == 200 and p.upstream(srv["A"].addr).state["admin"] == "drain"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
                    {"authorization": f"Bearer {TOKEN}x"}):
        for peer in (far, ("127.0.0.1", 1), "unix"):
            r = handle_admin(p, req("POST", path, {"state": "ready"}, peer=peer, headers=headers), token=TOKEN)
            assert r.status == 401 and "stats_token" in json.loads(r.body)["error"]
            assert dict(r.headers)["WWW-Authenticate"].startswith("Bearer")
    assert p.upstream(srv["A"].addr).state["admin"] == "drain"
    assert answer(p, req("GET", "/admin/upstreams", headers={"authorization": f"bearer {TOKEN}"}),
                  token=TOKEN)[0] == 200


def test_admin_off_or_not_running(engine):
    with Servers(1) as srv:
        p = Proxy(listen="127.0.0.1:0", upstream=srv["A"].addr, engine=engine, workers=1)
        status, body = answer(p, req("GET", "/admin/upstreams"))
        assert status == 403 and "stats_admin" in body["error"]
        q = Proxy(listen="127.0.0.1:0", upstream=srv["A"].addr, engine=engine, workers=1, stats_admin=True)
        status, body = answer(q, req("GET", "/admin/upstreams"))
        assert status == 503 and "not running" in body["error"]
        assert answer(q, req("GET", "/admin/bridges"))[0] == 200     # none: not running
