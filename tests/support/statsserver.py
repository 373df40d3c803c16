"""A test-only stand-in for the stats endpoint: GET /stats answers
json.dumps(proxy.stats()) of a real in-process Proxy, over a real TCP or Unix
socket, on a thread; anything else is 404. `fastproxy top` is tested against
it until the endpoint itself is merged (then against both)."""
import http.server
import json
import socketserver
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?", 1)[0] != "/stats":
            self.send_error(404)
            return
        body = json.dumps(self.server.source()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self):
        # A Unix peer's address is '' (the base class indexes it).
        return "unix" if not self.client_address else str(self.client_address[0])

    def log_message(self, format, *args):
        pass


class _TCP(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)


class StatsServer:
    """source: a Proxy (its stats()) or a callable returning the dict.
    unix_path: serve on that Unix socket instead of 127.0.0.1:0."""

    def __init__(self, source, unix_path=None):
        get = source.stats if hasattr(source, "stats") else source
        if unix_path is None:
            self.server = _TCP(("127.0.0.1", 0), _Handler)
            self.addr = "127.0.0.1:%d" % self.server.server_address[1]
        else:
            self.server = _Unix(unix_path, _Handler)
            self.addr = "unix:" + unix_path
        self.server.source = get
        self.requests = 0
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stats-server", daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
