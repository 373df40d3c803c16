"""Balancing building blocks on their own: the UpstreamGroup (the C choice,
limits and passive health, driven through its Python methods), upstream
specs, and the active health checker. No proxy runs here."""
import logging
import random
import socket
import threading
import time
from collections import Counter

import pytest

from fastproxy._core import BALANCE_ALGORITHMS, UpstreamGroup
from fastproxy.values import ConfigError
from fastproxy.health import HealthChecker
from fastproxy.upstreams import Upstream, parse_balance, parse_upstream, parse_upstreams

from support.waits import wait_for

T0 = 10**12          # a fake monotonic clock, in ns
S = 10**9
FULL, NONE = -2, -1


def picks(b, count, client="127.0.0.1", hold=False, **kw):
    """`count` choices; each slot is given back at once unless `hold`."""
    chosen = []
    for _ in range(count):
        i = b.acquire(client, **kw)
        chosen.append(i)
        if i >= 0 and not hold:
            b.release(i)
    return chosen


def pin(b, i, count):
    """Hold `count` slots on upstream i (every other one marked tried)."""
    others = [j for j in range(len(b)) if j != i]
    for _ in range(count):
        assert b.acquire(tried=others) == i


def group(n):
    return ["10.0.0.%d:80" % (k + 1) for k in range(n)]


def make_group(specs, balance="roundrobin", **kw):
    """A group of parsed specs without addresses: it chooses, no engine runs it."""
    return UpstreamGroup([parse_upstream(s) for s in specs], balance=balance, **kw)


# ---------------------------------------------------------------- distribution

def test_roundrobin_weights_1_2_3_exact():
    b = make_group(["a:1@1", "b:1@2", "c:1@3"], "roundrobin")
    assert Counter(picks(b, 600)) == {0: 100, 1: 200, 2: 300}


@pytest.mark.parametrize("seed", range(5))
def test_random_weights_1_2_3_within_tolerance(seed):
    # Tolerance: each upstream's share within 25% of weight/6 of 600
    # picks (about 2.7 standard deviations for the smallest share).
    b = make_group(["a:1@1", "b:1@2", "c:1@3"], "random", seed=seed)
    got = Counter(picks(b, 600))
    for i, expected in enumerate((100, 200, 300)):
        assert abs(got[i] - expected) <= 0.25 * expected, got


def test_random_prefers_the_lighter_of_two():
    b = make_group(group(3), "random", seed=7)
    pin(b, 0, 50)
    got = Counter(picks(b, 900))
    # Upstream 0 wins only when both draws are 0: about 1/9 of the picks.
    assert got[0] < 900 / 9 * 1.5, got
    assert got[1] > 300 and got[2] > 300, got


def test_smooth_roundrobin_interleaves_5_1_1():
    b = make_group(["a:1@5", "b:1@1", "c:1@1"])
    order = "".join("abc"[i] for i in picks(b, 14))
    assert order == "aabacaa" * 2


def test_roundrobin_skips_unavailable_and_keeps_weights():
    b = make_group(["a:1@2", "b:1@1", "c:1@1"])
    b.set_health(1, False)
    assert Counter(picks(b, 300)) == {0: 200, 2: 100}


# ---------------------------------------------------------------- leastconn

def test_leastconn_sends_new_clients_to_the_least_loaded():
    b = make_group(group(3), "leastconn")
    pin(b, 0, 3)
    pin(b, 1, 1)
    # Active 3/1/0: c; then b and c tie at 1 and the scan, which starts
    # after the last choice, meets b first; then c, and so on up to 3/3/3,
    # where ties rotate.
    assert picks(b, 5, hold=True) == [2, 1, 2, 1, 2]
    assert picks(b, 3, hold=True) == [0, 1, 2]
    assert [b.state(i)["active"] for i in range(3)] == [4, 4, 4]


def test_leastconn_ties_go_round_robin():
    b = make_group(group(3), "leastconn")
    assert picks(b, 6) == [0, 1, 2, 0, 1, 2]


def test_leastconn_is_relative_to_weight():
    b = make_group(["a:1@1", "b:1@3"], "leastconn")
    assert Counter(picks(b, 8, hold=True)) == {0: 2, 1: 6}


# ---------------------------------------------------------------- source

def client_addresses(count=3000):
    rnd = random.Random(5)
    addrs = {"127.%d.%d.%d" % (rnd.randrange(256), rnd.randrange(256), rnd.randrange(1, 255))
             for _ in range(count)}
    return sorted(addrs) + ["::1"]


def mapping(b, clients, **kw):
    return {c: picks(b, 1, client=c, **kw)[0] for c in clients}


def test_source_is_sticky_and_spread():
    b = make_group(group(5), "source")
    clients = client_addresses()
    first = mapping(b, clients)
    assert mapping(b, clients) == first
    spread = Counter(first.values())
    assert set(spread) == set(range(5))
    assert min(spread.values()) > len(clients) / 5 / 2, spread
    assert b.acquire("::ffff:127.0.0.1") == b.acquire("127.0.0.1")


@pytest.mark.parametrize("gone", range(5))
def test_source_unavailable_upstream_moves_only_its_clients(gone):
    b = make_group(group(5), "source")
    clients = client_addresses()
    before = mapping(b, clients)
    b.set_health(gone, False)
    after = mapping(b, clients)
    moved = {c for c in clients if after[c] != before[c]}
    assert moved == {c for c in clients if before[c] == gone}
    assert moved and gone not in after.values()
    # A retry after a failed connect goes where that client would go with
    # the upstream down: the next one along the ring.
    b.set_health(gone, True)
    assert {c: b.acquire(c, tried=(before[c],)) for c in moved} == {c: after[c] for c in moved}


def test_source_group_rebuilt_without_one_moves_only_its_clients():
    names = group(5)
    clients = client_addresses()
    full = make_group(names, "source")
    before = {c: names[i] for c, i in mapping(full, clients).items()}
    rest = names[:2] + names[3:]
    after = {c: rest[i] for c, i in mapping(make_group(rest, "source"), clients).items()}
    moved = {c for c in clients if after[c] != before[c]}
    assert moved == {c for c in clients if before[c] == names[2]}


# ---------------------------------------------------------------- first, backup, weight 0

def test_first_takes_the_first_available_in_order():
    b = make_group(["a:1,max-connections=2", "b:1", "c:1"], "first")
    assert picks(b, 5) == [0] * 5
    assert picks(b, 3, hold=True) == [0, 0, 1]
    b.set_health(1, False)
    assert b.acquire() == 2


@pytest.mark.parametrize("algorithm", BALANCE_ALGORITHMS)
def test_backup_only_when_no_regular_is_available(algorithm):
    b = make_group(["a:1", "b:1,max-connections=1", "c:1,backup"], algorithm)
    assert 2 not in picks(b, 100)
    b.set_health(0, False)
    assert picks(b, 1, hold=True) == [1]    # b now full, a down
    assert picks(b, 3) == [2, 2, 2]
    b.set_health(0, True)
    assert picks(b, 1) == [0]
    b.set_health(0, False)
    b.set_health(2, False)
    assert b.acquire() == FULL              # b is up, at its limit
    b.set_health(1, False)
    assert b.acquire() == NONE
    assert b.state(2)["state"] == "down"


@pytest.mark.parametrize("algorithm", BALANCE_ALGORITHMS)
def test_weight_zero_is_drained(algorithm):
    b = make_group(["a:1@0", "b:1", "c:1@0"], algorithm)
    assert set(picks(b, 50, hold=True)) == {1}
    assert b.state(0)["state"] == "drained" and b.state(1)["state"] == "up"
    assert make_group(["a:1@0"], algorithm).acquire() == NONE


@pytest.mark.parametrize("algorithm", BALANCE_ALGORITHMS)
def test_tried_upstreams_are_avoided(algorithm):
    b = make_group(group(3), algorithm)
    for _ in range(20):
        assert picks(b, 1, tried=(0, 2)) == [1]
    assert b.acquire(tried=(0, 1, 2)) == NONE


# ---------------------------------------------------------------- limits

def test_max_connections_is_exact():
    b = make_group(["a:1,max-connections=3", "b:1,max-connections=2"], "leastconn")
    assert sorted(picks(b, 5, hold=True)) == [0, 0, 0, 1, 1]
    assert b.acquire() == FULL
    b.release(1)
    assert b.acquire() == 1
    st = b.state(0)
    assert (st["active"], st["peak_active"], st["accepted"]) == (3, 3, 3)


def test_max_connections_under_python_threads():
    b = make_group(["a:1,max-connections=3", "b:1,max-connections=2"], "random", seed=1)
    start = threading.Barrier(8)
    got = []

    def grab():
        start.wait(5)
        got.extend(i for i in picks(b, 10, hold=True) if i >= 0)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert Counter(got) == {0: 3, 1: 2}
    assert [b.state(i)["peak_active"] for i in (0, 1)] == [3, 2]


@pytest.mark.parametrize("algorithm", BALANCE_ALGORITHMS)
def test_max_connections_under_native_threads(algorithm):
    # _stress runs without the GIL: these threads race in C, on the CAS.
    # (With a check-then-add instead of the CAS, most runs of these fail.)
    b = make_group(["a:1,max-connections=3", "b:1,max-connections=2", "c:1,max-connections=1"], algorithm)
    start = threading.Barrier(4)
    taken = []

    def hammer():
        start.wait(5)
        taken.append(b._stress(200000, 8))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    states = [b.state(i) for i in range(3)]
    assert all(s["peak_active"] <= limit for s, limit in zip(states, (3, 2, 1))), states
    assert [s["active"] for s in states] == [0, 0, 0]
    assert sum(s["accepted"] for s in states) == sum(taken) > 0


# ---------------------------------------------------------------- passive health

def test_passive_health_max_fails_and_fail_timeout():
    b = make_group(["a:1", "b:1"], max_fails=3, fail_timeout=10)
    changes = b.changes
    assert not b.connect_result(0, False, T0)
    assert not b.connect_result(0, False, T0)
    b.connect_result(0, True, T0)                       # a success resets the count
    assert b.state(0, T0)["consecutive_failures"] == 0
    assert [b.connect_result(0, False, T0) for _ in range(3)] == [False, False, True]
    assert b.changes == changes + 1
    assert b.state(0, T0)["state"] == "down"
    assert set(picks(b, 20, now_ns=T0 + 5 * S)) == {1}
    # After fail_timeout, one client probes it; the others still skip it.
    later = T0 + 11 * S
    assert b.state(0, later)["state"] == "up"
    assert sorted(picks(b, 4, now_ns=later, hold=True)) == [0, 1, 1, 1]
    assert b.state(0, later)["state"] == "down"
    # The probe fails: down again at once (no new transition to log).
    assert not b.connect_result(0, False, later)
    assert set(picks(b, 10, now_ns=later + 5 * S)) == {1}
    # The next probe succeeds: up.
    again = later + 11 * S
    assert b.acquire(tried=(1,), now_ns=again) == 0
    assert b.connect_result(0, True, again)
    assert b.changes == changes + 2
    assert b.state(0, again)["state"] == "up"
    assert set(picks(b, 10, now_ns=again)) == {0, 1}


def test_passive_health_off_with_max_fails_zero():
    b = make_group(["a:1"], max_fails=0)
    assert not any(b.connect_result(0, False, T0) for _ in range(100))
    assert b.acquire(now_ns=T0) == 0


def test_set_health_transitions_and_state():
    b = make_group(["a:1", "b:1,max-connections=7,backup"])
    changes = b.changes
    assert not b.set_health(0, True)
    assert b.set_health(0, False)
    assert not b.set_health(0, False)
    assert b.changes == changes + 1
    assert b.state(0) == {"state": "down", "health": "down", "active": 0, "peak_active": 0,
                          "accepted": 0, "consecutive_failures": 0, "bytes_upstream": 0,
                          "bytes_downstream": 0, "connect_failures": 0, "admin": "ready", "weight": 1}
    assert b.names == ("a:1", "b:1") and len(b) == 2 and b.algorithm == "roundrobin"


def test_group_argument_errors():
    with pytest.raises(ValueError):
        make_group([])
    with pytest.raises(ValueError):
        make_group(["a:1"], "fastest")
    with pytest.raises(ConfigError):
        make_group(["a:1@999"])
    with pytest.raises(ValueError, match="out of range"):    # read by attribute: checked again
        UpstreamGroup([type("U", (), {"address": "a:1", "weight": 999, "max_connections": None,
                                      "backup": False})()])
    with pytest.raises(ValueError, match="listed twice"):
        make_group(["a:1", "a:1"])
    with pytest.raises(ValueError, match="address lists"):
        UpstreamGroup([parse_upstream("a:1")], [])
    b = make_group(["a:1"])
    with pytest.raises(IndexError):
        b.release(1)
    with pytest.raises(IndexError):
        b.acquire(tried=(5,))
    with pytest.raises(ValueError):
        b.acquire("not an address")


# ---------------------------------------------------------------- upstream specs

@pytest.mark.parametrize("spec, expected", [
    ("127.0.0.1:80", Upstream("127.0.0.1:80")),
    ("backend:8080@5", Upstream("backend:8080", weight=5)),
    ("[::1]:80@0,backup", Upstream("[::1]:80", weight=0, backup=True)),
    (" h:1 @ 2 , max-connections=10 ,backup", Upstream("h:1", 2, 10, True)),
    ("h:1,backup,max-connections=1", Upstream("h:1", 1, 1, True)),
])
def test_parse_upstream(spec, expected):
    u = parse_upstream(spec)
    assert u == expected
    assert parse_upstream(u) is u


def test_upstream_normalises_and_exposes_host_port():
    u = Upstream(" [::1]:443 ", weight=3)
    assert (u.address, u.host, u.port, u.weight) == ("[::1]:443", "::1", 443, 3)
    with pytest.raises(Exception):
        u.weight = 4    # frozen


@pytest.mark.parametrize("spec, problem", [
    ("h:1@", "'@' needs a weight"),
    ("h:1@x", "weight 'x' is not a whole number"),
    ("h:1@257", "weight 257 is out of range (0-256)"),
    ("h:1@-1", "weight '-1' is not a whole number"),
    ("h:1,max-connections=0", "max-connections 0 is out of range (1-16777216)"),
    ("h:1,max-connections=", "max-connections '' is not a whole number"),
    ("h:1,max-connections", "unknown option 'max-connections'"),
    ("h:1,backup=yes", "unknown option 'backup=yes'"),
    ("h:1,weight=2", "unknown option 'weight=2'"),
    ("h:1,backup,backup", "backup is given twice"),
    ("h", "expected HOST:PORT"),
    ("h:0", "port 0 is out of range"),
    ("::1:80", "needs brackets"),
    (":80", "needs a host"),
])
def test_parse_upstream_errors_name_the_spec(spec, problem):
    with pytest.raises(ConfigError) as e:
        parse_upstream(spec, "--upstream")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--upstream: %r: " % spec) and problem in msg, msg


@pytest.mark.parametrize("kw, problem", [
    ({"weight": 300}, "weight 300 is out of range"),
    ({"weight": True}, "weight True is not a whole number"),
    ({"weight": 1.5}, "weight 1.5 is not a whole number"),
    ({"max_connections": 0}, "max-connections 0 is out of range"),
    ({"backup": "yes"}, "backup must be True or False"),
])
def test_upstream_dataclass_errors(kw, problem):
    with pytest.raises(ConfigError) as e:
        Upstream("h:1", **kw)
    assert str(e.value).startswith("upstream: 'h:1': ") and problem in str(e.value)


def test_parse_upstreams_and_balance():
    assert parse_upstreams(["a:1", Upstream("b:2", 2)]) == (Upstream("a:1"), Upstream("b:2", 2))
    for bad, problem in [([], "at least one"), ("a:1", "a list"), (["a:1", "a:1@2"], "listed twice"),
                         ([3], "expected HOST:PORT")]:
        with pytest.raises(ConfigError, match=problem):
            parse_upstreams(bad)
    assert [parse_balance(a) for a in BALANCE_ALGORITHMS] == list(BALANCE_ALGORITHMS)
    with pytest.raises(ConfigError, match="must be one of roundrobin, leastconn, random, source, first"):
        parse_balance("fastest")


# ---------------------------------------------------------------- active health

class Script:
    """A check function answering from a per-upstream script (then True)."""

    def __init__(self, **answers):
        self.answers = {int(k[1:]): list(v) for k, v in answers.items()}
        self.calls = Counter()

    def __call__(self, host, port):
        self.calls[port] += 1
        left = self.answers.get(port, [])
        result = left.pop(0) if left else True
        if isinstance(result, Exception):
            raise result
        return result


def test_health_rise_and_fall(caplog):
    calls = []
    script = Script(u1=[False, False, True, False, False, False, True, True, True],
                    u2=[RuntimeError("boom")] * 3)
    hc = HealthChecker([("h", 1), ("h", 2)], lambda i, up: calls.append((i, up)),
                       interval=60, timeout=2, rise=2, fall=3, check=script)
    with caplog.at_level(logging.INFO, logger="fastproxy"):
        for rnd in range(1, 10):
            hc.check_once()
            if rnd == 3:
                assert calls == [(1, False)]   # upstream 2: three exceptions
            if rnd == 6:
                assert calls == [(1, False), (1, True), (0, False)]
    assert calls == [(1, False), (1, True), (0, False), (0, True)]
    assert hc.up == (True, True)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("fastproxy") and r.levelno >= logging.INFO]
    assert lines == [
        "upstream h:2 is down: 3 health checks failed in a row",
        "upstream h:2 is up: 2 health checks passed in a row",
        "upstream h:1 is down: 3 health checks failed in a row",
        "upstream h:1 is up: 2 health checks passed in a row",
    ]


def test_health_hung_check_counts_as_failed_and_is_not_piled_up():
    release = threading.Event()
    started = []

    def check(host, port):
        started.append(port)
        if port == 2:
            release.wait(10)
        return True

    calls = []
    hc = HealthChecker([("h", 1), ("h", 2)], lambda i, up: calls.append((i, up)),
                       interval=60, timeout=0.2, fall=2, rise=1, check=check)
    t0 = time.monotonic()
    hc.check_once()
    hc.check_once()
    assert time.monotonic() - t0 < 2
    assert calls == [(1, False)] and Counter(started) == {1: 2, 2: 1}
    release.set()
    assert wait_for(lambda: hc._results.qsize() == 1, 5)
    hc.check_once()                       # the late answer frees it: checked again
    assert calls == [(1, False), (1, True)] and Counter(started)[2] == 2


def test_health_stops_promptly():
    hc = HealthChecker([("h", 1)], lambda i, up: None, interval=60, check=lambda h, p: True).start()
    time.sleep(0.05)
    t0 = time.monotonic()
    hc.stop()
    assert time.monotonic() - t0 < 1 and not hc._thread.is_alive()


def listener(port=0):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)   # the checks' connections are never accepted
    return s


def test_health_tcp_checks_on_loopback_drive_a_group():
    a, b_sock = listener(), listener()
    targets = [s.getsockname() for s in (a, b_sock)]
    bal = make_group(["127.0.0.1:%d" % p for _, p in targets])
    hc = HealthChecker(targets, bal.set_health, interval=0.05, timeout=1, rise=2, fall=2).start()
    try:
        time.sleep(0.3)
        assert hc.up == (True, True) and bal.state(1)["state"] == "up"
        b_sock.close()
        assert wait_for(lambda: bal.state(1)["state"] == "down", 5)
        assert set(picks(bal, 10)) == {0}
        b_sock = listener(targets[1][1])
        assert wait_for(lambda: bal.state(1)["state"] == "up", 5)
        assert hc.up == (True, True)
    finally:
        hc.stop()
        a.close()
        b_sock.close()
