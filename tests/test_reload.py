"""Several listeners on one process, and reload(): what changes, what stays,
and that nothing in flight is lost or refused while it happens."""
import json
import logging
import socket
import time

import pytest

from fastproxy import Config, ConfigError, Proxy, _core
from support.servers import EchoServer, Servers, open_tagged, which
from support.sockets import connect, echo_roundtrip, fmt_addr, free_port, recv_exact
from support.traffic import ConnectLoop, StreamLoad, VerifyingServer
from support.waits import stop_bounded, wait_for

KiB = 1024


def listener(port, upstreams, engine, **options):
    return Config.build(listen=f"127.0.0.1:{port}", upstreams=list(upstreams), engine=engine,
                        workers=2, **options)


def echo_through(sock, payload):
    sock.sendall(payload)
    return recv_exact(sock, len(payload))


def test_listeners_share_workers_and_keep_their_own_groups_and_counters(engine):
    with Servers(names=["A", "B"]) as srv:
        pa, pb = free_port(), free_port()
        p = Proxy.from_config([listener(pa, [srv["A"].addr], engine, name="a"),
                               listener(pb, [srv["B"].addr], engine, name="b", max_connections=7)])
        p.start()
        try:
            assert p.workers == 2 and len(p._plane.listeners()) == 2
            assert p.addresses == {"a": ("127.0.0.1", pa), "b": ("127.0.0.1", pb)}
            assert [which(("127.0.0.1", pa)) for _ in range(3)] == ["A"] * 3
            assert [which(("127.0.0.1", pb)) for _ in range(2)] == ["B"] * 2
            assert wait_for(lambda: p.stats()["active"] == 0, 5)
            st = p.stats()
            assert st["listeners"]["a"]["accepted"] == 3 and st["listeners"]["b"]["accepted"] == 2
            assert st["accepted"] == 5
            assert set(st["listeners"]["a"]["upstreams"]) == {srv["A"].addr}
            assert "upstreams" not in st   # a total would mix two groups
            assert p._listeners[1].config.limits.max_connections == 7
        finally:
            stop_bounded(p)


def test_reload_changes_group_and_limits_for_new_clients_only(engine):
    with Servers(names=["S1", "S2"]) as srv:
        port = free_port()
        p = Proxy.from_config([listener(port, [srv["S1"].addr], engine)]).start()
        try:
            addr = ("127.0.0.1", port)
            c, name = open_tagged(addr)
            assert name == "S1"
            assert echo_through(c, b"x" * 100_000) == b"x" * 100_000
            p.reload([listener(port, [srv["S2"].addr], engine, max_connections=50)])
            # The live bridge stays with S1; new clients go to S2, under the new limit.
            assert echo_through(c, b"y" * 200_000) == b"y" * 200_000
            assert [which(addr) for _ in range(4)] == ["S2"] * 4
            assert p._listeners[0].config.limits.max_connections == 50
            assert wait_for(lambda: p.stats()["active"] == 1, 5)   # the which() bridges closed
            st = p.stats()
            assert st["accepted"] == 5, st   # counted across the reload
            assert set(st["upstreams"]) == {srv["S1"].addr, srv["S2"].addr}   # S1 while its bridge lives
            c.close()
            assert wait_for(lambda: p.stats()["active"] == 0 and not p._listeners[0].draining, 5)
            st = p.stats()
            assert st["accepted"] == 5 and set(st["upstreams"]) == {srv["S2"].addr}
            assert st["bytes_upstream"] >= 300_000
            assert len(p._plane.listeners()) == 1   # the replaced block was freed
        finally:
            stop_bounded(p)


def test_reload_adds_and_removes_listeners_removed_ones_drain(engine):
    with Servers(names=["A", "B"]) as srv:
        pa, pb = free_port(), free_port()
        a = listener(pa, [srv["A"].addr], engine)
        b = listener(pb, [srv["B"].addr], engine, drain_timeout=1.0)
        p = Proxy.from_config([a]).start()
        try:
            with pytest.raises(OSError):
                connect(("127.0.0.1", pb), timeout=1)
            p.reload([a, b])
            assert which(("127.0.0.1", pb)) == "B"
            c, name = open_tagged(("127.0.0.1", pb))
            assert name == "B"
            p.reload([a])
            # Removed: refused at once, while its live bridge goes on until
            # the drain timeout closes it.
            with pytest.raises(ConnectionRefusedError):
                connect(("127.0.0.1", pb), timeout=1)
            assert echo_through(c, b"still here") == b"still here"
            c.settimeout(5)
            t0 = time.monotonic()
            with c:
                assert c.recv(10) == b""
            assert 0.5 < time.monotonic() - t0 < 4
            assert wait_for(lambda: len(p._plane.listeners()) == 1 and not p._removed, 5)
            assert which(("127.0.0.1", pa)) == "A"
        finally:
            stop_bounded(p)


def test_reload_of_the_same_configuration_changes_nothing(engine, echo_server):
    port = free_port()
    cfg = listener(port, [echo_server.addr], engine)
    p = Proxy.from_config([cfg]).start()
    try:
        handle = p._listeners[0].handle
        p.reload([listener(port, [echo_server.addr], engine)])
        assert p._listeners[0].handle is handle
        assert echo_roundtrip(("127.0.0.1", port), b"same") == b"same"
    finally:
        stop_bounded(p)


def test_upstream_counters_survive_a_reload_that_keeps_the_upstream(engine, echo_server):
    port = free_port()
    p = Proxy.from_config([listener(port, [echo_server.addr], engine)]).start()
    try:
        for i in range(3):
            assert echo_roundtrip(("127.0.0.1", port), b"a" * 10) == b"a" * 10
        p.reload([listener(port, [echo_server.addr], engine, connect_timeout=2)])
        for i in range(2):
            assert echo_roundtrip(("127.0.0.1", port), b"b" * 10) == b"b" * 10
        assert wait_for(lambda: p.stats()["active"] == 0, 5)
        up = p.stats()["upstreams"][echo_server.addr]
        assert up["accepted"] == 5 and up["bytes_upstream"] == 50 and up["bytes_downstream"] == 50
        assert up["state"] == "up"
    finally:
        stop_bounded(p)


def test_port_zero_listener_keeps_its_bound_port(engine, echo_server):
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine=engine).start()
    try:
        addr = p.address
        p.reload([Config.build(listen=fmt_addr(*addr), upstreams=[echo_server.addr], engine=engine,
                               idle_timeout=30)])
        assert p.address == addr
        assert echo_roundtrip(addr, b"kept") == b"kept"
    finally:
        stop_bounded(p)


def test_invalid_reload_is_refused_and_logged_the_old_configuration_stays(engine, echo_server, caplog):
    port = free_port()
    p = Proxy.from_config([listener(port, [echo_server.addr], engine)]).start()
    try:
        with caplog.at_level(logging.ERROR, logger="fastproxy.proxy"):
            with pytest.raises(ConfigError) as err:
                p.reload({"listeners": [{"listen": f"127.0.0.1:{port}", "upstreams": ["127.0.0.1:99999"]}]})
        assert "99999" in str(err.value)
        assert any("reload refused" in r.getMessage() and "99999" in r.getMessage() for r in caplog.records)
        with pytest.raises(ConfigError, match="workers"):
            p.reload([Config.build(listen=f"127.0.0.1:{port}", upstreams=[echo_server.addr], engine=engine,
                                   workers=3)])
        assert echo_roundtrip(("127.0.0.1", port), b"old") == b"old"
    finally:
        stop_bounded(p)


def test_a_reload_naming_a_directory_as_rule_file_is_a_config_error(engine, echo_server, tmp_path):
    port = free_port()
    p = Proxy.from_config([listener(port, [echo_server.addr], engine)]).start()
    try:
        with pytest.raises(ConfigError, match="is a directory, not a rule file"):
            p.reload({"listeners": [{"listen": f"127.0.0.1:{port}", "upstreams": [echo_server.addr],
                                     "allow_file": [str(tmp_path)]}]})
        assert echo_roundtrip(("127.0.0.1", port), b"old") == b"old"
    finally:
        stop_bounded(p)


def test_reload_that_cannot_bind_is_refused_whole(engine, echo_server):
    port, fresh = free_port(), free_port()
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        old = listener(port, [echo_server.addr], engine)
        p = Proxy.from_config([old]).start()
        try:
            with pytest.raises(ConfigError, match="in use"):
                p.reload([listener(port, [echo_server.addr], engine, max_connections=3),
                          listener(fresh, [echo_server.addr], engine),
                          listener(taken.getsockname()[1], [echo_server.addr], engine)])
            # Nothing applied: the changed listener keeps its options, the
            # listener that could bind was closed again.
            assert p._listeners[0].source_config is old and len(p._plane.listeners()) == 1
            with pytest.raises(ConnectionRefusedError):
                connect(("127.0.0.1", fresh), timeout=1)
            assert echo_roundtrip(("127.0.0.1", port), b"ok") == b"ok"
        finally:
            stop_bounded(p)
    finally:
        taken.close()


def test_replaced_listener_takes_over_its_socket_with_no_refusal(engine, echo_server):
    """A client loop on an unchanged address sees no refusal while the
    listener behind it is replaced again and again."""
    port = free_port()
    p = Proxy.from_config([listener(port, [echo_server.addr], engine)]).start()
    try:
        with ConnectLoop(("127.0.0.1", port), payload=b"ping", expect=b"ping", max_rate=300) as loop:
            for i in range(10):
                p.reload([listener(port, [echo_server.addr], engine, max_connections=100 + i)])
                time.sleep(0.05)
            counts = loop.stop()
        assert counts.ok > 20 and counts.failed == 0, counts
    finally:
        stop_bounded(p)


@pytest.mark.slow
def test_twenty_reloads_under_load_lose_nothing(engine):
    """200 bridges stream random data both ways (random chunks, pauses and
    half-closes) while the configuration is reloaded 20 times: a listener
    added and removed, the streaming listener's group and limits changed.
    Every byte arrives, no bridge is cut, and a client loop on an unchanged
    listener is never refused."""
    with VerifyingServer() as v1, VerifyingServer() as v2, EchoServer() as echo:
        ps, pe, px = free_port(), free_port(), free_port()

        def configs(i):
            group = [v1.addr] if i % 3 else [v1.addr, v2.addr]
            out = [listener(ps, group, engine, name="stream", max_connections=1000 + i),
                   listener(pe, [echo.addr], engine, name="echo")]
            if i % 2:
                out.append(listener(px, [echo.addr], engine, name="extra"))
            return out

        p = Proxy.from_config(configs(0)).start()
        try:
            with ConnectLoop(("127.0.0.1", pe), payload=b"ping", expect=b"ping", max_rate=200) as loop:
                load = StreamLoad(("127.0.0.1", ps), n=200, max_pause=0.05, seed=11).start()
                assert load.wait_progress(0.05, 20)
                for i in range(1, 21):
                    p.reload(configs(i))
                    if i % 2:
                        assert echo_roundtrip(("127.0.0.1", px), b"extra") == b"extra"
                    time.sleep(0.05)
                moved_during = load.bytes_moved()
                result = load.wait(120)
                counts = loop.stop()
            result.assert_all_ok()
            # The server reads the client's last FIN after the client is done.
            wait_for(lambda: not v1.bad() and not v2.bad() and not v1.active and not v2.active, 10)
            v1.assert_all_ok()
            v2.assert_all_ok()
            assert moved_during < load.total_bytes, "the reloads ended before the traffic did not overlap it"
            assert counts.ok > 0 and counts.failed == 0, counts
            st = p.stats()["listeners"]
            assert st["stream"]["accepted"] == 200
            assert st["echo"]["accepted"] >= counts.ok
            assert wait_for(lambda: len(p._plane.listeners()) == 2, 5)
        finally:
            stop_bounded(p)


def test_listener_ids_are_not_reused_at_once_and_records_name_their_listener(engine, echo_server, tmp_path):
    port = free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    p = Proxy.from_config([listener(port, [echo_server.addr], engine, access_log=str(logs[0]))]).start()
    try:
        first = p._listeners[0].handle.id
        assert echo_roundtrip(("127.0.0.1", port), b"1") == b"1"
        p.reload([listener(port, [echo_server.addr], engine, access_log=str(logs[1]))])
        assert p._listeners[0].handle.id != first
        assert echo_roundtrip(("127.0.0.1", port), b"2") == b"2"
        assert wait_for(lambda: all(f.exists() and f.read_text().count("\n") == 1 for f in logs), 5)
        # Each line names its listener (the default name: the address).
        assert [json.loads(f.read_text())["listener"] for f in logs] == [f"127.0.0.1:{port}"] * 2
    finally:
        stop_bounded(p)


def test_data_plane_refuses_a_listener_that_still_accepts_or_has_bridges(engine, echo_server):
    p = Proxy(listen="127.0.0.1:0", upstream=echo_server.addr, engine=engine).start()
    try:
        h = p._listeners[0].handle
        with pytest.raises(RuntimeError, match="still accepts"):
            p._plane.free_listener(h)
        c = connect(p.address)
        assert echo_through(c, b"live") == b"live"
        h.stop_accepting()
        assert h.bridges == 1
        with pytest.raises(RuntimeError, match="still has bridges"):
            p._plane.free_listener(h)
        assert echo_through(c, b"still") == b"still"
        c.close()
    finally:
        stop_bounded(p)
    assert isinstance(_core.ListenerHandle, type)


def test_a_hooked_listener_added_by_reload_serves_its_first_client(engine, echo_server, tmp_path, monkeypatch):
    """The data plane serves a new listener before its hooks are registered
    with the hook threads (its id is known only then): a client that comes
    in between waits for on_connect instead of getting an error."""
    from fastproxy import dispatch

    hooks = tmp_path / "hooks.py"
    hooks.write_text("calls = []\n\ndef on_connect(conn):\n    calls.append(conn.id)\n")
    pa, pb = free_port(), free_port()
    # A hooked listener first: the hook threads run when the new one comes.
    a = listener(pa, [echo_server.addr], engine, hooks=str(hooks))
    p = Proxy.from_config([a]).start()
    real_register = dispatch.HookRunner.register
    client_in = []

    def late_register(self, lid, entry):
        # The new listener accepts already: let a client in first.
        client_in.append(echo_roundtrip_async(("127.0.0.1", pb)))
        time.sleep(0.3)
        real_register(self, lid, entry)

    def echo_roundtrip_async(addr):
        import threading

        result = {}

        def run():
            try:
                result["echo"] = echo_roundtrip(addr, b"first")
            except OSError as exc:
                result["error"] = exc

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, result

    monkeypatch.setattr(dispatch.HookRunner, "register", late_register)
    try:
        p.reload([a, listener(pb, [echo_server.addr], engine, hooks=str(hooks))])
        (t, result), = client_in
        t.join(10)
        assert result == {"echo": b"first"}, result
        assert p.stats()["hook_errors"] == 0
    finally:
        stop_bounded(p)


def test_port_zero_listeners_keep_their_ports_by_name_across_a_reload(any_engine):
    # Several listeners on 127.0.0.1:0: a reload that adds one in front must
    # not hand a's port to the newcomer (its clients would reach c's
    # upstreams); each keeps its port, the new one gets a new port.
    with Servers(names=["A", "B", "C"]) as srv:
        def table(name):
            return {"name": name, "listen": "127.0.0.1:0", "upstreams": [srv[name.upper()].addr]}

        p = Proxy.from_config({"engine": any_engine, "workers": 1, "listeners": [table("a"), table("b")]}).start()
        try:
            before = dict(p.addresses)
            p.reload({"engine": any_engine, "workers": 1, "listeners": [table("c"), table("a"), table("b")]})
            after = dict(p.addresses)
            assert (after["a"], after["b"]) == (before["a"], before["b"]), (before, after)
            assert after["c"] not in before.values()
            for name in "abc":
                assert which(after[name]) == name.upper()
        finally:
            stop_bounded(p)


def test_a_listen_address_spelled_otherwise_keeps_its_socket(any_engine, echo_server):
    # localhost:P for 127.0.0.1:P, [0::1]:P for [::1]:P: the same address,
    # so the same socket; binding it again would fail against itself.
    for first, second in (("127.0.0.1", "localhost"), ("[::1]", "[0:0::1]")):
        port = free_port()
        p = Proxy(listen=f"{first}:{port}", upstream=echo_server.addr, engine=any_engine, workers=1).start()
        try:
            sock = p._listeners[0].sock
            with connect(p.address) as live:
                assert echo_through(live, b"before") == b"before"
                p.reload({"engine": any_engine, "workers": 1,
                          "listeners": [{"listen": f"{second}:{port}", "upstreams": [echo_server.addr],
                                         "max_connections": 7}]})
                assert p._listeners[0].sock is sock
                assert p._listeners[0].config.limits.max_connections == 7
                assert echo_through(live, b"after") == b"after"
            assert echo_roundtrip(p.address, b"new") == b"new"
        finally:
            stop_bounded(p)


def test_a_refused_reload_names_the_listener_whose_option_failed(any_engine, echo_server, caplog):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        p = Proxy.from_config({"engine": any_engine, "workers": 1, "listeners": [
            {"name": "a", "listen": "127.0.0.1:0", "upstreams": [echo_server.addr]}]}).start()
        try:
            with caplog.at_level(logging.ERROR, logger="fastproxy.proxy"):
                with pytest.raises(ConfigError) as err:
                    p.reload({"engine": any_engine, "workers": 1, "listeners": [
                        {"name": "a", "listen": f"127.0.0.1:{p.address[1]}", "upstreams": [echo_server.addr]},
                        {"name": "b", "listen": f"127.0.0.1:{busy}", "upstreams": [echo_server.addr]}]})
            assert err.value.listener == "b" and err.value.field == "listen"
            assert any("reload refused, the running configuration stays: listener 'b': listen:" in r.getMessage()
                       for r in caplog.records), caplog.text
            assert echo_roundtrip(p.address, b"still") == b"still"
        finally:
            stop_bounded(p)
