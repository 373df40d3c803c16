"""A verifying traffic harness, for proving that nothing is lost while the proxy
reloads, hands its sockets over or is abused.

VerifyingServer  the upstream: reads each client's header, streams the down
                 bytes back and checks the up bytes it receives
StreamLoad       n bridges through the proxy to a VerifyingServer, streaming
                 both ways at once and checking the down bytes; wait() gives a
                 LoadResult, which can also carry the server's verdicts
ConnectLoop      short connections one after another, counted by outcome

Each bridge's client sends a header first (`HEADER_SIZE` bytes: a seed, the
two stream lengths and the pacing limits); both ends derive from the seed
alone the bytes of each direction and how each side paces them (chunk sizes,
pauses), so a failing connection is named by its seed and can be replayed.
Each side half-closes (SHUT_WR) when its stream is sent; the lengths and the
pacing decide which side does so first.

Why asyncio: 200 bridges are 400 directions per side, each pausing at random.
A thread per direction would be 800 threads on 2 CPUs taking turns at the GIL
(and 8 MiB of stack reserved each); one selector loop with timers per side
does the same with two threads, and asyncio is that loop with the timers
already written. Both sides run one loop each on a daemon thread.

Everything is bounded: StreamLoad.wait() cancels what has not finished by its
deadline and reports it as timed out; the server gives up on a connection
after `timeout`; ConnectLoop's sockets carry timeouts.
"""
import asyncio
import errno
import math
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from .sockets import family_of, fmt_addr, parse_addr

KiB = 1024
MAGIC = b"FPT1"
# magic, seed, up_len, down_len, max_pause in microseconds, max_chunk
_HEADER = struct.Struct("!4sQQQII")
HEADER_SIZE = _HEADER.size
# The streams are generated in blocks of this size, so any split of a stream
# into writes or reads gives the same bytes.
_BLOCK = 64 * KiB


def _addr(target):
    """(host, port) from a (host, port, ...) tuple or 'host:port' / '[::1]:port'."""
    if isinstance(target, str):
        return parse_addr(target)
    return target[0], target[1]


def _describe(exc):
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return "%s (%s)" % (errno.errorcode[exc.errno], exc.strerror)
    return repr(exc)


class Stream:
    """The bytes of one direction ('up' or 'down') of the connection with this seed."""

    def __init__(self, seed, direction):
        # A str seed is hashed (SHA-512): neighbouring seeds give unrelated streams.
        self._rng = random.Random("%d:%s:data" % (seed, direction))
        self._block = b""
        self._pos = 0

    def take(self, n):
        parts = []
        while n:
            if self._pos == len(self._block):
                self._block, self._pos = self._rng.randbytes(_BLOCK), 0
            k = min(n, len(self._block) - self._pos)
            parts.append(self._block[self._pos:self._pos + k])
            self._pos += k
            n -= k
        return b"".join(parts)


class _Pacing:
    """How one side sends one direction: chunk sizes log-uniform in
    [1, max_chunk] (so single bytes and full writes both happen), and after
    half of the chunks (and before the first) a pause of up to max_pause."""

    def __init__(self, seed, direction, max_chunk, max_pause):
        self._rng = random.Random("%d:%s:pace" % (seed, direction))
        self._log_max = math.log2(max(1, max_chunk))
        self._max_pause = max_pause

    def chunk(self, left):
        return min(left, int(2 ** self._rng.uniform(0, self._log_max)))

    def pause(self):
        return self._rng.uniform(0, self._max_pause) if self._rng.random() < 0.5 else 0.0


@dataclass
class Flow:
    """One direction of one connection as one end saw it."""
    length: int
    sending: bool
    done: int = 0                       # bytes sent, or received within length
    mismatch_at: Optional[int] = None   # receiver: first wrong byte's offset
    eof_at: Optional[int] = None        # receiver: bytes received when EOF came
    excess: int = 0                     # receiver: bytes past length
    error: Optional[str] = None
    finished: Optional[float] = None    # monotonic: sender's SHUT_WR, receiver's EOF

    def problem(self):
        where = "after %d of %d bytes" % (self.done, self.length)
        if self.mismatch_at is not None:
            return "mismatch at offset %d" % self.mismatch_at
        if self.error is not None:
            return "%s %s" % (self.error, where)
        if self.sending:
            return None if self.finished is not None else "sent only %d of %d bytes" % (self.done, self.length)
        if self.excess:
            return "%d bytes past the end (%d)" % (self.excess, self.length)
        if self.eof_at is None:
            return "no EOF " + where
        if self.eof_at < self.length:
            return "cut early: EOF " + where
        return None

    def feed(self, expected, data):
        """Check received bytes against the expected stream."""
        n = min(len(data), self.length - self.done)
        if n and self.mismatch_at is None:
            want = expected.take(n)
            if data[:n] != want:
                self.mismatch_at = self.done + next(i for i in range(n) if data[i] != want[i])
        self.done += n
        self.excess += len(data) - n


@dataclass
class Conn:
    """One bridge: the client's view in a LoadResult (with the server's view
    in `server` when the load was given the server), or the server's view in
    VerifyingServer.conns."""
    index: int
    seed: Optional[int]
    up: Flow
    down: Flow
    error: Optional[str] = None     # connecting, the header, the deadline
    connected: bool = False
    closed: bool = False
    server: Optional["Conn"] = None

    def problems(self):
        out = [self.error] if self.error else []
        out += ["%s: %s" % (name, p) for name, p in
                (("up", self.up.problem()), ("down", self.down.problem())) if p]
        if self.server is not None:
            out += ["server: " + p for p in self.server.problems()]
        return out

    @property
    def ok(self):
        return self.closed and not self.problems()

    def describe(self):
        seed = "?" if self.seed is None else "%#x" % self.seed
        return "#%d seed=%s (up %d B, down %d B): %s" % (
            self.index, seed, self.up.length, self.down.length,
            "; ".join(self.problems()) or ("still open" if not self.closed else "ok"))


async def _send(writer, flow, stream, pacing):
    try:
        await asyncio.sleep(pacing.pause())
        while flow.done < flow.length:
            n = pacing.chunk(flow.length - flow.done)
            writer.write(stream.take(n))
            await writer.drain()
            flow.done += n
            pause = pacing.pause()
            if pause:
                await asyncio.sleep(pause)
        writer.write_eof()
        flow.finished = time.monotonic()
    except OSError as e:
        flow.error = _describe(e)


async def _receive(reader, flow, stream):
    try:
        while True:
            data = await reader.read(_BLOCK)
            if not data:
                break
            flow.feed(stream, data)
        flow.eof_at = flow.done + flow.excess
        flow.finished = time.monotonic()
    except OSError as e:
        flow.error = _describe(e)


async def _close(writer, clean):
    """Close; abort (RST, no waiting on a peer that reads nothing) unless clean."""
    if not clean:
        writer.transport.abort()
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


class _LoopThread:
    """An asyncio loop on a daemon thread running main(stop_event, ready) to its
    end; stop() sets stop_event from any thread."""

    def __init__(self, name, main):
        self._main = main
        self._ready = threading.Event()
        self._loop = None
        self._stop = None
        self.error = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout=5.0):
        self._thread.start()
        assert self._ready.wait(timeout), "%s did not start" % self._thread.name
        if self.error is not None:
            raise self.error

    def _run(self):
        try:
            asyncio.run(self._amain())
        except BaseException as e:  # noqa: B902 - re-raised by start() / join()
            self.error = e
            self._ready.set()

    async def _amain(self):
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self._main(self._stop, self._ready.set)

    def stop(self):
        try:
            self._loop.call_soon_threadsafe(self._stop.set)
        except (AttributeError, RuntimeError):  # never started, or already done
            pass

    def join(self, timeout):
        """True when the thread ended; re-raises what ended it."""
        self._thread.join(max(0.0, timeout))
        if self.error is not None:
            raise self.error
        return not self._thread.is_alive()

    def is_alive(self):
        return self._thread.is_alive()


class VerifyingServer:
    """The upstream of a StreamLoad (see the module docstring). `conns` holds
    one Conn per accepted connection, `by_seed` the ones whose header was read.
    A context manager; binds host:port (port 0: any)."""

    def __init__(self, host="127.0.0.1", port=0, timeout=60.0, backlog=1024):
        self.host = host
        self.timeout = timeout
        self.conns = []
        self.by_seed = {}
        self._backlog = backlog
        self._tasks = set()
        self.port = port
        self._runner = _LoopThread("verifying-server", self._main)
        self._runner.start()

    @property
    def address(self):
        return (self.host, self.port)

    @property
    def addr(self):
        return fmt_addr(self.host, self.port)

    @property
    def active(self):
        return sum(1 for c in self.conns if not c.closed)

    async def _main(self, stop, ready):
        server = await asyncio.start_server(self._serve, self.host, self.port,
                                            family=family_of(self.host), backlog=self._backlog)
        self.port = server.sockets[0].getsockname()[1]
        ready()
        async with server:
            await stop.wait()
            server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader, writer):
        self._tasks.add(asyncio.current_task())
        c = Conn(len(self.conns), None, Flow(0, sending=False), Flow(0, sending=True), connected=True)
        self.conns.append(c)
        clean = False
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readexactly(HEADER_SIZE)
                magic, seed, up_len, down_len, pause_us, max_chunk = _HEADER.unpack(head)
                if magic != MAGIC:
                    c.error = "bad header %r" % head
                    return
                c.seed, c.up.length, c.down.length = seed, up_len, down_len
                self.by_seed[seed] = c
                pacing = _Pacing(seed, "down", max_chunk, pause_us / 1e6)
                await asyncio.gather(_send(writer, c.down, Stream(seed, "down"), pacing),
                                     _receive(reader, c.up, Stream(seed, "up")))
                clean = c.up.finished is not None and c.down.finished is not None
        except asyncio.IncompleteReadError as e:
            c.error = "EOF in the header after %d bytes" % len(e.partial)
        except TimeoutError:
            c.error = "timeout after %.0fs" % self.timeout
        except OSError as e:
            c.error = _describe(e)
        except asyncio.CancelledError:
            c.error = "server closed"
            raise
        finally:
            self._tasks.discard(asyncio.current_task())
            c.closed = True
            await _close(writer, clean)

    def bad(self):
        return [c for c in self.conns if not c.ok]

    def assert_all_ok(self):
        bad = self.bad()
        assert not bad, _report("the server's view", bad, len(self.conns))

    def close(self):
        self._runner.stop()
        assert self._runner.join(10), "VerifyingServer did not stop"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _report(what, bad, total, limit=20):
    lines = ["%d of %d connections bad (%s):" % (len(bad), total, what)]
    lines += ["  " + c.describe() for c in bad[:limit]]
    if len(bad) > limit:
        lines.append("  ... and %d more" % (len(bad) - limit))
    return "\n".join(lines)


@dataclass
class LoadResult:
    conns: list
    elapsed: float
    timed_out: bool = False

    @property
    def bad(self):
        return [c for c in self.conns if not c.ok]

    def close_orders(self):
        """How many bridges saw the client half-close first, and the server:
        both should be well represented, or the test exercised only one order."""
        orders = Counter()
        for c in self.conns:
            if c.up.finished is not None and c.down.finished is not None:
                orders["client first" if c.up.finished < c.down.finished else "server first"] += 1
        return orders

    def assert_all_ok(self):
        bad = self.bad
        assert not bad, _report("took %.2fs%s" % (self.elapsed, ", timed out" if self.timed_out else ""),
                                bad, len(self.conns))


def _length(spec, rng):
    """An int is the length; a (lo, hi) pair draws one per connection."""
    return spec if isinstance(spec, int) else rng.randint(*spec)


class StreamLoad:
    """n bridges to `target` (see the module docstring), started on entering.

    up_len / down_len: bytes per bridge, an int or a (lo, hi) range drawn per
    bridge. Each side writes chunks of 1..max_chunk bytes and pauses up to
    max_pause seconds after half of them; a bridge starts within max_pause.
    The defaults run for 2 to 4 s on 2 CPUs; stretch with max_pause (the
    run's length is roughly proportional to it) or the lengths.

    server: the VerifyingServer behind the target; wait() then also waits
    for its verdicts on the up streams and adds them to each Conn."""

    def __init__(self, target, n=200, up_len=(0, 256 * KiB), down_len=(0, 256 * KiB), seed=1,
                 max_pause=0.1, max_chunk=64 * KiB, server=None):
        self.target = _addr(target)
        self.server = server
        rng = random.Random("load:%d" % seed)
        self.conns = []
        for i in range(n):
            s = rng.getrandbits(64)
            self.conns.append(Conn(i, s, Flow(_length(up_len, rng), sending=True),
                                   Flow(_length(down_len, rng), sending=False)))
        self._starts = [rng.uniform(0, max_pause) for _ in range(n)]
        self.max_pause, self.max_chunk = max_pause, max_chunk
        self.total_bytes = sum(c.up.length + c.down.length for c in self.conns)
        self._cancel_reason = "stopped"
        self._result = None
        self._t0 = None
        self._runner = _LoopThread("stream-load", self._main)

    def start(self):
        self._t0 = time.monotonic()
        self._runner.start()
        return self

    def bytes_moved(self):
        """Bytes sent up and received down so far, over all bridges."""
        return sum(c.up.done + c.down.done for c in self.conns)

    def active(self):
        """Bridges connected and not yet closed."""
        return sum(1 for c in self.conns if c.connected and not c.closed)

    def wait_progress(self, fraction, timeout=10.0):
        """Wait until `fraction` of total_bytes moved; return bytes_moved().
        Fails if the load finished or the timeout passed first."""
        deadline = time.monotonic() + timeout
        while True:
            moved = self.bytes_moved()
            if moved >= fraction * self.total_bytes:
                return moved
            assert time.monotonic() < deadline and self._runner.is_alive(), \
                "load reached only %d of %d bytes" % (moved, self.total_bytes)
            time.sleep(0.01)

    async def _main(self, stop, ready):
        tasks = [asyncio.create_task(self._bridge(c, d)) for c, d in zip(self.conns, self._starts)]
        ready()
        everything = asyncio.gather(*tasks)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([everything, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        everything.cancel()
        await asyncio.gather(everything, stopping, return_exceptions=True)

    async def _bridge(self, c, start_delay):
        await asyncio.sleep(start_delay)
        try:
            reader, writer = await asyncio.open_connection(*self.target)
        except OSError as e:
            c.error = "connect: " + _describe(e)
            c.closed = True
            return
        except asyncio.CancelledError:
            c.error = self._cancel_reason + " before connecting"
            c.closed = True
            raise
        c.connected = True
        clean = False
        try:
            writer.write(_HEADER.pack(MAGIC, c.seed, c.up.length, c.down.length,
                                      int(self.max_pause * 1e6), self.max_chunk))
            pacing = _Pacing(c.seed, "up", self.max_chunk, self.max_pause)
            await asyncio.gather(_send(writer, c.up, Stream(c.seed, "up"), pacing),
                                 _receive(reader, c.down, Stream(c.seed, "down")))
            clean = c.up.finished is not None and c.down.finished is not None
        except asyncio.CancelledError:
            c.error = self._cancel_reason
            raise
        finally:
            c.closed = True
            await _close(writer, clean)

    def wait(self, timeout=60.0):
        """Wait for every bridge to end (and, given the server, for its
        verdicts), at most `timeout` seconds in all: what is left then is
        cancelled and reported as timed out. Returns the LoadResult."""
        if self._result is not None:
            return self._result
        deadline = time.monotonic() + timeout
        timed_out = not self._runner.join(timeout)
        if timed_out:
            self._cancel_reason = "timeout after %.1fs" % timeout
            self._runner.stop()
            assert self._runner.join(10), "StreamLoad did not stop after its timeout"
        elapsed = time.monotonic() - self._t0
        if self.server is not None:
            self._collect_server_views(max(deadline - time.monotonic(), 2.0))
        self._result = LoadResult(self.conns, elapsed, timed_out)
        return self._result

    def _collect_server_views(self, timeout):
        # The client may end before the server has seen its EOF: wait for the
        # server to close each connection the client made.
        deadline = time.monotonic() + timeout
        mine = [c for c in self.conns if c.connected]
        while time.monotonic() < deadline:
            views = [self.server.by_seed.get(c.seed) for c in mine]
            if all(v is not None and v.closed for v in views):
                break
            time.sleep(0.02)
        for c in mine:
            view = self.server.by_seed.get(c.seed)
            if view is None:
                view = Conn(c.index, c.seed, Flow(c.up.length, sending=False),
                            Flow(c.down.length, sending=True), error="never saw this bridge's header")
            elif not view.closed:
                view = Conn(view.index, view.seed, view.up, view.down, "still open", closed=True)
            c.server = view

    def assert_all_ok(self, timeout=60.0):
        self.wait(timeout).assert_all_ok()

    def stop(self):
        """Cancel what still runs (reported as 'stopped') and wait for the end."""
        self._runner.stop()
        assert self._runner.join(10), "StreamLoad did not stop"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@dataclass
class ConnectCounts:
    ok: int = 0
    refused: int = 0
    reset: int = 0
    timeout: int = 0
    wrong: int = 0       # an answer other than the expected one, or EOF before it
    other: int = 0       # any other error (EADDRNOTAVAIL: ephemeral ports ran out)
    samples: list = field(default_factory=list)   # the first few non-ok outcomes

    @property
    def total(self):
        return self.ok + self.refused + self.reset + self.timeout + self.wrong + self.other

    @property
    def failed(self):
        return self.total - self.ok


class ConnectLoop:
    """A thread connecting to `target` again and again: each connection sends
    `payload`, reads len(expect) bytes (expect defaults to the payload: an
    echo), and closes. Counted by outcome; stop() returns the ConnectCounts.

    At most max_rate connections a second (None: no bound), `interval`
    seconds apart. The client closes first once it has its answer, so the
    TIME_WAIT is the client's: on Linux loopback connect() reuses such ports
    (tcp_tw_reuse), and the default rate stays under the ~470/s that the
    default ephemeral range sustains for 60 s of TIME_WAIT without reuse.
    No SO_LINGER 0: its RST would reach the server as a reset and hide a
    server (or proxy) that resets connections itself."""

    SAMPLES = 10

    def __init__(self, target, interval=0.0, payload=b"ping", expect=None, max_rate=400.0,
                 timeout=2.0):
        self.target = _addr(target)
        self.interval = interval
        self.payload = payload
        self.expect = payload if expect is None else expect
        self.max_rate = max_rate
        self.timeout = timeout
        self._counts = ConnectCounts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connect-loop", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def counts(self):
        """A snapshot of the counts so far."""
        with self._lock:
            c = self._counts
            return ConnectCounts(c.ok, c.refused, c.reset, c.timeout, c.wrong, c.other, list(c.samples))

    def _run(self):
        t0 = time.monotonic()
        k = 0
        while not self._stop.is_set():
            if self.max_rate:
                wait = t0 + k / self.max_rate - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
            kind, detail = self._once()
            k += 1
            with self._lock:
                setattr(self._counts, kind, getattr(self._counts, kind) + 1)
                if kind != "ok" and len(self._counts.samples) < self.SAMPLES:
                    self._counts.samples.append("%s: %s" % (kind, detail))
            if self.interval and self._stop.wait(self.interval):
                break

    def _once(self):
        s = socket.socket(family_of(self.target[0]), socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.target)
            s.sendall(self.payload)
            got = b""
            while len(got) < len(self.expect):
                data = s.recv(len(self.expect) - len(got))
                if not data:
                    return "wrong", "EOF after %r" % got
                got += data
            return ("ok", None) if got == self.expect else ("wrong", repr(got))
        except ConnectionRefusedError:
            return "refused", "refused"
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            return "reset", repr(e)
        except TimeoutError:
            return "timeout", "after %.1fs" % self.timeout
        except OSError as e:
            return "other", repr(e)
        finally:
            s.close()

    def stop(self):
        self._stop.set()
        # One connection at most is under way: its connect and reads are bounded.
        self._thread.join(3 * self.timeout + 1)
        assert not self._thread.is_alive(), "ConnectLoop did not stop"
        return self.counts()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self._thread.is_alive():
            self.stop()
