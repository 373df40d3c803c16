"""Proxy: the control plane of one listener (lifecycle, stats, signals).

It validates the config, binds, resolves, and hands everything to the
data plane (`_core.DataPlane`), whose workers run on threads of their own
with the GIL released. Nothing here is on the forwarding path.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import _core, activation
from .config import Config, ConfigError
from .accesslog import AccessLog
from .dispatch import HookRunner
from .hooks import Direction, Hook, Hooks, load_hooks
from .options import OPTIONS, option
from .timewindows import Clock, TimeWindows
from .upstreams import Upstream
from .values import Duration, format_address
from .sockets import adopt_socket, check_listening, fd_budget, listen_socket, resolve_upstream
from .takeover import Handover, TakeoverServer, take_over
from .watch import Watchers

__all__ = ["Proxy"]

log = logging.getLogger(__name__)

# Each bridge holds two sockets; a flowing one briefly holds up to two pipes.
FDS_PER_BRIDGE = 2
# Idle pipes a worker keeps for reuse: enough to skip pipe2() on busy
# bridges, few enough that pooled pipes never crowd out client sockets.
PIPE_POOL_MAX = 64


def pipe_pool_size(fd_budget: int, workers: int) -> int:
    # At most 1/16 of the fd budget sits in idle pipes (two fds each).
    return max(1, min(PIPE_POOL_MAX, fd_budget // (32 * workers)))
STARTUP_TIMEOUT = 10.0


def default_max_connections(fd_budget: int) -> int:
    # Two fds a bridge, less a margin for the listener, Python's own files
    # and pipes (a bridge short of a pipe copies instead).
    return max(1, fd_budget // FDS_PER_BRIDGE - min(32, fd_budget // 8))


def choose_engine(requested: str) -> str:
    """The engine option (already a valid name) -> an engine compiled in."""
    if requested == "auto":
        requested = option("engine").parse(os.environ.get("FASTPROXY_ENGINE") or "auto", "FASTPROXY_ENGINE")
        if requested == "auto":
            return "epoll" if "epoll" in _core.ENGINES else "poll"
    if requested not in _core.ENGINES:
        raise ConfigError("engine", requested, f"is not available here (available: {', '.join(_core.ENGINES)})")
    return requested


class Proxy:
    """A TCP proxy: accepts clients on `listen` and bridges each one to an
    upstream. Use start()/stop(), serve_forever(), or `with Proxy(...) as p:`."""

    def __init__(
        self,
        listen: Optional[str] = None,
        upstream: Optional[Union[str, Upstream]] = None,
        *,
        # Options: one keyword per row of options.OPTIONS, with its default
        # (a test holds the two together); docs/reference.md says what each does.
        upstreams: Optional[Sequence[Union[str, Upstream]]] = None,
        notsent_lowat: Optional[Union[int, str]] = None,
        balance: str = "roundrobin",
        retries: Optional[int] = None,
        max_fails: int = 3,
        fail_timeout: Duration = 10.0,
        health_interval: Optional[Duration] = None,
        health_timeout: Duration = 2.0,
        health_rise: int = 2,
        health_fall: int = 3,
        max_connections: Optional[int] = None,
        max_connections_per_ip: Optional[int] = None,
        on_limit: str = "queue",
        queue_size: int = 1024,
        queue_timeout: Duration = 30.0,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        allow_file: Sequence[str] = (),
        deny_file: Sequence[str] = (),
        reject_with: str = "close",
        allow_time: Optional[Sequence[str]] = None,
        time_zone: Optional[str] = None,
        close_outside_window: bool = False,
        rate_limit_per_ip: Optional[str] = None,
        rate_limit_table: int = 65536,
        connect_timeout: Duration = 5.0,
        idle_timeout: Optional[Duration] = None,
        max_lifetime: Optional[Duration] = None,
        half_close_timeout: Duration = 300.0,
        drain_timeout: Duration = 10.0,
        send_proxy: Optional[str] = None,
        accept_proxy: bool = False,
        accept_proxy_from: Sequence[str] = (),
        proxy_header_timeout: Duration = 3.0,
        proxy_header_max: int = 1024,
        hooks: Optional[str] = None,
        hook_threads: int = 16,
        hook_timeout: Optional[Duration] = None,
        max_hold: Union[int, str] = 1 << 20,
        access_log: Optional[str] = None,
        workers: Optional[int] = None,
        engine: str = "auto",
        busy_poll: Duration = 0.0,
        fd_limit: str = "keep",
        worker_cpus: Optional[Union[str, Sequence[int]]] = None,
        takeover: Optional[str] = None,
        # Python only: objects and callables have no flag.
        sock: Optional[socket.socket] = None,
        health_check: Optional[Callable[[str, int], bool]] = None,
        clock: Optional[Clock] = None,
        on_connect: Optional[Hook] = None,
        on_data: Optional[Hook] = None,
        on_close: Optional[Hook] = None,
    ) -> None:
        given = locals()
        options = {o.name: given[o.name] for o in OPTIONS}
        # The application's socket: checked now, duplicated at start().
        self._app_sock = sock
        if sock is not None:
            if listen is not None:
                raise ConfigError("sock", sock, "give either listen or sock, not both")
            options["listen"] = format_address(*check_listening(sock))
        self.config = Config.build(upstream=upstream, **options)
        access = self.config.access
        self._windows = (TimeWindows(access.allow_time, access.time_zone, clock)
                         if access.allow_time is not None else None)
        if health_check is not None and not callable(health_check):
            raise ConfigError("health_check", health_check, "must be a callable (host, port) -> bool")
        self._health_check = health_check
        self._watchers: Optional[Watchers] = None
        self._lock = threading.Lock()
        self._plane: Optional[_core.DataPlane] = None
        self._sock: Optional[socket.socket] = None
        self._threads: List[threading.Thread] = []
        self._address: Optional[Tuple[str, int]] = None
        self._stopped = threading.Event()
        self._final_stats: Optional[Dict[str, Any]] = None
        self._hooks = Hooks()
        self._runner: Optional[HookRunner] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._serve_waiter: Optional[Tuple[asyncio.AbstractEventLoop, asyncio.Event]] = None
        self._access_log: Optional[AccessLog] = None
        self._listen_text = listen if isinstance(listen, str) else None
        self._takeover_server: Optional[TakeoverServer] = None
        self._handover: Optional[Handover] = None
        if self.config.hooks.hooks is not None:
            self._hooks.load(load_hooks(self.config.hooks.hooks))
        if on_connect is not None:
            self.on_connect(on_connect)
        if on_data is not None:
            self.on_data(on_data)
        if on_close is not None:
            self.on_close(on_close)

    # ---- hooks (register before start)

    def on_connect(self, fn: Hook) -> Hook:
        """Register fn(conn) -> None/True (proceed), False (refuse), or
        'host:port' (route there). Usable as a decorator."""
        self._before_start("on_connect")
        self._hooks.set_connect(fn)
        return fn

    def on_data(self, fn: Hook, direction: Optional[Direction] = None) -> Hook:
        """Register fn(conn, direction, data) -> None, bytes, WAIT or CLOSE,
        for both directions or one. Bridges then copy instead of splicing."""
        self._before_start("on_data")
        self._hooks.set_data(fn, direction)
        return fn

    def on_close(self, fn: Hook) -> Hook:
        """Register fn(conn, record), called once per bridge after it ended."""
        self._before_start("on_close")
        self._hooks.set_close(fn)
        return fn

    def _before_start(self, what: str) -> None:
        if self._plane is not None or self._final_stats is not None:
            raise RuntimeError(f"register {what} before start(): the data plane is running")

    # ---- lifecycle

    def start(self) -> "Proxy":
        """Bind, resolve and start the workers; return once they accept."""
        with self._lock:
            if self._plane is not None or self._final_stats is not None:
                raise RuntimeError("this Proxy was already started; make a new one")
            if self._hooks.is_async() and self._loop is None:
                raise ConfigError("hooks", "async def", "coroutine hooks need the proxy run by `await proxy.serve()`")
            budget = fd_budget(self.config.process.fd_limit == "raise")
            cfg = self.config = self.config.resolve(
                engine=choose_engine(self.config.process.engine),
                max_connections=default_max_connections(budget))
            upstreams = cfg.upstream_group.upstreams
            group = _core.UpstreamGroup(
                upstreams, [resolve_upstream((u.host, u.port)) for u in upstreams],
                balance=cfg.balancing.balance, max_fails=cfg.balancing.max_fails,
                fail_timeout=cfg.balancing.fail_timeout)
            workers = cfg.process.workers
            logged = cfg.hooks.access_log is not None
            try:
                access_log = AccessLog(self, cfg.hooks.access_log, self._access_log_error)
            except OSError as exc:
                raise ConfigError("access_log", cfg.hooks.access_log, exc.strerror or str(exc)) from None
            try:
                sock = self._listening_socket(cfg)
            except BaseException:
                access_log.close()
                self._abort_takeover()
                raise
            try:
                plane = _core.DataPlane(
                    sock.fileno(), group, cfg,
                    hooks=self._hooks.flags(logged),
                    pool_max=pipe_pool_size(budget, workers),
                )
            except OSError as exc:
                sock.close()
                access_log.close()
                self._abort_takeover()
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise ConfigError(
                        "workers", workers, f"too many for the fd budget of {budget} ({exc.strerror})"
                    ) from None
                raise
            except BaseException:
                sock.close()
                access_log.close()
                self._abort_takeover()
                raise
            self._sock = sock
            self._plane = plane
            self._address = tuple(sock.getsockname()[:2])
            self._stopped.clear()
            self._access_log = access_log
            self._runner = HookRunner(plane, self._hooks, self.address,
                                      cfg.hooks.hook_threads, access_log if logged else None, self._loop,
                                      cfg.hooks.max_hold,
                                      cfg.hooks.hook_timeout or 0.0)
            self._runner.start()
            self._watchers = Watchers(cfg, self._windows, plane, self._health_check)
            self._watchers.start()
            self._threads = [
                threading.Thread(target=self._run_worker, args=(i,), name=f"fastproxy-worker-{i}", daemon=True)
                for i in range(workers)
            ]
            for t in self._threads:
                t.start()
            try:
                self._wait_accepting(plane, workers)
            except BaseException:
                self._abort_takeover()
                raise
            self._finish_takeover()
        log.info(
            "listening on %s, forwarding to %s (%s), engine %s, %d worker%s, fd budget %d, max %d bridges",
            format_address(*self.address),
            ", ".join(group.names),
            cfg.balancing.balance,
            cfg.process.engine,
            workers,
            "" if workers == 1 else "s",
            budget,
            cfg.limits.max_connections,
        )
        return self

    # ---- takeover and socket activation (takeover.py, activation.py)

    def _listener_name(self) -> str:
        # The name another process's listener is matched by: the listen
        # text as given, until listeners have names of their own.
        name = getattr(self.config.listener, "name", None) or self._listen_text
        return str(name) if name else format_address(*self.config.listener.listen)

    def _listening_socket(self, cfg: Config) -> socket.socket:
        """The application's socket; else one taken over from the process
        serving at the takeover path; else one systemd passed; else a new one."""
        path = cfg.process.takeover
        if path is not None and self._takeover_server is None:
            server = TakeoverServer(path, self._takeover_sockets, self._handed_over)
            server.bind()
            self._takeover_server = server
            self._handover = take_over(path)
            if self._handover is None:
                server.publish(replace=False)
        if self._app_sock is not None:
            return adopt_socket(self._app_sock)
        name, address = self._listener_name(), cfg.listener.listen
        sock = self._handover.take(name, address) if self._handover is not None else None
        if sock is None:
            sock = activation.take(name, address)
        if sock is None:
            return listen_socket(address)
        check_listening(sock, "listen")
        return sock

    def _finish_takeover(self) -> None:
        # Our workers accept on the shared sockets: only now may the old
        # process stop accepting, so no client in a backlog is left behind.
        handover, self._handover = self._handover, None
        if handover is not None and self._takeover_server is not None:
            try:
                self._takeover_server.publish(replace=True)
            except OSError as exc:
                # Serving matters more than the next upgrade: go on.
                log.error("takeover endpoint %s not created (%s): the next process cannot take over",
                          self._takeover_server.path, exc.strerror or exc)
            handover.ready()

    def _abort_takeover(self) -> None:
        handover, self._handover = self._handover, None
        if handover is not None:
            handover.abort()
        server, self._takeover_server = self._takeover_server, None
        if server is not None:
            server.close()

    def _takeover_sockets(self) -> Dict[str, socket.socket]:
        sock = self._sock
        return {self._listener_name(): sock} if sock is not None and self._plane is not None else {}

    def _handed_over(self) -> None:
        # On the takeover thread, which must not wait for the drain.
        threading.Thread(target=self.stop, name="fastproxy-handover", daemon=True).start()

    def reopen_logs(self) -> None:
        """Reopen the access log file at its path (after a log rotator moved
        it away); lines written meanwhile went to the moved file."""
        if self._access_log is not None:
            self._access_log.reopen()

    def _access_log_error(self) -> None:
        if self._runner is not None:
            self._runner.errors.report("access_log")

    def check_time_windows(self) -> bool:
        """Evaluate the time windows now (a background thread does this
        every second); returns whether new clients are admitted."""
        if self._watchers is not None:
            return self._watchers.check_time_windows()
        return self._windows is None or self._windows.is_open()

    def _wait_accepting(self, plane: "_core.DataPlane", workers: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while plane.accepting() < workers:
            if not any(t.is_alive() for t in self._threads) or time.monotonic() > deadline:
                raise RuntimeError("the fastproxy workers did not start")
            time.sleep(0.001)

    def _run_worker(self, i: int) -> None:
        plane = self._plane
        assert plane is not None
        cpus = self.config.process.worker_cpus
        if cpus:
            cpu = cpus[i % len(cpus)]
            try:
                os.sched_setaffinity(0, {cpu})  # 0: this thread
            except OSError as exc:
                # The CPU went away since the configuration was checked: this
                # worker does not start, and start() says the workers did not.
                log.error("worker %d cannot run on CPU %d (worker_cpus): %s", i, cpu, exc.strerror or exc)
                return
        try:
            plane.run_worker(i)
        except Exception:
            log.exception("worker %d failed; its bridges were closed", i)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, let live bridges finish for up to the drain
        timeout (`timeout` seconds if given), close the rest, and return
        once every bridge is closed. Safe to call more than once.

        From inside a hook (a hook thread, the close-record thread, or the
        event loop that runs async hooks) the stop runs on a new thread and
        this returns at once: the hook must return for its bridge to drain,
        and the stop waits for the threads the hook runs on. serve_forever()
        (and serve()) return once that stop completed."""
        if self._in_hook():
            threading.Thread(target=self.stop, args=(timeout,), name="fastproxy-stop").start()
            return
        server, self._takeover_server = self._takeover_server, None
        if server is not None:
            server.close()
        with self._lock:
            plane = self._plane
            if plane is None:
                return
            try:
                self._stop_plane(plane, timeout)
            finally:
                self._plane = None
                self._threads = []
                self._stopped.set()
                self._wake_serve()
        log.info("stopped")

    def _in_hook(self) -> bool:
        runner = self._runner
        if runner is not None and runner.owns_current_thread():
            return True
        if self._loop is None:
            return False
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _stop_plane(self, plane: "_core.DataPlane", timeout: Optional[float]) -> None:
        drain = self.config.timeouts.drain_timeout if timeout is None else max(0.0, float(timeout))
        plane.stop(drain)
        # Close the listening socket as soon as no worker polls it:
        # new clients are refused at once instead of waiting in its
        # backlog for a proxy that will never serve them.
        deadline = time.monotonic() + 5.0
        while plane.accepting() and time.monotonic() < deadline:
            time.sleep(0.001)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for t in self._threads:
            t.join()
        if self._watchers is not None:
            self._watchers.stop()
            self._watchers = None
        hooks_done = self._runner is None or self._runner.stop()
        self._final_stats = self._stats(plane)
        if self._access_log is not None:
            self._access_log.close()
            self._access_log = None
        if hooks_done:
            plane.close()
        else:
            # A hook still runs and may answer: the data plane is freed when
            # the last reference to it (that hook thread's) goes.
            log.warning("a hook is still running; its bridge was closed")

    def _wake_serve(self) -> None:
        # serve() waits on its loop: tell it the stop is done.
        waiter, self._serve_waiter = self._serve_waiter, None
        if waiter is not None:
            loop, event = waiter
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass   # the loop is closed: nobody waits

    def serve_forever(self) -> None:
        """start(), then wait until stop() or, from the main thread, SIGINT,
        SIGTERM or SIGQUIT (a second one shortens the drain to nothing).
        From the main thread SIGUSR1 also reopens the access log and SIGHUP
        reloads (docs/operations.md)."""
        signals_seen: List[int] = []
        # Handlers go in before start(): a signal that arrives while the
        # workers start must stop the proxy, not raise KeyboardInterrupt.
        restore = self._install_signal_handlers(signals_seen)
        try:
            if self._plane is None:
                self.start()
            if signals_seen:
                self._on_signal(signals_seen)
            while not self._stopped.wait(0.5):
                pass
        finally:
            for signum, handler in restore:
                signal.signal(signum, handler)

    def _install_signal_handlers(self, signals_seen: List[int]) -> List[Tuple[int, Any]]:
        if threading.current_thread() is not threading.main_thread():
            return []

        def on_signal(signum: int, frame: Any) -> None:
            signals_seen.append(signum)
            log.info("%s: %s", signal.Signals(signum).name,
                     "draining" if len(signals_seen) == 1 else "closing now")
            if self._plane is not None:
                self._on_signal(signals_seen)

        def on_control_signal(signum: int, frame: Any) -> None:
            # Reopening a file or reloading may block: not in the handler.
            threading.Thread(target=self._on_control_signal, args=(signum,),
                             name="fastproxy-signal", daemon=True).start()

        restore: List[Tuple[int, Any]] = []
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            restore.append((signum, signal.signal(signum, on_signal)))
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            restore.append((signum, signal.signal(signum, on_control_signal)))
        return restore

    def _on_control_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1:
            log.info("%s: reopening the access log", name)
            self.reopen_logs()
            return
        log.info("%s: reloading", name)
        # Proxy.reload() comes with named listeners; until then, say so.
        reload: Optional[Callable[[], Any]] = getattr(self, "reload", None)
        if reload is None:
            log.warning("reload is not available")
            return
        try:
            reload()
        except Exception as exc:   # a bad new configuration: keep serving the old one
            log.error("reload failed, still serving the previous configuration: %s", exc)

    def _on_signal(self, signals_seen: List[int]) -> None:
        # stop() blocks while bridges drain: run it off the signal handler.
        timeout = None if len(signals_seen) == 1 else 0.0
        threading.Thread(target=self.stop, args=(timeout,), daemon=True).start()
        plane = self._plane
        if len(signals_seen) > 1 and plane is not None:
            plane.stop(0.0)  # the first stop() holds the lock: shorten its drain

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def start_async(self) -> "Proxy":
        """start() without blocking the running loop: resolving names and
        starting workers run on a thread. `.address` is valid once it
        returns; coroutine on_connect / on_close hooks are awaited on this
        loop."""
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self.start)
        return self

    async def stop_async(self, timeout: Optional[float] = None) -> None:
        """stop() on a thread: the loop keeps running (async hooks may need
        it) while live bridges drain."""
        loop = asyncio.get_running_loop()
        await asyncio.shield(loop.run_in_executor(None, self.stop, timeout))

    async def __aenter__(self) -> "Proxy":
        return await self.start_async()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_async()

    async def serve(self) -> None:
        """Run under asyncio until cancelled or stopped, then drain and stop. Coroutine
        on_connect / on_close hooks are awaited on this loop."""
        self._loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        self._serve_waiter = (self._loop, stopped)
        if self._plane is None:
            await self.start_async()
        try:
            await stopped.wait()   # set by a stop() (from a hook, say)
        finally:
            # stop() blocks while bridges drain, and async hooks may need
            # this loop meanwhile: run it on a thread and keep the loop free.
            await asyncio.shield(self._loop.run_in_executor(None, self.stop))

    # ---- observation

    @property
    def address(self) -> Tuple[str, int]:
        """The bound listening address (host, port); port 0 shows the real one."""
        if self._address is None:
            raise RuntimeError("the proxy is not started: no address yet")
        return self._address

    @property
    def engine(self) -> str:
        plane = self._plane
        return plane.engine if plane is not None else choose_engine(self.config.process.engine)

    @property
    def workers(self) -> int:
        return int(self.config.process.workers)

    def _stats(self, plane: "_core.DataPlane") -> Dict[str, Any]:
        stats = plane.stats()
        stats["hook_errors"] = self._runner.errors.count if self._runner is not None else 0
        return stats

    def stats(self) -> Dict[str, Any]:
        """Counters as a plain dict (see docs/architecture.md for each key)."""
        plane = self._plane
        if plane is not None:
            return self._stats(plane)
        if self._final_stats is not None:
            return dict(self._final_stats)
        raise RuntimeError("the proxy is not started: no stats yet")
