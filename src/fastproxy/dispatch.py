"""Hook threads: where the data plane's hook calls and close records meet
Python. Workers never run Python; they queue a call and serve other bridges
until these threads answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import _core
from .accesslog import AccessLog
from .hooks import (
    V_CLOSE,
    V_ERROR,
    V_PASS,
    V_PROCEED,
    V_REFUSE,
    V_REPLACE,
    V_ROUTE,
    V_WAIT,
    CloseReason,
    CloseRecord,
    Connection,
    Direction,
    Hooks,
    data_verdict,
    route_target,
)

log = logging.getLogger(__name__)

EVT_CONNECT = int(_core.EventKind.EVT_CONNECT)
POLL_MS = 1000           # a stop wakes idle hook threads; this only bounds a lost wake-up
RECORD_BATCH = 1024
CONN_CACHE = 4096        # bridges whose Connection on_data reuses
DIRECTIONS = (Direction(0), Direction(1))


class _ErrorLog:
    """Logs a hook's traceback at most once per second per hook."""

    def __init__(self) -> None:
        self.count = 0
        self._last: Dict[str, float] = {}
        self._lock = threading.Lock()

    def report(self, hook: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.count += 1
            due = now - self._last.get(hook, -1e9) >= 1.0
            if due:
                self._last[hook] = now
        if due:
            log.exception("%s hook failed (its bridge was closed; later failures within 1 s are only counted)", hook)


class HookRunner:
    """Runs one Proxy's hooks on `threads` hook threads plus one thread that
    delivers close records (on_close, access log) in batches.

    With a `timeout` (hook_timeout), the data plane closes a bridge whose
    call is not answered in time (HOOK_TIMEOUT), and a watchdog thread here
    writes off the hook thread stuck in that call: a replacement takes its
    place, and the stuck one, if its hook ever returns, answers (stale by
    then) and ends. At most `threads` written-off threads are replaced at
    once (the data plane has that many spare slots); past that, stuck threads
    are left to return."""

    def __init__(
        self,
        plane: "_core.DataPlane",
        hooks: Hooks,
        listener_address: Tuple[str, int],
        threads: int,
        access_log: Optional[AccessLog],
        loop: Optional[asyncio.AbstractEventLoop],
        max_hold: int,
        timeout: Optional[float] = None,
    ) -> None:
        self.plane = plane
        self.max_hold = max_hold
        self.hooks = hooks
        self.listener = listener_address
        self.access_log = access_log
        self.loop = loop
        self.errors = _ErrorLog()
        self.timeout = float(timeout) if timeout else 0.0
        # Both clocks are CLOCK_MONOTONIC: turns data-plane times into epoch.
        self._epoch_offset = time.time() - plane.now_ns() / 1e9
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._closing = threading.Event()
        # hook_timeout: when each slot's current call began, the slots
        # written off (their thread ends after its call), free slots.
        self._started: Dict[int, float] = {}
        self._written_off: Set[int] = set()
        self._abandoned: Set[threading.Thread] = set()
        self._spare: List[int] = []
        self._slot_threads: Dict[int, threading.Thread] = {}
        self._bound_logged = False
        wants_calls = hooks.on_connect is not None or bool(hooks.on_data)
        for i in range(threads if wants_calls else 0):
            self._threads.append(self._call_thread(i))
        if wants_calls and self.timeout:
            self._spare = list(range(plane.hook_slots - 1, threads - 1, -1))
            self._threads.append(threading.Thread(target=self._watch, name="fastproxy-hook-watch", daemon=True))
        # on_data is called per chunk: a bridge's Connection is built once.
        # Connections are values, so dropping the cache when it grows only
        # costs rebuilding the ones still in use.
        self._conns: Dict[int, Connection] = {}
        if hooks.on_close is not None or access_log is not None:
            self._threads.append(threading.Thread(target=self._serve_records, name="fastproxy-records", daemon=True))

    def _call_thread(self, slot: int) -> threading.Thread:
        t = threading.Thread(target=self._serve_calls, args=(slot,), name=f"fastproxy-hook-{slot}", daemon=True)
        self._slot_threads[slot] = t
        return t

    def start(self) -> None:
        for t in list(self._threads):
            t.start()

    def owns_current_thread(self) -> bool:
        """True on one of this runner's threads (where a hook runs)."""
        with self._lock:
            return threading.current_thread() in self._threads

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop once the workers are gone; True if every thread ended, but
        for written-off ones (stuck in a hook past hook_timeout), which
        nothing waits for. Never joins the calling thread."""
        self._closing.set()
        self.plane.close_hooks()
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        with self._lock:
            threads = [t for t in self._threads if t is not me and t not in self._abandoned]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    # ---- calls

    def _connection(self, ident: int, client: Tuple[str, int], accepted_ns: int) -> Connection:
        return Connection(ident, client, self.listener, self._epoch_offset + accepted_ns / 1e9)

    def _serve_calls(self, slot: int) -> None:
        next_event = self.plane.next_event
        on_data = self._on_data
        timed = self.timeout > 0
        while True:
            event = next_event(slot, POLL_MS)
            if event is None:
                continue
            if event is False:
                return
            if timed:
                self._started[slot] = time.monotonic()
            try:
                if event[0] == EVT_CONNECT:
                    self._on_connect(*event[1:])
                else:
                    on_data(*event[1:])
            except BaseException:
                # Hook exceptions are answered where they are caught; this
                # is the plumbing failing. The call may be unanswered: an
                # error answers it (stale, and dropped, if it was answered).
                self.errors.report("hook dispatch")
                self._answer_error(event)
            if timed and self._retire(slot):
                return

    def _answer_error(self, event: tuple) -> None:
        try:
            if event[0] == EVT_CONNECT:
                self.plane.answer_connect(event[1], V_ERROR)
            else:
                self.plane.answer_data(event[1], V_ERROR)
        except BaseException:
            self.errors.report("hook dispatch")

    def _retire(self, slot: int) -> bool:
        """After a call: True if this thread was written off (it ends and
        its slot goes back to the spares)."""
        with self._lock:
            self._started.pop(slot, None)
            if slot not in self._written_off:
                return False
            self._written_off.discard(slot)
            self._spare.append(slot)
            self._abandoned.discard(threading.current_thread())
            return True

    def _watch(self) -> None:
        # Writes off a thread within a quarter of hook_timeout of its
        # call's deadline; the data plane closed the bridge at the deadline.
        period = min(self.timeout / 4, 0.25)
        while not self._closing.wait(period):
            now = time.monotonic()
            with self._lock:
                for slot, began in list(self._started.items()):
                    if now - began < self.timeout or slot in self._written_off:
                        continue
                    if not self._spare:
                        if not self._bound_logged:
                            self._bound_logged = True
                            log.warning("hook_timeout: %d hook threads are stuck in hooks already replaced; "
                                        "stuck threads are no longer replaced until one returns", len(self._written_off))
                        continue
                    self._written_off.add(slot)
                    self._abandoned.add(self._slot_threads[slot])
                    t = self._call_thread(self._spare.pop())
                    self._threads = [x for x in self._threads if x.is_alive()] + [t]
                    t.start()

    def _on_connect(self, handle: int, ident: int, client: Tuple[str, int], accepted_ns: int) -> None:
        fn = self.hooks.on_connect
        assert fn is not None   # the data plane asks only when on_connect is set
        conn = self._connection(ident, client, accepted_ns)
        if inspect.iscoroutinefunction(fn) and self.loop is not None:
            # Awaited on the embedder's loop; no hook thread waits for it.
            future = asyncio.run_coroutine_threadsafe(fn(conn), self.loop)
            future.add_done_callback(lambda f: self._answer_connect(handle, f.result, conn))
            return
        self._answer_connect(handle, lambda: fn(conn), conn)

    def _answer_connect(self, handle: int, call: Callable[[], Any], conn: Connection) -> None:
        upstream, route, group = -1, None, None
        try:
            result = call()
            if result is None or result is True:
                verdict = V_PROCEED
            elif result is False:
                verdict = V_REFUSE
            elif isinstance(result, str):
                verdict = V_ROUTE
                # Looked up in the group current now; the worker maps the
                # name again if the group is swapped before it picks.
                group = self.plane.group
                upstream, route = route_target(result, group.index)
            else:
                raise TypeError(f"on_connect returned {type(result).__name__}: expected None, bool or 'host:port'")
        except BaseException:
            # SystemExit, KeyboardInterrupt and CancelledError too: an
            # unanswered call would park its bridge and end this thread.
            self.errors.report("on_connect")
            verdict, upstream, route, group = V_ERROR, -1, None, None
        self.plane.answer_connect(handle, verdict, upstream, route, group)

    def _on_data(self, handle: int, ident: int, direction: int, chunks: List[bytes], client: Tuple[str, int],
                 accepted_ns: int) -> None:
        """Calls on_data once per chunk of one read, in order, and answers
        for them all: the worker sends the answers in one go."""
        d = DIRECTIONS[direction]
        conn = self._conns.get(ident)
        if conn is None:
            if len(self._conns) >= CONN_CACHE:
                self._conns.clear()
            conn = self._conns[ident] = self._connection(ident, client, accepted_ns)
        fn = self.hooks.on_data[d]
        out: Optional[List[bytes]] = None   # the answers, once one is not its chunk
        done = 0                            # bytes of the read answered so far
        held: Optional[bytes] = None        # what WAIT holds: joined to the next chunk
        then = 0
        for chunk in chunks:
            data = chunk if held is None else held + chunk
            try:
                verdict, replacement = data_verdict(fn(conn, d, data), data)
            except BaseException:   # as on_connect's
                self.errors.report("on_data")
                verdict, replacement = V_ERROR, None
            if verdict == V_WAIT:
                if len(data) >= self.max_hold:   # as the worker's check on its next read
                    verdict = V_CLOSE
                else:
                    held = data
                    continue
            held = None
            if verdict == V_CLOSE or verdict == V_ERROR:
                then = verdict   # what was answered before still goes out
                break
            if verdict == V_REPLACE:
                if out is None:
                    out = [b"".join(chunks)[:done]]
                out.append(replacement)  # type: ignore[arg-type]
            elif out is not None:
                out.append(data)
            done += len(data)
        answer = self.plane.answer_data
        if out is not None:
            answer(handle, V_REPLACE, b"".join(out), tail=held, then=then)
        elif then and done == 0:
            answer(handle, then)
        elif held is not None and done == 0:
            answer(handle, V_WAIT)
        else:
            answer(handle, V_PASS, keep=done if then else -1,
                   hold=len(held) if held is not None else 0, then=then)

    # ---- close records

    def _serve_records(self) -> None:
        while True:
            batch = self.plane.next_records(RECORD_BATCH, POLL_MS)
            if batch is None:
                break
            for raw in batch:
                try:
                    self._deliver(raw)
                except BaseException:   # the plumbing failed: this thread serves on
                    self.errors.report("close records")

    def _record(self, raw: tuple) -> Tuple[Connection, CloseRecord]:
        ident, client, upstream, route, up, down, accepted_ns, closed_ns, reason = raw
        accepted_at = self._epoch_offset + accepted_ns / 1e9
        name = route if route is not None else upstream
        conn = Connection(ident, client, self.listener, accepted_at)
        record = CloseRecord(ident, client, name, up, down, (closed_ns - accepted_ns) / 1e9, accepted_at,
                             CloseReason(reason))
        return conn, record

    def _deliver(self, raw: tuple) -> None:
        conn, record = self._record(raw)
        if self.access_log is not None:
            try:
                self.access_log.write(json.dumps(record.to_json()))
            except BaseException:
                self.errors.report("access_log")
        fn = self.hooks.on_close
        if fn is None:
            return
        if inspect.iscoroutinefunction(fn) and self.loop is not None:
            future = asyncio.run_coroutine_threadsafe(fn(conn, record), self.loop)
            future.add_done_callback(self._async_close_done)
            return
        try:
            fn(conn, record)
        except BaseException:   # SystemExit too: this thread must go on delivering
            self.errors.report("on_close")

    def _async_close_done(self, future: "concurrent.futures.Future[Any]") -> None:
        try:
            future.result()
        except BaseException:   # CancelledError too
            self.errors.report("on_close")
