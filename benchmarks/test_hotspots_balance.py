"""What choosing an upstream costs, per algorithm, over 3 upstreams.

    PYTHONPATH=src python -m pytest benchmarks/test_hotspots_balance.py

`python`: one acquire() + release() through the UpstreamGroup's methods (mostly
the Python call overhead). `native`: 1000 acquire + release pairs in C
without the GIL, as a worker makes them; divide by 1000 for one pair.
"""
import pytest

from fastproxy._core import BALANCE_ALGORITHMS, UpstreamGroup
from fastproxy.upstreams import parse_upstreams

UPSTREAMS = ["10.0.0.1:80@1", "10.0.0.2:80@2", "10.0.0.3:80@3"]


@pytest.fixture(params=BALANCE_ALGORITHMS)
def balancer(request):
    return UpstreamGroup(parse_upstreams(UPSTREAMS), balance=request.param, seed=1)


def test_acquire_release_python(benchmark, balancer):
    def pair():
        balancer.release(balancer.acquire("127.0.0.1"))

    benchmark(pair)
    assert sum(balancer.state(i)["active"] for i in range(3)) == 0


def test_acquire_release_native_x1000(benchmark, balancer):
    taken = benchmark(balancer._stress, 1000, 1)
    assert taken == 1000
