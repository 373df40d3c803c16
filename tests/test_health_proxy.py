"""Failure handling end to end: retries on another upstream, passive health
(max_fails, fail_timeout) and active health checks (rise, fall, a callable),
through real proxies and loopback upstreams, both engines."""
import logging
import threading
import time

from support.balance import ask_many, ping_pong, ustats
from support.servers import Servers, which
from support.waits import wait_for


def served(addr, count):
    """Names of the upstreams that served `count` clients; a client that
    failed (closed, reset, refused) shows as None."""
    out = []
    for _ in range(count):
        try:
            out.append(which(addr, timeout=3))
        except (OSError, EOFError):
            out.append(None)
    return out


def log_lines(caplog, name, word):
    return [r.getMessage() for r in caplog.records
            if name in r.getMessage() and word in r.getMessage()]


def test_retry_and_passive_health_with_one_upstream_refusing(make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="fastproxy")
    fail_timeout = 0.5
    with Servers(2, names=["A", "R"]) as srv:
        srv["R"].stop_listening()
        p = make_proxy(upstreams=[srv["A"].addr, srv["R"].addr], workers=1,
                       max_fails=3, fail_timeout=fail_timeout)
        # Round-robin sends every other client to R: its 3rd failure marks it down.
        assert served(p.address, 6) == ["A"] * 6
        r = ustats(p, srv["R"])
        assert (r["state"], r["connect_failures"], r["consecutive_failures"]) == ("down", 3, 3), r
        t_down = time.monotonic()
        got = served(p.address, 494)
        assert got.count(None) == 0 and set(got) == {"A"}
        assert p.stats()["connect_failures"] == 0  # no client saw a failure
        periods = int((time.monotonic() - t_down) / fail_timeout) + 1
        assert ustats(p, srv["R"])["connect_failures"] <= 3 + periods  # skipped meanwhile
        # After fail_timeout one client probes R (and is retried on A); R stays down.
        time.sleep(fail_timeout + 0.1)
        before = ustats(p, srv["R"])["connect_failures"]
        assert served(p.address, 4) == ["A"] * 4
        r = ustats(p, srv["R"])
        assert r["connect_failures"] == before + 1 and r["state"] == "down", r
        # R accepts again: the next probe succeeds and R is up and in turn again.
        srv["R"].listen_again()
        assert wait_for(lambda: which(p.address) == "R", fail_timeout + 2), p.stats()
        r = ustats(p, srv["R"])
        assert (r["state"], r["consecutive_failures"]) == ("up", 0), r
        assert sorted(ask_many(p.address, 10)) == ["A"] * 5 + ["R"] * 5
        assert p.stats()["connect_failures"] == 0
        # Each passive transition is logged once (a state watcher polls every 0.25 s).
        assert wait_for(lambda: log_lines(caplog, srv["R"].addr, " is up"), 2)
        time.sleep(0.3)
        assert (len(log_lines(caplog, srv["R"].addr, " is down")),
                len(log_lines(caplog, srv["R"].addr, " is up"))) == (1, 1), caplog.text


def test_active_health_tcp_fall_and_rise(make_proxy):
    interval = 0.1
    with Servers(2) as srv:
        p = make_proxy(upstreams=[srv["A"].addr, srv["B"].addr], workers=1, max_fails=0,
                       health_interval=interval, health_timeout=0.5, health_fall=3,
                       health_rise=2)
        assert sorted(ask_many(p.address, 4)) == ["A", "A", "B", "B"]
        srv["B"].stop_listening()
        t0 = time.monotonic()
        assert wait_for(lambda: ustats(p, srv["B"])["state"] == "down", 3, 0.005), p.stats()
        took = time.monotonic() - t0
        assert took >= 0.8 * 2 * interval, took  # 3 failed checks, an interval apart
        assert ustats(p, srv["B"])["health"] == "down"
        b = ustats(p, srv["B"])
        assert served(p.address, 20) == ["A"] * 20
        b2 = ustats(p, srv["B"])
        assert (b2["accepted"], b2["connect_failures"]) == (b["accepted"], b["connect_failures"])
        srv["B"].listen_again()
        t0 = time.monotonic()
        assert wait_for(lambda: ustats(p, srv["B"])["state"] == "up", 3, 0.005), p.stats()
        assert time.monotonic() - t0 >= 0.8 * interval  # 2 passed checks
        assert "B" in ask_many(p.address, 4)


def test_each_health_transition_is_logged_once(make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="fastproxy")
    with Servers(2) as srv:
        p = make_proxy(upstreams=[srv["A"].addr, srv["B"].addr], max_fails=0,
                       health_interval=0.05, health_timeout=0.5, health_fall=2, health_rise=2)
        name = srv["B"].addr
        srv["B"].stop_listening()
        assert wait_for(lambda: ustats(p, srv["B"])["state"] == "down", 3, 0.005)
        time.sleep(0.3)  # the control plane's state watcher polls every 0.25 s
        srv["B"].listen_again()
        assert wait_for(lambda: ustats(p, srv["B"])["state"] == "up", 3, 0.005)
        time.sleep(0.3)
        assert (len(log_lines(caplog, name, " is down")),
                len(log_lines(caplog, name, " is up"))) == (1, 1), caplog.text


def test_active_health_callable_is_honoured(make_proxy):
    calls = []
    lock = threading.Lock()

    def check(host, port):
        ok = ping_pong(host, port, timeout=0.5)
        with lock:
            calls.append((host, port, ok))
        return ok

    with Servers(2) as srv:
        p = make_proxy(upstreams=[srv["A"].addr, srv["B"].addr], workers=1, health_check=check,
                       health_interval=0.05, health_timeout=0.5, health_fall=3, health_rise=2)
        bport = srv["B"].port
        assert wait_for(lambda: len(calls) >= 4, 3)
        assert {c[:2] for c in calls} == {("127.0.0.1", srv["A"].port), ("127.0.0.1", bport)}
        # B still accepts connections: only the callable can tell it is sick.
        srv["B"].healthy = False
        assert wait_for(lambda: ustats(p, srv["B"])["state"] == "down", 3, 0.002), p.stats()
        with lock:
            failed = sum(1 for h, port, ok in calls if port == bport and not ok)
        assert failed >= 3, calls
        chosen = ustats(p, srv["B"])["accepted"]
        assert served(p.address, 20) == ["A"] * 20
        assert ustats(p, srv["B"])["accepted"] == chosen  # no client was sent to B
        srv["B"].healthy = True
        assert wait_for(lambda: ustats(p, srv["B"])["state"] == "up", 3, 0.002), p.stats()
        assert "B" in ask_many(p.address, 4)


def test_consecutive_failures_reads_zero_after_a_reload_and_a_success(engine):
    # A gauge, not a count: the block a reload replaced still holds its 3
    # failures in a row, but the upstream's figure is the current block's.
    from fastproxy import Proxy

    with Servers(1, names=["R"]) as srv:
        srv["R"].stop_listening()

        def config(connect_timeout, port=0):
            return {"engine": engine, "workers": 1,
                    "listeners": [{"name": "web", "listen": f"127.0.0.1:{port}", "upstreams": [srv["R"].addr],
                                   "max_fails": 3, "fail_timeout": "0.3s", "retries": 0,
                                   "connect_timeout": connect_timeout}]}

        p = Proxy.from_config(config("2s")).start()
        try:
            assert served(p.address, 3) == [None] * 3
            r = p.stats()["listeners"]["web"]["upstreams"][srv["R"].addr]
            assert (r["state"], r["consecutive_failures"]) == ("down", 3), r
            p.reload(config("3s", port=p.address[1]))
            srv["R"].listen_again()
            assert wait_for(lambda: which(p.address, timeout=3) == "R", 5)

            def settled():
                r = p.stats()["listeners"]["web"]["upstreams"][srv["R"].addr]
                return r["state"] == "up" and r["consecutive_failures"] == 0

            # Both while the old block drains and once it is carried.
            assert wait_for(settled, 5), p.stats()["listeners"]["web"]["upstreams"]
            time.sleep(1.2)
            assert settled(), p.stats()["listeners"]["web"]["upstreams"]
            assert p.stats()["listeners"]["web"]["upstreams"][srv["R"].addr]["connect_failures"] == 3
        finally:
            p.stop()
