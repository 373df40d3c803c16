"""toxiproxy's own Python client (toxiproxy-python, from PyPI) against
`fastproxy toxiproxy`, unchanged: create a proxy, add a latency toxic and
see the latency through it, remove it, take the proxy down, destroy it."""
import time

import pytest

from fastproxy.toxiproxy import ToxiproxyServer
from support.sockets import connect, recv_exact

toxiproxy = pytest.importorskip("toxiproxy", reason="toxiproxy-python is in the test extra")


@pytest.fixture
def client(any_engine):
    server = ToxiproxyServer("127.0.0.1", 0, engine=any_engine).start()
    api = toxiproxy.Toxiproxy()
    api.update_api_consumer(*server.address)   # a class attribute: every consumer uses it
    try:
        yield api
    finally:
        server.stop()


def round_trip_ms(address, payload=b"ping"):
    with connect(address) as s:
        start = time.perf_counter()
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
        return (time.perf_counter() - start) * 1000


def test_client_lifecycle_unchanged(client, echo_server):
    assert client.running()
    assert client.version().startswith(b'{"version": "2.')
    proxy = client.create(upstream=echo_server.addr, name="echo")
    assert proxy.enabled is True and proxy.upstream == echo_server.addr
    host, _, port = proxy.listen.rpartition(":")
    address = (host, int(port))
    assert int(port) > 0
    assert set(client.proxies()) == {"echo"}
    with pytest.raises(toxiproxy.exceptions.ProxyExists):
        client.create(upstream=echo_server.addr, name="echo")

    before = min(round_trip_ms(address) for _ in range(5))
    proxy.add_toxic(type="latency", attributes={"latency": 100})
    (shown,) = proxy.toxics().values()
    assert (shown.name, shown.type, shown.stream, shown.attributes) == \
        ("latency_downstream", "latency", "downstream", {"latency": 100, "jitter": 0})
    slow = min(round_trip_ms(address) for _ in range(3))
    assert 95 <= slow - before <= 200, (before, slow)
    proxy.destroy_toxic("latency_downstream")
    assert proxy.toxics() == {}
    assert min(round_trip_ms(address) for _ in range(3)) < before + 50

    with proxy.down():
        with pytest.raises(ConnectionRefusedError):
            connect(address, timeout=2).close()
    assert round_trip_ms(address) < 1000

    with pytest.raises(toxiproxy.exceptions.InvalidToxic):
        proxy.add_toxic(type="nonsense")
    with pytest.raises(toxiproxy.exceptions.NotFound):
        proxy.destroy_toxic("nope")
    assert client.reset()
    client.destroy(proxy)
    assert client.proxies() == {}
    with pytest.raises(ConnectionRefusedError):
        connect(address, timeout=2).close()


def test_client_populate(client, echo_server):
    made = client.populate([{"name": "a", "upstream": echo_server.addr, "listen": "127.0.0.1:0"},
                            {"name": "b", "upstream": echo_server.addr, "listen": "127.0.0.1:0"}])
    assert sorted(p.name for p in made) == ["a", "b"]
    assert sorted(client.proxies()) == ["a", "b"]
    client.destroy_all()
    assert client.proxies() == {}
