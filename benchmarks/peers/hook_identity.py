"""Benchmark hook: an identity on_data, the same function for fastproxy
(--hooks) and the asyncio/uvloop peers (asyncio_proxy.py --hooks)."""


def on_data(conn, direction, data):
    return data
