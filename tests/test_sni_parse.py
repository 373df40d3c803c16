"""The ClientHello parser (_core.parse_client_hello, the data plane's own
hello_parse) and the route table (_core.route_for): exact results on real
and crafted records, and fuzzed with hypothesis, with the input ending at a
page that may not be read, so a read past it would crash the test."""
import ctypes
import mmap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastproxy import _core

from support.tls import client_hello, records

parse = _core.parse_client_hello
HELLO = client_hello("a.example", ["h2", "http/1.1"])
MESSAGE = HELLO[5:]          # the handshake message, without its record header
PAGE = mmap.PAGESIZE


class Guarded:
    """Input placed to end where a PROT_NONE page begins: reading one byte
    past it is a segfault, not a silent wrong answer."""

    def __init__(self):
        self.map = mmap.mmap(-1, 2 * PAGE + 32 * 1024, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.size = 32 * 1024 + PAGE
        libc = ctypes.CDLL(None, use_errno=True)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        guard = address + self.size
        assert guard % PAGE == 0
        assert libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(PAGE), 0) == 0

    def parse(self, data, limit=16384):
        start = self.size - len(data)
        self.map[start:self.size] = data
        view = memoryview(self.map)[start:self.size]
        try:
            return parse(view, limit)
        finally:
            view.release()


GUARD = Guarded()


def test_a_real_client_hello_gives_its_name_and_alpn():
    assert parse(HELLO) == ("ok", 0, "a.example", ("h2", "http/1.1"))
    assert GUARD.parse(HELLO) == ("ok", 0, "a.example", ("h2", "http/1.1"))


def test_a_client_hello_without_sni_has_no_name():
    assert parse(client_hello(None)) == ("ok", 0, None, ())


def test_every_prefix_asks_for_what_it_needs():
    assert parse(b"") == ("need", 5, None, ())
    for n in range(1, 5):
        assert parse(HELLO[:n]) == ("need", 5, None, ()), n
    for n in range(5, len(HELLO)):
        assert GUARD.parse(HELLO[:n]) == ("need", len(HELLO), None, ()), n


@pytest.mark.parametrize("sizes", [[1], [3], [4], [10, 10], [1] * 40, [len(MESSAGE) // 2]])
def test_a_message_spanning_records_is_joined(sizes):
    data = records(MESSAGE, sizes)
    assert GUARD.parse(data) == ("ok", 0, "a.example", ("h2", "http/1.1"))
    # Each prefix is either a need for a longer input or (never) an answer.
    for n in range(len(data)):
        status, need, _, _ = GUARD.parse(data[:n])
        assert status == "need" and n < need <= len(data), (n, status, need)


def test_what_is_not_tls_is_said_at_once():
    for data in (b"G", b"GET / HTTP/1.1\r\n", b"\x16\x02", b"\x16\x03\x09", b"SSH-2.0-x\r\n", b"\x00" * 10):
        assert parse(data)[0] == "not_tls", data
    # A handshake, but a ServerHello (type 2), not a ClientHello.
    assert parse(b"\x16\x03\x01\x00\x30\x02")[0] == "not_tls"
    # An empty record, or one longer than TLS allows.
    assert parse(b"\x16\x03\x01\x00\x00")[0] == "not_tls"
    assert parse(b"\x16\x03\x01\x40\x01")[0] == "not_tls"
    # A second record of another content type.
    assert parse(records(MESSAGE, [10])[:15] + b"\x17\x03\x03\x00\x05hello")[0] == "not_tls"


def hello_with(extensions=b"", session=b"", suites=b"\x13\x01", compression=b"\x00", tail=None):
    body = (b"\x03\x03" + b"\x11" * 32 + bytes([len(session)]) + session
            + len(suites).to_bytes(2, "big") + suites + bytes([len(compression)]) + compression)
    if tail is not None:
        body += tail
    elif extensions is not None:
        body += len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return records(message, [])


def sni(name, list_len=None, name_len=None):
    entry = b"\x00" + (len(name) if name_len is None else name_len).to_bytes(2, "big") + name
    listed = (len(entry) if list_len is None else list_len).to_bytes(2, "big") + entry
    return b"\x00\x00" + len(listed).to_bytes(2, "big") + listed


def alpn(*names, list_len=None):
    entries = b"".join(bytes([len(n)]) + n for n in names)
    listed = (len(entries) if list_len is None else list_len).to_bytes(2, "big") + entries
    return b"\x00\x10" + len(listed).to_bytes(2, "big") + listed


def test_crafted_hellos_give_exact_results():
    assert GUARD.parse(hello_with(sni(b"Host.Example"))) == ("ok", 0, "Host.Example", ())
    assert GUARD.parse(hello_with(sni(b"a.example") + alpn(b"h2"))) == ("ok", 0, "a.example", ("h2",))
    # Extensions the parser does not know are skipped.
    assert GUARD.parse(hello_with(b"\xfa\xfa\x00\x00" + sni(b"a.example"))) == ("ok", 0, "a.example", ())
    # No extensions block at all (TLS 1.0 style).
    assert GUARD.parse(hello_with(tail=b"")) == ("ok", 0, None, ())
    # A name with a byte no host name has is not used, the hello stands.
    assert GUARD.parse(hello_with(sni(b"a\x00b"))) == ("ok", 0, None, ())
    # ALPN keeps the protocols that fit in 127 bytes, whole.
    many = [bytes([65 + i]) * 30 for i in range(6)]
    assert GUARD.parse(hello_with(alpn(*many)))[3] == tuple(m.decode() for m in many[:4])


@pytest.mark.parametrize("data", [
    hello_with(sni(b"a.example", list_len=200)),          # the name list runs past its extension
    hello_with(sni(b"a.example", name_len=200)),          # the name runs past its list
    hello_with(sni(b"a.example")[:-3]),                   # the extension is cut short
    hello_with(alpn(b"h2", list_len=50)),                 # the ALPN list runs past its extension
    hello_with(alpn(b"")),                                # an empty protocol name
    hello_with(session=b"\x00" * 33),                     # a session id longer than 32
    hello_with(suites=b"\x13\x01\x13"),                   # an odd cipher suite list
    hello_with(suites=b""),                               # no cipher suite
    hello_with(tail=b"\x00\x50" + sni(b"a.example")),     # extensions run past the message
    hello_with(tail=b"\x00"),                             # one byte of an extensions length
    hello_with(b"\x00\x00\x00"),                          # an extension header cut short
    records(b"\x01\x00\x00\x10" + b"\x03\x03" + b"\x11" * 14, []),   # the body is shorter than its random
])
def test_lengths_pointing_past_the_end_are_malformed(data):
    assert GUARD.parse(data)[0] == "not_tls"


def test_a_hello_past_the_limit_is_too_big():
    big = hello_with(sni(b"a.example") + b"\xfa\xfa" + (15000).to_bytes(2, "big") + b"\x00" * 15000)
    assert GUARD.parse(big)[0] == "ok"
    assert GUARD.parse(big, 4096)[0] == "too_big"
    assert GUARD.parse(big[:100], 4096)[0] == "too_big"      # said as soon as the record header says so
    # A message announced longer than the limit, in small records.
    huge = b"\x01" + (20000).to_bytes(3, "big") + b"\x03\x03"
    assert parse(records(huge, [4]))[0] == "too_big"
    # Past 16 KiB of records (a record header that does not fit) whatever the message.
    padded = hello_with(sni(b"a.example") + b"\xfa\xfa" + (3000).to_bytes(2, "big") + b"\x00" * 3000)[5:]
    assert parse(records(padded, [1000] * 3))[0] == "ok"
    spread = records(padded, [1] * len(padded))   # 6 bytes of records per byte of message
    assert parse(spread)[0] == "too_big"
    with pytest.raises(ValueError):
        parse(HELLO, 16385)


STATUSES = {"ok", "need", "not_tls", "too_big"}
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(data, limit=16384):
    status, need, name, protocols = GUARD.parse(data, limit)
    assert status in STATUSES
    if status == "need":
        assert len(data) < need <= limit
    else:
        assert need == 0
    if name is not None:
        assert status == "ok" and 0 < len(name) <= 255 and name.isascii()
    assert sum(len(p) + 1 for p in protocols) <= 127
    return status


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    check(data)


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_behind_a_handshake_header(data):
    check(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + data)
    check(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + b"\x01" + data)


@FUZZ
@given(st.data())
def test_fuzz_truncations_and_mutations_of_real_hellos(data):
    name = data.draw(st.sampled_from(["a.example", "x.b.example", None, "z" * 60 + ".example"]))
    base = bytearray(client_hello(name, data.draw(st.sampled_from([None, ["h2"], ["h2", "http/1.1"]]))))
    if data.draw(st.booleans()):
        base = bytearray(records(bytes(base[5:]), data.draw(st.lists(st.integers(1, 300), max_size=4))))
    for _ in range(data.draw(st.integers(0, 6))):
        at = data.draw(st.integers(0, len(base) - 1))
        base[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    limit = data.draw(st.sampled_from([16384, 512, 5]))
    check(bytes(base[:cut]), limit)


def test_route_table_exact_then_longest_wildcard():
    routes = [["a.example", "*.b.example"], ["*.c.b.example", "c.b.example"], ["*.example"]]
    assert _core.route_for(routes, "a.example") == 1
    assert _core.route_for(routes, "A.Example.") == 1          # case and a trailing dot
    assert _core.route_for(routes, "x.b.example") == 1
    assert _core.route_for(routes, "deep.x.b.example") == 1    # any depth
    assert _core.route_for(routes, "c.b.example") == 2         # exact beats the wildcard above it
    assert _core.route_for(routes, "y.c.b.example") == 2       # the longest wildcard wins
    assert _core.route_for(routes, "b.example") == 3           # *.b.example does not name b.example
    assert _core.route_for(routes, "example") == 0
    assert _core.route_for(routes, "a.example.org") == 0
    assert _core.route_for([["a.example"]], "x.a.example") == 0


def test_route_table_of_a_thousand_names():
    routes = [[f"host{i}.example", f"*.zone{i}.example"] for i in range(1000)]
    for i in (0, 1, 499, 999):
        assert _core.route_for(routes, f"host{i}.example") == i + 1
        assert _core.route_for(routes, f"a.b.zone{i}.example") == i + 1
    assert _core.route_for(routes, "host1000.example") == 0


def test_the_guard_page_really_faults():
    # What makes the fuzz tests' "never reads past its input" mean something.
    import subprocess
    import sys
    code = ("import ctypes, mmap, sys; sys.path[:0] = ['tests']; from test_sni_parse import GUARD; "
            "a = ctypes.addressof(ctypes.c_char.from_buffer(GUARD.map)) + GUARD.size; "
            "print(ctypes.string_at(a - 1, 1)); sys.stdout.flush(); ctypes.string_at(a, 1)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                         env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert run.stdout.strip() == b"b'\\x00'" and run.returncode == -11, (run.returncode, run.stderr[-300:])
