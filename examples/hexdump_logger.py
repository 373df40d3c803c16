"""A logging proxy: prints a hexdump of the first bytes each way of every connection.

Run it as a script:

    python examples/hexdump_logger.py --listen 127.0.0.1:8080 --upstream example.com:80
    python examples/hexdump_logger.py --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000 --bytes 128

then point a client at 127.0.0.1:8080. Output (stdout) looks like:

    #1 open 127.0.0.1:50312
    #1 client->server 18 bytes
      0000  47 45 54 20 2f 20 48 54 54 50 2f 31 2e 30 0d 0a  |GET / HTTP/1.0..|
      0010  0d 0a                                            |..|
    #1 server->client ...
    #1 close CLIENT_CLOSED up 18 B down 1256 B 0.012 s

Ctrl-C (or SIGTERM) stops it. The engine follows FASTPROXY_ENGINE (auto by default).
"""
import argparse
import logging
import sys
import threading

from fastproxy import Direction, Proxy

LABEL = {Direction.UPSTREAM: "client->server", Direction.DOWNSTREAM: "server->client"}


def hexdump(data, width=16):
    lines = []
    for off in range(0, len(data), width):
        row = data[off:off + width]
        hexes = " ".join("%02x" % b for b in row)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append("  %04x  %-*s  |%s|" % (off, width * 3 - 1, hexes, text))
    return "\n".join(lines)


def make_hooks(limit, out=sys.stdout):
    shown = {}  # (conn id, direction) -> bytes dumped so far
    lock = threading.Lock()  # hooks run on several hook threads

    def emit(text):
        with lock:
            out.write(text + "\n")
            out.flush()

    def on_connect(conn):
        emit("#%d open %s:%d" % (conn.id, *conn.client_address))

    def on_data(conn, direction, data):
        key = (conn.id, direction)
        with lock:
            done = shown.get(key, 0)
            take = data[:max(0, limit - done)]
            shown[key] = done + len(take)
        if take:
            emit("#%d %s %d bytes\n%s" % (conn.id, LABEL[direction], len(take), hexdump(take)))
        return None  # forward unchanged

    def on_close(conn, record):
        with lock:
            shown.pop((conn.id, Direction.UPSTREAM), None)
            shown.pop((conn.id, Direction.DOWNSTREAM), None)
        emit("#%d close %s up %d B down %d B %.3f s" % (
            conn.id, record.reason.name, record.bytes_upstream, record.bytes_downstream,
            record.duration))

    return on_connect, on_data, on_close


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--upstream", required=True, metavar="HOST:PORT")
    ap.add_argument("--bytes", type=int, default=64, help="bytes to dump each way (default 64)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    on_connect, on_data, on_close = make_hooks(args.bytes)
    proxy = Proxy(args.listen, args.upstream,
                  on_connect=on_connect, on_data=on_data, on_close=on_close)
    proxy.serve_forever()  # logs "listening on ..." to stderr; stops on SIGINT/SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
