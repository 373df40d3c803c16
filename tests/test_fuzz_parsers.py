"""Fuzzing the parsers of untrusted input with hypothesis.

The contract: any input gives a result or a ConfigError (a ValueError
subclass) whose message names the field, on one line; never another
exception. The PROXY protocol parser, which reads bytes from the network in
C, gives exact results for valid headers, None for every proper prefix of
one, and never looks past its input: a header that ends on the last byte
before a page the process may not read parses the same as anywhere else, and
a result depends only on the bytes it says it consumed.

Longer, coverage-guided runs of the same contracts: fuzz/ (fuzz/README.md).
"""
import ctypes
import ipaddress
import mmap
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from fastproxy import _core
from fastproxy.acl import parse_cidrs
from fastproxy.configfile import config_from_mapping, load_config
from fastproxy.options import OPTIONS, parse_resolve_interval
from fastproxy.ratelimit import parse_rate
from fastproxy.timewindows import parse_time_windows
from fastproxy.upstreams import parse_upstream
from fastproxy.values import ConfigError, parse_address, parse_duration, parse_size, parse_tcp_keepalive

# FASTPROXY_FUZZ_SCALE=20 for a longer run than the suite's.
SCALE = float(os.environ.get("FASTPROXY_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])

SIG_V2 = b"\r\n\r\n\x00\r\nQUIT\n"

# Pieces the parsers look for, so that random text reaches past their first
# check: prefixes, separators, units, digits of other scripts (str.isdigit
# accepts them, int() only some), huge numbers, NUL.
FRAGMENTS = ["unix:", "unix:@", "srv:", "_pg._tcp.", "[", "]", ":", "::", "::1", "@", ",", "/", "-", ".",
             " ", "\t", "\n", "\x00", "backup", "max-connections=", "=", "127.0.0.1", "10.0.0.0", "2001:db8::",
             "localhost", "0", "1", "7", "80", "65535", "65536", "99999999999999999999", "9" * 5000, "1e309",
             "nan", "inf", "-1", "+5", "\uff18\uff10", "\u0663", "\u00b2", "ms", "s", "m", "h", "k", "kib", "MiB",
             "Mon", "Fri", "Sat,Sun", "08:00", "24:00", "23:59", "25:61", "x", "\u00e9", "\U0001f600"]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join)
texts = st.one_of(fragment_text, st.text(max_size=60))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(1 << 80), max_value=1 << 80),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.tuples(scalars, scalars),
                   st.dictionaries(st.text(max_size=5), scalars, max_size=3))


def result_or_config_error(parse, value, *args, **kwargs):
    """parse(value, ...) or None when it raised a ConfigError that names its
    field on one line; any other exception fails the test."""
    try:
        return parse(value, *args, **kwargs)
    except ConfigError as exc:
        message = str(exc)
        assert isinstance(exc, ValueError)
        assert exc.field, message
        assert exc.field in message, message
        assert "\n" not in message, message
        return None


# ---- values, addresses, upstreams

@FUZZ
@given(texts)
@example("127.0.0.1:\uff18\uff10")
@example("h:\u00b2")
@example("h:" + "9" * 5000)
def test_parse_address(text):
    for listen in (False, True):
        got = result_or_config_error(parse_address, text, "listen", listen=listen)
        if got is not None:
            host, port = got
            assert isinstance(host, str) and isinstance(port, int)
            assert (0 if listen or host.startswith("unix:") else 1) <= port <= 65535
            if not host.startswith("unix:"):
                # The port was written in ASCII digits: str.isdigit() takes
                # other scripts' digits too, which no resolver or peer would.
                port_text = text.strip().rsplit(":", 1)[1]
                assert re.fullmatch("[0-9]+", port_text) and int(port_text) == port


@FUZZ
@given(st.one_of(texts, scalars))
@example("srv:" + "a." * 200)
@example("h:1@" + "9" * 5000)
@example("h:1,max-connections=" + "9" * 5000)
def test_parse_upstream(spec):
    up = result_or_config_error(parse_upstream, spec)
    if up is not None:
        assert 0 <= up.weight <= 256


@FUZZ
@given(values)
@example("9" * 5000)
@example("1" * 400 + "h")
def test_parse_duration(value):
    got = result_or_config_error(parse_duration, value, "connect_timeout")
    if got is not None:
        assert got >= 0 and got == got and got != float("inf")


@FUZZ
@given(values)
@example("9" * 5000)
@example("9" * 5000 + "k")
def test_parse_size(value):
    got = result_or_config_error(parse_size, value, "notsent_lowat")
    if got is not None:
        assert 0 <= got <= 1 << 30


@FUZZ
@given(values)
@example("9" * 5000 + ":1s:2")
@example("1s:1s:" + "9" * 5000)
def test_parse_tcp_keepalive(value):
    got = result_or_config_error(parse_tcp_keepalive, value, "tcp_keepalive")
    if got is not None:
        assert 0 <= got.idle <= 32767 and 0 <= got.interval <= 32767 and 0 <= got.probes <= 127
        assert parse_tcp_keepalive(str(got), "tcp_keepalive") == got   # shown as it is read


@FUZZ
@given(values)
def test_parse_cidrs(value):
    got = result_or_config_error(parse_cidrs, value, "allow")
    if got is not None:
        assert all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) for n in got)


@FUZZ
@given(values)
@example("9" * 5000 + "/1s")
@example("5/" + "9" * 5000 + "s")
def test_parse_rate(value):
    got = result_or_config_error(parse_rate, value, "rate_limit_per_ip")
    if got is not None:
        count, period = got
        assert count >= 1 and period > 0


@FUZZ
@given(values)
def test_parse_time_windows(value):
    result_or_config_error(parse_time_windows, value, "allow_time")


@FUZZ
@given(values)
@example("9" * 5000 + "-1s")
def test_parse_resolve_interval(value):
    got = result_or_config_error(parse_resolve_interval, value, "resolve_interval")
    if got is not None:
        assert 0 < got[0] <= got[1]


# ---- the config loader

# Keys whose values name files or modules the loader would open or import.
UNSAFE_KEYS = {"hooks", "allow_file", "deny_file", "access_log", "takeover", "stats_token"}
KEYS = [o.name for o in OPTIONS if o.name not in UNSAFE_KEYS] + ["log_level", "no_such_option"]
toml_scalars = st.one_of(st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
                         st.floats(allow_nan=True, allow_infinity=True), texts)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))
listener = st.fixed_dictionaries({"listen": st.sampled_from(["127.0.0.1:0", ":0"]) | texts},
                                 optional={k: toml_values for k in KEYS if k != "listen"})


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else "inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v)
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else "\\u%04x" % ord(c)
                             if ord(c) < 0x10000 else "\\U%08x" % ord(c) for c in v) + '"'
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def toml_document(top, defaults, listeners):
    lines = ["%s = %s" % (k, toml_value(v)) for k, v in top.items()]
    if defaults:
        lines.append("[defaults]")
        lines += ["%s = %s" % (k, toml_value(v)) for k, v in defaults.items()]
    for item in listeners:
        lines.append("[[listeners]]")
        lines += ["%s = %s" % (k, toml_value(v)) for k, v in item.items()]
    return "\n".join(lines) + "\n"


documents = st.builds(toml_document, st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=3),
                      st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=2),
                      st.lists(listener, max_size=3))
# Text that is TOML-ish but broken in every way a hand-edited file can be.
TOML_FRAGMENTS = ["[[listeners]]\n", "[defaults]\n", "[listeners]\n", "listen = ", "upstreams = ", "workers = ",
                  '"127.0.0.1:1"', "[", "]", "{", "}", "=", "\n", '"', "'", "1", "99999999999999999999",
                  "#", "\\", "\x00", "\r", "true", "x.y = 1\n", "é", "\ufeff"]
broken_toml = st.lists(st.sampled_from(TOML_FRAGMENTS), max_size=12).map("".join)


@pytest.fixture(scope="module")
def toml_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-toml")


def load_text(directory, text, encoding="utf-8"):
    path = directory / "fuzz.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode(encoding, "surrogatepass"))
    try:
        return load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message, message
        # The file, and where there is one, the key in it.
        assert message.startswith(str(path)), message
        return None


@FUZZ
@given(documents)
def test_config_documents(toml_dir, text):
    got = load_text(toml_dir, text)
    if got is not None:
        assert got.listeners


@FUZZ
@given(st.one_of(broken_toml, st.text(max_size=200), st.binary(max_size=200)))
@example(b"\xff\xfe")
@example("workers = 99999999999999999999\n[[listeners]]\nlisten=':0'\nupstreams=['h:1']\n")
@example('"\\n" = 1\n')
@example('[[listeners]]\nlisten = ":0"\n"\\u0000" = 1\n')
def test_config_text(toml_dir, text):
    load_text(toml_dir, text)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS + ["listeners", "defaults"]), st.text(max_size=8)),
                       st.one_of(values, st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
                                                  max_size=2)), max_size=5))
@example({"\n": None})
@example({"listeners": [{"listen": ":0", "upstreams": ["h:1"], "x\ry": 1}]})
def test_config_mappings(mapping):
    # Proxy.from_config takes a mapping as it is: not only what TOML can hold.
    try:
        config_from_mapping(mapping)
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)


# ---- the PROXY protocol parser

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None)
ports = st.integers(0, 65535)


def v1(src, dst, sport, dport):
    return ("PROXY TCP%d %s %s %d %d\r\n" % (src.version, src, dst, sport, dport)).encode()


def v2(cmd, src, dst, sport, dport, tlvs=b""):
    fam = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport) + tlvs
    return SIG_V2 + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


@st.composite
def valid_headers(draw):
    """(header, expected result without its length)."""
    family = draw(st.sampled_from([ipv4, ipv6]))
    src, dst, sport, dport = draw(family), draw(family), draw(ports), draw(ports)
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local", "v2-other"]))
    addresses = (False, (str(src), sport), (str(dst), dport))
    if kind == "v1":
        return v1(src, dst, sport, dport), addresses
    if kind == "v1-unknown":
        rest = draw(st.binary(max_size=80).filter(lambda b: b"\n" not in b and b"\r" not in b))
        return b"PROXY UNKNOWN" + (b" " + rest if rest else b"") + b"\r\n", (True, None, None)
    tlvs = draw(st.binary(max_size=64))
    if kind == "v2":
        return v2(1, src, dst, sport, dport, tlvs), addresses
    if kind == "v2-local":
        return v2(0, src, dst, sport, dport, tlvs), (True, None, None)
    # PROXY over UNSPEC, UDP or UNIX: the peer's own address counts.
    fam = draw(st.sampled_from([0x00, 0x01, 0x12, 0x22, 0x31, 0x32]))
    return SIG_V2 + bytes([0x21, fam]) + struct.pack("!H", len(tlvs)) + tlvs, (True, None, None)


def parse(data, max_v2=1024):
    """The parser's answer, or "error" for the ValueError it gives on
    malformed input (any other exception fails the test)."""
    try:
        return _core.parse_proxy_header(data, max_v2)
    except ValueError as exc:
        assert "PROXY" in str(exc)
        return "error"


class GuardedBuffer:
    """Bytes that end on the last byte before a page mapped PROT_NONE: a
    read past them is a SIGSEGV (the test run dies loudly)."""

    PAGE = mmap.PAGESIZE

    def __init__(self):
        self.map = mmap.mmap(-1, 2 * self.PAGE)
        self._array = (ctypes.c_char * (2 * self.PAGE)).from_buffer(self.map)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.mprotect(ctypes.addressof(self._array) + self.PAGE, self.PAGE, 0) != 0:
            pytest.skip("mprotect: %s" % os.strerror(ctypes.get_errno()))

    def at_end(self, data):
        assert len(data) <= self.PAGE
        start = self.PAGE - len(data)
        self.map[start:self.PAGE] = data
        return memoryview(self.map)[start:self.PAGE]


@pytest.fixture(scope="module")
def guarded():
    return GuardedBuffer()


def check_bounded(data, guarded, max_v2=1024):
    """The parser's answer for `data`, checked to depend on nothing past the
    bytes it consumed, nor on where `data` lies."""
    got = parse(data, max_v2)
    view = guarded.at_end(data)
    try:
        assert parse(view, max_v2) == got
    finally:
        view.release()
    if isinstance(got, tuple):
        length = got[0]
        assert 0 < length <= len(data)
        assert parse(data[:length], max_v2) == got
        assert parse(data[:length] + b"\r\n\x00garbage", max_v2) == got
    elif got is None:
        # Incomplete: a valid prefix, never longer than a header may be.
        assert len(data) < 16 + max_v2 if data[:1] == b"\r" else len(data) < 108
    return got


@FUZZ
@given(valid_headers(), st.binary(max_size=32))
def test_proxy_header_valid(guarded, header_expected, trailer):
    header, expected = header_expected
    data = header + trailer
    assert check_bounded(data, guarded, max_v2=4096) == (len(header),) + expected
    # Every proper prefix asks for more bytes.
    for k in range(len(header)):
        assert parse(header[:k], 4096) is None, (k, header[:k])


@st.composite
def mutated_headers(draw):
    header, _ = draw(valid_headers())
    data = bytearray(header + draw(st.binary(max_size=16)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from([0, 0x0A, 0x0D, 0x20, 0x3A, 0x30, 0x39, 0x7F, 0xFF]))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[i]
        elif op == "truncate":
            del data[i:]
        elif op == "length" and len(data) >= 16 and data.startswith(SIG_V2):
            data[14:16] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
    return bytes(data)


@settings(max_examples=int(1500 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_headers(), st.sampled_from([0, 12, 36, 1024, 65535]))
def test_proxy_header_mutated(guarded, data, max_v2):
    check_bounded(data, guarded, max_v2)


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=120).map(lambda b: b"PROXY " + b),
                 st.binary(max_size=120).map(lambda b: SIG_V2 + b)))
@example(b"")
@example(b"PROXY TCP4 " + b"9" * 200)
@example(SIG_V2 + b"\x21\x11\xff\xff")
def test_proxy_header_arbitrary(guarded, data):
    check_bounded(data, guarded)


def test_proxy_header_v2_length_bound():
    # A v2 block longer than max_v2 is refused as soon as its length is read,
    # not buffered until it arrives.
    head = SIG_V2 + b"\x21\x11" + struct.pack("!H", 1025)
    assert parse(head, 1024) == "error"
    assert parse(head, 1025) is None


def test_proxy_header_v1_length_bound():
    # A v1 line with no end in its first 107 bytes is too long.
    assert parse(b"PROXY UNKNOWN " + b"x" * 92, 1024) is None
    assert parse(b"PROXY UNKNOWN " + b"x" * 93, 1024) == "error"


@pytest.mark.skipif(not hasattr(_core, "parse_client_hello"), reason="the TLS ClientHello parser is not built yet")
@FUZZ
@given(st.binary(max_size=600))
def test_client_hello_arbitrary(guarded, data):
    # The contract is the PROXY parser's: a result, None for more bytes, or
    # a ValueError; and nothing read past the input.
    try:
        got = _core.parse_client_hello(data)
    except ValueError:
        got = "error"
    view = guarded.at_end(data)
    try:
        try:
            again = _core.parse_client_hello(view)
        except ValueError:
            again = "error"
    finally:
        view.release()
    assert again == got


def test_a_failing_hypothesis_test_fails_cleanly(tmp_path):
    # Under the suite's warning filters ("error"), hypothesis' patch writer
    # (it imports libcst on a failure) once turned a failure into an
    # INTERNALERROR: the suite's own configuration, on a test that fails.
    root = Path(__file__).resolve().parent.parent
    (tmp_path / "test_fails.py").write_text(
        "from hypothesis import given, settings, strategies as st\n"
        "@settings(max_examples=50, deadline=None, database=None)\n"
        "@given(st.integers())\n"
        "def test_small(n):\n"
        "    assert n < 10\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-c", str(root / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out   # tests failed; 3 is an internal error
    assert "INTERNALERROR" not in out, out
    # The shrunk example is reported ("Falsifying example" before
    # hypothesis 6.16x, "Failing test case" since).
    assert "n=10" in out and "1 failed" in out, out
