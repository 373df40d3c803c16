"""Benchmark hook: an on_connect that admits everyone (its cost is the hand-over)."""


def on_connect(conn):
    return None
