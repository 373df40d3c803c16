"""fastproxy inside an asyncio service, typed (tests/test_typing.py runs
mypy --strict over this file).

    python examples/embedded.py UPSTREAM_HOST:PORT [LISTEN]

Admits clients from loopback only, through an async on_connect (where a
service would ask its auth backend), keeps totals of the closed bridges and
prints them when SIGTERM or SIGINT stops it. The event loop stays free while
the proxy starts and drains.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from fastproxy import CloseRecord, Connection, Proxy


async def admit(conn: Connection) -> bool:
    await asyncio.sleep(0)   # e.g. ask an auth service
    return conn.client_address[0] in ("127.0.0.1", "::1")


class Totals:
    def __init__(self) -> None:
        self.bridges = 0
        self.bytes = 0

    def on_close(self, conn: Connection, record: CloseRecord) -> None:
        self.bridges += 1
        self.bytes += record.bytes_upstream + record.bytes_downstream


async def main(upstream: str, listen: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    totals = Totals()
    async with Proxy(listen, upstream, on_connect=admit, on_close=totals.on_close) as proxy:
        address = proxy.address   # (host, port), or a path for listen="unix:PATH"
        shown = address if isinstance(address, str) else "%s:%d" % address
        logging.getLogger("embedded").info("serving %s", shown)
        await stop.wait()
    print(f"{totals.bridges} bridges, {totals.bytes} bytes", flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "127.0.0.1:0"))
