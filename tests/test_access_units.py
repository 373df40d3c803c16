"""Unit tests of the access-control building blocks: IP rules, rate limits,
the PROXY protocol parser and builder (byte by byte against the spec,
haproxy.org/download/2.9/doc/proxy-protocol.txt) and time windows.

No sockets, no proxy and no waiting: the rate limiter takes a fake now_ns,
time windows a fake clock.
"""
import ipaddress
import os
import struct
import threading
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastproxy import _core
from fastproxy.acl import parse_cidr, read_rule_file
from fastproxy.ratelimit import parse_rate
from fastproxy.timewindows import TimeWindow, TimeWindows, load_time_zone, parse_time_window
from fastproxy.values import ConfigError
from support.procfs import proc_fd_count

AccessList = _core.AccessList
RateLimiter = _core.RateLimiter
parse = _core.parse_proxy_header
build = _core.build_proxy_header

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
MS = 1_000_000
S = 1_000_000_000


def config_error(call, *args, field, **kwargs):
    """The ConfigError call(*args) raises: it names `field`, in one line."""
    with pytest.raises(ConfigError) as e:
        call(*args, **kwargs)
    assert e.value.field == field
    assert "\n" not in str(e.value)
    return e.value


# ================================================================ IP rules

class TestAccessList:
    def test_no_rules_admit_everyone(self):
        acl = AccessList()
        assert len(acl) == 0
        assert acl.admits("192.0.2.1") and acl.admits("::1")

    def test_deny_ipv4(self):
        acl = AccessList(deny=["127.0.0.2", "10.0.0.0/8"])
        assert not acl.admits("127.0.0.2")
        assert acl.admits("127.0.0.3")
        assert not acl.admits("10.255.255.255") and not acl.admits("10.0.0.0")
        assert acl.admits("11.0.0.0") and acl.admits("9.255.255.255")
        assert acl.admits("::1")

    def test_deny_ipv6(self):
        acl = AccessList(deny=["::1", "2001:db8::/32"])
        assert not acl.admits("::1")
        assert not acl.admits("2001:db8:ffff::1")
        assert acl.admits("2001:db9::1") and acl.admits("::2")
        assert acl.admits("127.0.0.1")

    def test_mapped_clients_match_ipv4_rules(self):
        acl = AccessList(deny=["127.0.0.2"])
        assert not acl.admits("::ffff:127.0.0.2")
        assert acl.admits("::ffff:127.0.0.3")
        allow = AccessList(allow=["192.0.2.0/24"])
        assert allow.admits("::ffff:192.0.2.9")
        assert not allow.admits("::ffff:192.0.3.9")

    def test_mapped_ipv6_rule_matches_ipv4_clients(self):
        acl = AccessList(deny=["::ffff:10.0.0.0/104"])
        assert not acl.admits("10.1.2.3")
        assert acl.admits("11.1.2.3")

    def test_deny_wins_over_allow(self):
        acl = AccessList(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"])
        assert acl.admits("10.2.0.1")
        assert not acl.admits("10.1.0.1")
        # Even when the deny rule is wider than the allow rule.
        acl = AccessList(allow=["10.1.2.3"], deny=["10.0.0.0/8"])
        assert not acl.admits("10.1.2.3")

    def test_allow_rules_are_exclusive(self):
        acl = AccessList(allow=["127.0.0.2", "::1"])
        assert acl.admits("127.0.0.2") and acl.admits("::1")
        assert not acl.admits("127.0.0.3")
        assert not acl.admits("::2")

    def test_networks_and_strings(self):
        acl = AccessList(allow=[ipaddress.ip_network("192.0.2.0/24"), "2001:db8::/32"])
        assert len(acl) == 2
        assert acl.admits("192.0.2.200") and acl.admits("2001:db8::5")
        assert acl.allow[1] == ipaddress.ip_network("2001:db8::/32")

    def test_overlapping_and_adjacent_rules_merge(self):
        acl = AccessList(deny=["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24"])
        assert len(acl) == 4
        assert acl.ranges == (0, 2)   # 10.0.0.0-10.0.1.255 and 10.0.3.0/24
        assert not acl.admits("10.0.1.255")
        assert acl.admits("10.0.2.0")
        assert not acl.admits("10.0.3.0")

    def test_everything_rules(self):
        assert not AccessList(deny=["0.0.0.0/0"]).admits("255.255.255.255")
        assert AccessList(deny=["0.0.0.0/0"]).admits("::1")
        # IPv4 lives inside the IPv6 space (::ffff:0:0/96): ::/0 covers it.
        assert not AccessList(deny=["::/0"]).admits("1.2.3.4")

    def test_bad_address_raises(self):
        for bad in ("not-an-ip", "1.2.3.4\0junk", "1.2.3", ""):
            with pytest.raises(ValueError):
                AccessList().admits(bad)
        assert not AccessList(deny=["fe80::/10"]).admits("fe80::1%eth0")
        with pytest.raises(ValueError):
            AccessList(deny=["10.0.0.1/8"])

    def test_ten_thousand_rules(self):
        # Every other /32 of 10.0.0.0/16: 10,000 ranges that cannot merge.
        base = int(ipaddress.ip_address("10.0.0.0"))
        deny = [str(ipaddress.ip_address(base + 2 * i)) for i in range(10_000)]
        acl = AccessList(deny=deny)
        assert len(acl) == 10_000 and acl.ranges == (0, 10_000)
        for i in (0, 1, 2, 4999, 9998, 9999, 19_998, 19_999, 20_000):
            ip = str(ipaddress.ip_address(base + i))
            assert acl.admits(ip) == (i % 2 == 1 or i >= 20_000), ip

    @settings(max_examples=200, deadline=None)
    @given(data=st.data())
    def test_matches_a_reference_model(self, data):
        def networks():
            v4 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                           st.integers(0, 2**32 - 1), st.integers(0, 32))
            v6 = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                           st.integers(0, 2**128 - 1), st.integers(0, 128))
            return st.lists(st.one_of(v4, v6), max_size=12)

        allow, deny = data.draw(networks()), data.draw(networks())
        acl = AccessList(allow=allow, deny=deny)
        candidates = [n.network_address for n in allow + deny]
        candidates += [n.broadcast_address for n in allow + deny]
        candidates += [ipaddress.ip_address(data.draw(st.integers(0, 2**32 - 1))) for _ in range(5)]
        # The model: an IPv4 client or rule is its IPv4-mapped IPv6 form.
        def v6(addr):
            return addr if addr.version == 6 else ipaddress.ip_address(f"::ffff:{addr}")

        def v6net(n):
            return n if n.version == 6 else ipaddress.ip_network(f"::ffff:{n.network_address}/{96 + n.prefixlen}")

        for addr in candidates:
            def covered(nets):
                return any(v6(addr) in v6net(n) for n in nets)
            expected = not covered(deny) and (not allow or covered(allow))
            assert acl.admits(str(addr)) == expected, (addr, allow, deny)


class TestParseCidr:
    def test_bare_addresses(self):
        assert parse_cidr("192.0.2.7", "allow") == ipaddress.ip_network("192.0.2.7/32")
        assert parse_cidr(" ::1 ", "allow") == ipaddress.ip_network("::1/128")

    def test_networks(self):
        assert parse_cidr("10.0.0.0/8", "deny").prefixlen == 8
        assert parse_cidr("2001:db8::/32", "deny").version == 6
        net = ipaddress.ip_network("10.0.0.0/8")
        assert parse_cidr(net, "deny") is net
        assert parse_cidr(ipaddress.ip_address("::1"), "deny").prefixlen == 128

    def test_host_bits_suggest_the_network(self):
        error = config_error(parse_cidr, "10.1.2.3/8", "deny", field="deny")
        assert "did you mean 10.0.0.0/8?" in str(error)

    @pytest.mark.parametrize("bad", ["", "example.com", "10.0.0.256", "10.0.0.0/33",
                                     "::1/129", "010.0.0.1", "1.2.3.4/-1", 42, None])
    def test_garbage(self, bad):
        config_error(parse_cidr, bad, "allow", field="allow")


class TestRuleFiles:
    def test_comments_and_blank_lines(self, tmp_path):
        path = tmp_path / "deny.txt"
        path.write_text("# office\n10.0.0.0/8\n\n   \n::1  # loopback\n  192.0.2.7\n")
        rules = read_rule_file(path, "deny_file")
        assert [str(r) for r in rules] == ["10.0.0.0/8", "::1/128", "192.0.2.7/32"]

    def test_bad_line_names_file_and_line(self, tmp_path):
        path = tmp_path / "allow.txt"
        path.write_text("10.0.0.0/8\n# fine\n10.0.0.300\n")
        error = config_error(read_rule_file, path, "allow_file", field="allow_file")
        assert error.value == f"{path}:3"
        assert "10.0.0.300" in str(error)

    def test_two_rules_on_a_line(self, tmp_path):
        path = tmp_path / "allow.txt"
        path.write_text("10.0.0.0/8 192.0.2.0/24\n")
        with pytest.raises(ConfigError, match="one rule per line"):
            read_rule_file(path, "allow_file")

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match="cannot be read"):
            read_rule_file(tmp_path / "nope.txt", "deny_file")

    @pytest.mark.linux_only   # counts fds in /proc
    @pytest.mark.parametrize("special", ["directory", "/dev/null", "fifo"])
    def test_a_directory_or_special_file_is_refused_without_leaking_its_fd(self, tmp_path, special):
        path = {"directory": str(tmp_path), "fifo": str(tmp_path / "rules.fifo")}.get(special, special)
        if special == "fifo":
            os.mkfifo(path)
        before = proc_fd_count(os.getpid())
        for _ in range(50):
            error = config_error(read_rule_file, path, "allow_file", field="allow_file")
        assert proc_fd_count(os.getpid()) == before
        assert error.value == path
        assert ("is a directory, not a rule file" if special == "directory" else "not a regular file") in str(error)

    def test_file_feeds_an_access_list(self, tmp_path):
        path = tmp_path / "deny.txt"
        path.write_text("127.0.0.2\n::1\n")
        acl = AccessList(deny=read_rule_file(path, "deny_file"))
        assert not acl.admits("127.0.0.2") and not acl.admits("::1")
        assert acl.admits("127.0.0.3")


# ================================================================ rate limits

class TestParseRate:
    @pytest.mark.parametrize("text, expected", [
        ("20/1s", (20, 1.0)), ("600/1m", (600, 60.0)), ("5/s", (5, 1.0)),
        (" 10 / 500ms ", (10, 0.5)), ("1/1h", (1, 3600.0)), ((3, "2s"), (3, 2.0)),
    ])
    def test_good(self, text, expected):
        assert parse_rate(text, "rate_limit_per_ip") == expected

    @pytest.mark.parametrize("bad", ["20", "0/1s", "20/0s", "x/1s", "20/1x", "-1/1s",
                                     "20/10000h", "20/1s/2", "", None, (0, 1), (1.5, 1)])
    def test_bad(self, bad):
        config_error(parse_rate, bad, "rate_limit_per_ip", field="rate_limit_per_ip")


class TestRateLimiter:
    def test_burst_then_refill(self):
        rl = RateLimiter(20, 1.0, 16)
        t0 = 5 * S
        assert all(rl.take("192.0.2.1", t0) for _ in range(20))
        assert not rl.take("192.0.2.1", t0)
        assert not rl.take("192.0.2.1", t0 + 49 * MS)
        assert rl.take("192.0.2.1", t0 + 50 * MS)        # one token per 50 ms
        assert not rl.take("192.0.2.1", t0 + 50 * MS)
        later = t0 + 10 * S                               # full again, not fuller
        assert sum(rl.take("192.0.2.1", later) for _ in range(30)) == 20

    def test_clients_are_independent(self):
        rl = RateLimiter(1, 60.0, 16)
        assert rl.take("192.0.2.1", 0)
        assert not rl.take("192.0.2.1", 0)
        assert rl.take("192.0.2.2", 0)
        assert rl.take("2001:db8::1", 0)
        assert rl.entries() == 3

    def test_mapped_and_ipv4_share_a_bucket(self):
        rl = RateLimiter(1, 60.0, 16)
        assert rl.take("192.0.2.1", 0)
        assert not rl.take("::ffff:192.0.2.1", 0)

    def test_table_is_bounded(self):
        rl = RateLimiter(1, 3600.0, 64)
        for i in range(10_000):
            assert rl.take(str(ipaddress.ip_address(0x20010DB8 << 96 | i)), i)
            assert rl.entries() == min(i + 1, 64)
        # The last 64 are remembered (limited); older ones were forgotten
        # and come back with a full bucket.
        last = str(ipaddress.ip_address(0x20010DB8 << 96 | 9_999))
        assert not rl.take(last, 10_000)
        first = str(ipaddress.ip_address(0x20010DB8 << 96))
        assert rl.take(first, 10_000)
        assert rl.entries() == 64

    def test_least_recently_seen_is_evicted(self):
        rl = RateLimiter(1, 3600.0, 4)
        for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
            assert rl.take(ip, 0)
        assert not rl.take("10.0.0.1", 1)   # limited, but seen: now the newest
        assert rl.take("10.0.0.5", 2)       # evicts 10.0.0.2, the oldest
        assert not rl.take("10.0.0.1", 3)
        assert rl.take("10.0.0.2", 4)       # forgotten: a full bucket again
        assert not rl.take("10.0.0.4", 5)

    def test_one_entry_table(self):
        rl = RateLimiter(1, 3600.0, 1)
        assert rl.take("10.0.0.1", 0) and rl.take("10.0.0.2", 0)
        assert not rl.take("10.0.0.2", 0)
        assert rl.entries() == 1

    def test_threads_share_one_table(self):
        rl = RateLimiter(5_000, 3600.0, 1024)
        allowed = []

        def hammer():
            allowed.append(sum(rl.take("192.0.2.1", 0) for _ in range(2_000)))

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(allowed) == 5_000

    @pytest.mark.parametrize("args", [(0, 1.0, 16), (1, 0.0, 16), (1, 1.0, 0),
                                      (1, float("nan"), 16), (1, 1e30, 16)])
    def test_bad_arguments(self, args):
        with pytest.raises(ValueError):
            RateLimiter(*args)


# ================================================================ PROXY protocol

def v2(cmd, fam, body):
    """A v2 header by hand, as the spec lays it out."""
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


def tcp4_body(src="192.0.2.1", dst="198.51.100.2", sport=56324, dport=443):
    return (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + struct.pack("!HH", sport, dport))


def tcp6_body(src="2001:db8::1", dst="2001:db8::2", sport=1, dport=65535):
    return (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + struct.pack("!HH", sport, dport))


TLVS = (bytes([0x01, 0, 2]) + b"h2"                          # PP2_TYPE_ALPN
        + bytes([0x02, 0, 11]) + b"example.com"              # PP2_TYPE_AUTHORITY
        + bytes([0x04, 0, 3, 0, 0, 0]))                       # PP2_TYPE_NOOP

VALID_HEADERS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
    b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    # The spec's worst case, 107 bytes: "ffff:f...f:ffff" is 39 characters.
    b"PROXY UNKNOWN %s %s 65535 65535\r\n" % ((b"ffff:" * 7 + b"ffff",) * 2),
    v2(1, 0x11, tcp4_body()),
    v2(1, 0x21, tcp6_body()),
    v2(1, 0x11, tcp4_body() + TLVS),
    v2(0, 0x00, b""),
    v2(0, 0x11, tcp4_body()),
    v2(1, 0x00, b""),
    v2(1, 0x31, bytes(216)),
]


class TestProxyV1:
    def test_tcp4(self):
        hdr = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
        assert parse(hdr + b"GET / HTTP/1.0\r\n") == (
            len(hdr), False, ("192.0.2.1", 56324), ("198.51.100.2", 443))

    def test_tcp6(self):
        hdr = b"PROXY TCP6 2001:db8::1 2001:DB8::2 0 65535\r\n"
        assert parse(hdr) == (len(hdr), False, ("2001:db8::1", 0), ("2001:db8::2", 65535))

    def test_tcp6_longest_is_104_bytes(self):
        hdr = VALID_HEADERS[3]
        assert len(hdr) == 104 and parse(hdr)[0] == 104

    def test_unknown(self):
        assert parse(b"PROXY UNKNOWN\r\nabc") == (15, True, None, None)
        worst = VALID_HEADERS[5]
        assert len(worst) == 107
        assert parse(worst + b"x") == (107, True, None, None)

    def test_longer_than_107_bytes(self):
        hdr = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
        assert len(hdr) == 108
        with pytest.raises(ValueError):
            parse(hdr)
        with pytest.raises(ValueError):
            parse(hdr[:107])        # 107 bytes and no end yet: too long
        assert parse(hdr[:106]) is None

    @pytest.mark.parametrize("bad", [
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",     # two spaces
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",     # heading zero
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",         # LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",               # family mismatch
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY UNKNOWN\n",
        b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    ])
    def test_malformed(self, bad):
        with pytest.raises(ValueError):
            parse(bad)

    def test_decides_early(self):
        for prefix in (b"PROXY TCP4 1.2.3.4 5", b"PROXY TCP", b"PROXY U", b"PROXY TCP6 ::1 "):
            assert parse(prefix) is None
        for prefix in (b"PROXX", b"PROXY TCP4 1.2.3.4x", b"PROXY TCP4 1.2.3.4.5 ",
                       b"PROXY TCP4 1.2.3.4 5.6.7.8 070"):
            with pytest.raises(ValueError):
                parse(prefix)


class TestProxyV2:
    def test_tcp4(self):
        hdr = v2(1, 0x11, tcp4_body())
        assert len(hdr) == 28
        assert parse(hdr + b"payload") == (28, False, ("192.0.2.1", 56324), ("198.51.100.2", 443))

    def test_tcp6(self):
        hdr = v2(1, 0x21, tcp6_body())
        assert len(hdr) == 52
        assert parse(hdr) == (52, False, ("2001:db8::1", 1), ("2001:db8::2", 65535))

    def test_tlvs_are_skipped(self):
        hdr = v2(1, 0x11, tcp4_body() + TLVS)
        assert parse(hdr + b"\x16\x03\x01") == (len(hdr), False, ("192.0.2.1", 56324),
                                                ("198.51.100.2", 443))
        hdr = v2(1, 0x21, tcp6_body() + TLVS)
        assert parse(hdr)[0] == len(hdr)

    def test_local(self):
        assert parse(v2(0, 0x00, b"")) == (16, True, None, None)
        # LOCAL ignores whatever address block comes with it.
        assert parse(v2(0, 0x11, tcp4_body())) == (28, True, None, None)
        assert parse(v2(0, 0xff, b"")) == (16, True, None, None)

    def test_unspec_and_other_protocols_use_the_peer(self):
        assert parse(v2(1, 0x00, b"")) == (16, True, None, None)
        assert parse(v2(1, 0x31, bytes(216))) == (232, True, None, None)   # UNIX stream
        assert parse(v2(1, 0x12, tcp4_body())) == (28, True, None, None)   # UDP

    def test_exact_bytes_of_a_tcp4_header(self):
        hdr = bytes.fromhex("0d0a0d0a000d0a515549540a" "21" "11" "000c"
                            "c0000201" "c6336402" "dc04" "01bb")
        assert hdr == v2(1, 0x11, tcp4_body())
        assert parse(hdr) == (28, False, ("192.0.2.1", 56324), ("198.51.100.2", 443))

    @pytest.mark.parametrize("bad", [
        SIG + b"\x11\x11\x00\x0c" + tcp4_body(),     # version 1 in a v2 header
        SIG + b"\x31\x11\x00\x0c" + tcp4_body(),     # version 3
        SIG + b"\x22\x11\x00\x0c" + tcp4_body(),     # command 2
        SIG + b"\x21\x41\x00\x0c" + tcp4_body(),     # family 4
        SIG + b"\x21\x13\x00\x0c" + tcp4_body(),     # transport 3
        v2(1, 0x11, tcp4_body()[:8]),                # shorter than TCP4 addresses
        v2(1, 0x21, tcp4_body()),                    # shorter than TCP6 addresses
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + tcp4_body(),
    ])
    def test_malformed(self, bad):
        with pytest.raises(ValueError):
            parse(bad)

    def test_too_long(self):
        hdr = v2(1, 0x11, tcp4_body() + bytes(1025 - 12))
        assert len(hdr) == 16 + 1025
        with pytest.raises(ValueError):
            parse(hdr[:16])               # known from the length field alone
        assert parse(hdr, max_v2=1025)[0] == len(hdr)
        ok = v2(1, 0x11, tcp4_body() + bytes(1024 - 12))
        assert parse(ok)[0] == 16 + 1024
        with pytest.raises(ValueError):
            parse(v2(1, 0x11, tcp4_body()), max_v2=11)

    def test_decides_early(self):
        with pytest.raises(ValueError):
            parse(b"\r\n\r\n\x01")
        with pytest.raises(ValueError):
            parse(SIG + b"\x10")
        with pytest.raises(ValueError):
            parse(SIG + b"\x21\x51")
        assert parse(SIG + b"\x20\x51") is None     # LOCAL: family ignored


class TestProxyParsing:
    @pytest.mark.parametrize("hdr", VALID_HEADERS)
    def test_every_prefix_is_incomplete(self, hdr):
        for n in range(len(hdr)):
            assert parse(hdr[:n]) is None, hdr[:n]
        assert parse(hdr)[0] == len(hdr)

    @pytest.mark.parametrize("hdr", VALID_HEADERS)
    def test_byte_by_byte_as_segments_arrive(self, hdr):
        buf = bytearray()
        results = []
        for byte in hdr + b"tail":
            buf.append(byte)
            results.append(parse(bytes(buf)))
        first = next(i for i, r in enumerate(results) if r is not None)
        assert first == len(hdr) - 1
        assert all(r == results[first] for r in results[first:])

    @pytest.mark.parametrize("garbage", [b"G", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01",
                                         b"\x00", b"\n", b"SSH-2.0"])
    def test_garbage_fails_at_the_first_byte(self, garbage):
        with pytest.raises(ValueError):
            parse(garbage[:1])
        with pytest.raises(ValueError):
            parse(garbage)

    def test_accepts_bytes_like(self):
        hdr = VALID_HEADERS[0]
        assert parse(bytearray(hdr)) == parse(memoryview(hdr)) == parse(hdr)
        assert parse(b"") is None


def _outcome(data, max_v2=1024):
    try:
        return parse(data, max_v2)
    except ValueError:
        return "error"


def _check_prefix_consistency(data, max_v2=1024):
    # Along growing prefixes the parser says "incomplete" for a while,
    # then settles for good on one error or one header; a header's length
    # never exceeds what it was given.
    settled = None
    for n in range(len(data) + 1):
        r = _outcome(data[:n], max_v2)
        if r is not None and r != "error":
            assert 0 < r[0] <= n
        if settled is not None:
            assert r == settled, (data[:n], r, settled)
        elif r is not None:
            settled = r


# Random bytes, often behind a signature so the parser gets past byte one.
PREFIXES = [b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 ", SIG, SIG + b"\x21", SIG + b"\x21\x11", SIG + b"\x20"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PREFIXES), st.binary(max_size=200))
def test_random_bytes(prefix, data):
    _check_prefix_consistency(prefix + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_HEADERS), st.data())
def test_mutated_headers(hdr, data):
    buf = bytearray(hdr + b"payload")
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[pos:pos + data.draw(st.integers(1, 8))]
        else:
            del buf[pos:]
    max_v2 = data.draw(st.sampled_from([0, 12, 1024, 65535]))
    _check_prefix_consistency(bytes(buf), max_v2)


class TestProxyBuild:
    def test_v1_tcp4(self):
        assert build(1, ("192.0.2.1", 56324), ("198.51.100.2", 443)) == \
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"

    def test_v1_tcp6(self):
        assert build(1, ("2001:db8::1", 1), ("::1", 65535)) == \
            b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"

    def test_v2_tcp4(self):
        assert build(2, ("192.0.2.1", 56324), ("198.51.100.2", 443)) == v2(1, 0x11, tcp4_body())

    def test_v2_tcp6(self):
        assert build(2, ("2001:db8::1", 1), ("2001:db8::2", 65535)) == v2(1, 0x21, tcp6_body())

    def test_mapped_clients_are_tcp4(self):
        assert build(1, ("::ffff:192.0.2.1", 5), ("::ffff:198.51.100.2", 6)) == \
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5 6\r\n"
        assert build(2, ("::ffff:192.0.2.1", 56324), ("198.51.100.2", 443)) == v2(1, 0x11, tcp4_body())

    def test_mixed_families_are_tcp6(self):
        hdr = build(2, ("192.0.2.1", 1), ("2001:db8::2", 2))
        assert hdr[13] == 0x21
        assert parse(hdr) == (52, False, ("::ffff:192.0.2.1", 1), ("2001:db8::2", 2))
        assert build(1, ("192.0.2.1", 1), ("::1", 2)).startswith(b"PROXY TCP6 ")

    @pytest.mark.parametrize("args", [(3, ("1.2.3.4", 1), ("1.2.3.4", 2)),
                                      (0, ("1.2.3.4", 1), ("1.2.3.4", 2)),
                                      (1, ("1.2.3.4", 65536), ("1.2.3.4", 2)),
                                      (2, ("1.2.3.4", -1), ("1.2.3.4", 2)),
                                      (1, ("nowhere", 1), ("1.2.3.4", 2))])
    def test_bad_arguments(self, args):
        with pytest.raises(ValueError):
            build(*args)


@settings(max_examples=300, deadline=None)
@given(version=st.sampled_from([1, 2]),
       family=st.sampled_from([4, 6]),
       src=st.integers(0, 2**128 - 1), dst=st.integers(0, 2**128 - 1),
       sport=st.integers(0, 65535), dport=st.integers(0, 65535))
def test_build_parse_round_trip(version, family, src, dst, sport, dport):
    if family == 4:
        s, d = ipaddress.IPv4Address(src % 2**32), ipaddress.IPv4Address(dst % 2**32)
    else:
        s, d = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    hdr = build(version, (str(s), sport), (str(d), dport))
    length, local, (sh, sp), (dh, dp) = parse(hdr + b"data")
    assert length == len(hdr) and not local
    assert (sp, dp) == (sport, dport)
    expect_v4 = family == 4 or (s.ipv4_mapped and d.ipv4_mapped)

    def same(text, addr):
        back = ipaddress.ip_address(text)
        if expect_v4:
            return back.version == 4 and back == (getattr(addr, "ipv4_mapped", None) or addr)
        return back == addr

    assert same(sh, s) and same(dh, d)


# ================================================================ time windows

def utc(*args):
    return datetime(*args, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


class TestParseTimeWindow:
    def test_day_range(self):
        w = parse_time_window("Mon-Fri 08:00-18:00", "allow_time")
        assert w == TimeWindow(frozenset(range(5)), 8 * 60, 18 * 60)

    def test_day_list(self):
        w = parse_time_window("Sat,Sun 10:00-14:00", "allow_time")
        assert w.days == {5, 6} and (w.start, w.end) == (600, 840)
        assert parse_time_window("sat, SUN 10:00 - 14:00", "allow_time") == w
        assert parse_time_window("Saturday,Sunday 10:00-14:00", "allow_time") == w

    def test_mixed_and_wrapping_days(self):
        assert parse_time_window("Mon,Wed-Fri 9:00-10:00", "t").days == {0, 2, 3, 4}
        assert parse_time_window("Fri-Mon 09:00-10:00", "t").days == {4, 5, 6, 0}

    def test_every_day_and_whole_day(self):
        assert parse_time_window("22:00-06:00", "t") == TimeWindow(frozenset(range(7)), 1320, 360)
        assert parse_time_window("00:00-24:00", "t").end == 1440

    @pytest.mark.parametrize("bad", ["", "Mon-Fri", "Funday 08:00-10:00", "25:00-26:00",
                                     "08:60-09:00", "08:00-08:00", "24:00-01:00",
                                     "Mon-Fri 8-18", "Mon,,Tue 08:00-09:00", "Mo 08:00-09:00",
                                     "08:00-24:01", 42, None])
    def test_bad(self, bad):
        config_error(parse_time_window, bad, "allow_time", field="allow_time")


class TestTimeWindows:
    # 2024-01-08 is a Monday.
    def test_day_range_edges(self):
        tw = TimeWindows(["Mon-Fri 08:00-18:00"], time_zone="UTC")
        assert not tw.is_open(utc(2024, 1, 8, 7, 59, 59))
        assert tw.is_open(utc(2024, 1, 8, 8, 0))
        assert tw.is_open(utc(2024, 1, 12, 17, 59, 59))    # Friday
        assert not tw.is_open(utc(2024, 1, 12, 18, 0))
        assert not tw.is_open(utc(2024, 1, 13, 12, 0))     # Saturday

    def test_any_window_opens(self):
        tw = TimeWindows(["Mon-Fri 08:00-18:00", "Sat,Sun 10:00-14:00"], time_zone="UTC")
        assert tw.is_open(utc(2024, 1, 13, 10, 0))
        assert not tw.is_open(utc(2024, 1, 13, 9, 0))
        assert not tw.is_open(utc(2024, 1, 14, 14, 0))

    def test_crossing_midnight_belongs_to_its_first_day(self):
        tw = TimeWindows("Fri 22:00-06:00", time_zone="UTC")
        assert not tw.is_open(utc(2024, 1, 12, 21, 59))    # Friday
        assert tw.is_open(utc(2024, 1, 12, 23, 0))
        assert tw.is_open(utc(2024, 1, 13, 5, 59))         # Saturday morning
        assert not tw.is_open(utc(2024, 1, 13, 6, 0))
        assert not tw.is_open(utc(2024, 1, 13, 23, 0))     # Saturday night
        assert not tw.is_open(utc(2024, 1, 12, 5, 0))      # Friday morning: Thursday's

    def test_every_night(self):
        tw = TimeWindows("22:00-06:00", time_zone="UTC")
        assert tw.is_open(utc(2024, 1, 8, 3, 0))           # Monday, from Sunday
        assert tw.is_open(utc(2024, 1, 14, 23, 0))
        assert not tw.is_open(utc(2024, 1, 10, 12, 0))

    def test_replaceable_clock(self):
        clock = FakeClock(utc(2024, 1, 8, 7, 0).timestamp())
        tw = TimeWindows(["Mon 08:00-09:00"], time_zone="UTC", clock=clock)
        assert not tw.is_open()
        clock.now += 3600
        assert tw.is_open()
        clock.now = utc(2024, 1, 8, 9, 0)                  # an aware datetime works too
        assert not tw.is_open()
        clock.now = datetime(2024, 1, 8, 8, 30)            # naive: ambiguous, refused
        with pytest.raises(ValueError):
            tw.is_open()

    def test_time_zone_shifts_the_window(self):
        tw = TimeWindows(["Mon-Fri 08:00-18:00"], time_zone="Europe/Berlin")
        assert tw.is_open(utc(2024, 1, 8, 7, 30))          # 08:30 CET
        assert not tw.is_open(utc(2024, 1, 8, 6, 30))      # 07:30 CET
        assert tw.is_open(utc(2024, 7, 8, 6, 30))          # 08:30 CEST
        assert not tw.is_open(utc(2024, 7, 8, 16, 30))     # 18:30 CEST

    @staticmethod
    def open_minutes(tw, start, hours):
        return sum(tw.is_open(start + timedelta(minutes=m)) for m in range(hours * 60))

    def test_dst_spring_forward(self):
        # Berlin, Sunday 2024-03-31: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        day = utc(2024, 3, 30, 22, 0)                      # local midnight
        three_hours = TimeWindows("Sun 01:00-04:00", time_zone="Europe/Berlin")
        assert self.open_minutes(three_hours, day, 24) == 120
        assert three_hours.is_open(utc(2024, 3, 31, 1, 30))      # 03:30 CEST
        assert not three_hours.is_open(utc(2024, 3, 31, 2, 0))   # 04:00 CEST
        skipped = TimeWindows("Sun 02:00-03:00", time_zone="Europe/Berlin")
        assert self.open_minutes(skipped, day, 24) == 0

    def test_dst_fall_back(self):
        # Berlin, Sunday 2024-10-27: 03:00 CEST goes back to 02:00 CET (01:00 UTC).
        day = utc(2024, 10, 26, 22, 0)
        repeated = TimeWindows("Sun 02:00-03:00", time_zone="Europe/Berlin")
        assert self.open_minutes(repeated, day, 25) == 120
        office = TimeWindows("Sun 08:00-18:00", time_zone="Europe/Berlin")
        assert self.open_minutes(office, day, 25) == 600

    def test_default_is_local_time(self, monkeypatch):
        import time as time_module

        monkeypatch.setenv("TZ", "Asia/Tokyo")
        time_module.tzset()
        try:
            tw = TimeWindows("Mon 08:00-09:00")
            assert tw.is_open(utc(2024, 1, 7, 23, 30).timestamp())   # 08:30 JST
            assert not tw.is_open(utc(2024, 1, 8, 8, 30).timestamp())
            assert tw.is_open(utc(2024, 1, 7, 23, 30))
        finally:
            monkeypatch.undo()
            time_module.tzset()

    @pytest.mark.parametrize("bad", ["Mars/Olympus", "../etc/passwd", "", "Europe/", 5])
    def test_bad_time_zone(self, bad):
        config_error(TimeWindows, "08:00-18:00", time_zone=bad, field="time_zone")

    def test_load_time_zone(self):
        assert str(load_time_zone(" Europe/Berlin ")) == "Europe/Berlin"
        with pytest.raises(ConfigError):
            load_time_zone("No/Such_Zone")

    def test_needs_a_window(self):
        with pytest.raises(ConfigError, match="at least one"):
            TimeWindows([])
        with pytest.raises(ConfigError):
            TimeWindows(["Mon 08:00"])
