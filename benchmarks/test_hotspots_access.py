"""Access-control hot spots, measured in isolation: `pytest benchmarks/`.

Each check runs once per new client in the data plane. Two views of each:
the Python wrapper (what a test or script pays, mostly call overhead) and a
loop of LOOPS calls in C without the GIL (what a worker pays), whose
per-call cost is recorded as extra_info["ns_per_call"].
"""
import ipaddress
import struct

import pytest

from fastproxy import _core

LOOPS = 100_000
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def every_other_address(n):
    """n deny rules that cannot merge: 10.0.0.0, 10.0.0.2, 10.0.0.4, ..."""
    base = int(ipaddress.ip_address("10.0.0.0"))
    return [str(ipaddress.ip_address(base + 2 * i)) for i in range(n)]


@pytest.fixture(scope="module", params=[0, 10_000], ids=["no-rules", "10k-deny-rules"])
def acl(request):
    acl = _core.AccessList(deny=every_other_address(request.param))
    assert acl.ranges == (0, request.param)
    return acl


def per_call(benchmark, loops):
    if benchmark.stats:     # None under --benchmark-disable
        benchmark.extra_info["ns_per_call"] = round(benchmark.stats.stats.mean / loops * 1e9, 1)


@pytest.mark.parametrize("client", ["10.0.39.17", "2001:db8::1"])
def test_acl_admits_python(benchmark, acl, client):
    assert benchmark(acl.admits, client)


@pytest.mark.parametrize("client", ["10.0.39.17", "2001:db8::1"])
def test_acl_admits_c_loop(benchmark, acl, client):
    assert benchmark(_core._bench_admits, acl, client, LOOPS) == LOOPS
    per_call(benchmark, LOOPS)


def v2_header(tlvs=b""):
    body = (ipaddress.ip_address("192.0.2.1").packed + ipaddress.ip_address("198.51.100.2").packed
            + struct.pack("!HH", 56324, 443) + tlvs)
    return SIG + b"\x21\x11" + struct.pack("!H", len(body)) + body


HEADERS = {
    "v2-tcp4": v2_header(),
    "v2-tcp4-tlvs": v2_header(bytes([0x01, 0, 2]) + b"h2" + bytes([0x04, 0, 64]) + bytes(64)),
    "v1-tcp4": b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
}


@pytest.mark.parametrize("name", HEADERS)
def test_proxy_parse_python(benchmark, name):
    data = HEADERS[name] + b"GET / HTTP/1.1\r\n\r\n"
    assert benchmark(_core.parse_proxy_header, data)[0] == len(HEADERS[name])


@pytest.mark.parametrize("name", HEADERS)
def test_proxy_parse_c_loop(benchmark, name):
    data = HEADERS[name] + b"GET / HTTP/1.1\r\n\r\n"
    assert benchmark(_core._bench_proxy_parse, data, LOOPS) == len(HEADERS[name])
    per_call(benchmark, LOOPS)
