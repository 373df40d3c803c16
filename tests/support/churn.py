"""Short connections by the tens of thousands, each ending in a chosen way,
driven by one selector loop (a thread per connection would be far slower).

A kind is (target address, what the client does, what it expects):
  echo        send a ping, read it back, close (FIN)
  client_rst  send a ping, then close with linger 0 (RST) at once
  expect_end  send a ping, then wait for the proxy to end the connection
              (EOF or reset: an upstream that resets, refuses, or never
              answers within the proxy's connect timeout)
Outcomes are counted per kind; anything else (a wrong answer, a stall past
`op_timeout`, a refused connect to the proxy) is a failure, kept with its
kind and error."""
import errno
import random
import selectors
import socket
import struct
import threading
import time
from collections import Counter

from .sockets import fmt_addr, parse_addr

PING = b"ping"
_LINGER0 = struct.pack("ii", 1, 0)


class ResetServer:
    """Accepts and resets at once (linger 0): an upstream that resets."""

    def __init__(self, host="127.0.0.1"):
        self._sock = socket.socket()
        self._sock.bind((host, 0))
        self._sock.listen(4096)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="reset-server", daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return fmt_addr(*self._sock.getsockname()[:2])

    def _run(self):
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                continue
            self.accepted += 1
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            c.close()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Churn:
    def __init__(self, kinds, total, concurrency=256, op_timeout=5.0, seed=1):
        """kinds: {name: (address, behaviour, weight)}; behaviour is one of
        'echo', 'client_rst', 'expect_end'."""
        self.kinds = {k: (parse_addr(a) if isinstance(a, str) else a, b, w) for k, (a, b, w) in kinds.items()}
        self.total = total
        self.concurrency = concurrency
        self.op_timeout = op_timeout
        self._rng = random.Random(seed)
        names = sorted(self.kinds)
        self._names = names
        self._weights = [self.kinds[k][2] for k in names]
        self.outcomes = Counter()
        self.failures = []
        self.started = 0

    def _open(self, sel, now):
        kind = self._rng.choices(self._names, self._weights)[0]
        addr, behaviour, _ = self.kinds[kind]
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        self.started += 1
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.failures.append((kind, "connect: " + errno.errorcode.get(err, str(err))))
            return
        sel.register(s, selectors.EVENT_WRITE, [kind, behaviour, "connecting", now + self.op_timeout, b""])

    def _end(self, sel, s, kind, outcome=None, failure=None, reset=False):
        sel.unregister(s)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        s.close()
        if failure is not None:
            self.failures.append((kind, failure))
        else:
            self.outcomes[kind + ":" + outcome] += 1

    def run(self, deadline_s):
        """Drive `total` connections; returns the seconds it took. Stops at
        the deadline, leaving the rest counted as not started."""
        sel = selectors.DefaultSelector()
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        last_sweep = t0
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                while self.started < self.total and len(sel.get_map()) < self.concurrency:
                    self._open(sel, now)
                if not sel.get_map():
                    break
                for key, mask in sel.select(0.05):
                    self._step(sel, key, mask)
                if now - last_sweep > 0.5:
                    last_sweep = now
                    for key in list(sel.get_map().values()):
                        if key.data[3] < now:
                            self._end(sel, key.fileobj, key.data[0],
                                      failure="stalled in %s for %.0fs" % (key.data[2], self.op_timeout))
            for key in list(sel.get_map().values()):
                self._end(sel, key.fileobj, key.data[0], failure="deadline in " + key.data[2])
        finally:
            sel.close()
        return time.monotonic() - t0

    def _step(self, sel, key, mask):
        s = key.fileobj
        kind, behaviour, phase = key.data[:3]
        if phase == "connecting":
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == errno.ECONNRESET and behaviour == "expect_end":
                # Accepted, then reset by the proxy before this loop looked.
                self._end(sel, s, kind, "ended")
                return
            if err:
                self._end(sel, s, kind, failure="connect: " + errno.errorcode.get(err, str(err)))
                return
            try:
                s.send(PING)
            except OSError as e:
                if behaviour == "expect_end":
                    self._end(sel, s, kind, "ended")
                else:
                    self._end(sel, s, kind, failure="send: %r" % e)
                return
            if behaviour == "client_rst":
                self._end(sel, s, kind, "reset", reset=True)
                return
            key.data[2] = "reading"
            sel.modify(s, selectors.EVENT_READ, key.data)
            return
        try:
            data = s.recv(64)
        except BlockingIOError:
            return
        except OSError as e:
            if behaviour == "expect_end":
                self._end(sel, s, kind, "ended")
            else:
                self._end(sel, s, kind, failure="recv: %r" % e)
            return
        if behaviour == "expect_end":
            if data:
                self._end(sel, s, kind, failure="got %r from an upstream that should not answer" % data)
            else:
                self._end(sel, s, kind, "ended")
            return
        got = key.data[4] = key.data[4] + data
        if got == PING:
            self._end(sel, s, kind, "echoed")
        elif not data or not PING.startswith(got):
            self._end(sel, s, kind, failure="echo answered %r" % got)
