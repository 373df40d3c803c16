"""Access control end to end, through real proxies on loopback: allow/deny rules
(IPv4 sources 127.0.0.2/127.0.0.3, ::1, IPv4-mapped clients), rule files,
reject_with, time windows with a replaceable clock, per-IP rate limits."""
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest

from fastproxy import Proxy
from fastproxy.values import ConfigError
from support.cli import run_cli
from support.sockets import connect_from, ipv6_available, read_all, recv_exact
from support.waits import wait_stat

needs_ipv6 = pytest.mark.skipif(not ipv6_available(), reason="no IPv6 on this host")

WED_NOON = datetime(2024, 5, 15, 12, 0, tzinfo=timezone.utc)   # a Wednesday
WED_EVENING = WED_NOON.replace(hour=19)
SAT_NOON = WED_NOON + timedelta(days=3)
OFFICE = ["Mon-Fri 08:00-18:00"]


def dest(proxy, src):
    """Where a client from src reaches proxy (a Proxy, or a CLI proxy's address);
    a dual-stack listener takes both families."""
    host, port = (proxy if isinstance(proxy, tuple) else proxy.address)[:2]
    if host in ("::", "0.0.0.0"):
        host = "::1" if src == "::1" else ("::ffff:127.0.0.1" if src.startswith("::ffff:") else "127.0.0.1")
    return (host, port)


def served(proxy, src, payload=b"hello"):
    with connect_from(dest(proxy, src), src) as s:
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload, "client from %s not served" % src


def refused(proxy, src, want=("eof", "reset")):
    """Connects from src, sends nothing; the proxy must close at once, with nothing sent."""
    t0 = time.monotonic()
    try:
        s = connect_from(dest(proxy, src), src)
    except ConnectionResetError:   # the RST beat connect()'s own completion check
        data, how = b"", "reset"
    else:
        with s:
            data, how = read_all(s, timeout=3.0)
    assert how in want, "client from %s: %r (want %r)" % (src, how, want)
    assert data == b""
    assert time.monotonic() - t0 < 1.5, "refusal took %.2fs" % (time.monotonic() - t0)
    return how


def dual_stack(make_proxy, upstream, **kw):
    p = make_proxy(upstream, listen=":0", **kw)
    if p.address[0] != "::":
        pytest.skip("no dual-stack listener on this host")
    return p


# ---------------------------------------------------------------- IP rules

def test_deny_ipv4_source(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, deny=["127.0.0.2"])
    refused(p, "127.0.0.2")
    assert echo_server.accepted == 0, "a denied client reached the upstream"
    served(p, "127.0.0.3")
    served(p, "127.0.0.1")
    st = wait_stat(p, "denied", 1)
    assert st["denied"] == 1 and st["accepted"] == 3


def test_allow_only(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, allow=["127.0.0.3/32", "192.0.2.0/24"])
    served(p, "127.0.0.3")
    refused(p, "127.0.0.2")
    refused(p, "127.0.0.1")
    assert wait_stat(p, "denied", 2)["denied"] == 2
    assert echo_server.accepted == 1


def test_deny_wins_over_allow(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, allow=["127.0.0.0/8"], deny=["127.0.0.2"])
    refused(p, "127.0.0.2")
    served(p, "127.0.0.3")
    assert wait_stat(p, "denied", 1)["denied"] == 1


@needs_ipv6
def test_deny_ipv6(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, listen="[::1]:0", deny=["::1"])
    refused(p, "::1")
    assert wait_stat(p, "denied", 1)["denied"] == 1
    q = make_proxy(echo_server.addr, listen="[::1]:0", deny=["::2", "127.0.0.0/8"])
    served(q, "::1")


@needs_ipv6
def test_ipv4_mapped_clients_match_ipv4_rules(make_proxy, echo_server):
    p = dual_stack(make_proxy, echo_server.addr, deny=["127.0.0.2"])
    refused(p, "127.0.0.2")           # IPv4 client, seen as ::ffff:127.0.0.2
    refused(p, "::ffff:127.0.0.2")    # an IPv6 socket with a mapped address
    served(p, "::ffff:127.0.0.3")
    served(p, "127.0.0.3")
    served(p, "::1")
    assert wait_stat(p, "denied", 2)["denied"] == 2


@needs_ipv6
def test_allow_only_covers_both_families(make_proxy, echo_server):
    p = dual_stack(make_proxy, echo_server.addr, allow=["::1"])
    served(p, "::1")
    refused(p, "127.0.0.1")
    q = dual_stack(make_proxy, echo_server.addr, allow=["127.0.0.3"])
    served(q, "::ffff:127.0.0.3")
    refused(q, "::1")


def test_rule_files_with_comments_and_blank_lines(make_proxy, echo_server, tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text("# who may come in\n\n  127.0.0.2   # the office\n127.0.0.3/32\n\n# end\n")
    deny = tmp_path / "deny.txt"
    deny.write_text("\n127.0.0.3 # revoked\n")
    p = make_proxy(echo_server.addr, allow_file=[str(allow)], deny_file=[str(deny)])
    served(p, "127.0.0.2")
    refused(p, "127.0.0.3")   # deny file wins
    refused(p, "127.0.0.1")   # not in the allow file
    assert wait_stat(p, "denied", 2)["denied"] == 2


def test_bad_rule_file_line(any_engine, tmp_path, echo_server):
    bad = tmp_path / "deny.txt"
    bad.write_text("127.0.0.2\n# fine\n\n10.0.0.300\n")
    with pytest.raises(ConfigError) as e:
        Proxy("127.0.0.1:0", echo_server.addr, deny_file=[str(bad)], engine=any_engine)
    assert e.value.field == "deny_file"
    assert "%s:4" % bad in str(e.value) and "\n" not in str(e.value)
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                            "--deny-file", str(bad), "--engine", any_engine], timeout=20)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert "--deny-file" in lines[0] and "%s:4" % bad in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("mode,want", [("close", "eof"), ("reset", "reset")])
def test_reject_with(make_proxy, echo_server, mode, want):
    p = make_proxy(echo_server.addr, deny=["127.0.0.2"], reject_with=mode)
    for _ in range(3):
        refused(p, "127.0.0.2", want=(want,))
    served(p, "127.0.0.3")


def test_cli_allow_deny_reject_with(cli_proxy, echo_server):
    cp = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                   "--allow", "127.0.0.0/8", "--deny", "127.0.0.2", "--reject-with", "reset")
    refused(cp.address, "127.0.0.2", want=("reset",))
    served(cp.address, "127.0.0.3")
    assert echo_server.accepted == 1


# ---------------------------------------------------------------- time windows

class FakeClock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def test_time_window_outside_refuses_inside_admits(make_proxy, echo_server):
    clock = FakeClock(WED_EVENING)
    p = make_proxy(echo_server.addr, allow_time=OFFICE, time_zone="UTC", clock=clock)
    refused(p, "127.0.0.1")
    st = wait_stat(p, "outside_window", 1)
    assert st["outside_window"] == 1 and st["denied"] == 0
    clock.now = WED_NOON
    assert p.check_time_windows() is True
    served(p, "127.0.0.1")
    clock.now = SAT_NOON
    assert p.check_time_windows() is False
    refused(p, "127.0.0.2")
    assert wait_stat(p, "outside_window", 2)["outside_window"] == 2
    assert echo_server.accepted == 1


def test_time_window_epoch_clock_and_time_zone(make_proxy, echo_server):
    # 17:30 UTC is inside 08:00-18:00 in UTC but 19:30 in Berlin (summer time).
    clock = FakeClock(WED_NOON.replace(hour=17, minute=30).timestamp())
    p = make_proxy(echo_server.addr, allow_time=OFFICE, time_zone="Europe/Berlin", clock=clock)
    refused(p, "127.0.0.1")
    clock.now -= 2 * 3600
    assert p.check_time_windows() is True
    served(p, "127.0.0.1")


@pytest.mark.parametrize("close_live", [True, False])
def test_time_window_end_and_live_bridges(make_proxy, echo_server, close_live):
    clock = FakeClock(WED_NOON)
    p = make_proxy(echo_server.addr, allow_time=OFFICE, time_zone="UTC", clock=clock,
                   close_outside_window=close_live)
    with connect_from(p.address, "127.0.0.1") as live:
        live.sendall(b"before")
        assert recv_exact(live, 6) == b"before"
        clock.now = WED_EVENING
        assert p.check_time_windows() is False
        refused(p, "127.0.0.2")
        if close_live:
            data, how = read_all(live, timeout=2.0)
            assert how == "eof" and data == b"", "live bridge not closed at window end: %r" % how
        else:
            live.sendall(b"after")
            assert recv_exact(live, 5) == b"after"
    assert p.stats()["outside_window"] == 1


# ---------------------------------------------------------------- rate limits

def test_rate_limit_per_ip(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, rate_limit_per_ip="3/500ms")
    t0 = time.monotonic()
    for _ in range(3):
        served(p, "127.0.0.2")
    refused(p, "127.0.0.2")
    burst = time.monotonic() - t0
    served(p, "127.0.0.3")        # another address has its own bucket
    st = wait_stat(p, "rate_limited", 1)
    assert st["rate_limited"] == 1 and st["denied"] == 0
    assert burst < 0.4, "burst took %.2fs, too slow to prove the limit" % burst
    time.sleep(0.6)               # the bucket refills over D
    for _ in range(3):
        served(p, "127.0.0.2")
    assert p.stats()["rate_limited"] == 1


def test_rate_limit_table_is_bounded(make_proxy, echo_server):
    p = make_proxy(echo_server.addr, rate_limit_per_ip="1/30s", rate_limit_table=4)
    sources = ["127.0.0.%d" % i for i in range(2, 22)]
    for src in sources:
        served(p, src)
    refused(p, sources[-1])       # recently seen: still limited
    served(p, sources[0])         # least recently seen: evicted, so a fresh bucket
    st = wait_stat(p, "rate_limited", 1)
    assert st["rate_limited"] == 1
    assert echo_server.accepted == len(sources) + 1


def test_cli_time_window_and_rate_limit(cli_proxy, echo_server):
    # A window on a day three days from now (UTC) is closed all through the test.
    day = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[(datetime.now(timezone.utc).weekday() + 3) % 7]
    closed = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                       "--allow-time", "%s 00:00-24:00" % day, "--time-zone", "UTC")
    refused(closed.address, "127.0.0.1")
    limited = cli_proxy("--listen", "127.0.0.1:0", "--upstream", echo_server.addr,
                        "--allow-time", "00:00-24:00", "--rate-limit-per-ip", "1/1m")
    served(limited.address, "127.0.0.2")
    refused(limited.address, "127.0.0.2")
    served(limited.address, "127.0.0.3")
    assert echo_server.accepted == 2
