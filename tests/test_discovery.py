"""Upstreams from DNS and SRV (discovery.py), against a DNS server on
loopback whose answers the tests change while the proxy serves."""
import logging
import socket
import time
from collections import Counter
from contextlib import ExitStack

import pytest

from fastproxy import ConfigError
from fastproxy.discovery import DnsClient, Resolution, ResolveError, _srv_weights, first_resolution
from fastproxy.options import parse_resolve_interval
from fastproxy.upstreams import Upstream, parse_upstream
from support.cli import assert_one_line_error, run_cli
from support.dns import DnsServer
from support.servers import TagServer, tag_of
from support.traffic import StreamLoad, VerifyingServer
from support.waits import wait_for

FAST = "100ms-5s"   # the answers' TTL (1 s) decides when names are asked again


@pytest.fixture
def dns_server():
    with DnsServer() as server:
        yield server


def _same_port(factory, hosts):
    """Servers on each of `hosts` at one port (a name's A records share the
    spec's port): the first picks it, the others take it or we try again."""
    for _ in range(20):
        stack = ExitStack()
        try:
            first = stack.enter_context(factory(hosts[0], 0))
            servers = [first] + [stack.enter_context(factory(h, first.port)) for h in hosts[1:]]
        except OSError:
            stack.close()
            continue
        return stack, servers
    pytest.skip("no port free on all of %s" % (hosts,))


def _tags(hosts):
    return _same_port(lambda h, port: TagServer(h, host=h, port=port), hosts)


def _up(proxy, address):
    return proxy.stats()["upstreams"].get(address)


# ---- the DNS client and answers

def test_client_reads_a_and_aaaa_with_the_shortest_ttl(dns_server):
    dns_server.set("svc.test", "A", ["127.0.0.2", "127.0.0.3"], ttl=30)
    dns_server.set("svc.test", "AAAA", ["::1"], ttl=10)
    addresses, ttl = DnsClient(("127.0.0.1", dns_server.port)).addresses("svc.test")
    assert addresses[0] == "::1" and sorted(addresses[1:]) == ["127.0.0.2", "127.0.0.3"]
    assert 8 < ttl <= 10


def test_client_errors_say_why(dns_server):
    client = DnsClient(("127.0.0.1", dns_server.port))
    with pytest.raises(ResolveError, match=r"no such name \(NXDOMAIN\)") as info:
        client.addresses("nothing.test")
    assert not info.value.unanswered
    dns_server.silent = True
    t0 = time.monotonic()
    with pytest.raises(ResolveError, match="no answer from the resolver") as info:
        client.addresses("svc.test")
    assert info.value.unanswered
    # A dead resolver is asked once per name, not once per record type.
    assert time.monotonic() - t0 < 4.0


@pytest.mark.parametrize("additional", [True, False])
def test_srv_targets_with_or_without_the_additional_section(dns_server, additional):
    dns_server.additional = additional
    dns_server.set("_db._tcp.svc.test", "SRV", ["10 1 9001 a.svc.test.", "20 3 9002 b.svc.test.",
                                                "10 1 0 ."], ttl=20)
    dns_server.set("a.svc.test", "A", ["127.0.0.4"], ttl=20)
    dns_server.set("b.svc.test", "A", ["127.0.0.5"], ttl=5)
    records, ttl = DnsClient(("127.0.0.1", dns_server.port)).srv("_db._tcp.svc.test")
    # "." is a target that says "not here": left out.
    assert sorted(records) == [(10, 1, 9001, "a.svc.test", ["127.0.0.4"]),
                               (20, 3, 9002, "b.svc.test", ["127.0.0.5"])]
    assert 3 < ttl <= 5      # the least of the SRV records' and the targets'
    asked_targets = dns_server.asked("a.svc.test", "A")
    assert asked_targets == (0 if additional else 1)


def test_srv_spec_becomes_one_upstream_per_target_address(dns_server):
    dns_server.set("_db._tcp.svc.test", "SRV", ["10 1 9001 a.svc.test.", "10 3 9002 b.svc.test.",
                                                "30 1 9003 c.svc.test."])
    dns_server.set("a.svc.test", "A", ["127.0.0.4"])
    dns_server.set("b.svc.test", "A", ["127.0.0.5", "127.0.0.6"])
    dns_server.set("c.svc.test", "AAAA", ["::1"])
    spec = parse_upstream("srv:_db._tcp.svc.test,max-connections=7")
    r = first_resolution(spec, DnsClient(("127.0.0.1", dns_server.port)), (0.1, 5.0), frozenset())
    got = sorted((t.upstream.address, t.upstream.weight, t.upstream.backup, t.upstream.max_connections)
                 for t in r.targets)
    assert got == [("127.0.0.4:9001", 1, False, 7), ("127.0.0.5:9002", 3, False, 7),
                   ("127.0.0.6:9002", 3, False, 7), ("[::1]:9003", 1, True, 7)]


def test_srv_weights_fit_the_group_and_keep_their_ratios():
    assert _srv_weights([1, 3, 0]) == [1, 3, 1]
    assert _srv_weights([100, 256]) == [100, 256]
    assert _srv_weights([1000, 3000, 65535]) == [4, 12, 256]


def test_schedule_clamps_the_ttl_and_backs_off_while_failing():
    r = Resolution(Upstream("svc.test:80"), "dns", (), ttl=0.0)
    r.schedule((1.0, 300.0), 0.0)
    assert r.due == 1.0            # TTL 0 (Consul's default): never more often than MIN
    r.ttl = 3600.0
    r.schedule((1.0, 300.0), 0.0)
    assert r.due == 300.0          # never later than MAX
    r.failing = 4
    r.schedule((1.0, 300.0), 0.0)
    assert r.due == 8.0            # 1, 2, 4, 8 s after failures in a row


def test_names_the_hosts_file_knows_stay_the_systems(dns_server, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.7 app.internal app # comment\n")
    from fastproxy.discovery import hosts_names
    names = hosts_names(str(hosts))
    assert names == {"localhost", "app.internal", "app"}
    client = DnsClient(("127.0.0.1", dns_server.port))
    r = first_resolution(Upstream("localhost:80"), client, (1.0, 5.0), names)
    assert r.kind == "system" and not r.dynamic
    assert [t.upstream.address for t in r.targets] == ["localhost:80"]
    assert dns_server.queries == Counter()   # DNS was not asked


# ---- options

@pytest.mark.parametrize("text, expected", [("1s-5m", (1.0, 300.0)), ("2s", (2.0, 2.0)),
                                            ("500ms-500ms", (0.5, 0.5)), (3, (3.0, 3.0))])
def test_resolve_interval_forms(text, expected):
    assert parse_resolve_interval(text, "resolve_interval") == expected


@pytest.mark.parametrize("argv, shown", [
    (["--resolver", "localhost:53"], "localhost:53"),
    (["--resolver", "127.0.0.1:0"], "127.0.0.1:0"),
    (["--resolve-interval", "5m-1s"], "5m-1s"),
    (["--resolve-interval", "soon"], "soon"),
    (["--upstream", "srv:_x._tcp.svc.test@3"], "srv:_x._tcp.svc.test@3"),
    (["--upstream", "srv:bad..name"], "srv:bad..name"),
])
def test_bad_dns_options_are_one_line_errors(argv, shown):
    if "--upstream" not in argv:
        argv = argv + ["--upstream", "127.0.0.1:9"]
    assert_one_line_error(*run_cli(["--listen", "127.0.0.1:0"] + argv), shown)


def test_name_no_one_knows_is_a_start_error_naming_it(make_proxy_any, dns_server):
    with pytest.raises(ConfigError, match=r"nothing\.test:80.*does not resolve.*NXDOMAIN"):
        make_proxy_any("nothing.test:80", resolver=dns_server.addr)
    with pytest.raises(ConfigError, match=r"srv:_x\._tcp\.nothing\.test.*does not resolve.*NXDOMAIN"):
        make_proxy_any("srv:_x._tcp.nothing.test", resolver=dns_server.addr)


# ---- the proxy follows DNS

def test_changed_answer_moves_new_clients_and_live_bridges_finish(engine, make_proxy, dns_server):
    stack, (old, new) = _same_port(lambda h, port: VerifyingServer(h, port), ["127.0.0.2", "127.0.0.3"])
    with stack:
        port = old.port
        dns_server.set("svc.test", "A", ["127.0.0.2"], ttl=1)
        p = make_proxy("svc.test:%d" % port, resolver=dns_server.addr, resolve_interval=FAST)
        assert list(p.stats()["upstreams"]) == ["127.0.0.2:%d" % port]
        # 100 bridges streaming both ways for a few seconds, all to the old address.
        load = StreamLoad(p.address, n=100, up_len=(64 << 10, 128 << 10), down_len=(64 << 10, 128 << 10),
                          max_pause=0.4, max_chunk=32 << 10, seed=15, server=old).start()
        assert wait_for(lambda: old.active >= 50, 10), old.active
        dns_server.set("svc.test", "A", ["127.0.0.3"], ttl=1)
        # Asked again once the TTL ran out: the new address takes over.
        assert wait_for(lambda: _up(p, "127.0.0.3:%d" % port) is not None, 1.0 + 3.0), p.stats()
        assert load.active() > 0, "the load ended before the swap: it proves nothing"
        later = StreamLoad(p.address, n=20, up_len=4096, down_len=4096, max_pause=0.05, seed=16,
                           server=new).start()
        later.assert_all_ok(30)
        # Every bridge made before the change finished, byte for byte.
        load.assert_all_ok(60)
        assert all(c.seed in old.by_seed for c in load.conns)
        assert not any(c.seed in old.by_seed for c in later.conns)
        assert all(c.seed in new.by_seed for c in later.conns)
        st = p.stats()
        assert st["resolution"]["svc.test:%d" % port]["changes"] == 1
        assert st["resolution"]["svc.test:%d" % port]["upstreams"] == ["127.0.0.3:%d" % port]
        # The removed address shows while its bridges live, and goes after.
        assert wait_for(lambda: _up(p, "127.0.0.2:%d" % port) is None, 5), p.stats()["upstreams"]
        assert p.stats()["accepted"] == 120


def test_added_address_takes_new_clients_and_counters_carry_over(make_proxy_any, dns_server):
    stack, (a, b) = _tags(["127.0.0.2", "127.0.0.3"])
    with stack:
        dns_server.set("svc.test", "A", ["127.0.0.2"], ttl=1)
        # One worker: its round robin cursor alone decides, exactly.
        p = make_proxy_any("svc.test:%d" % a.port, resolver=dns_server.addr, resolve_interval=FAST, workers=1)
        for _ in range(4):
            assert tag_of(p.address) == b"127.0.0.2"
        held = socket.create_connection(p.address, timeout=5)   # a bridge on the first group
        try:
            assert held.recv(64).startswith(b"127.0.0.2")
            dns_server.set("svc.test", "A", ["127.0.0.2", "127.0.0.3"], ttl=1)
            assert wait_for(lambda: _up(p, "127.0.0.3:%d" % a.port) is not None, 4), p.stats()
            tags = Counter(tag_of(p.address) for _ in range(20))
            assert tags == {b"127.0.0.2": 10, b"127.0.0.3": 10}
            key = "127.0.0.2:%d" % a.port
            # The last tagged clients' bridges end once the proxy has read
            # their close: "active" may lag the client by a moment.
            assert wait_for(lambda: p.stats()["upstreams"][key]["active"] == 1, 5), p.stats()["upstreams"][key]
            up = p.stats()["upstreams"][key]
            # 5 before the swap (in the retired group) + 10 after: never backwards.
            assert up["accepted"] == 15 and up["active"] == 1
        finally:
            held.close()
        assert wait_for(lambda: p.stats()["upstreams"]["127.0.0.2:%d" % a.port]["active"] == 0, 5)
        # The retired group's figures stay counted once its last bridge closed.
        time.sleep(0.3)
        assert p.stats()["upstreams"]["127.0.0.2:%d" % a.port]["accepted"] == 15


def test_srv_change_moves_traffic_by_weight_and_priorities_are_backups(make_proxy_any, dns_server):
    with TagServer("a") as a, TagServer("b") as b, TagServer("c") as c:
        def srv(wa, wb):
            dns_server.set("_t._tcp.svc.test", "SRV", ["10 %d %d a.svc.test." % (wa, a.port),
                                                       "10 %d %d b.svc.test." % (wb, b.port),
                                                       "20 1 %d c.svc.test." % c.port], ttl=1)
        for name in "abc":
            dns_server.set("%s.svc.test" % name, "A", ["127.0.0.1"], ttl=1)
        srv(1, 3)
        p = make_proxy_any("srv:_t._tcp.svc.test", resolver=dns_server.addr, resolve_interval=FAST,
                           max_fails=1, fail_timeout="30s", workers=1)
        assert Counter(tag_of(p.address) for _ in range(40)) == {b"a": 10, b"b": 30}
        srv(3, 1)
        assert wait_for(lambda: p.stats()["resolution"]["srv:_t._tcp.svc.test"]["changes"] == 1, 4)
        assert Counter(tag_of(p.address) for _ in range(40)) == {b"a": 30, b"b": 10}
        # Priority 20 is a backup: it gets clients only when priority 10 has none to give.
        a.stop_listening()
        b.stop_listening()
        assert Counter(tag_of(p.address) for _ in range(6)) == {b"c": 6}


def test_dead_resolver_keeps_the_last_answer_and_says_so(make_proxy_any, dns_server, caplog):
    caplog.set_level(logging.INFO, logger="fastproxy")
    with TagServer("127.0.0.2", host="127.0.0.2") as srv:
        dns_server.set("svc.test", "A", ["127.0.0.2"], ttl=1)
        name = "svc.test:%d" % srv.port
        p = make_proxy_any(name, resolver=dns_server.addr, resolve_interval=FAST)
        dns_server.silent = True
        assert wait_for(lambda: p.stats()["resolution"][name]["failing"] >= 1, 8), p.stats()["resolution"]
        r = p.stats()["resolution"][name]
        assert r["error"] == "no answer from the resolver within 2s"
        assert r["upstreams"] == ["127.0.0.2:%d" % srv.port]
        assert tag_of(p.address) == b"127.0.0.2"      # still served from the last answer
        assert wait_for(lambda: p.stats()["resolution"][name]["age"] > 2.5, 8)
        warned = [rec for rec in caplog.records if "keeping its last answer" in rec.getMessage()]
        assert len(warned) == 1, [rec.getMessage() for rec in warned]
        assert name in warned[0].getMessage()
        dns_server.silent = False
        assert wait_for(lambda: p.stats()["resolution"][name]["failing"] == 0, 10), p.stats()["resolution"]
        r = p.stats()["resolution"][name]
        assert r["error"] is None and r["failures"] >= 1 and r["age"] < 2
        assert any("resolves again" in rec.getMessage() for rec in caplog.records)


def test_health_checks_follow_the_swapped_group(make_proxy_any, dns_server):
    stack, (live,) = _tags(["127.0.0.2"])
    with stack:
        port = live.port
        dns_server.set("svc.test", "A", ["127.0.0.2"], ttl=1)
        p = make_proxy_any("svc.test:%d" % port, resolver=dns_server.addr, resolve_interval=FAST,
                           health_interval="100ms", health_rise=1, health_fall=1)
        # An address where nothing listens joins: only a checker of the new group finds it down.
        dns_server.set("svc.test", "A", ["127.0.0.2", "127.0.0.9"], ttl=1)
        dead = "127.0.0.9:%d" % port
        assert wait_for(lambda: (_up(p, dead) or {}).get("health") == "down", 5), p.stats()["upstreams"]
        assert _up(p, "127.0.0.2:%d" % port)["health"] == "up"
        assert Counter(tag_of(p.address) for _ in range(6)) == {b"127.0.0.2": 6}


def test_run_time_settings_survive_a_swap(make_proxy_any, dns_server):
    stack, (a, b) = _tags(["127.0.0.2", "127.0.0.3"])
    with stack:
        dns_server.set("svc.test", "A", ["127.0.0.2", "127.0.0.3"], ttl=1)
        p = make_proxy_any("svc.test:%d" % a.port, resolver=dns_server.addr, resolve_interval=FAST)
        p.upstream("127.0.0.2:%d" % a.port).drain()
        dns_server.set("svc.test", "A", ["127.0.0.2", "127.0.0.3", "127.0.0.4"], ttl=1)
        assert wait_for(lambda: _up(p, "127.0.0.4:%d" % a.port) is not None, 4)
        assert _up(p, "127.0.0.2:%d" % a.port)["admin"] == "drain"


def test_names_in_the_hosts_file_are_not_asked_of_dns(make_proxy_any, dns_server, echo_server):
    p = make_proxy_any("localhost:%d" % echo_server.port, resolver=dns_server.addr)
    st = p.stats()
    assert list(st["upstreams"]) == ["localhost:%d" % echo_server.port]
    assert "resolution" not in st
    assert dns_server.queries == Counter()


def test_resolution_metrics(make_proxy_any, dns_server):
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    from fastproxy.metrics import make_registry, render
    with TagServer("x") as srv:
        dns_server.set("svc.test", "A", ["127.0.0.1"], ttl=1)
        p = make_proxy_any("svc.test:%d" % srv.port, resolver=dns_server.addr, resolve_interval=FAST)
        text = render(make_registry(p.stats, process=False)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {"listener": "127.0.0.1:0", "route": "", "name": "svc.test:%d" % srv.port}
    for fam, value in (("fastproxy_resolution_upstreams", 1), ("fastproxy_resolution_failing", 0),
                       ("fastproxy_resolution_failures", 0), ("fastproxy_resolution_changes", 0)):
        samples = [s for s in families[fam].samples if s.labels == labels and not s.name.endswith("_created")]
        assert [s.value for s in samples] == [value], (fam, families[fam].samples)
    (age,) = families["fastproxy_resolution_age_seconds"].samples
    assert 0 <= age.value < 5


def test_without_dnspython_names_are_the_systems(monkeypatch, dns_server):
    """A wheel installed without its dependencies still resolves names, once,
    through the system; only srv: needs DNS."""
    import fastproxy.discovery as discovery
    monkeypatch.setattr(discovery, "HAVE_DNSPYTHON", False)
    dns_server.set("sys.test", "A", ["127.0.0.9"])   # not asked: no dnspython
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kw):
        if host != "sys.test":
            return real(host, port, *args, **kw)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.8", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    client = DnsClient(("127.0.0.1", dns_server.port))
    r = first_resolution(Upstream("sys.test:80"), client, (1.0, 5.0), frozenset())
    assert r.kind == "system" and r.targets[0].addresses == ((socket.AF_INET, ("127.0.0.8", 80)),)
    assert dns_server.queries == Counter()
    with pytest.raises(ConfigError, match="dnspython is not installed"):
        first_resolution(parse_upstream("srv:_x._tcp.svc.test"), client, (1.0, 5.0), frozenset())


def test_resolver_thread_runs_only_for_names_and_a_reload_keeps_following(make_proxy_any, dns_server,
                                                                          echo_server):
    import threading
    p = make_proxy_any("127.0.0.1:%d" % echo_server.port)
    assert "fastproxy-resolver" not in {t.name for t in threading.enumerate()}
    stack, (a, b) = _tags(["127.0.0.2", "127.0.0.3"])
    with stack:
        dns_server.set("svc.test", "A", ["127.0.0.2"], ttl=1)
        # A reload that brings the first name starts the thread; the new
        # listener block follows DNS from then on.
        p.reload({"resolver": dns_server.addr, "resolve_interval": FAST,
                  "listeners": [{"listen": "%s:%d" % p.address, "upstreams": ["svc.test:%d" % a.port]}]})
        assert "fastproxy-resolver" in {t.name for t in threading.enumerate()}
        assert tag_of(p.address) == b"127.0.0.2"
        dns_server.set("svc.test", "A", ["127.0.0.3"], ttl=1)
        assert wait_for(lambda: _up(p, "127.0.0.3:%d" % a.port) is not None, 4), p.stats()
        assert tag_of(p.address) == b"127.0.0.3"


def test_health_verdicts_carry_over_a_swap(make_proxy_any, dns_server):
    stack, (a, b) = _tags(["127.0.0.2", "127.0.0.3"])
    with stack:
        sick = {"127.0.0.3"}
        dns_server.set("svc.test", "A", ["127.0.0.2", "127.0.0.3"], ttl=1)
        # Coming back takes 50 passed checks (5 s): a verdict not carried
        # into the new group would show "up" at once.
        p = make_proxy_any("svc.test:%d" % a.port, resolver=dns_server.addr, resolve_interval=FAST,
                           health_interval="100ms", health_rise=50, health_fall=1,
                           health_check=lambda host, port: host not in sick)
        down = "127.0.0.3:%d" % a.port
        assert wait_for(lambda: _up(p, down)["health"] == "down", 5), p.stats()["upstreams"]
        sick.clear()
        dns_server.set("svc.test", "A", ["127.0.0.2", "127.0.0.3", "127.0.0.4"], ttl=1)
        assert wait_for(lambda: _up(p, "127.0.0.4:%d" % a.port) is not None, 4)
        for _ in range(10):
            assert _up(p, down)["health"] == "down", p.stats()["upstreams"]
            time.sleep(0.05)


def test_a_routes_upstreams_follow_dns(make_proxy_any, dns_server):
    """A route of a route = "sni" listener whose upstream is a name (here
    srv:) follows its answers as the listener's own group does."""
    pytest.importorskip("cryptography")
    from support.tls import Certificate, TlsServer, tls_connect, who
    cert = Certificate()
    with TlsServer(cert, "A") as a, TlsServer(cert, "B") as b:
        dns_server.set("_tls._tcp.svc.test", "SRV", ["10 1 %d t.svc.test." % a.port], ttl=1)
        dns_server.set("t.svc.test", "A", ["127.0.0.1"], ttl=1)
        p = make_proxy_any(route="sni", resolver=dns_server.addr, resolve_interval=FAST,
                           routes=[{"server_names": ["a.example"], "upstreams": ["srv:_tls._tcp.svc.test"],
                                    "name": "web"}])
        assert who(cert, p.address, "a.example") == "A"
        held, line = tls_connect(cert, p.address, "a.example")
        try:
            assert line.startswith("A")
            dns_server.set("_tls._tcp.svc.test", "SRV", ["10 1 %d t.svc.test." % b.port], ttl=1)
            route = lambda: p.stats()["routes"]["web"]   # noqa: E731
            assert wait_for(lambda: "127.0.0.1:%d" % b.port in route()["upstreams"], 4), route()
            assert who(cert, p.address, "a.example") == "B"
            # The old target shows while the held bridge lives, with its count carried.
            assert route()["upstreams"]["127.0.0.1:%d" % a.port]["accepted"] == 2
            assert route()["resolution"]["srv:_tls._tcp.svc.test"]["changes"] == 1
        finally:
            held.close()
        assert wait_for(lambda: "127.0.0.1:%d" % a.port not in route()["upstreams"], 5), route()
