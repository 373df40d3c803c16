"""Block Redis FLUSHALL in front of a Redis server (or any line protocol).

Run it with the fastproxy command, which loads the hooks from this file:

    fastproxy --listen 127.0.0.1:7000 --upstream 127.0.0.1:6379 \\
              --hooks examples/redis_filter.py

    redis-cli -p 7000 set a 1        # forwarded
    redis-cli -p 7000 flushall       # the proxy closes the connection

Commands are lines (inline `FLUSHALL\\r\\n` or RESP arrays, whose command name is
a line of its own). A chunk that ends mid-line is held with WAIT until the rest
arrives, so a command split across reads is still seen whole. If any complete
line is a blocked command, the proxy closes the connection without forwarding
that chunk; everything else passes through unchanged. Replies are not touched.
(Being a short example, it also blocks a RESP argument that is literally FLUSHALL.)
"""
from fastproxy import CLOSE, WAIT, Direction

BLOCKED = {b"FLUSHALL"}


def on_data(conn, direction, data):
    if direction != Direction.UPSTREAM:
        return None  # server -> client: forward as is
    if not data.endswith(b"\n"):
        return WAIT  # hold a partial line until the rest arrives (bounded by max_hold)
    for line in data.splitlines():
        words = line.split(None, 1)
        if words and words[0].upper() in BLOCKED:
            print("blocked %s from %s:%d" % (words[0].decode(errors="replace"),
                                            *conn.client_address), flush=True)
            return CLOSE
    return None
