"""Per-bridge timings: the connect-time and duration histograms in stats(),
the access log's queue_time / connect_time / total_time, access_log_format,
and the command's log_format."""
import json
import logging
import math
import random
import signal
import socket
import threading
import time

import pytest

from fastproxy import CloseReason, Config, Proxy
from fastproxy.cli import JsonFormatter
from fastproxy.listener import add_figures
from support.cli import assert_one_line_error, run_cli
from support.hooks import Recorder
from support.servers import EchoServer
from support.sockets import blackhole_listener, connect, echo_roundtrip, recv_exact
from support.waits import stop_bounded, wait_for

CONNECT_KEYS = {"bounds", "counts", "sum", "count"}


def hists(proxy, listener=None):
    st = proxy.stats()
    return (st if listener is None else st["listeners"][listener])["histograms"]


def bucket_of(hist, value):
    """The index of the bucket `value` falls in (upper bounds, inclusive)."""
    return next(i for i, b in enumerate(hist["bounds"]) if value <= b)


def read_lines(path):
    try:
        with open(path) as f:
            return [json.loads(ln) for ln in f.read().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def check_shape(h):
    assert set(h) == CONNECT_KEYS
    assert h["bounds"] == sorted(h["bounds"]) and h["bounds"][-1] == math.inf
    assert len(h["counts"]) == len(h["bounds"])
    assert sum(h["counts"]) == h["count"]
    assert isinstance(h["sum"], float) and isinstance(h["count"], int)


def test_histograms_count_every_bridge(make_proxy, echo_server):
    p = make_proxy(echo_server.addr)
    h = hists(p)
    for name in ("connect_seconds", "duration_seconds"):
        check_shape(h[name])
        assert h[name]["count"] == 0 and h[name]["sum"] == 0.0
    assert h["connect_seconds"]["bounds"][0] == 0.0005 and h["connect_seconds"]["bounds"][-2] == 10.0
    assert h["duration_seconds"]["bounds"][0] == 0.001 and h["duration_seconds"]["bounds"][-2] == 3600.0
    for i in range(6):
        assert echo_roundtrip(p.address, b"x%d" % i) == b"x%d" % i
    held = connect(p.address)
    assert echo_roundtrip(p.address, b"y") == b"y"
    held.sendall(b"hold")
    assert recv_exact(held, 4) == b"hold"
    time.sleep(0.3)
    held.close()
    assert wait_for(lambda: hists(p)["duration_seconds"]["count"] == 8, 5), hists(p)
    h = hists(p)
    for name in ("connect_seconds", "duration_seconds"):
        check_shape(h[name])
        assert h[name]["count"] == 8
    assert p.stats()["accepted"] == 8
    # Loopback connects take microseconds: all well under 0.25 s.
    assert sum(h["connect_seconds"]["counts"][:bucket_of(h["connect_seconds"], 0.25) + 1]) == 8
    assert h["connect_seconds"]["sum"] < 8 * 0.25
    dur = h["duration_seconds"]
    # The held bridge lived 0.3 s or more: in the (0.25, 0.5] bucket or later.
    assert sum(dur["counts"][bucket_of(dur, 0.3):]) >= 1
    assert dur["sum"] >= 0.3
    # The listener's own figures are the same as the totals with one listener.
    assert p.stats()["listeners"][p._listeners[0].name]["histograms"] == h


def test_connect_time_of_a_delayed_handshake(make_proxy, tmp_path):
    # A full accept queue makes the kernel drop the proxy's SYN; once there is
    # room, the SYN sent again (1 s later: the initial retransmission
    # timeout) completes the handshake. That is a connect of about 1 s.
    lst, fillers = blackhole_listener()
    log = tmp_path / "access.jsonl"
    got = []
    stop = threading.Event()

    def serve():
        lst.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = lst.accept()
            except OSError:
                continue
            got.append(c)
            c.settimeout(5)
            try:
                data = c.recv(64)
                while data:   # echo until the proxy passes the client's FIN on
                    c.sendall(data)
                    data = c.recv(64)
            except OSError:
                pass
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    try:
        p = make_proxy("%s:%d" % lst.getsockname(), connect_timeout=5, access_log=str(log))
        c = connect(p.address)
        c.sendall(b"late")
        time.sleep(0.3)
        for f in fillers:   # no filler's SYN takes the room made for the proxy's
            f.close()
        t.start()
        c.settimeout(5)
        assert recv_exact(c, 4) == b"late"
        c.close()
        assert wait_for(lambda: hists(p)["duration_seconds"]["count"] == 1, 5)
        conn = hists(p)["connect_seconds"]
        assert conn["count"] == 1
        assert 0.7 <= conn["sum"] <= 4.0, conn
        assert conn["counts"][bucket_of(conn, conn["sum"])] == 1
        assert conn["bounds"][bucket_of(conn, conn["sum"])] >= 1.0
        assert wait_for(lambda: len(read_lines(log)) == 1, 3)
        line = read_lines(log)[0]
        assert abs(line["connect_time"] - conn["sum"]) < 0.002
        assert line["queue_time"] == 0.0
        assert line["total_time"] >= line["connect_time"]
    finally:
        stop.set()
        if t.is_alive():
            t.join(2)
        for s in got:
            s.close()
        for f in fillers:
            f.close()
        lst.close()


def test_connect_time_is_the_address_that_took_the_bridge(make_proxy, echo_server):
    # A dead upstream costs connect_timeout before the retry: that is in the
    # bridge's total time, not in its connect time (HAProxy's Tc).
    lst, fillers = blackhole_listener()
    rec = Recorder()
    try:
        dead = "%s:%d" % lst.getsockname()
        p = make_proxy(upstreams=[dead, echo_server.addr], connect_timeout=0.3,
                       max_fails=0, on_close=rec)
        for i in range(2):   # round robin: one of the two tries the dead one first
            assert echo_roundtrip(p.address, b"r%d" % i) == b"r%d" % i
        recs = rec.wait(2)
        retried = [r for r in recs if r.total_time >= 0.3]
        assert len(retried) >= 1, (recs, p.stats())
        for r in recs:
            assert r.upstream == echo_server.addr
            assert r.connect_time is not None and r.connect_time < 0.25, r
        st = p.stats()
        assert st["upstreams"][dead]["connect_failures"] >= 1 and st["connect_failures"] == 0
        assert wait_for(lambda: hists(p)["connect_seconds"]["count"] == 2, 3)
        assert hists(p)["connect_seconds"]["sum"] < 0.5
    finally:
        for f in fillers:
            f.close()
        lst.close()


def test_queue_time_and_total_time(make_proxy, echo_server, tmp_path):
    log = tmp_path / "access.jsonl"
    p = make_proxy(echo_server.addr, max_connections=1, access_log=str(log))
    a = connect(p.address)
    a.sendall(b"first")
    assert recv_exact(a, 5) == b"first"
    b = connect(p.address)
    b.sendall(b"second")
    assert wait_for(lambda: p.stats()["queued"] == 1, 3)
    hold = 0.3
    time.sleep(hold)
    a.close()
    b.settimeout(5)
    assert recv_exact(b, 6) == b"second"
    b.close()
    assert wait_for(lambda: len(read_lines(log)) == 2, 5), read_lines(log)
    first, second = sorted(read_lines(log), key=lambda e: e["id"])
    assert first["queue_time"] == 0.0
    assert first["total_time"] >= hold and first["total_time"] == first["duration"]
    assert second["queue_time"] >= hold
    assert second["total_time"] >= second["queue_time"]
    for e in (first, second):
        assert e["connect_time"] is not None and 0 <= e["connect_time"] < 0.25
        assert e["total_time"] >= e["queue_time"] + e["connect_time"] - 1e-5


def test_queue_time_of_waiters_that_never_got_a_slot(make_proxy, echo_server, tmp_path):
    # A waiter that timed out in the queue, or gave up (FIN), waited: its
    # queue_time is that wait, as HAProxy's Tw on a queue timeout or abort.
    log = tmp_path / "access.jsonl"
    p = make_proxy(echo_server.addr, max_connections=1, queue_timeout=0.6, access_log=str(log))
    a = connect(p.address)
    a.sendall(b"first")
    assert recv_exact(a, 5) == b"first"
    timed_out = connect(p.address)
    gave_up = connect(p.address)
    assert wait_for(lambda: p.stats()["queued"] == 2, 3)
    time.sleep(0.3)
    gave_up.close()
    timed_out.settimeout(5)
    assert timed_out.recv(1) == b""
    timed_out.close()
    assert wait_for(lambda: len(read_lines(log)) == 2, 5), read_lines(log)
    by_reason = {e["reason"]: e for e in read_lines(log)}
    assert set(by_reason) == {"TIMEOUT", "CLIENT_CLOSED"}, by_reason
    assert 0.6 <= by_reason["TIMEOUT"]["queue_time"] <= by_reason["TIMEOUT"]["total_time"]
    assert 0.3 <= by_reason["CLIENT_CLOSED"]["queue_time"] <= by_reason["CLIENT_CLOSED"]["total_time"]
    for e in by_reason.values():
        assert e["connect_time"] is None
    a.close()


def test_never_connected_has_no_connect_time(make_proxy, echo_server):
    rec = Recorder()
    p = make_proxy(echo_server.addr, on_connect=lambda conn: False, on_close=rec)
    c = connect(p.address)
    c.settimeout(3)
    assert c.recv(1) == b""
    c.close()
    (r,) = rec.wait(1)
    assert r.reason == CloseReason.REFUSED
    assert r.connect_time is None and r.queue_time == 0.0 and r.total_time >= 0
    assert r.to_json()["connect_time"] is None
    assert wait_for(lambda: hists(p)["duration_seconds"]["count"] == 1, 3)
    assert hists(p)["connect_seconds"]["count"] == 0


def test_access_log_format_picks_fields(make_proxy, echo_server, tmp_path):
    log = tmp_path / "access.jsonl"
    p = make_proxy(echo_server.addr, access_log=str(log), access_log_format="total_time, id,upstream")
    assert echo_roundtrip(p.address, b"abc") == b"abc"
    assert wait_for(lambda: len(read_lines(log)) == 1, 3)
    (line,) = read_lines(log)
    assert list(line) == ["total_time", "id", "upstream"]   # in the order asked
    assert line["upstream"] == echo_server.addr


@pytest.mark.parametrize("value, needle", [("id,bogus", "bogus"), ("", "names no field"),
                                            ("id,id", "twice")])
def test_access_log_format_errors(value, needle):
    from fastproxy import ConfigError
    with pytest.raises(ConfigError) as exc:
        Proxy(listen="127.0.0.1:0", upstream="127.0.0.1:1", access_log_format=value)
    assert exc.value.field == "access_log_format" and needle in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_cli_access_log_format(cli_proxy, echo_server, tmp_path):
    log = tmp_path / "access.jsonl"
    cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                   "--access-log", str(log), "--access-log-format", "id,upstream,total_time")
    for i in range(2):
        assert echo_roundtrip(cp.connect_addr(), b"q%d" % i) == b"q%d" % i
    assert wait_for(lambda: len(read_lines(log)) == 2, 5)
    for line in read_lines(log):
        assert set(line) == {"id", "upstream", "total_time"}
        assert line["total_time"] >= 0


def test_cli_access_log_format_bad_field(tmp_path):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
                            "--access-log-format", "id,nosuch"])
    assert_one_line_error(rc, out, err, "--access-log-format", "nosuch")
    conf = tmp_path / "p.toml"
    conf.write_text('[[listeners]]\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:1"]\n'
                    'access_log_format = "id,nosuch"\n')
    rc, out, err = run_cli(["check", "--config", str(conf)])
    assert_one_line_error(rc, out, err, "access_log_format", "nosuch")


def _json_lines(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines
    return [json.loads(ln) for ln in lines]


def test_cli_log_format_json(cli_proxy, echo_server):
    cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr, "--log-format", "json")
    assert echo_roundtrip(cp.connect_addr(), b"j") == b"j"
    cp.signal(signal.SIGTERM)
    assert cp.wait(15) == 0
    cp.stderr.join(5)
    entries = _json_lines(cp.stderr.text())
    for e in entries:
        assert {"time", "level", "logger", "message"} <= set(e)
        assert e["logger"].startswith("fastproxy")
    assert any("listening on" in e["message"] for e in entries)


def test_config_file_log_format(tmp_path, echo_server):
    from support.cli import CliProxy
    conf = tmp_path / "p.toml"
    conf.write_text('log_format = "json"\n[[listeners]]\nlisten = "127.0.0.1:0"\n'
                    'upstreams = ["%s"]\n' % echo_server.addr)
    cp = CliProxy(["--config", str(conf)])
    try:
        cp.signal(signal.SIGTERM)
        assert cp.wait(15) == 0
        cp.stderr.join(5)
        assert any("listening on" in e["message"] for e in _json_lines(cp.stderr.text()))
    finally:
        cp.kill()
    # The flag overrides the file.
    cp = CliProxy(["--config", str(conf), "--log-format", "text"])
    try:
        assert not cp.ready_line.lstrip().startswith("{")
    finally:
        cp.kill()
    rc, out, err = run_cli(["--config", str(conf), "--log-format", "xml"])
    assert rc == 2 and "xml" in err


def test_json_formatter_carries_the_exception():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("fastproxy.test").makeRecord(
            "fastproxy.test", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=__import__("sys").exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed here" and entry["level"] == "ERROR"
    assert entry["logger"] == "fastproxy.test"
    assert "RuntimeError: boom" in entry["exception"] and "Traceback" in entry["exception"]
    assert entry["time"].endswith("+00:00")


def test_proxy_leaves_logging_alone(make_proxy_any, echo_server):
    root = logging.getLogger()
    before = (list(root.handlers), root.level, list(logging.getLogger("fastproxy").handlers))
    p = make_proxy_any(echo_server.addr, log_format="json")
    assert echo_roundtrip(p.address, b"z") == b"z"
    assert (list(root.handlers), root.level, list(logging.getLogger("fastproxy").handlers)) == before


def test_add_figures_adds_histograms_bucket_by_bucket():
    def h(counts, total):
        return {"histograms": {"connect_seconds": {"bounds": [0.1, math.inf], "counts": counts,
                                                   "sum": total, "count": sum(counts)}}}
    first, second = h([1, 2], 0.5), h([3, 4], 1.25)
    into = {}
    add_figures(into, first)
    add_figures(into, second)
    add_figures(into, {})
    assert into["histograms"]["connect_seconds"] == {"bounds": [0.1, math.inf], "counts": [4, 6],
                                                     "sum": 1.75, "count": 10}
    assert first["histograms"]["connect_seconds"]["counts"] == [1, 2]   # not aliased


def test_add_figures_sum_does_not_depend_on_the_order_blocks_are_added():
    # A reload moves a drained block into the listener's `carried` figures,
    # so the same blocks are added in another grouping from one scrape to the
    # next: a float sum then moved by an ulp, down as often as up, and a
    # Prometheus _sum that steps back reads as a counter reset.
    rng = random.Random(18)

    def h(ns):
        return {"histograms": {"duration_seconds": {"bounds": [1.0, math.inf], "counts": [1, 0],
                                                    "sum": ns / 1e9, "count": 1}}}

    differ = 0
    for _ in range(2000):
        ns = [rng.randrange(1, 10**13) for _ in range(3)]
        left = {}
        for n in ns:
            add_figures(left, h(n))
        carried = {}
        add_figures(carried, h(ns[1]))
        add_figures(carried, h(ns[2]))
        right = {}
        add_figures(right, h(ns[0]))
        add_figures(right, carried)
        total = left["histograms"]["duration_seconds"]["sum"]
        assert total == right["histograms"]["duration_seconds"]["sum"] == sum(ns) / 1e9, ns
        differ += (ns[0] / 1e9 + ns[1] / 1e9) + ns[2] / 1e9 != ns[0] / 1e9 + (ns[1] / 1e9 + ns[2] / 1e9)
    assert differ > 100   # plain float addition would have disagreed this often


def test_add_figures_keeps_the_current_blocks_gauges():
    # consecutive_failures is reset by a success: the current block's (the
    # first added) is the figure; peak_active stays the highest of all.
    into = {}
    add_figures(into, {"upstreams": {"a": {"consecutive_failures": 0, "weight": 2, "peak_active": 1,
                                           "connect_failures": 1}}})
    add_figures(into, {"upstreams": {"a": {"consecutive_failures": 3, "weight": 1, "peak_active": 5,
                                           "connect_failures": 3}}})
    assert into["upstreams"]["a"] == {"consecutive_failures": 0, "weight": 2, "peak_active": 5,
                                      "connect_failures": 4}


def test_histograms_across_listeners_and_reload(engine):
    with EchoServer("127.0.0.1") as srv:
        up = [srv.addr]
        a = Config.build(listen="127.0.0.1:0", upstreams=up, engine=engine, workers=2, name="a")
        b = Config.build(listen="127.0.0.1:0", upstreams=up, engine=engine, workers=2, name="b")
        p = Proxy.from_config([a, b]).start()
        try:
            addrs = p.addresses
            for _ in range(3):
                assert echo_roundtrip(addrs["a"], b"a") == b"a"
            for _ in range(2):
                assert echo_roundtrip(addrs["b"], b"b") == b"b"
            held = connect(addrs["a"])
            assert echo_roundtrip(addrs["a"], b"a") == b"a"
            held.sendall(b"h")
            assert recv_exact(held, 1) == b"h"
            # A changed option replaces a's block; the held bridge drains in the old one.
            pa = "127.0.0.1:%d" % addrs["a"][1]
            pb = "127.0.0.1:%d" % addrs["b"][1]
            p.reload({"workers": 2, "engine": engine, "listeners": [
                {"listen": pa, "name": "a", "upstreams": up, "idle_timeout": "1h"},
                {"listen": pb, "name": "b", "upstreams": up}]})
            assert echo_roundtrip(addrs["a"], b"a") == b"a"
            (la,) = [lst for lst in p._listeners if lst.name == "a"]
            assert len(la.draining) == 1   # two blocks: their figures add up
            held.close()
            total_a = 3 + 1 + 1 + 1
            assert wait_for(lambda: p.stats()["listeners"]["a"]["histograms"]["duration_seconds"]["count"]
                            == total_a, 5), p.stats()["listeners"]["a"]
            st = p.stats()
            ha, hb = st["listeners"]["a"]["histograms"], st["listeners"]["b"]["histograms"]
            assert ha["connect_seconds"]["count"] == total_a and hb["connect_seconds"]["count"] == 2
            for name in ("connect_seconds", "duration_seconds"):
                check_shape(ha[name])
                check_shape(st["histograms"][name])
                assert st["histograms"][name]["counts"] == [x + y for x, y in zip(ha[name]["counts"],
                                                                                  hb[name]["counts"])]
                assert st["histograms"][name]["count"] == total_a + 2
                assert abs(st["histograms"][name]["sum"] - ha[name]["sum"] - hb[name]["sum"]) < 1e-9
        finally:
            stop_bounded(p)
