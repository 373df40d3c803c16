"""The stats endpoint (stats=ADDR): /metrics, /stats, the status page, its
guards (slow clients, big bodies, bad requests) and that scraping never
disturbs the bridges."""
import gc
import html
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastproxy import Config, ConfigError, Proxy, metrics, reasons, statsserver
from fastproxy.statuspage import status_page
from fastproxy.view import build_view
from support.cli import assert_one_line_error, run_cli
from support.servers import EchoServer, Servers
from support.sockets import connect, echo_roundtrip, free_port, recv_until_eof
from support.traffic import StreamLoad, VerifyingServer
from support.waits import stop_bounded, wait_for

KiB = 1024


def get(proxy, path, timeout=5.0):
    """(status, headers, body) of GET path on proxy's stats endpoint."""
    host, port = proxy.stats_address
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


def raw(address, data, timeout=5.0):
    """Send raw bytes, read the answer until the server closes."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def samples(text):
    """{(sample name, sorted label items): value} of a /metrics page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found, name, **labels):
    return found[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def stats_proxy(engine):
    made = []

    def make(upstream, **kw):
        kw.setdefault("stats", "127.0.0.1:0")
        if upstream is not None:
            kw["upstream"] = upstream
        p = Proxy(listen="127.0.0.1:0", engine=engine, **kw).start()
        made.append(p)
        return p

    yield make
    for p in made:
        stop_bounded(p, timeout=2.0, limit=20.0)


def test_metrics_count_known_traffic_on_two_listeners(engine):
    """10 bridges to upstream A through listener "web", 5 clients refused by
    a deny rule on listener "locked": /metrics says exactly that."""
    with EchoServer() as echo_a, EchoServer() as echo_b:
        web = Config.build(listen=f"127.0.0.1:{free_port()}", name="web", upstreams=[echo_a.addr],
                           engine=engine, workers=2, stats="127.0.0.1:0")
        locked = Config.build(listen=f"127.0.0.1:{free_port()}", name="locked", upstreams=[echo_b.addr],
                              engine=engine, workers=2, deny=["127.0.0.0/8"], stats="127.0.0.1:0")
        p = Proxy.from_config([web, locked]).start()
        try:
            sent = 0
            for i in range(10):
                msg = b"x" * (100 + i)
                assert echo_roundtrip(p.addresses["web"], msg) == msg
                sent += len(msg)
            for _ in range(5):
                c = connect(p.addresses["locked"])
                assert recv_until_eof(c) == b""
                c.close()
            assert wait_for(lambda: p.stats()["listeners"]["web"]["active"] == 0
                            and p.stats()["listeners"]["locked"]["denied"] == 5, 5), p.stats()
            status, headers, body = get(p, "/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain")
            found = samples(body.decode())
            a, b = echo_a.addr, echo_b.addr
            assert value(found, "fastproxy_bridges_total", listener="web") == 10
            assert value(found, "fastproxy_bridges_active", listener="web") == 0
            assert value(found, "fastproxy_upstream_bridges_total", listener="web", route="", upstream=a) == 10
            assert value(found, "fastproxy_upstream_bytes_total", listener="web", route="", upstream=a, direction="up") == sent
            assert value(found, "fastproxy_upstream_bytes_total", listener="web", route="", upstream=a,
                         direction="down") == sent
            assert value(found, "fastproxy_bytes_total", listener="web", direction="up") == sent
            assert value(found, "fastproxy_upstream_state", listener="web", route="", upstream=a, state="up") == 1
            assert value(found, "fastproxy_upstream_state", listener="web", route="", upstream=a, state="down") == 0
            assert value(found, "fastproxy_upstream_health_up", listener="web", route="", upstream=a) == 1
            assert value(found, "fastproxy_bridges_total", listener="locked") == 5
            assert value(found, "fastproxy_upstream_bridges_total", listener="locked", route="", upstream=b) == 0
            for reason in ("limit", "queue_timeout", "rate_limit", "time_window", "proxy_header", "hook"):
                assert value(found, "fastproxy_refused_total", listener="locked", reason=reason) == 0
                assert value(found, "fastproxy_refused_total", listener="web", reason=reason) == 0
            assert value(found, "fastproxy_refused_total", listener="locked", reason="deny") == 5
            assert value(found, "fastproxy_refused_total", listener="web", reason="deny") == 0
            assert value(found, "fastproxy_listeners") == 2
            assert value(found, "fastproxy_workers") == 2
            # The workers accepted 15 clients between them, and looped.
            accepts = sum(value(found, "fastproxy_worker_accept_calls_total", worker=str(i)) for i in range(2))
            assert accepts >= 15
            assert sum(value(found, "fastproxy_worker_loop_iterations_total", worker=str(i))
                       for i in range(2)) > 0
            assert ("process_cpu_seconds_total", ()) in found
            # Histograms, when the data plane has them (another branch adds them).
            if "histograms" in p.stats()["listeners"]["web"]:
                assert value(found, "fastproxy_bridge_duration_seconds_count", listener="web") == 10
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)


def test_hook_refusals_and_calls_are_counted(stats_proxy, echo_server):
    p = stats_proxy(echo_server.addr, on_connect=lambda conn: False)
    for _ in range(4):
        c = connect(p.address)
        recv_until_eof(c)
        c.close()
    name = p.config.name
    assert wait_for(lambda: p.stats()["listeners"][name]["hook_refused"] == 4, 5), p.stats()
    found = samples(get(p, "/metrics")[2].decode())
    assert value(found, "fastproxy_refused_total", listener=name, reason="hook") == 4
    assert value(found, "fastproxy_hook_calls_total", listener=name) == 4


def test_histograms_render_cumulative_buckets():
    stats = {"listeners": {"web": {"accepted": 3, "upstreams": {}, "histograms": {
        "connect_seconds": {"bounds": [0.001, 0.01, float("inf")], "counts": [2, 0, 1], "sum": 0.5, "count": 3},
    }}}, "workers": []}
    registry = metrics.make_registry(lambda: stats, process=False)
    found = samples(metrics.render(registry).decode())
    assert value(found, "fastproxy_connect_seconds_bucket", listener="web", le="0.001") == 2
    assert value(found, "fastproxy_connect_seconds_bucket", listener="web", le="0.01") == 2
    assert value(found, "fastproxy_connect_seconds_bucket", listener="web", le="+Inf") == 3
    assert value(found, "fastproxy_connect_seconds_sum", listener="web") == 0.5
    assert value(found, "fastproxy_connect_seconds_count", listener="web") == 3
    # Absent: no family at all, and no error.
    assert not any(k[0].startswith("fastproxy_bridge_duration_seconds") for k in found)


def test_unknown_upstream_state_gets_its_series():
    stats = {"listeners": {"web": {"upstreams": {"a:1": {"state": "stuck", "health": "up"}}}}}
    found = samples(metrics.render(metrics.make_registry(lambda: stats, process=False)).decode())
    assert value(found, "fastproxy_upstream_state", listener="web", route="", upstream="a:1", state="stuck") == 1
    assert value(found, "fastproxy_upstream_state", listener="web", route="", upstream="a:1", state="up") == 0


def test_every_upstream_state_has_its_series_always(stats_proxy, echo_server):
    # One series per known state, 1 for the current one, whatever it is: an
    # alert on state="maint" must not see its series come and go.
    p = stats_proxy(echo_server.addr, stats_admin=True)
    name = p.config.name
    for state in (None, "maint", "drain", "ready"):
        if state is not None:
            getattr(p.upstream(echo_server.addr, listener=name), state)()
        found = samples(get(p, "/metrics")[2].decode())
        series = {dict(k[1])["state"]: v for k, v in found.items()
                  if k[0] == "fastproxy_upstream_state" and ("upstream", echo_server.addr) in k[1]}
        now = p.stats()["upstreams"][echo_server.addr]["state"]
        assert set(series) == {"up", "down", "drained", "maint"}, series
        assert series == {s: float(s == now) for s in series}, (state, series)


def test_stats_json_equals_proxy_stats(stats_proxy, echo_server):
    p = stats_proxy(echo_server.addr)
    for i in range(3):
        assert echo_roundtrip(p.address, b"hello %d" % i) == b"hello %d" % i
    assert wait_for(lambda: p.stats()["active"] == 0, 5)
    status, headers, body = get(p, "/stats")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    # Strict JSON (RFC 8259), as JavaScript's or Go's parser reads it: no
    # Infinity or NaN. A histogram's +Inf bound is null there.
    def refuse(word):
        raise AssertionError(f"/stats has {word}, which is not JSON")

    served = json.loads(body, parse_constant=refuse)
    expected = json.loads(json.dumps(p.stats()))
    for h in expected["listeners"][p.config.name]["histograms"].values():
        assert h["bounds"][-1] == float("inf")
        h["bounds"][-1] = None
    for h in expected["histograms"].values():
        h["bounds"][-1] = None
    assert served == expected
    assert served["listeners"][p.config.name]["accepted"] == 3
    assert len(served["workers"]) == p.workers


def test_status_page_has_a_row_per_upstream(engine):
    with Servers(names=["A", "B", "C"]) as srv:
        p = Proxy(listen="127.0.0.1:0", upstreams=[srv["A"].addr, srv["B"].addr + "@3", srv["C"].addr],
                  engine=engine, stats="127.0.0.1:0").start()
        try:
            status, headers, body = get(p, "/")
            assert status == 200 and headers["content-type"].startswith("text/html")
            page = body.decode()
            for name in ("A", "B", "C"):
                assert page.count(f'data-upstream="{srv[name].addr}"') == 1, page
            assert f'data-upstream="{srv["B"].addr}" data-weight="3"' in page
            # The weight shown is the run-time one, read from the figures.
            p.upstream(srv["B"].addr).set_weight(7)
            page = get(p, "/")[2].decode()
            assert f'data-upstream="{srv["B"].addr}" data-weight="7"' in page
            assert page.count('class="listener"') == 1
            assert '<script src="/static/status.js">' in page
            status, headers, js = get(p, "/static/status.js")
            # The script refreshes by fetching the page itself and swapping in
            # its listeners: one renderer, so a refresh shows what a reload shows.
            assert status == 200 and headers["content-type"].startswith("text/javascript")
            assert b"fetch(window.location.pathname" in js and b'getElementById("listeners")' in js
            assert '<main id="listeners">' in page
            status, _, css = get(p, "/static/status.css")
            assert status == 200 and b"state-up" in css
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)


def _tally(page, cls):
    """(sum, title) of the summary's refused or lost span."""
    m = re.search(r'<span class="%s" title="([^"]*)"[^>]*>(\d+)</span>' % cls, page)
    assert m, page
    return int(m.group(2)), html.unescape(m.group(1))


@pytest.mark.parametrize("key", [k for _, k in reasons.REFUSAL_REASONS] + list(reasons.LOSSES))
def test_every_view_counts_a_reason_the_same_way(key):
    """One counter set to 3 on a routing listener: the status page, `top`'s
    view and /metrics agree on whether it is a refusal or a loss."""
    fig = {"upstreams": {}, "routes": {"r": {"upstreams": {}}}, key: 3}
    page = status_page({"listeners": {"web": fig}}).decode()
    refused, lost = _tally(page, "refused"), _tally(page, "lost")
    lv = build_view({"listeners": {"web": fig}}).listeners[0]
    found = samples(metrics.render(metrics.make_registry(lambda: {"listeners": {"web": fig}},
                                                        process=False)).decode())
    by_metrics = sum(v for (name, labels), v in found.items() if name == "fastproxy_refused_total")
    if key in reasons.LOSSES:
        assert lost == (3, f"{key} 3") and refused == (0, "")
        assert dict(lv.losses)[key] == 3 and sum(v for _, v in lv.refusals) == 0
        assert by_metrics == 0
    else:
        assert refused == (3, f"{key} 3") and lost == (0, "")
        assert dict(lv.refusals)[key] == 3 and sum(v for _, v in lv.losses) == 0
        assert by_metrics == 3


def test_route_counters_show_only_on_a_routing_listener():
    fig = {"upstreams": {}, "route_refused": 2, "route_aborted": 1, "denied": 1}
    page = status_page({"listeners": {"web": fig}}).decode()
    assert _tally(page, "refused") == (1, "denied 1") and _tally(page, "lost") == (0, "")
    assert "data-route-refused" not in page
    lv = build_view({"listeners": {"web": fig}}).listeners[0]
    assert "route_refused" not in dict(lv.refusals) and "route_aborted" not in dict(lv.losses)


def test_status_page_rows_for_route_groups_and_routed_bridges():
    up = {"state": "up", "health": "up", "active": 1, "accepted": 4, "bytes_upstream": 2048,
          "bytes_downstream": 0, "connect_failures": 0}
    fig = {"upstreams": {"d:1": dict(up, accepted=1)}, "accepted": 7, "no_memory": 2, "fd_exhausted": 1,
           "routes": {"a.example": {"upstreams": {"a:1": up}}, "bees": {"upstreams": {"b:1": dict(up, state="down")}}},
           "routed": dict(up, accepted=2)}
    page = status_page({"listeners": {"tls": fig}}).decode()
    names = re.findall(r'<td class="name">([^<]*)</td>', page)
    assert names == ["d:1", "a.example/a:1", "bees/b:1", "(routed)", "listener total"]
    assert '<tr class="upstream" data-route="bees" data-upstream="b:1"' in page
    assert 'state-down">down<' in page
    assert _tally(page, "lost") == (3, "fd_exhausted 1, no_memory 2")
    # No routed row when on_connect routed nothing.
    fig["routed"] = dict(up, accepted=0, active=0)
    assert "(routed)" not in status_page({"listeners": {"tls": fig}}).decode()


def test_connect_failures_count_tries_per_upstream_and_clients_per_listener(stats_proxy, echo_server):
    # The listener's figure is the clients no upstream took (CONNECT_FAILED);
    # each failed try counts on its upstream: a retry that the other
    # upstream served is in the second and not the first.
    dead = f"127.0.0.1:{free_port()}"
    p = stats_proxy(None, upstreams=[echo_server.addr, dead], workers=1, max_fails=0)
    for i in range(4):
        assert echo_roundtrip(p.address, b"hi %d" % i) == b"hi %d" % i
    name = p.config.name
    found = samples(get(p, "/metrics")[2].decode())
    assert value(found, "fastproxy_connect_failures_total", listener=name) == 0
    assert value(found, "fastproxy_upstream_connect_failures_total", listener=name, route="", upstream=dead) == 2
    page = get(p, "/")[2].decode()
    total = re.search(r'<tr class="total">.*?</tr>', page).group(0)
    assert re.search(r'<td class="num failures" title="clients no upstream took[^"]*">0</td>', total), total
    row = re.search(rf'<tr class="upstream" data-upstream="{re.escape(dead)}".*?</tr>', page).group(0)
    assert '<td class="num failures">2</td>' in row, row
    # With no upstream to take them, each client counts once on the listener.
    q = stats_proxy(dead, retries=0, max_fails=0)
    for _ in range(3):
        # CONNECT_FAILED resets the client: on loopback even before its
        # connect() returns, at times.
        with pytest.raises(ConnectionResetError):
            with connect(q.address) as c:
                recv_until_eof(c)
    assert wait_for(lambda: q.stats()["connect_failures"] == 3, 5), q.stats()
    found = samples(get(q, "/metrics")[2].decode())
    assert value(found, "fastproxy_connect_failures_total", listener=q.config.name) == 3
    assert value(found, "fastproxy_upstream_connect_failures_total", listener=q.config.name, route="",
                 upstream=dead) == 3


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium here (apt-get install chromium)")
def test_the_page_refreshes_itself_in_a_real_browser(stats_proxy, echo_server, monkeypatch):
    """status.js in Chromium: the second render of the page (where the
    figures have moved) replaces the first in the DOM, and the page says
    it was updated."""
    renders = []

    def render(stats):
        renders.append(1)
        if len(renders) > 1:
            for fig in stats["listeners"].values():
                fig["denied"], fig["no_memory"] = 7, 2
        return status_page(stats)

    monkeypatch.setattr(statsserver, "status_page", render)
    p = stats_proxy(echo_server.addr)
    url = "http://%s:%d/" % p.stats_address
    # Virtual time: the page's 1.5 s timer fires without waiting for it.
    out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2500",
                          "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    assert len(renders) >= 2
    assert re.search(r'<span id="updated">updated [^<]+</span>', out), out
    assert _tally(out, "refused") == (7, "denied 7") and _tally(out, "lost") == (2, "no_memory 2")


def test_unix_socket_stats_address(stats_proxy, echo_server, tmp_path):
    path = str(tmp_path / "stats.sock")
    p = stats_proxy(echo_server.addr, stats="unix:" + path)
    assert p.stats_address == path
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body)["listeners"][p.config.name]["accepted"] == 0
    stop_bounded(p, timeout=2.0, limit=20.0)
    assert not os.path.exists(path)


def test_slow_client_does_not_block_a_scrape(stats_proxy, echo_server, monkeypatch):
    monkeypatch.setattr(statsserver, "HEAD_TIMEOUT", 3.0)
    p = stats_proxy(echo_server.addr)
    slow = socket.create_connection(p.stats_address, timeout=10)
    try:
        done = threading.Event()

        def trickle():
            for byte in b"GET /metrics HTTP/1.1\r\n":
                if done.is_set():
                    return
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(1.0)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        time.sleep(1.5)
        t0 = time.monotonic()
        status, _, _ = get(p, "/metrics", timeout=3)
        assert status == 200 and time.monotonic() - t0 < 2.0
        assert t.is_alive()   # the slow request is still coming
        done.set()
        # The slow head is cut at HEAD_TIMEOUT: 408, then closed.
        slow.settimeout(6)
        answer = b""
        while chunk := slow.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        done.set()
    finally:
        slow.close()


def test_oversized_body_is_413(stats_proxy, echo_server):
    p = stats_proxy(echo_server.addr)
    big = statsserver.MAX_BODY + 1
    out = raw(p.stats_address, b"POST /admin/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % big)
    assert out.startswith(b"HTTP/1.1 413 "), out
    assert b"larger than" in out


def test_malformed_request_line_is_400(stats_proxy, echo_server):
    p = stats_proxy(echo_server.addr)
    out = raw(p.stats_address, b"HELLO\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert b"malformed request line" in out
    out = raw(p.stats_address, b"GET /stats HTTP/1.1\r\nno colon here\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"malformed header line" in out
    out = raw(p.stats_address, b"GET /stats HTTP/2.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 505 "), out
    # Two lengths that differ: which frames the body is ambiguous (smuggling).
    out = raw(p.stats_address, b"POST /admin/bridges/1/close HTTP/1.1\r\nContent-Length: 0\r\n"
                               b"Content-Length: 44\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"two Content-Length headers that differ" in out, out
    # The same length twice is one length (RFC 9112 6.3).
    out = raw(p.stats_address, b"GET /stats HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 "), out[:100]
    # The endpoint still serves.
    assert get(p, "/metrics")[0] == 200


def test_unknown_path_404_and_methods(stats_proxy, echo_server):
    p = stats_proxy(echo_server.addr)
    status, _, body = get(p, "/nothing/here")
    assert status == 404 and json.loads(body)["path"] == "/nothing/here"
    out = raw(p.stats_address, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in out


def test_admin_is_off_unless_asked(stats_proxy, echo_server):
    p = stats_proxy(echo_server.addr)
    status, _, body = get(p, "/admin/upstreams")
    assert status == 403 and "run-time control is off" in json.loads(body)["error"]
    q = stats_proxy(echo_server.addr, stats_admin=True)
    status, _, body = get(q, "/admin/upstreams")
    try:
        import fastproxy.admin  # noqa: F401
    except ImportError:
        assert status == 404 and "run-time control is off" in json.loads(body)["error"]
    else:
        assert status != 500


def test_keep_alive_serves_several_requests_on_one_connection(stats_proxy, echo_server):
    p = stats_proxy(echo_server.addr)
    conn = http.client.HTTPConnection(*p.stats_address, timeout=5)
    try:
        for path in ("/stats", "/metrics", "/stats"):
            conn.request("GET", path)
            r = conn.getresponse()
            assert r.status == 200 and r.getheader("Connection") == "keep-alive"
            r.read()
    finally:
        conn.close()


def test_stats_address_in_use_is_a_config_error(any_engine, echo_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine=any_engine, stats=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError) as info:
            p.start()
        assert str(info.value).startswith("stats: ") and "in use" in str(info.value)
    # Nothing was left serving: the listener's port is free again.
    assert p.stats_address is None


def test_scraping_from_four_threads_loses_no_byte(engine):
    with VerifyingServer() as server:
        p = Proxy(listen="127.0.0.1:0", upstream=server.addr, engine=engine, stats="127.0.0.1:0").start()
        try:
            stop = threading.Event()
            scrapes = [0] * 4
            errors = []

            def scrape(i):
                conn = http.client.HTTPConnection(*p.stats_address, timeout=5)
                try:
                    while not stop.is_set():
                        conn.request("GET", "/metrics" if i % 2 else "/stats")
                        r = conn.getresponse()
                        r.read()
                        if r.status != 200:
                            errors.append(r.status)
                        scrapes[i] += 1
                except Exception as exc:  # reported below
                    errors.append(repr(exc))
                finally:
                    conn.close()

            threads = [threading.Thread(target=scrape, args=(i,), daemon=True) for i in range(4)]
            load = StreamLoad(p.address, n=100, up_len=(0, 128 * KiB), down_len=(0, 128 * KiB), seed=5,
                              max_pause=0.05, server=server).start()
            for t in threads:
                t.start()
            result = load.wait(60)
            stop.set()
            for t in threads:
                t.join(10)
            result.assert_all_ok()
            assert not errors, errors[:5]
            assert min(scrapes) > 0, scrapes
            assert p.stats()["accepted"] == 100
        finally:
            stop_bounded(p, timeout=2.0, limit=20.0)


def test_stop_with_open_connections_is_prompt_and_clean(engine, echo_server):
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine=engine, stats="127.0.0.1:0").start()
    address = p.stats_address
    kept = http.client.HTTPConnection(*address, timeout=5)
    kept.request("GET", "/stats")
    kept.getresponse().read()
    partial = socket.create_connection(address, timeout=5)
    partial.sendall(b"GET /metr")
    try:
        t0 = time.monotonic()
        stop_bounded(p, timeout=2.0, limit=20.0)
        assert time.monotonic() - t0 < 5
        assert p.stats_address is None
        partial.settimeout(5)
        # Closed, not left hanging: FIN, or RST when the server had not
        # read the partial request yet.
        try:
            assert partial.recv(100) == b""
        except ConnectionResetError:
            pass
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
    finally:
        kept.close()
        partial.close()


def test_cli_serves_the_endpoint(cli_proxy, echo_server):
    cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--stats", "127.0.0.1:0")
    m = cp.stderr.wait_line(r"stats endpoint on 127\.0\.0\.1:(\d+)", 5)
    assert m is not None, cp.stderr.text()
    assert echo_roundtrip(cp.address, b"through the cli") == b"through the cli"
    conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=5)
    try:
        assert wait_for(lambda: _accepted(conn) == 1, 5)
    finally:
        conn.close()


def _accepted(conn):
    conn.request("GET", "/metrics")
    found = samples(conn.getresponse().read().decode())
    return sum(v for (name, _), v in found.items() if name == "fastproxy_bridges_total")


def test_cli_bad_stats_address_is_one_line(any_engine, echo_server):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--stats", "nowhere"])
    assert_one_line_error(rc, out, err, "stats", "nowhere")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                                "--stats", f"127.0.0.1:{port}"])
        assert_one_line_error(rc, out, err, "stats", str(port), "in use")


def test_connections_past_the_cap_get_503_and_others_still_served_after(stats_proxy, echo_server, monkeypatch):
    monkeypatch.setattr(statsserver, "MAX_CONNECTIONS", 4)
    p = stats_proxy(echo_server.addr)
    idle = [socket.create_connection(p.stats_address, timeout=5) for _ in range(4)]
    try:
        # The four are registered once the server has accepted them.
        time.sleep(0.3)
        out = raw(p.stats_address, b"GET /stats HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 "), out
    finally:
        for s in idle:
            s.close()
    assert wait_for(lambda: get(p, "/stats")[0] == 200, 5)


WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None   # as if installed without its dependencies
from fastproxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_prometheus_client_the_endpoint_is_one_line(echo_server):
    import subprocess
    import sys

    from support.cli import subprocess_env

    cp = subprocess.run([sys.executable, "-c", WITHOUT_PROMETHEUS, "--listen", "127.0.0.1:0", "--upstream",
                         echo_server.addr, "--stats", "127.0.0.1:0"], capture_output=True, text=True, timeout=30,
                        env=subprocess_env(), stdin=subprocess.DEVNULL)
    assert_one_line_error(cp.returncode, cp.stdout, cp.stderr, "--stats", "prometheus_client")


def test_a_client_accepted_as_the_endpoint_stops_is_closed_at_once():
    # A client the loop accepted in its last round before a stop once got a
    # transport made after Server.close(), which asyncio dropped with its
    # socket open: the client waited for the garbage collector (1 to 4 in
    # 300 stops here with it off). Each client must get its FIN or RST now.
    hung = 0
    collecting = gc.isenabled()
    gc.disable()
    try:
        for i in range(200):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            server = statsserver.StatsServer(sock, stats=dict)
            server.start()
            with socket.create_connection(sock.getsockname()[:2], timeout=2) as c:
                c.sendall(b"GET /metr")
                if i % 3 == 0:
                    time.sleep(0.0005 * (i % 7))   # vary where in the loop's round the stop lands
                server.stop()
                c.settimeout(1)
                try:
                    c.recv(100)
                except ConnectionResetError:
                    pass
                except TimeoutError:
                    hung += 1
    finally:
        if collecting:
            gc.enable()
    assert hung == 0, "%d of 200 clients were left open by a stop" % hung
