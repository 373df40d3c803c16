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
from dataclasses import dataclass
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
REGISTER_WAIT_S = 5.0    # how long a call may wait for its listener's registration
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


@dataclass
class ListenerHooks:
    """What the hook threads need of one listener."""

    name: str                        # the listener's, in its access log lines
    hooks: Hooks
    address: Any                     # the listener's address, as Connection.listener
    handle: Any                      # its _core.ListenerHandle: the group on_connect names from
    access_log: Optional[AccessLog]
    max_hold: int
    timeout: float                   # hook_timeout, 0: none
    access_fields: Optional[Tuple[str, ...]] = None   # access_log_format's; None: every field

    @property
    def wants_calls(self) -> bool:
        return self.hooks.on_connect is not None or bool(self.hooks.on_data)

    @property
    def wants_records(self) -> bool:
        return self.hooks.on_close is not None or self.access_log is not None


class HookRunner:
    """Runs the hooks of a process's listeners on `threads` hook threads
    plus one thread that delivers close records (on_close, access log) in
    batches. Each call and record names its listener (register()); the
    threads start with the first listener that needs them.

    With a `timeout` (a listener's hook_timeout), the data plane closes a
    bridge whose call is not answered in time (HOOK_TIMEOUT), and a watchdog
    thread here writes off the hook thread stuck in that call: a replacement
    takes its place, and the stuck one, if its hook ever returns, answers
    (stale by then) and ends. At most `threads` written-off threads are
    replaced at once (the data plane has that many spare slots); past that,
    stuck threads are left to return."""

    def __init__(self, plane: "_core.DataPlane", threads: int,
                 loop: Optional[asyncio.AbstractEventLoop]) -> None:
        self.plane = plane
        self.loop = loop
        self.threads = threads
        self.errors = _ErrorLog()
        self.listeners: Dict[int, ListenerHooks] = {}
        # Both clocks are CLOCK_MONOTONIC: turns data-plane times into epoch.
        self._epoch_offset = time.time() - plane.now_ns() / 1e9
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._closing = threading.Event()
        self._started_calls = self._started_records = self._started_watch = False
        self._running = False
        # hook_timeout: when each slot's current call began and its
        # deadline, the slots written off (their thread ends after its
        # call), free slots.
        self._started: Dict[int, Tuple[float, float]] = {}
        self._written_off: Set[int] = set()
        self._abandoned: Set[threading.Thread] = set()
        self._spare: List[int] = []
        self._slot_threads: Dict[int, threading.Thread] = {}
        self._bound_logged = False
        # on_data is called per chunk: a bridge's Connection is built once.
        # Connections are values, so dropping the cache when it grows only
        # costs rebuilding the ones still in use.
        self._conns: Dict[int, Connection] = {}
        self._after: List[Callable[[], None]] = []
        self._registered = threading.Condition(self._lock)

    def after_records(self, fn: Callable[[], None]) -> None:
        """Call fn once every close record queued before now is delivered
        (a freed listener's access log closes after its last line)."""
        with self._lock:
            if self._started_records and self._running:
                self._after.append(fn)
                return
        fn()

    def _entry(self, listener: int) -> ListenerHooks:
        # A listener added while workers run is serving before attach()
        # registers it here (the data plane names its id only then): its
        # first calls may come a moment early, and wait for it.
        entry = self.listeners.get(listener)
        if entry is None:
            with self._lock:
                self._registered.wait_for(lambda: listener in self.listeners, REGISTER_WAIT_S)
                entry = self.listeners[listener]
        return entry

    def register(self, listener: int, entry: ListenerHooks) -> None:
        """Listener id `listener` (its ListenerHandle's) is served by
        `entry` from now on; starts the threads it needs."""
        with self._lock:
            self.listeners[listener] = entry
            self._registered.notify_all()
            new: List[threading.Thread] = []
            if entry.wants_calls and not self._started_calls:
                self._started_calls = True
                new += [self._call_thread(i) for i in range(self.threads)]
            if entry.wants_calls and entry.timeout and not self._started_watch:
                self._started_watch = True
                self._spare = list(range(self.plane.hook_slots - 1, self.threads - 1, -1))
                new.append(threading.Thread(target=self._watch, name="fastproxy-hook-watch", daemon=True))
            if entry.wants_records and not self._started_records:
                self._started_records = True
                new.append(threading.Thread(target=self._serve_records, name="fastproxy-records", daemon=True))
            self._threads += new
            if self._running:
                for t in new:
                    t.start()

    def _call_thread(self, slot: int) -> threading.Thread:
        t = threading.Thread(target=self._serve_calls, args=(slot,), name=f"fastproxy-hook-{slot}", daemon=True)
        self._slot_threads[slot] = t
        return t

    def start(self) -> None:
        with self._lock:
            self._running = True
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

    def _connection(self, entry: ListenerHooks, ident: int, client: Tuple[str, int],
                    accepted_ns: int, server_name: Optional[str] = None, alpn: Tuple[str, ...] = ()) -> Connection:
        return Connection(ident, client, entry.address, self._epoch_offset + accepted_ns / 1e9, server_name, alpn)

    def _serve_calls(self, slot: int) -> None:
        next_event = self.plane.next_event
        on_data = self._on_data
        while True:
            event = next_event(slot, POLL_MS)
            if event is None:
                continue
            if event is False:
                return
            timed = False
            try:
                entry = self._entry(event[1])
                timed = entry.timeout > 0
                if timed:
                    self._started[slot] = (time.monotonic(), entry.timeout)
                if event[0] == EVT_CONNECT:
                    self._on_connect(entry, *event[2:])
                else:
                    on_data(entry, *event[2:])
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
                self.plane.answer_connect(event[2], V_ERROR)
            else:
                self.plane.answer_data(event[2], V_ERROR)
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
        period = min(min((e.timeout for e in self.listeners.values() if e.timeout), default=1.0) / 4, 0.25)
        while not self._closing.wait(period):
            now = time.monotonic()
            with self._lock:
                for slot, (began, timeout) in list(self._started.items()):
                    if now - began < timeout or slot in self._written_off:
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

    def _on_connect(self, entry: ListenerHooks, handle: int, ident: int, client: Tuple[str, int],
                    accepted_ns: int, server_name: Optional[str], alpn: Tuple[str, ...], route: int) -> None:
        fn = entry.hooks.on_connect
        assert fn is not None   # the data plane asks only when on_connect is set
        conn = self._connection(entry, ident, client, accepted_ns, server_name, alpn)
        if inspect.iscoroutinefunction(fn) and self.loop is not None:
            # Awaited on the embedder's loop; no hook thread waits for it.
            future = asyncio.run_coroutine_threadsafe(fn(conn), self.loop)
            future.add_done_callback(lambda f: self._answer_connect(entry, handle, f.result, conn, route))
            return
        self._answer_connect(entry, handle, lambda: fn(conn), conn, route)

    def _answer_connect(self, entry: ListenerHooks, handle: int, call: Callable[[], Any],
                        conn: Connection, route_id: int = 0) -> None:
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
                # In the bridge's route's group: a name of another route's
                # (or the default group's) is an address like any other.
                handle_ = entry.handle
                group = handle_.group if route_id == 0 else handle_.route_groups[route_id - 1]
                upstream, route = route_target(result, group.index if group is not None else {})
                if upstream < 0:
                    group = None
            else:
                raise TypeError(f"on_connect returned {type(result).__name__}: expected None, bool or 'host:port'")
        except BaseException:
            # SystemExit, KeyboardInterrupt and CancelledError too: an
            # unanswered call would park its bridge and end this thread.
            self.errors.report("on_connect")
            verdict, upstream, route, group = V_ERROR, -1, None, None
        self.plane.answer_connect(handle, verdict, upstream, route, group)

    def _on_data(self, entry: ListenerHooks, handle: int, ident: int, direction: int, chunks: List[bytes],
                 client: Tuple[str, int], accepted_ns: int) -> None:
        """Calls on_data once per chunk of one read, in order, and answers
        for them all: the worker sends the answers in one go."""
        d = DIRECTIONS[direction]
        conn = self._conns.get(ident)
        if conn is None:
            if len(self._conns) >= CONN_CACHE:
                self._conns.clear()
            conn = self._conns[ident] = self._connection(entry, ident, client, accepted_ns)
        fn = entry.hooks.on_data[d]
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
                if len(data) >= entry.max_hold:   # as the worker's check on its next read
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
            with self._lock:
                after, self._after = self._after, []
            batch = self.plane.next_records(RECORD_BATCH, POLL_MS)
            if batch is None:
                break
            for raw in batch:
                try:
                    self._deliver(raw)
                except BaseException:   # the plumbing failed: this thread serves on
                    self.errors.report("close records")
            if len(batch) < RECORD_BATCH:
                # The ring was empty behind this batch: every record queued
                # before `after` was asked for is delivered.
                for fn in after:
                    fn()
            elif after:
                with self._lock:
                    self._after[:0] = after
        for fn in self._after:
            fn()

    def _record(self, entry: ListenerHooks, raw: tuple) -> Tuple[Connection, CloseRecord]:
        (_, ident, client, upstream, route, up, down, accepted_ns, closed_ns, reason, queue_ns, connect_ns,
         server_name, alpn) = raw
        accepted_at = self._epoch_offset + accepted_ns / 1e9
        name = route if route is not None else upstream
        conn = Connection(ident, client, entry.address, accepted_at, server_name, alpn)
        total = (closed_ns - accepted_ns) / 1e9
        record = CloseRecord(ident, client, name, up, down, total, accepted_at, CloseReason(reason),
                             queue_ns / 1e9, None if connect_ns < 0 else connect_ns / 1e9, total, server_name)
        return conn, record

    def _deliver(self, raw: tuple) -> None:
        entry = self._entry(raw[0])
        conn, record = self._record(entry, raw)
        if entry.access_log is not None:
            try:
                line = {"listener": entry.name, **record.to_json()}
                if entry.access_fields is not None:
                    line = {k: line[k] for k in entry.access_fields}
                entry.access_log.write(json.dumps(line))
            except BaseException:
                self.errors.report("access_log")
        fn = entry.hooks.on_close
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
