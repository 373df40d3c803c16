"""Proxy: the control plane of one listener (lifecycle, stats, signals).

It validates the config, binds, resolves, and hands everything to the
data plane (`_core.Engine`), whose workers run on threads of their own
with the GIL released. Nothing here is on the forwarding path.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import _core
from .access import build_access
from .config import Config, ConfigError, Duration, default_notsent_lowat, format_address, parse_size
from .dispatch import HookRunner, open_access_log
from .hooks import Direction, Hook, Hooks
from .sockets import listen_socket, raise_fd_limit, resolve_upstream
from .watch import Watchers

__all__ = ["Proxy"]

log = logging.getLogger("fastproxy")

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
    if requested == "auto":
        requested = os.environ.get("FASTPROXY_ENGINE", "auto") or "auto"
        if requested == "auto":
            return "epoll" if "epoll" in _core.ENGINES else "poll"
        if requested not in ("epoll", "poll"):
            raise ConfigError("FASTPROXY_ENGINE", requested, "must be auto, epoll or poll")
    if requested not in _core.ENGINES:
        raise ConfigError("engine", requested, f"is not available here (available: {', '.join(_core.ENGINES)})")
    return requested


class Proxy:
    """A TCP proxy: accepts clients on `listen` and bridges each one to an
    upstream. Use start()/stop(), serve_forever(), or `with Proxy(...) as p:`."""

    def __init__(
        self,
        listen: str,
        upstream: Optional[str] = None,
        *,
        upstreams: Optional[Sequence[str]] = None,
        workers: Optional[int] = None,
        connect_timeout: Duration = 5.0,
        drain_timeout: Duration = 10.0,
        half_close_timeout: Duration = 300.0,
        engine: str = "auto",
        busy_poll: Duration = 0.0,
        worker_cpus: Optional[Union[str, Sequence[int]]] = None,
        notsent_lowat: Optional[Union[int, str]] = None,
        balance: str = "roundrobin",
        retries: Optional[int] = None,
        max_fails: int = 3,
        fail_timeout: Duration = 10.0,
        health_interval: Optional[Duration] = None,
        health_timeout: Duration = 2.0,
        health_rise: int = 2,
        health_fall: int = 3,
        health_check: Optional[Callable[[str, int], bool]] = None,
        max_connections: Optional[int] = None,
        max_connections_per_ip: Optional[int] = None,
        on_limit: str = "queue",
        queue_size: int = 1024,
        queue_timeout: Duration = 30.0,
        allow: Optional[Sequence[str]] = None,
        deny: Optional[Sequence[str]] = None,
        allow_file: Optional[Sequence[str]] = None,
        deny_file: Optional[Sequence[str]] = None,
        reject_with: str = "close",
        idle_timeout: Optional[Duration] = None,
        max_lifetime: Optional[Duration] = None,
        allow_time: Optional[Sequence[str]] = None,
        time_zone: Optional[str] = None,
        close_outside_window: bool = False,
        clock: Optional[Callable[[], Any]] = None,
        rate_limit_per_ip: Optional[str] = None,
        rate_limit_table: int = 65536,
        send_proxy: Optional[str] = None,
        accept_proxy: bool = False,
        accept_proxy_from: Optional[Sequence[str]] = None,
        proxy_header_timeout: Duration = 3.0,
        proxy_header_max: int = 1024,
        on_connect: Optional[Hook] = None,
        on_data: Optional[Hook] = None,
        on_close: Optional[Hook] = None,
        hook_threads: int = 16,
        access_log: Optional[str] = None,
        max_hold: Union[int, str] = 1 << 20,
    ) -> None:
        self.config = Config.build(
            listen,
            upstream=upstream,
            upstreams=upstreams,
            workers=workers,
            connect_timeout=connect_timeout,
            drain_timeout=drain_timeout,
            half_close_timeout=half_close_timeout,
            engine=engine,
            busy_poll=busy_poll,
            worker_cpus=worker_cpus,
            notsent_lowat=notsent_lowat,
            balance=balance,
            retries=retries,
            max_fails=max_fails,
            fail_timeout=fail_timeout,
            health_interval=health_interval,
            health_timeout=health_timeout,
            health_rise=health_rise,
            health_fall=health_fall,
            max_connections=max_connections,
            max_connections_per_ip=max_connections_per_ip,
            on_limit=on_limit,
            queue_size=queue_size,
            queue_timeout=queue_timeout,
        )
        self.access = build_access(
            allow=allow, deny=deny, allow_file=allow_file, deny_file=deny_file,
            reject_with=reject_with, idle_timeout=idle_timeout, max_lifetime=max_lifetime,
            allow_time=allow_time, time_zone=time_zone, close_outside_window=close_outside_window,
            clock=clock, rate_limit_per_ip=rate_limit_per_ip, rate_limit_table=rate_limit_table,
            send_proxy=send_proxy, accept_proxy=accept_proxy, accept_proxy_from=accept_proxy_from,
            proxy_header_timeout=proxy_header_timeout, proxy_header_max=proxy_header_max,
        )
        if health_check is not None and not callable(health_check):
            raise ConfigError("health_check", health_check, "must be a callable (host, port) -> bool")
        self._health_check = health_check
        self._watchers: Optional[Watchers] = None
        self._lock = threading.Lock()
        self._engine: Optional[_core.Engine] = None
        self._sock = None
        self._threads: List[threading.Thread] = []
        self._address: Optional[Tuple[str, int]] = None
        self._stopped = threading.Event()
        self._final_stats: Optional[Dict[str, Any]] = None
        self._hooks = Hooks()
        self._runner: Optional[HookRunner] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._access_log_target = access_log
        self._access_log = None
        self._owns_access_log = False
        if isinstance(hook_threads, bool) or not isinstance(hook_threads, int) or hook_threads < 1:
            raise ConfigError("hook_threads", hook_threads, "must be a whole number >= 1")
        self._hook_threads = hook_threads
        self._max_hold = parse_size(max_hold, "max_hold", low=1)
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
        if self._engine is not None or self._final_stats is not None:
            raise RuntimeError(f"register {what} before start(): the data plane is running")

    # ---- lifecycle

    def start(self) -> "Proxy":
        """Bind, resolve and start the workers; return once they accept."""
        with self._lock:
            if self._engine is not None or self._final_stats is not None:
                raise RuntimeError("this Proxy was already started; make a new one")
            cfg = self.config
            engine_name = choose_engine(cfg.engine)
            if self._hooks.is_async() and self._loop is None:
                raise ConfigError("hooks", "async def", "coroutine hooks need the proxy run by `await proxy.serve()`")
            group = _core.UpstreamGroup(cfg.upstreams, [resolve_upstream((u.host, u.port)) for u in cfg.upstreams],
                                        balance=cfg.balance, max_fails=cfg.max_fails,
                                        fail_timeout=cfg.fail_timeout)
            budget = raise_fd_limit()
            max_connections = cfg.max_connections or default_max_connections(budget)
            sock = listen_socket(cfg.listen)
            try:
                engine = _core.Engine(
                    sock.fileno(),
                    group,
                    workers=cfg.workers,
                    engine=engine_name,
                    connect_timeout=cfg.connect_timeout,
                    half_close_timeout=cfg.half_close_timeout,
                    pool_max=pipe_pool_size(budget, cfg.workers),
                    retries=cfg.retry_count,
                    max_connections=max_connections,
                    max_per_ip=cfg.max_connections_per_ip or 0,
                    queue_on_limit=cfg.on_limit == "queue",
                    queue_size=cfg.queue_size,
                    queue_timeout=cfg.queue_timeout,
                    **self._access_args(),
                    hooks=self._hooks.flags(self._access_log_target is not None),
                    max_hold=self._max_hold,
                    hook_threads=self._hook_threads,
                    busy_poll=cfg.busy_poll,
                    notsent_lowat=(default_notsent_lowat(engine_name) if cfg.notsent_lowat is None
                                   else cfg.notsent_lowat),
                )
            except OSError as exc:
                sock.close()
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise ConfigError(
                        "workers", cfg.workers, f"too many for the fd budget of {budget} ({exc.strerror})"
                    ) from None
                raise
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            self._engine = engine
            self._address = tuple(sock.getsockname()[:2])  # type: ignore[assignment]
            self._stopped.clear()
            try:
                self._access_log, self._owns_access_log = open_access_log(self._access_log_target)
            except OSError as exc:
                sock.close()
                engine.close()
                raise ConfigError("access_log", self._access_log_target, exc.strerror or str(exc)) from None
            self._runner = HookRunner(engine, self._hooks, self._address,
                                      self._hook_threads, self._access_log, self._loop, self._max_hold)
            self._runner.start()
            self._watchers = Watchers(cfg, self.access, engine, self._health_check)
            self._watchers.start()
            self._threads = [
                threading.Thread(target=self._run_worker, args=(i,), name=f"fastproxy-worker-{i}", daemon=True)
                for i in range(cfg.workers)
            ]
            for t in self._threads:
                t.start()
            self._wait_accepting(engine, cfg.workers)
        log.info(
            "listening on %s, forwarding to %s (%s), engine %s, %d worker%s, fd budget %d, max %d bridges",
            format_address(*self._address),
            ", ".join(group.names),
            cfg.balance,
            engine_name,
            cfg.workers,
            "" if cfg.workers == 1 else "s",
            budget,
            max_connections,
        )
        return self

    def _access_args(self) -> Dict[str, Any]:
        a = self.access
        return dict(
            idle_timeout=a.idle_timeout or 0.0,
            max_lifetime=a.max_lifetime or 0.0,
            acl=_core.AccessList(a.allow, a.deny) if a.allow or a.deny else None,
            rate=_core.RateLimiter(a.rate[0], a.rate[1], a.rate_table) if a.rate else None,
            reject_reset=a.reject_with == "reset",
            send_proxy=a.send_proxy,
            accept_proxy=a.accept_proxy,
            proxy_from=_core.AccessList(a.accept_proxy_from) if a.accept_proxy_from else None,
            proxy_v2_max=a.proxy_header_max,
            header_timeout=a.proxy_header_timeout,
        )

    def check_time_windows(self) -> bool:
        """Evaluate the time windows now (a background thread does this
        every second); returns whether new clients are admitted."""
        if self._watchers is not None:
            return self._watchers.check_time_windows()
        return self.access.windows is None or self.access.windows.is_open()

    def _wait_accepting(self, engine: "_core.Engine", workers: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while engine.accepting() < workers:
            if not any(t.is_alive() for t in self._threads) or time.monotonic() > deadline:
                raise RuntimeError("the fastproxy workers did not start")
            time.sleep(0.001)

    def _run_worker(self, i: int) -> None:
        engine = self._engine
        assert engine is not None
        cpus = self.config.worker_cpus
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
            engine.run_worker(i)
        except Exception:
            log.exception("worker %d failed; its bridges were closed", i)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, let live bridges finish for up to the drain
        timeout (`timeout` seconds if given), close the rest, and return
        once every bridge is closed. Safe to call more than once."""
        with self._lock:
            engine = self._engine
            if engine is None:
                return
            drain = self.config.drain_timeout if timeout is None else max(0.0, float(timeout))
            engine.stop(drain)
            # Close the listening socket as soon as no worker polls it:
            # new clients are refused at once instead of waiting in its
            # backlog for a proxy that will never serve them.
            deadline = time.monotonic() + 5.0
            while engine.accepting() and time.monotonic() < deadline:
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
            self._final_stats = self._stats(engine)
            if self._owns_access_log and self._access_log is not None:
                self._access_log.close()
            if hooks_done:
                engine.close()
            else:
                # A hook still runs and may answer: the engine is freed when
                # the last reference to it (that hook thread's) goes.
                log.warning("a hook is still running; its bridge was closed")
            self._engine = None
            self._threads = []
            self._stopped.set()
        log.info("stopped")

    def serve_forever(self) -> None:
        """start(), then wait until stop() or, from the main thread, SIGINT
        or SIGTERM (a second signal shortens the drain to nothing)."""
        signals_seen: List[int] = []
        # Handlers go in before start(): a signal that arrives while the
        # workers start must stop the proxy, not raise KeyboardInterrupt.
        restore = self._install_signal_handlers(signals_seen)
        try:
            if self._engine is None:
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
            if self._engine is not None:
                self._on_signal(signals_seen)

        return [(signum, signal.signal(signum, on_signal)) for signum in (signal.SIGINT, signal.SIGTERM)]

    def _on_signal(self, signals_seen: List[int]) -> None:
        # stop() blocks while bridges drain: run it off the signal handler.
        timeout = None if len(signals_seen) == 1 else 0.0
        threading.Thread(target=self.stop, args=(timeout,), daemon=True).start()
        engine = self._engine
        if len(signals_seen) > 1 and engine is not None:
            engine.stop(0.0)  # the first stop() holds the lock: shorten its drain

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def serve(self) -> None:
        """Run under asyncio until cancelled, then drain and stop. Coroutine
        on_connect / on_close hooks are awaited on this loop."""
        self._loop = asyncio.get_running_loop()
        self.start()
        try:
            await asyncio.Event().wait()
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
        return self._engine.engine if self._engine is not None else choose_engine(self.config.engine)

    @property
    def workers(self) -> int:
        return self.config.workers

    def _stats(self, engine: "_core.Engine") -> Dict[str, Any]:
        stats = engine.stats()
        stats["hook_errors"] = self._runner.errors.count if self._runner is not None else 0
        return stats

    def stats(self) -> Dict[str, Any]:
        """Counters as a plain dict (see docs/architecture.md for each key)."""
        engine = self._engine
        if engine is not None:
            return self._stats(engine)
        if self._final_stats is not None:
            return dict(self._final_stats)
        raise RuntimeError("the proxy is not started: no stats yet")
