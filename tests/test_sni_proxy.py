"""Routing by TLS server name through a running proxy, on both engines:
real TLS servers on loopback (one per upstream, each says who it is after
the handshake) and real ssl clients that verify the upstream's certificate
(the proxy passes TLS through untouched)."""
import json
import socket
import ssl
import time

import pytest

from fastproxy import Config, ConfigError, Proxy, _core
from support.cli import assert_one_line_error, run_cli
from support.servers import EchoServer, Listener
from support.sockets import closed_by_peer, connect, recv_exact
from support.tls import Certificate, TlsServer, client_hello, tls_connect, who
from support.waits import stop_bounded, wait_for


@pytest.fixture(scope="module")
def cert():
    return Certificate()


@pytest.fixture
def tls_servers(cert):
    servers = {tag: TlsServer(cert, tag, alpn=["h2", "http/1.1"]) for tag in ("A", "B", "C", "D")}
    yield servers
    for s in servers.values():
        s.close()


def routes(srv):
    return [{"server_names": ["a.example"], "upstreams": [srv["A"].addr]},
            {"server_names": ["*.b.example", "c.example"], "upstreams": [srv["B"].addr, srv["C"].addr],
             "name": "bees", "balance": "roundrobin"}]


def listener_stats(p):
    return next(iter(p.stats()["listeners"].values()))


def test_names_pick_routes_wildcards_and_the_default(make_proxy, cert, tls_servers):
    srv = tls_servers
    p = make_proxy(upstreams=[srv["D"].addr], route="sni", routes=routes(srv))
    addr = p.address
    assert who(cert, addr, "a.example") == "A"
    assert who(cert, addr, "A.EXAMPLE") == "A"                     # case-insensitive
    assert {who(cert, addr, "x.b.example") for _ in range(4)} == {"B", "C"}   # the route's group balances
    assert who(cert, addr, "deep.x.b.example") in ("B", "C")      # a wildcard matches any depth
    assert who(cert, addr, "c.example") in ("B", "C")
    assert who(cert, addr, "b.example") == "D"                    # *.b.example is not b.example
    assert who(cert, addr, "other.example") == "D"                # no route: the default group
    # The upstream saw the name the client sent: the ClientHello arrived whole.
    assert "a.example" in srv["A"].names
    st = listener_stats(p)
    bees = st["routes"]["bees"]
    assert bees["server_names"] == ["*.b.example", "c.example"]
    assert sum(u["accepted"] for u in bees["upstreams"].values()) == 6
    assert st["routes"]["a.example"]["upstreams"][srv["A"].addr]["accepted"] == 2
    assert st["upstreams"][srv["D"].addr]["accepted"] == 2
    assert st["route_refused"] == 0 and st["accepted"] == 10


def test_without_a_default_group_unknown_names_are_refused(make_proxy, cert, tls_servers):
    p = make_proxy(route="sni", routes=routes(tls_servers))
    assert who(cert, p.address, "a.example") == "A"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_connect(cert, p.address, "other.example")
    assert wait_for(lambda: listener_stats(p)["route_refused"] == 1, 3)
    assert listener_stats(p)["upstreams"] == {}


def test_alpn_and_server_name_reach_the_hooks_and_the_access_log(make_proxy, cert, tls_servers, tmp_path):
    seen, closed = [], []
    log_file = tmp_path / "access.log"
    p = make_proxy(upstreams=[tls_servers["D"].addr], route="sni", routes=routes(tls_servers),
                   access_log=str(log_file), start=False)

    @p.on_connect
    def connect_hook(conn):
        seen.append((conn.server_name, conn.alpn))

    @p.on_close
    def close_hook(conn, record):
        closed.append((conn.server_name, conn.alpn, record.server_name))

    p.start()
    assert who(cert, p.address, "a.example", alpn=["h2", "http/1.1"]) == "A"
    assert who(cert, p.address, "other.example") == "D"
    assert wait_for(lambda: len(closed) == 2, 5)
    assert seen == [("a.example", ("h2", "http/1.1")), ("other.example", ())]
    assert sorted(closed) == [("a.example", ("h2", "http/1.1"), "a.example"),
                              ("other.example", (), "other.example")]
    assert wait_for(lambda: len(log_file.read_text().splitlines()) == 2, 5)
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert sorted(line["server_name"] for line in lines) == ["a.example", "other.example"]


def test_on_connect_names_an_upstream_of_the_route_group(make_proxy, cert, tls_servers):
    srv = tls_servers
    p = make_proxy(upstreams=[srv["D"].addr], route="sni", routes=routes(srv), start=False)

    @p.on_connect
    def pick_c(conn):
        return srv["C"].addr if conn.server_name == "x.b.example" else None

    p.start()
    assert [who(cert, p.address, "x.b.example") for _ in range(3)] == ["C"] * 3
    st = listener_stats(p)
    assert st["routes"]["bees"]["upstreams"][srv["C"].addr]["accepted"] == 3
    assert st["routed"]["accepted"] == 0     # in the group, not a route outside it


def raw_upstream():
    """A plain TCP upstream that records what it gets."""
    return Listener()


def test_a_client_hello_sent_one_byte_at_a_time_still_routes(make_proxy, tls_servers):
    hello = client_hello("a.example")
    with raw_upstream() as up:
        p = make_proxy(upstreams=[tls_servers["D"].addr], route="sni",
                       routes=[{"server_names": ["a.example"], "upstreams": [up.addr]}])
        c = connect(p.address)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(hello)):
            c.sendall(hello[i:i + 1])
            if i < 40 or i % 50 == 0:
                time.sleep(0.002)
        s = up.accept()
        # The bytes arrive untouched, in one piece or many.
        assert recv_exact(s, len(hello)) == hello
        c.sendall(b"after")
        assert recv_exact(s, 5) == b"after"
        s.sendall(b"back")
        assert recv_exact(c, 4) == b"back"
        c.close()
        s.close()


def test_a_client_hello_spanning_records_and_segments_routes(make_proxy, tls_servers):
    from support.tls import records
    hello = records(client_hello("x.b.example")[5:], [7, 100, 3])
    with raw_upstream() as up:
        p = make_proxy(route="sni", routes=[{"server_names": ["*.b.example"], "upstreams": [up.addr]}])
        c = connect(p.address)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (hello[:3], hello[3:20], hello[20:120], hello[120:]):
            c.sendall(piece)
            time.sleep(0.02)
        s = up.accept()
        assert recv_exact(s, len(hello)) == hello
        c.close()
        s.close()


def test_non_tls_goes_to_the_default_group_by_default(make_proxy, echo_server, tls_servers):
    p = make_proxy(upstreams=[echo_server.addr], route="sni", routes=routes(tls_servers))
    c = connect(p.address)
    c.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert recv_exact(c, 18) == b"GET / HTTP/1.1\r\n\r\n"
    c.close()
    # Garbage too, and a ClientHello without a name.
    c = connect(p.address)
    c.sendall(b"\x16\x03\x01\x00\x05\x02garbage!")
    assert recv_exact(c, 14) == b"\x16\x03\x01\x00\x05\x02garbage!"
    c.close()
    hello = client_hello(None)
    c = connect(p.address)
    c.sendall(hello)
    assert recv_exact(c, len(hello)) == hello
    c.close()
    assert listener_stats(p)["route_refused"] == 0


def test_non_tls_is_refused_with_route_non_tls_reject(make_proxy, echo_server, tls_servers, cert):
    p = make_proxy(upstreams=[echo_server.addr], route="sni", routes=routes(tls_servers),
                   route_non_tls="reject")
    for data in (b"GET / HTTP/1.1\r\n\r\n", client_hello(None)):
        c = connect(p.address)
        c.sendall(data)
        assert closed_by_peer(c, 3)
        c.close()
    assert wait_for(lambda: listener_stats(p)["route_refused"] == 2, 3)
    assert echo_server.accepted == 0
    # A name no route has still goes to the default group.
    hello = client_hello("other.example")
    c = connect(p.address)
    c.sendall(hello)
    assert recv_exact(c, len(hello)) == hello
    c.close()


def test_non_tls_without_a_default_group_is_refused(make_proxy, tls_servers):
    p = make_proxy(route="sni", routes=routes(tls_servers))
    c = connect(p.address)
    c.sendall(b"SSH-2.0-client\r\n")
    assert closed_by_peer(c, 3)
    c.close()
    assert wait_for(lambda: listener_stats(p)["route_refused"] == 1, 3)


def test_an_incomplete_client_hello_times_out_and_is_counted(make_proxy, echo_server, tls_servers):
    p = make_proxy(upstreams=[echo_server.addr], route="sni", routes=routes(tls_servers),
                   route_timeout="300ms")
    hello = client_hello("a.example")
    c = connect(p.address)
    c.sendall(hello[:50])
    began = time.monotonic()
    assert closed_by_peer(c, 5)
    assert 0.25 <= time.monotonic() - began < 3
    c.close()
    silent = connect(p.address)     # nothing at all
    assert closed_by_peer(silent, 5)
    silent.close()
    assert wait_for(lambda: listener_stats(p)["route_timeouts"] == 2, 3)
    assert wait_for(lambda: listener_stats(p)["active"] == 0, 3)
    assert listener_stats(p)["route_refused"] == 0 and echo_server.accepted == 0


def test_a_client_that_ends_before_its_client_hello_is_whole_is_counted(make_proxy, echo_server, tls_servers):
    p = make_proxy(upstreams=[echo_server.addr], route="sni", routes=routes(tls_servers))
    c = connect(p.address)
    c.sendall(client_hello("a.example")[:100])
    time.sleep(0.05)
    c.shutdown(socket.SHUT_WR)
    assert closed_by_peer(c, 3)
    c.close()
    assert wait_for(lambda: listener_stats(p)["route_aborted"] == 1, 3)
    assert wait_for(lambda: listener_stats(p)["active"] == 0, 3)
    assert echo_server.accepted == 0


def test_clients_waiting_for_their_client_hello_hold_their_limit_slot(make_proxy, cert, tls_servers):
    p = make_proxy(upstreams=[tls_servers["D"].addr], route="sni", routes=routes(tls_servers),
                   max_connections=2, on_limit="reject")
    idle = [connect(p.address) for _ in range(2)]
    assert wait_for(lambda: listener_stats(p)["active"] == 2, 3)
    late = connect(p.address)
    assert closed_by_peer(late, 3)
    assert wait_for(lambda: listener_stats(p)["rejected"] == 1, 3)
    for s in idle + [late]:
        s.close()
    assert wait_for(lambda: listener_stats(p)["active"] == 0, 3)
    assert who(cert, p.address, "a.example") == "A"


def test_swapping_a_route_group_moves_new_clients_only(make_proxy, cert, tls_servers):
    from fastproxy.discovery import DnsClient
    from fastproxy.listener import build_group, resolve_upstreams
    from fastproxy.upstreams import parse_upstreams
    srv = tls_servers
    config = lambda: p._listeners[0].config   # noqa: E731

    def group_of(addr):
        return build_group(resolve_upstreams(parse_upstreams([addr]), config(), DnsClient()), config().balancing)

    p = make_proxy(upstreams=[srv["D"].addr], route="sni", routes=routes(srv))
    live, line = tls_connect(cert, p.address, "a.example")
    assert line.startswith("A")
    handle = p._listeners[0].handle
    handle.swap_group(group_of(srv["C"].addr), route=1)
    assert who(cert, p.address, "a.example") == "C"
    assert who(cert, p.address, "x.b.example") in ("B", "C")
    assert who(cert, p.address, "other.example") == "D"
    live.sendall(b"still\n")
    assert live.recv(6) == b"still\n"
    live.close()
    with pytest.raises(IndexError):
        handle.swap_group(group_of(srv["C"].addr), route=3)


def test_a_reload_that_changes_routes_keeps_live_bridges_flowing(engine, cert, tls_servers):
    srv = tls_servers

    def config(port, route_a):
        return Config.build(listen=f"127.0.0.1:{port}", upstreams=[srv["D"].addr], route="sni", engine=engine,
                            workers=2, routes=[{"server_names": ["a.example"], "upstreams": [srv[route_a].addr]}])

    p = Proxy.from_config([config(0, "A")]).start()
    try:
        port = p.address[1]
        live, line = tls_connect(cert, p.address, "a.example")
        assert line.startswith("A")
        p.reload([config(port, "B")])
        assert who(cert, p.address, "a.example") == "B"
        for i in range(20):
            live.sendall(b"x%d\n" % i)
            assert live.recv(16) == b"x%d\n" % i
        live.close()
        assert wait_for(lambda: not p._listeners[0].draining, 5)
        st = listener_stats(p)
        # Figures add up across the reload; what the reload removed is gone.
        assert st["routes"]["a.example"]["upstreams"] == {srv["B"].addr: st["routes"]["a.example"]["upstreams"][srv["B"].addr]}
        assert st["routes"]["a.example"]["upstreams"][srv["B"].addr]["accepted"] == 1
        assert st["accepted"] == 2
        p.reload([Config.build(listen=f"127.0.0.1:{port}", upstreams=[srv["D"].addr], engine=engine, workers=2)])
        assert who(cert, p.address, "a.example") == "D"
        assert wait_for(lambda: not p._listeners[0].draining, 5)
        assert "routes" not in listener_stats(p) and listener_stats(p)["accepted"] == 3
    finally:
        stop_bounded(p)


def test_config_file_routes(tmp_path, engine, cert, tls_servers):
    srv = tls_servers
    path = tmp_path / "fastproxy.toml"
    path.write_text(f'''
engine = "{engine}"
[[listeners]]
listen = "127.0.0.1:0"
route = "sni"
[[listeners.routes]]
server_names = ["a.example"]
upstreams = ["{srv["A"].addr}"]
[[listeners.routes]]
name = "bees"
server_names = ["*.b.example"]
upstreams = [{{ address = "{srv["B"].addr}", weight = 2 }}, "{srv["C"].addr}"]
balance = "leastconn"
''')
    p = Proxy.from_config(str(path)).start()
    try:
        assert who(cert, p.address, "a.example") == "A"
        assert who(cert, p.address, "x.b.example") in ("B", "C")
        route = p._listeners[0].config.routing.routes[1]
        assert route.name == "bees" and route.setting("balance", "roundrobin") == "leastconn"
    finally:
        stop_bounded(p)


def test_cli_route_sni(cli_proxy, cert, tls_servers):
    srv = tls_servers
    cp = cli_proxy("--listen", "127.0.0.1:0", "--route", "sni", "--route-sni", f"a.example={srv['A'].addr}",
                   "--route-sni", f"*.b.example={srv['B'].addr}", "--route-sni", f"*.b.example={srv['C'].addr}",
                   "--upstream", srv["D"].addr)
    addr = cp.connect_addr()
    assert who(cert, addr, "a.example") == "A"
    assert {who(cert, addr, "x.b.example") for _ in range(4)} == {"B", "C"}
    assert who(cert, addr, "other.example") == "D"


@pytest.mark.parametrize("args,needles", [
    (["--upstream", "127.0.0.1:9", "--route-sni", "a.example=127.0.0.1:9"], ["--route-sni", 'route = "sni"']),
    (["--route", "sni", "--route-sni", "a_b..example=127.0.0.1:9"], ["--route-sni", "a_b..example"]),
    (["--route", "sni", "--route-sni", "a.example"], ["--route-sni", "NAME=SPEC"]),
    (["--route", "sni", "--route-sni", "bücher.example=127.0.0.1:9"], ["--route-sni", "IDNA"]),
    (["--route", "sni", "--route-sni", "a.example=127.0.0.1:x"], ["--route-sni", "a.example=127.0.0.1:x"]),
    (["--route", "sni"], ["--upstream", "required"]),
    (["--route", "tls", "--upstream", "127.0.0.1:9"], ["--route"]),
    (["--route", "sni", "--upstream", "127.0.0.1:9", "--route-timeout", "0"], ["--route-timeout"]),
])
def test_cli_errors_are_one_line(any_engine, args, needles):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--engine", any_engine] + args)
    assert_one_line_error(rc, out, err, *needles)


@pytest.mark.parametrize("routes_toml,needles", [
    ('[[listeners.routes]]\nserver_names = ["a.example"]\nupstreams = ["127.0.0.1:9"]\n'
     '[[listeners.routes]]\nserver_names = ["b.example", "c.example", "-bad.example"]\nupstreams = ["127.0.0.1:9"]\n',
     ["listeners[0].routes[1].server_names[2]", "-bad.example"]),
    ('[[listeners.routes]]\nserver_names = ["a.example"]\nupstreams = ["127.0.0.1:9"]\n'
     '[[listeners.routes]]\nserver_names = ["A.example."]\nupstreams = ["127.0.0.1:10"]\n',
     ["listeners[0].routes[1].server_names[0]", "a.example", "routes[0]"]),
    ('[[listeners.routes]]\nupstreams = ["127.0.0.1:9"]\n', ["listeners[0].routes[0]", "server_names"]),
    ('[[listeners.routes]]\nserver_names = ["a.example"]\n', ["listeners[0].routes[0]", "upstreams"]),
    ('[[listeners.routes]]\nserver_names = ["a.example"]\nupstreams = ["127.0.0.1:9"]\nbalanse = "first"\n',
     ["listeners[0].routes[0].balanse", "route key"]),
    ('[[listeners.routes]]\nserver_names = ["a.example"]\nupstreams = ["127.0.0.1:9"]\nmax_fails = -1\n',
     ["listeners[0].routes[0].max_fails", "-1"]),
    ('[[listeners.routes]]\nserver_names = ["a.example"]\nupstreams = [{ address = "127.0.0.1:9", weight = 300 }]\n',
     ["listeners[0].routes[0].upstreams[0].weight", "300"]),
])
def test_config_file_errors_are_one_line(tmp_path, any_engine, routes_toml, needles):
    path = tmp_path / "bad.toml"
    path.write_text(f'[[listeners]]\nlisten = "127.0.0.1:0"\nroute = "sni"\n{routes_toml}')
    rc, out, err = run_cli(["--config", str(path), "--engine", any_engine])
    assert_one_line_error(rc, out, err, str(path), *needles)


def test_routes_without_route_sni_is_an_error_naming_the_field():
    with pytest.raises(ConfigError, match='routes.*needs route = "sni"'):
        Config.build(listen=":0", upstreams=["127.0.0.1:9"],
                     routes=[{"server_names": ["a.example"], "upstreams": ["127.0.0.1:9"]}])
    with pytest.raises(ConfigError, match="upstream.*required"):
        Config.build(listen=":0", route="sni")
    # With route sni, routes alone are enough.
    assert Config.build(listen=":0", route="sni", routes=["a.example=127.0.0.1:9"]).upstream_group.upstreams is None


def test_metrics_tell_route_groups_apart(make_proxy, cert, tls_servers):
    from fastproxy.metrics import make_registry, render
    srv = tls_servers
    p = make_proxy(upstreams=[srv["D"].addr], route="sni", routes=routes(srv), name="tls")
    assert who(cert, p.address, "a.example") == "A"
    assert who(cert, p.address, "other.example") == "D"
    text = render(make_registry(p.stats, process=False)).decode()
    assert (f'fastproxy_upstream_bridges_total{{listener="tls",route="a.example",upstream="{srv["A"].addr}"}} 1.0'
            in text), text
    assert f'fastproxy_upstream_bridges_total{{listener="tls",route="",upstream="{srv["D"].addr}"}} 1.0' in text
    assert f'fastproxy_upstream_bridges_total{{listener="tls",route="bees",upstream="{srv["B"].addr}"}} 0.0' in text
    assert 'fastproxy_refused_total{listener="tls",reason="route"} 0.0' in text


def test_check_shows_the_routes(any_engine):
    rc, out, err = run_cli(["check", "--listen", "127.0.0.1:0", "--engine", any_engine, "--route", "sni",
                            "--route-sni", "a.example=127.0.0.1:9", "--route-sni", "*.b.example=127.0.0.1:10@2"])
    assert rc == 0, err
    assert "upstream group: none (names no route has are refused)" in out
    assert "route a.example: a.example: 1 upstream\n    127.0.0.1:9 weight 1" in out
    assert "route *.b.example: *.b.example: 1 upstream\n    127.0.0.1:10 weight 2" in out
    assert "routing by TLS server name: route sni, route_timeout 5s, route_non_tls default" in out


def test_run_time_control_of_a_route_upstream(make_proxy, cert, tls_servers):
    from fastproxy.admin import handle_admin
    from fastproxy.control import UnknownNameError
    from fastproxy.httpapi import Request
    srv = tls_servers
    p = make_proxy(upstreams=[srv["D"].addr], route="sni", routes=routes(srv), name="tls", stats_admin=True)
    control = p.upstream(srv["B"].addr, route="bees")
    control.drain()
    assert [who(cert, p.address, "x.b.example") for _ in range(4)] == ["C"] * 4
    assert control.state["admin"] == "drain"
    assert listener_stats(p)["routes"]["bees"]["upstreams"][srv["B"].addr]["admin"] == "drain"
    with pytest.raises(UnknownNameError, match="route"):
        p.upstream(srv["B"].addr, listener="tls", route="nope")
    with pytest.raises(UnknownNameError):
        p.upstream(srv["B"].addr)        # not in the listener's own group
    # Over the admin routes: C into maintenance, B back.
    body = json.dumps({"state": "maint"}).encode()
    r = handle_admin(p, Request("POST", f"/admin/routes/tls/bees/{srv['C'].addr}", {}, {}, body,
                                ("127.0.0.1", 1)), token=None)
    assert r.status == 200 and json.loads(r.body)["route"] == "bees", r.body
    r = handle_admin(p, Request("POST", f"/admin/routes/tls/bees/{srv['B'].addr}", {}, {},
                                json.dumps({"state": "ready"}).encode(), ("127.0.0.1", 1)), token=None)
    assert r.status == 200
    assert [who(cert, p.address, "x.b.example") for _ in range(3)] == ["B"] * 3
    r = handle_admin(p, Request("POST", f"/admin/routes/tls/nope/{srv['B'].addr}", {}, {},
                                json.dumps({"state": "ready"}).encode(), ("127.0.0.1", 1)), token=None)
    assert r.status == 404
    # A reload that keeps the route keeps its run-time settings.
    p.reload()
    assert who(cert, p.address, "x.b.example") == "B"
    assert p.upstream(srv["C"].addr, route="bees").state["admin"] == "maint"


def test_health_checks_and_passive_health_cover_route_groups(make_proxy, cert, tls_servers, caplog):
    import logging
    from support.sockets import reserve_refusing_port
    srv = tls_servers
    dead_sock = reserve_refusing_port()
    dead = f"127.0.0.1:{dead_sock.getsockname()[1]}"
    with dead_sock:
        p = make_proxy(upstreams=[srv["D"].addr], route="sni", routes=[
            {"server_names": ["a.example"], "upstreams": [srv["A"].addr, dead], "health_interval": "100ms",
             "health_fall": 1},
            {"server_names": ["*.b.example"], "upstreams": [dead, srv["B"].addr], "max_fails": 1,
             "balance": "first"}])
        route_ups = lambda r: listener_stats(p)["routes"][r]["upstreams"]   # noqa: E731
        # Active checks of route a.example's group mark its dead upstream down.
        assert wait_for(lambda: route_ups("a.example")[dead]["health"] == "down", 5)
        assert route_ups("a.example")[srv["A"].addr]["health"] == "up"
        # Passive health in the other route: one failure marks it down (retried on B), and is logged.
        with caplog.at_level(logging.WARNING, logger="fastproxy.watch"):
            assert who(cert, p.address, "x.b.example") == "B"
            assert wait_for(lambda: route_ups("*.b.example")[dead]["state"] == "down", 3)
            assert wait_for(lambda: any("is down" in r.getMessage() for r in caplog.records), 3)
        assert listener_stats(p)["upstreams"][srv["D"].addr]["health"] == "up"


def test_the_example_files_commented_route_loads(tmp_path):
    import os
    from fastproxy.configfile import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "examples", "fastproxy.toml"), encoding="utf-8") as f:
        text = f.read()
    marker = "# [[listeners]]"
    assert marker in text
    head, tail = text.split(marker, 1)
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in (marker + tail).splitlines()]
    path = tmp_path / "fastproxy.toml"
    path.write_text(head + "\n".join(lines) + "\n")
    pc = load_config(str(path))
    tls = pc.listeners[2]
    assert tls.name == "tls" and tls.routing.route == "sni"
    assert tls.routing.routes[0].server_names == ("api.example.com", "*.api.example.com")


def test_a_client_waiting_for_its_client_hello_is_listed_as_hello(make_proxy, tls_servers):
    p = make_proxy(upstreams=[tls_servers["D"].addr], route="sni", routes=routes(tls_servers))
    c = connect(p.address)
    c.sendall(client_hello("a.example")[:20])
    assert wait_for(lambda: [b["state"] for b in p.bridges()] == ["hello"], 3)
    c.close()


def test_status_page_shows_route_groups_and_route_refusals(make_proxy, cert, tls_servers):
    """The stats endpoint's page of a routing listener: a row per route
    upstream (ROUTE/UPSTREAM, as `top` names them) and the refused name
    counted in the summary, as /metrics counts it."""
    import re
    import urllib.request
    srv = tls_servers
    p = make_proxy(route="sni", routes=routes(srv), name="tls", stats="127.0.0.1:0")
    assert who(cert, p.address, "a.example") == "A"
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_connect(cert, p.address, "other.example")
    assert wait_for(lambda: listener_stats(p)["route_refused"] == 1 and listener_stats(p)["active"] == 0, 3)
    base = "http://%s:%d" % p.stats_address
    with urllib.request.urlopen(base + "/", timeout=5) as r:
        page = r.read().decode()
    rows = dict(re.findall(r'<td class="name">([^<]*)</td><td class="state[^"]*">[^<]*</td><td class="health">'
                           r'[^<]*</td><td class="weight">[^<]*</td><td class="num active">\d+</td>'
                           r'<td class="num total">(\d+)</td>', page))
    assert rows == {f"a.example/{srv['A'].addr}": "1", f"bees/{srv['B'].addr}": "0",
                    f"bees/{srv['C'].addr}": "0"}, page
    assert f'data-route="bees" data-upstream="{srv["C"].addr}"' in page
    assert re.search(r'<span class="refused" title="route_refused 1"[^>]*>1</span>', page), page
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        metrics_text = r.read().decode()
    assert 'fastproxy_refused_total{listener="tls",reason="route"} 1.0' in metrics_text


def test_top_shows_route_upstreams_and_route_refusals(make_proxy, cert, tls_servers):
    from fastproxy.view import build_view, render_text
    srv = tls_servers
    p = make_proxy(upstreams=[srv["D"].addr], route="sni", routes=routes(srv), name="tls")
    before = p.stats()
    assert who(cert, p.address, "a.example") == "A"
    view = build_view(p.stats(), before, 1.0)
    rows = {r.name: r for r in view.listeners[0].upstreams}
    assert rows[f"a.example/{srv['A'].addr}"].total == 1 and rows[f"a.example/{srv['A'].addr}"].rate == 1.0
    assert f"bees/{srv['B'].addr}" in rows and srv["D"].addr in rows
    assert dict(view.listeners[0].refusals)["route_refused"] == 0
    assert f"a.example/{srv['A'].addr}" in render_text(view)
