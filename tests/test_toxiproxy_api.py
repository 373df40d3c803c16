"""`fastproxy toxiproxy`: toxiproxy's HTTP API, endpoint by endpoint, with
the exact JSON, status codes and error bodies toxiproxy's clients depend on
(toxiproxy's api.go, proxy_collection.go, toxic_collection.go)."""
import http.client
import json
import signal
import socket
import subprocess

import pytest

from fastproxy import Proxy, toxic
from fastproxy.toxiproxy import VERSION, ToxiproxyServer
from support.cli import LineReader, cli_command, subprocess_env
from support.sockets import connect, echo_roundtrip, recv_exact, recv_until_eof, round_trip_ms

ERROR_TYPE = "text/plain; charset=utf-8"


@pytest.fixture
def api(any_engine):
    server = ToxiproxyServer("127.0.0.1", 0, engine=any_engine).start()
    client = Client(server.address)
    try:
        yield client
    finally:
        client.close()
        server.stop()


class Client:
    """One HTTP/1.1 connection to the API, kept alive as toxiproxy's clients do."""

    def __init__(self, address):
        self.address = address
        self.conn = http.client.HTTPConnection(*address, timeout=10)

    def close(self):
        self.conn.close()

    def call(self, method, path, body=None, raw=None, headers=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.conn.request(method, path, body=data, headers=headers or {})
        r = self.conn.getresponse()
        payload = r.read()
        return r.status, r.getheader("Content-Type"), payload

    def json(self, method, path, body=None, expect=200):
        status, _, payload = self.call(method, path, body)
        assert status == expect, (status, payload)
        return json.loads(payload) if payload else None

    def error(self, method, path, body=None, raw=None):
        status, ctype, payload = self.call(method, path, body, raw)
        assert ctype == ERROR_TYPE and payload.endswith(b"\n"), (ctype, payload)
        obj = json.loads(payload)
        assert list(obj) == ["error", "status"] and obj["status"] == status, obj
        return status, obj["error"]


def host_port(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


def test_version(api):
    status, ctype, payload = api.call("GET", "/version")
    assert (status, ctype) == (200, "application/json;charset=utf-8")
    assert payload == b'{"version": "%s"}\n' % VERSION.encode()
    assert VERSION.startswith("2.")


def test_create_show_list_delete_with_exact_json(api, echo_server):
    status, ctype, payload = api.call("POST", "/proxies",
                                      {"name": "echo", "listen": "127.0.0.1:0", "upstream": echo_server.addr})
    assert (status, ctype) == (201, "application/json")
    created = json.loads(payload)
    host, port = host_port(created["listen"])
    assert host == "127.0.0.1" and port > 0   # the real port, as toxiproxy gives it
    assert payload == (b'{"name":"echo","listen":"127.0.0.1:%d","upstream":"%s","enabled":true,"toxics":[]}'
                       % (port, echo_server.addr.encode()))
    assert echo_roundtrip((host, port), b"through") == b"through"
    assert api.json("GET", "/proxies/echo") == created
    api.json("POST", "/proxies", {"name": "another", "upstream": echo_server.addr}, expect=201)
    listing = api.json("GET", "/proxies")
    assert list(listing) == ["another", "echo"] and listing["echo"] == created
    # listen left out: loopback, a free port.
    assert listing["another"]["listen"].startswith("127.0.0.1:")
    status, ctype, payload = api.call("DELETE", "/proxies/echo")
    assert (status, payload) == (204, b"")
    with pytest.raises(ConnectionRefusedError):
        connect((host, port), timeout=2).close()
    assert list(api.json("GET", "/proxies")) == ["another"]


def test_create_errors(api, echo_server):
    assert api.error("POST", "/proxies", {"upstream": echo_server.addr}) == (400, "missing required field: name")
    assert api.error("POST", "/proxies", {"name": "x"}) == (400, "missing required field: upstream")
    status, message = api.error("POST", "/proxies", raw=b"{not json")
    assert status == 400 and message.startswith("bad request body: ")
    status, message = api.error("POST", "/proxies", raw=b"[1, 2]")
    assert status == 400 and message.startswith("bad request body: ")
    status, message = api.error("POST", "/proxies", {"name": 5, "upstream": echo_server.addr})
    assert status == 400 and message.startswith("bad request body: ")
    api.json("POST", "/proxies", {"name": "x", "upstream": echo_server.addr}, expect=201)
    assert api.error("POST", "/proxies", {"name": "x", "upstream": echo_server.addr}) == (409, "proxy already exists")
    status, message = api.error("POST", "/proxies", {"name": "y", "upstream": "no-port"})
    assert status == 400 and "no-port" in message
    # A port in use: toxiproxy answers net.Listen's error, a 500.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        status, message = api.error("POST", "/proxies", {"name": "z", "upstream": echo_server.addr,
                                                         "listen": "127.0.0.1:%d" % taken.getsockname()[1]})
        assert status == 500 and "in use" in message
    assert list(api.json("GET", "/proxies")) == ["x"]
    # The name is checked before the addresses, as toxiproxy's Add does.
    assert api.error("POST", "/proxies", {"name": "x", "upstream": "no-port"}) == (409, "proxy already exists")
    assert api.error("POST", "/proxies", {"name": "x", "upstream": echo_server.addr, "listen": "bad"}) == \
        (409, "proxy already exists")


def test_toxic_checks_in_toxiproxys_order(api, echo_server):
    api.json("POST", "/proxies", {"name": "o", "upstream": echo_server.addr, "enabled": False}, expect=201)
    # The stream is lowercased to parse it (stream.ParseDirection); the
    # default name keeps it as given, as toxiproxy's.
    made = api.json("POST", "/proxies/o/toxics", {"type": "latency", "stream": "UpStream",
                                                  "attributes": {"latency": 1}})
    assert (made["name"], made["stream"]) == ("latency_UpStream", "upstream")
    api.json("POST", "/proxies/o/toxics", {"type": "latency", "attributes": {"latency": 1}})
    # A name taken is 409 before the attributes' values are looked at.
    assert api.error("POST", "/proxies/o/toxics", {"type": "latency", "attributes": {"latency": -5}}) == \
        (409, "toxic already exists")
    assert api.error("POST", "/proxies/o/toxics", {"type": "latency", "toxicity": 7}) == \
        (409, "toxic already exists")
    # ... but after the stream and the type.
    assert api.error("POST", "/proxies/o/toxics", {"type": "latency", "stream": "sideways"})[0] == 400
    assert api.error("POST", "/proxies/o/toxics", {"type": "bogus", "name": "latency_downstream"}) == \
        (400, "invalid toxic type")
    assert [t["name"] for t in api.json("GET", "/proxies/o/toxics")] == ["latency_UpStream", "latency_downstream"]


def test_unknown_proxy_is_404_everywhere(api):
    for method, path in [("GET", "/proxies/nope"), ("POST", "/proxies/nope"), ("PATCH", "/proxies/nope"),
                         ("DELETE", "/proxies/nope"), ("GET", "/proxies/nope/toxics"),
                         ("POST", "/proxies/nope/toxics"), ("GET", "/proxies/nope/toxics/t"),
                         ("POST", "/proxies/nope/toxics/t"), ("DELETE", "/proxies/nope/toxics/t")]:
        assert api.error(method, path, {}) == (404, "proxy not found"), (method, path)


def test_routes_and_methods_toxiproxy_has_not(api):
    status, ctype, payload = api.call("GET", "/nope")
    assert (status, payload) == (404, b"404 page not found\n")
    status, _, _ = api.call("GET", "/proxies/a/toxics/b/c")
    assert status == 404
    status, _, payload = api.call("PUT", "/proxies")
    assert (status, payload) == (405, b"")
    status, _, payload = api.call("DELETE", "/reset")
    assert status == 405
    # Browsers are refused, as toxiproxy does (no web page may drive it).
    status, _, payload = api.call("GET", "/proxies", headers={"User-Agent": "Mozilla/5.0"})
    assert (status, payload) == (403, b"User agent not allowed\n")


def test_update_enable_disable_and_addresses(api, echo_server):
    created = api.json("POST", "/proxies", {"name": "p", "upstream": echo_server.addr}, expect=201)
    address = host_port(created["listen"])
    with connect(address) as live:
        live.sendall(b"abc")
        assert recv_exact(live, 3) == b"abc"
        # Disabled: refused, its connections closed; the listen address kept.
        updated = api.json("POST", "/proxies/p", {"enabled": False})
        assert updated == dict(created, enabled=False)
        assert live.recv(16) == b""
    with pytest.raises(ConnectionRefusedError):
        connect(address, timeout=2).close()
    assert api.json("PATCH", "/proxies/p", {"enabled": True}) == created
    assert echo_roundtrip(address, b"again") == b"again"
    # A new upstream (and listen) restarts it there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        new_port = s.getsockname()[1]
    moved = api.json("POST", "/proxies/p", {"listen": "127.0.0.1:%d" % new_port})
    assert moved["listen"] == "127.0.0.1:%d" % new_port and moved["enabled"] is True
    assert echo_roundtrip(("127.0.0.1", new_port), b"moved") == b"moved"
    with pytest.raises(ConnectionRefusedError):
        connect(address, timeout=2).close()
    status, message = api.error("POST", "/proxies/p", raw=b"{")
    assert status == 400 and message.startswith("bad request body: ")
    status, message = api.error("POST", "/proxies/p", {"enabled": "yes"})
    assert status == 400 and message.startswith("bad request body: ")


def test_created_disabled_does_not_listen(api, echo_server):
    created = api.json("POST", "/proxies", {"name": "off", "upstream": echo_server.addr, "enabled": False},
                       expect=201)
    assert created == {"name": "off", "listen": "127.0.0.1:0", "upstream": echo_server.addr,
                       "enabled": False, "toxics": []}
    on = api.json("POST", "/proxies/off", {"enabled": True})
    assert on["enabled"] is True and host_port(on["listen"])[1] > 0
    assert echo_roundtrip(host_port(on["listen"]), b"on") == b"on"


def test_toxic_json_and_errors_on_a_disabled_proxy(api, echo_server):
    # A proxy created disabled holds toxics without serving: the shapes
    # and errors, whatever the data plane does.
    api.json("POST", "/proxies", {"name": "t", "upstream": echo_server.addr, "enabled": False}, expect=201)
    status, ctype, payload = api.call("POST", "/proxies/t/toxics",
                                      {"type": "latency", "attributes": {"latency": 100, "jitter": 5}})
    assert (status, ctype) == (200, "application/json")   # 200, not 201: as toxiproxy
    assert payload == (b'{"attributes":{"latency":100,"jitter":5},"name":"latency_downstream",'
                       b'"type":"latency","stream":"downstream","toxicity":1}')
    made = api.json("POST", "/proxies/t/toxics",
                    {"name": "slow", "type": "bandwidth", "stream": "upstream", "toxicity": 0.5,
                     "attributes": {"rate": 10, "unknown": 1}})
    assert made == {"attributes": {"rate": 10}, "name": "slow", "type": "bandwidth", "stream": "upstream",
                    "toxicity": 0.5}
    # Upstream toxics first, then downstream, as toxiproxy lists its chains.
    assert [t["name"] for t in api.json("GET", "/proxies/t/toxics")] == ["slow", "latency_downstream"]
    assert api.json("GET", "/proxies/t/toxics/slow") == made
    assert [t["name"] for t in api.json("GET", "/proxies/t")["toxics"]] == ["slow", "latency_downstream"]
    updated = api.json("POST", "/proxies/t/toxics/slow", {"attributes": {"rate": 20}})
    assert updated == dict(made, attributes={"rate": 20})
    updated = api.json("PATCH", "/proxies/t/toxics/slow", {"toxicity": 1.0})
    assert updated == dict(made, attributes={"rate": 20}, toxicity=1)

    assert api.error("POST", "/proxies/t/toxics", {"type": "latency"}) == (409, "toxic already exists")
    assert api.error("POST", "/proxies/t/toxics", {"type": "bogus"}) == (400, "invalid toxic type")
    assert api.error("POST", "/proxies/t/toxics", {"type": "latency", "stream": "sideways"}) == \
        (400, "stream was invalid, can be either upstream or downstream")
    for bad in ({"type": "latency", "name": "n", "attributes": {"latency": "slow"}},
                {"type": "latency", "name": "n", "attributes": {"latency": -1}},
                {"type": "latency", "name": "n", "toxicity": 2},
                {"type": "slicer", "attributes": {"average_size": 10, "size_variation": 20}}):
        status, message = api.error("POST", "/proxies/t/toxics", bad)
        assert status == 400 and message.startswith("bad request body: "), bad
    status, message = api.error("POST", "/proxies/t/toxics", raw=b"nope")
    assert status == 400 and message.startswith("bad request body: ")
    assert api.error("GET", "/proxies/t/toxics/none") == (404, "toxic not found")
    assert api.error("POST", "/proxies/t/toxics/none", {"toxicity": 0.1}) == (404, "toxic not found")
    assert api.error("DELETE", "/proxies/t/toxics/none") == (404, "toxic not found")
    status, message = api.error("POST", "/proxies/t/toxics/slow", {"attributes": {"rate": -5}})
    assert status == 400 and message.startswith("bad request body: ")

    status, _, payload = api.call("DELETE", "/proxies/t/toxics/slow")
    assert (status, payload) == (204, b"")
    assert [t["name"] for t in api.json("GET", "/proxies/t/toxics")] == ["latency_downstream"]


def test_populate_creates_keeps_and_replaces(api, echo_server):
    status, ctype, payload = api.call("POST", "/populate", [
        {"name": "a", "upstream": echo_server.addr},
        {"name": "b", "upstream": echo_server.addr, "listen": "127.0.0.1:0", "enabled": False}])
    assert (status, ctype) == (201, "application/json")
    body = json.loads(payload)
    assert list(body) == ["proxies"] and [p["name"] for p in body["proxies"]] == ["a", "b"]
    a = body["proxies"][0]
    assert a["enabled"] is True and body["proxies"][1]["enabled"] is False
    # The same listen and upstream: kept as it is (same port, same state).
    again = api.json("POST", "/populate", [{"name": "a", "upstream": echo_server.addr, "listen": a["listen"]}],
                     expect=201)
    assert again == {"proxies": [a]}
    status, _, payload = api.call("POST", "/populate", [{"name": "c"}])
    assert status == 400
    assert json.loads(payload) == {"error": "missing required field: upstream at proxy 1", "status": 400,
                                   "proxies": None}
    status, _, payload = api.call("POST", "/populate", [{"upstream": echo_server.addr}])
    assert json.loads(payload)["error"] == "missing required field: name at proxy 1"
    assert sorted(api.json("GET", "/proxies")) == ["a", "b"]


@pytest.mark.parametrize("raw", [b"{}", b'{"name": "x"}', b'[{"name": "x",', b"", b"[1]"])
def test_populate_bad_body_is_its_json_answer(api, raw):
    # toxiproxy's Populate answers every error, the body's too, with its
    # own JSON (error, status, proxies), not http.Error's text/plain.
    status, ctype, payload = api.call("POST", "/populate", raw=raw)
    assert (status, ctype) == (400, "application/json")
    body = json.loads(payload)
    assert list(body) == ["error", "status", "proxies"] and body["error"].startswith("bad request body: ")
    assert (body["status"], body["proxies"]) == (400, None)


def test_populate_lists_the_proxies_done_before_a_failure(api, echo_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        status, ctype, payload = api.call("POST", "/populate", [
            {"name": "first", "upstream": echo_server.addr},
            {"name": "second", "upstream": echo_server.addr, "listen": "127.0.0.1:%d" % taken.getsockname()[1]}])
    body = json.loads(payload)
    assert (status, ctype, body["status"]) == (500, "application/json", 500) and "in use" in body["error"]
    assert [p["name"] for p in body["proxies"]] == ["first"]
    # Nothing to do: Go writes the empty list as null.
    assert api.json("POST", "/populate", [], expect=201) == {"proxies": None}


def test_same_listen_by_host_name_keeps_the_proxy(api, echo_server):
    # toxiproxy 2.12 resolves the listen address before comparing
    # (Differs): "localhost:PORT" again, by populate or by update, keeps
    # the proxy, its connections and its toxics.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = [{"name": "named", "upstream": echo_server.addr, "listen": "localhost:%d" % port}]
    first = api.json("POST", "/populate", config, expect=201)["proxies"][0]
    address = host_port(first["listen"])
    assert address[1] == port
    api.json("POST", "/proxies/named/toxics", {"type": "latency", "attributes": {"latency": 1}})
    with connect(address) as live:
        live.sendall(b"a")
        assert recv_exact(live, 1) == b"a"
        again = api.json("POST", "/populate", config, expect=201)["proxies"][0]
        assert again["listen"] == first["listen"] and [t["name"] for t in again["toxics"]] == ["latency_downstream"]
        updated = api.json("PATCH", "/proxies/named", {"listen": "localhost:%d" % port})
        assert updated == again
        live.sendall(b"b")   # not cut: the same proxy
        assert recv_exact(live, 1) == b"b"
        # A name that does not resolve is an error before the proxy is touched.
        status, message = api.error("PATCH", "/proxies/named", {"listen": "nonexistent.invalid:%d" % port})
        assert status == 500 and "nonexistent.invalid" in message
        assert api.json("GET", "/proxies/named") == again
        live.sendall(b"c")
        assert recv_exact(live, 1) == b"c"


def test_reset_enables_every_proxy_and_removes_toxics(api, echo_server):
    api.json("POST", "/proxies", {"name": "r", "upstream": echo_server.addr, "enabled": False}, expect=201)
    api.json("POST", "/proxies/r/toxics", {"type": "timeout", "attributes": {"timeout": 10}})
    status, _, payload = api.call("POST", "/reset")
    assert (status, payload) == (204, b"")
    shown = api.json("GET", "/proxies/r")
    assert shown["enabled"] is True and shown["toxics"] == []
    assert echo_roundtrip(host_port(shown["listen"]), b"reset") == b"reset"


def test_hostile_requests_do_not_stop_the_server(api, echo_server):
    created = api.json("POST", "/proxies", {"name": "h", "upstream": echo_server.addr}, expect=201)
    big = b'{"name": "' + b"x" * (2 << 20) + b'"}'
    with socket.create_connection(api.address, timeout=5) as s:
        s.sendall(b"POST /proxies HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(big))
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    with socket.create_connection(api.address, timeout=5) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        s.recv(4096)
    fresh = Client(api.address)
    assert fresh.json("GET", "/proxies/h") == created
    fresh.close()
    assert echo_roundtrip(host_port(created["listen"]), b"still") == b"still"


def test_chunked_body_is_decoded(api, echo_server):
    # Go's net/http decodes a chunked body (curl -H 'Transfer-Encoding:
    # chunked', a streaming client); the connection stays usable after it.
    body = json.dumps({"name": "c", "upstream": echo_server.addr}).encode()
    api.conn.request("POST", "/proxies", body=iter([body[:7], body[7:]]), encode_chunked=True)
    r = api.conn.getresponse()
    created = json.loads(r.read())
    assert r.status == 201 and created["name"] == "c"
    assert api.json("GET", "/proxies/c") == created   # the same connection: in step
    # Extensions and trailers, as the grammar allows; Content-Length is ignored.
    with socket.create_connection(api.address, timeout=5) as s:
        s.sendall(b"POST /proxies/c/toxics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                  b"10;ext=1\r\n" + b'{"type":"latency' + b'\r\n2\r\n"}\r\n0\r\nX-Trailer: 1\r\n\r\n')
        out = recv_until_eof(s)
    assert out.startswith(b"HTTP/1.1 200 ") and out.count(b"HTTP/1.1") == 1, out
    assert [t["name"] for t in api.json("GET", "/proxies/c/toxics")] == ["latency_downstream"]


@pytest.mark.parametrize("head, rest, answer", [
    (b"Transfer-Encoding: chunked", b"zz\r\n{}\r\n0\r\n\r\n", b"HTTP/1.1 400 "),
    (b"Transfer-Encoding: chunked", b"2\r\n{}XX0\r\n\r\n", b"HTTP/1.1 400 "),
    (b"Transfer-Encoding: chunked", b"100001\r\n" + b"x" * 16, b"HTTP/1.1 400 "),
    (b"Transfer-Encoding: gzip", b"{}", b"HTTP/1.1 501 "),
    (b"Transfer-Encoding: gzip, chunked", b"2\r\n{}\r\n0\r\n\r\n", b"HTTP/1.1 501 "),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"2\r\n{}\r\n0\r\n\r\n", b"HTTP/1.1 501 "),
])
def test_a_body_that_cannot_be_read_is_answered_once_then_closed(api, head, rest, answer):
    # What follows a body that cannot be read is not another request.
    with socket.create_connection(api.address, timeout=5) as s:
        s.sendall(b"POST /proxies HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n\r\n" + rest
                  + b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        out = recv_until_eof(s)
    head, _, rest = out.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert head.startswith(answer) and len(rest) == length, out   # one answer, nothing after
    assert api.json("GET", "/proxies") == {}


def test_cli_prints_its_address_populates_and_stops_on_sigterm(tmp_path, echo_server):
    config = tmp_path / "toxiproxy.json"
    config.write_text(json.dumps([{"name": "svc", "upstream": echo_server.addr, "listen": "127.0.0.1:0"}]))
    proc = subprocess.Popen(cli_command(["toxiproxy", "--port", "0", "--config", str(config)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env())
    out, err = LineReader(proc.stdout), LineReader(proc.stderr)
    try:
        m = out.wait_line(r"^listening on (127\.0\.0\.1):(\d+)$", 20)
        assert m is not None, err.text()
        assert out.lines[0] == m.group(0)   # the first line
        client = Client((m.group(1), int(m.group(2))))
        svc = client.json("GET", "/proxies/svc")
        client.close()
        assert echo_roundtrip(host_port(svc["listen"]), b"cli") == b"cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        out.join(5)
        err.join(5)


@pytest.mark.parametrize("text", ['{"name": "x"}', '[{"name": "x",'])
def test_cli_config_that_is_not_a_json_array_is_one_line_exit_2(tmp_path, text):
    config = tmp_path / "toxiproxy.json"
    config.write_text(text)
    cp = subprocess.run(cli_command(["toxiproxy", "--port", "0", "--config", str(config)]), capture_output=True,
                        text=True, timeout=30, env=subprocess_env())
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastproxy toxiproxy: error: --config: %s: bad request body: "
                                                   % config), cp.stderr


@pytest.mark.parametrize("args, flag", [(["--port", "70000"], "--port"), (["--port", "x"], "argument --port"),
                                        (["--engine", "fast"], "argument --engine"),
                                        (["--config", "/nonexistent/x.json"], "--config")])
def test_cli_errors_are_one_line_exit_2(args, flag):
    cp = subprocess.run(cli_command(["toxiproxy", "--port", "0"] + args), capture_output=True, text=True,
                        timeout=30, env=subprocess_env())
    assert cp.returncode == 2
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastproxy toxiproxy: error: " + flag), cp.stderr


def test_cli_port_in_use_is_one_line_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cp = subprocess.run(cli_command(["toxiproxy", "--port", str(taken.getsockname()[1])]),
                            capture_output=True, text=True, timeout=30, env=subprocess_env())
    assert cp.returncode == 2 and "in use" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1


def test_unreachable_upstream_resets_the_client_as_documented(api):
    # docs/toxiproxy.md: toxiproxy closes such a client (FIN); fastproxy
    # resets it once its connect failed.
    from support.sockets import how_closed, reserve_refusing_port
    with reserve_refusing_port() as refusing:
        created = api.json("POST", "/proxies", {"name": "gone", "upstream": "127.0.0.1:%d" % refusing.getsockname()[1]},
                           expect=201)
        assert how_closed(host_port(created["listen"]), b"hello") == "reset"


def test_toxics_apply_and_survive_disable_and_moves(api, echo_server):
    created = api.json("POST", "/proxies", {"name": "lat", "upstream": echo_server.addr}, expect=201)
    address = host_port(created["listen"])
    before = min(round_trip_ms(address) for _ in range(5))
    api.json("POST", "/proxies/lat/toxics", {"type": "latency", "stream": "upstream",
                                             "attributes": {"latency": 80}})
    assert min(round_trip_ms(address) for _ in range(3)) - before >= 75
    api.json("POST", "/proxies/lat", {"enabled": False})
    api.json("POST", "/proxies/lat", {"enabled": True})
    assert min(round_trip_ms(address) for _ in range(3)) - before >= 75
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        new_port = s.getsockname()[1]
    moved = api.json("PATCH", "/proxies/lat", {"listen": "127.0.0.1:%d" % new_port})
    assert [t["name"] for t in moved["toxics"]] == ["latency_upstream"]
    assert min(round_trip_ms(("127.0.0.1", new_port)) for _ in range(3)) - before >= 75
    api.json("POST", "/proxies/lat/toxics/latency_upstream", {"attributes": {"latency": 0}})
    assert min(round_trip_ms(("127.0.0.1", new_port)) for _ in range(3)) < before + 60
    api.json("POST", "/proxies/lat/toxics", {"type": "limit_data", "attributes": {"bytes": 2}})
    status, _, _ = api.call("POST", "/reset")
    assert status == 204 and api.json("GET", "/proxies/lat/toxics") == []
    assert round_trip_ms(("127.0.0.1", new_port), b"longer than two bytes") < 1000
