#!/usr/bin/env python3
"""A small TCP proxy on asyncio streams: the pure-Python peer of fastproxy.

    python asyncio_proxy.py --listen 127.0.0.1:8000 --upstream 127.0.0.1:9000
    python asyncio_proxy.py --loop uvloop ...     # same code on uvloop's loop

What a careful asyncio user would write: asyncio.start_server plus
open_connection, one task per direction, 64 KiB reads, write + drain for
backpressure, write_eof() to pass a half-close on, and both sides closed once
both directions are done. TCP_NODELAY is set on both sockets (asyncio and
uvloop already do so for TCP transports; set again to be explicit). Stops
cleanly (exit 0) on SIGTERM or SIGINT.

Used by benchmarks/run.py as the `asyncio` and `uvloop` contenders. With
`--hooks FILE.py`, each chunk goes through the file's on_data(conn, direction,
data) first, as fastproxy's --hooks does (a None conn: there is no object
to give): the peers of fastproxy's on_data benchmark.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import socket
import sys
from typing import Any, Callable, Optional, Tuple

OnData = Optional[Callable[[Any, int, bytes], Any]]

CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 5.0


def address(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               on_data: OnData = None, direction: int = 0) -> None:
    """Copy one direction until EOF, then half-close the other side."""
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if on_data is not None:
                result = on_data(None, direction, data)
                data = data if result is None else result
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def bridge(upstream: Tuple[str, int], on_data: OnData, creader: asyncio.StreamReader,
                 cwriter: asyncio.StreamWriter) -> None:
    try:
        ureader, uwriter = await asyncio.wait_for(
            asyncio.open_connection(*upstream, limit=CHUNK), CONNECT_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        cwriter.transport.abort()
        return
    nodelay(cwriter)
    nodelay(uwriter)
    try:
        await asyncio.gather(pump(creader, uwriter, on_data, 0), pump(ureader, cwriter, on_data, 1))
    finally:
        for w in (cwriter, uwriter):
            w.close()


async def serve(listen: Tuple[str, int], upstream: Tuple[str, int], on_data: OnData) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(
        lambda r, w: bridge(upstream, on_data, r, w), *listen, limit=CHUNK,
        backlog=4096, reuse_address=True)
    async with server:
        await stop.wait()


def load_on_data(path: str) -> OnData:
    spec = importlib.util.spec_from_file_location("peer_hooks", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.on_data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=address, required=True)
    p.add_argument("--upstream", type=address, required=True)
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--hooks", metavar="FILE.py", help="call FILE's on_data(conn, direction, data) per chunk")
    args = p.parse_args()
    on_data = load_on_data(args.hooks) if args.hooks else None
    run = asyncio.run
    if args.loop == "uvloop":
        import uvloop  # only needed for this contender
        run = uvloop.run
    try:
        run(serve(args.listen, args.upstream, on_data))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
