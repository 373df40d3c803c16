"""A router: sends each client to an upstream chosen by the client's address.

Run it as a script:

    python examples/router.py --listen 0.0.0.0:5432 --upstream 10.0.0.10:5432 \\
        --route 10.1.0.0/16=10.0.0.11:5432 --route 192.168.1.7=10.0.0.12:5432

A client whose address is in a --route network goes to that route's upstream
(first match wins); every other client goes to --upstream. Add --deny-unmatched
to refuse clients that match no route instead. Try it on one machine with
loopback source addresses (127.0.0.2, 127.0.0.3, ...), which Linux accepts.
Ctrl-C (or SIGTERM) stops it. The engine follows FASTPROXY_ENGINE.
"""
import argparse
import ipaddress
import logging
import sys

from fastproxy import Proxy


def parse_route(text):
    net, sep, upstream = text.partition("=")
    if not sep or not upstream:
        raise argparse.ArgumentTypeError("want NETWORK=HOST:PORT, got %r" % text)
    try:
        return ipaddress.ip_network(net.strip(), strict=False), upstream.strip()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def make_router(routes, deny_unmatched=False):
    def on_connect(conn):
        ip = ipaddress.ip_address(conn.client_address[0].split("%", 1)[0])
        for net, upstream in routes:
            if ip.version == net.version and ip in net:
                return upstream  # route this client there
        return False if deny_unmatched else None  # None: the default --upstream
    return on_connect


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--upstream", required=True, metavar="HOST:PORT",
                    help="where clients that match no route go")
    ap.add_argument("--route", action="append", default=[], type=parse_route,
                    metavar="NETWORK=HOST:PORT", help="repeatable; first match wins")
    ap.add_argument("--deny-unmatched", action="store_true",
                    help="refuse clients that match no route")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    for net, upstream in args.route:
        logging.info("route %s -> %s", net, upstream)
    proxy = Proxy(args.listen, args.upstream,
                  on_connect=make_router(args.route, args.deny_unmatched))
    proxy.serve_forever()  # logs "listening on ..." to stderr; stops on SIGINT/SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
