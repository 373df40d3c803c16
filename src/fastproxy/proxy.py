"""Proxy: the control plane of a process (lifecycle, reload, stats,
signals) and its listeners (listener.py).

It validates the config, binds, resolves, and hands everything to the
data plane (`_core.DataPlane`), whose workers run on threads of their own
with the GIL released and serve every listener. Nothing here is on the
forwarding path.
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
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import _core, activation
from .config import Config, ConfigError
from .configfile import ProxyConfig, config_from_mapping, load_config
from .control import UnknownNameError, UpstreamControl, find_upstream, set_upstream
from .discovery import DnsClient
from .dispatch import HookRunner
from .hooks import Direction, Hook, Hooks
from .listener import Listener, add_figures
from .options import OPTIONS, option
from .timewindows import Clock
from .toxics import STREAMS, Toxic, ToxicError, check_toxics
from .upstreams import Upstream
from .values import Duration, format_address, naming_listener, unix_path
from .sockets import accepts_connections, bound_as, check_listening, close_listening, fd_budget, unix_file_of
from .takeover import Handover, TakeoverServer, take_over

if TYPE_CHECKING:
    from .statsserver import StatsServer

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
# The stats endpoint's socket in a takeover: a name no listener can have
# (names come from text options, which cannot hold a NUL).
STATS_SOCKET = "\0stats"
# How often drained blocks of reloaded or removed listeners are looked at.
REAP_S = 0.1
# stop(timeout=T) returns within T + STOP_GRACE seconds, whatever hooks do:
# past the drain, joining threads (the workers', which close what is left at
# once, the hook threads', the checkers') gets this long in all. A hook
# thread still running then is left behind (it ends when its hook returns).
STOP_GRACE = 1.0
# The resolver thread looks at the listeners at least this often (a reload
# may have added names to resolve).
RESOLVE_IDLE_S = 1.0


def default_max_connections(fd_budget: int) -> int:
    # Two fds a bridge, less a margin for the listener, Python's own files
    # and pipes (a bridge short of a pipe copies instead).
    return max(1, fd_budget // FDS_PER_BRIDGE - min(32, fd_budget // 8))


def hook_slots(config: Config) -> int:
    """Hook threads that may wait for calls at once: hook_threads, and as
    many spares for threads a hook_timeout writes off (any listener, now or
    after a reload, may set one)."""
    return 2 * int(config.hooks.hook_threads) or 1


def _load_configs(source: Any) -> List[Config]:
    """A configuration source -> its listeners' Configs: a ProxyConfig, a
    path to a TOML file, a mapping of the same shape, one Config or a list
    of them, or a callable returning any of these (called again by each
    reload())."""
    if callable(source) and not isinstance(source, Config):
        source = source()
    if isinstance(source, Config):
        source = [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(c, Config) for c in source):
        source = ProxyConfig(source[0].process, tuple(source))
    elif isinstance(source, (str, os.PathLike)):
        source = load_config(source)
    elif isinstance(source, Mapping):
        source = config_from_mapping(source)
    if not isinstance(source, ProxyConfig):
        raise ConfigError("config", source, "expected a ProxyConfig, a path, a mapping, Configs or a callable")
    return list(source.listeners)


def choose_engine(requested: str) -> str:
    """The engine option (already a valid name) -> an engine compiled in."""
    if requested == "auto":
        requested = option("engine").parse(os.environ.get("FASTPROXY_ENGINE") or "auto", "FASTPROXY_ENGINE")
        if requested == "auto":
            return "epoll" if "epoll" in _core.ENGINES else "poll"
    if requested not in _core.ENGINES:
        raise ConfigError("engine", requested, f"is not available here (available: {', '.join(_core.ENGINES)})")
    return requested



def _left(deadline: float) -> float:
    """Seconds until a monotonic deadline, 0 once past it."""
    return max(0.0, deadline - time.monotonic())


def _weak(method: Callable[..., Any], gone: Any = None) -> Callable[..., Any]:
    """`method` without keeping its object alive (`gone` once that went):
    what the proxy's threads hold, so that a running Proxy nobody references
    any more is collected (and stopped: Proxy.__del__)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        return gone if bound is None else bound(*args, **kwargs)
    return call


def _run_worker(plane: "_core.DataPlane", i: int, cpus: Optional[Tuple[int, ...]]) -> None:
    # A worker thread's body: it holds the data plane, not the Proxy.
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


def _every(ref: "weakref.ref[Proxy]", stop: threading.Event, step: Callable[["Proxy"], float]) -> None:
    # The reaper's and the resolver's loop: step(proxy) says how long to
    # wait before the next; the proxy is held only while a step runs.
    wait = 0.0
    while not stop.wait(wait):
        held = ref()
        if held is None:
            return
        wait = step(held)
        del held

class Proxy:
    """A TCP proxy: accepts clients on its listeners and bridges each one to
    an upstream. `Proxy(listen=..., upstreams=...)` has one listener;
    `Proxy.from_config(...)` any number. Use start()/stop(),
    serve_forever(), or `with Proxy(...) as p:`; reload() applies a new
    configuration without cutting a bridge."""

    def __init__(
        self,
        listen: Optional[str] = None,
        upstream: Optional[Union[str, Upstream]] = None,
        *,
        # Options: one keyword per row of options.OPTIONS, with its default
        # (a test holds the two together); docs/reference.md says what each does.
        name: Optional[str] = None,
        upstreams: Optional[Sequence[Union[str, Upstream]]] = None,
        route: Optional[str] = None,
        routes: Sequence[Any] = (),
        route_timeout: Duration = 5.0,
        route_non_tls: str = "default",
        notsent_lowat: Optional[Union[int, str]] = None,
        socket_buffer: Union[int, str] = "auto",
        congestion_control: Optional[str] = "auto",
        tcp_keepalive: Optional[Union[str, int, bool]] = None,
        tcp_user_timeout: Optional[Duration] = None,
        unix_mode: Optional[Union[int, str]] = None,
        unix_user: Optional[Union[int, str]] = None,
        unix_group: Optional[Union[int, str]] = None,
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
        access_log_format: Optional[str] = None,
        workers: Optional[int] = None,
        engine: str = "auto",
        busy_poll: Duration = 0.0,
        fd_limit: str = "keep",
        worker_cpus: Optional[Union[str, Sequence[int]]] = None,
        takeover: Optional[str] = None,
        log_format: str = "text",
        resolver: Optional[str] = None,
        resolve_interval: Union[str, Duration, Tuple[Duration, Duration]] = (1.0, 300.0),
        stats: Optional[str] = None,
        stats_admin: bool = False,
        stats_token: Optional[str] = None,
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
        # As given, for the errors of chown at start (the table holds ids).
        given_unix = {name: options[name] for name in ("unix_user", "unix_group")}
        # The application's socket: checked now, duplicated at start().
        if sock is not None:
            if listen is not None:
                raise ConfigError("sock", sock, "give either listen or sock, not both")
            options["listen"] = format_address(*check_listening(sock))
            for name in ("unix_mode", "unix_user", "unix_group"):
                if options[name] is not None:
                    raise ConfigError(name, options[name], "applies to a socket file the proxy binds, not to sock")
        config = Config.build(upstream=upstream, **options)
        if health_check is not None and not callable(health_check):
            raise ConfigError("health_check", health_check, "must be a callable (host, port) -> bool")
        self._setup([Listener(config, sock=sock, health_check=health_check, clock=clock, given_unix=given_unix)])
        self._rebuild: Callable[[], List[Config]] = lambda: [Config.build(upstream=upstream, **options)]
        if on_connect is not None:
            self.on_connect(on_connect)
        if on_data is not None:
            self.on_data(on_data)
        if on_close is not None:
            self.on_close(on_close)

    @classmethod
    def from_config(cls, source: Any, *, health_check: Optional[Callable[[str, int], bool]] = None,
                    clock: Optional[Clock] = None) -> "Proxy":
        """A Proxy with every listener of `source`: a ProxyConfig, a path
        to a TOML file (docs/configuration.md), a mapping of the same shape,
        Configs, or a callable returning one of these. reload() with no
        argument reads a file again, or calls the callable again."""
        configs = _load_configs(source)
        self = cls.__new__(cls)
        made = []
        for c in configs:
            with naming_listener(c.name):
                made.append(Listener(c, health_check=health_check, clock=clock))
        self._setup(made)
        if callable(source) or isinstance(source, (str, os.PathLike)):
            self._rebuild = lambda: _load_configs(source)
        else:
            self._rebuild = lambda: list(configs)
        self._health_check = health_check
        self._clock = clock
        return self

    def _setup(self, listeners: List[Listener]) -> None:
        self._listeners = listeners
        self.config = listeners[0].config
        self._health_check = listeners[0].health_check
        self._clock: Optional[Clock] = None
        self._lock = threading.Lock()
        self._plane: Optional[_core.DataPlane] = None
        self._threads: List[threading.Thread] = []
        self._stopped = threading.Event()
        self._final_stats: Optional[Dict[str, Any]] = None
        self._runner: Optional[HookRunner] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._serve_waiter: Optional[Tuple[asyncio.AbstractEventLoop, asyncio.Event]] = None
        self._budget = 0
        # Listeners a reload removed: draining until their deadline.
        self._removed: List[Tuple[Listener, float]] = []
        self._reaper: Optional[threading.Thread] = None
        self._reap_stop = threading.Event()
        self._dns: Optional[DnsClient] = None
        self._resolver: Optional[threading.Thread] = None
        self._takeover_server: Optional[TakeoverServer] = None
        self._handover: Optional[Handover] = None
        self._stats_server: Optional[StatsServer] = None

    @property
    def _hooks(self) -> Hooks:
        # Hooks registered in Python go to the one listener there is.
        if len(self._listeners) != 1:
            raise RuntimeError("this proxy has several listeners: name hooks per listener in its config "
                               "(hooks = \"module:object\")")
        return self._listeners[0].hooks

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
        if self._final_stats is not None:
            raise RuntimeError(f"register {what} before start(): this proxy is stopped (make a new one)")
        if self._plane is not None:
            raise RuntimeError(f"register {what} before start(): the data plane is running")

    # ---- lifecycle

    def start(self) -> "Proxy":
        """Bind, resolve and start the workers; return once they accept."""
        with self._lock:
            if self._plane is not None or self._final_stats is not None:
                raise RuntimeError("this Proxy was already started; make a new one")
            if any(lst.hooks.is_async() for lst in self._listeners) and self._loop is None:
                raise ConfigError("hooks", "async def", "coroutine hooks need the proxy run by `await proxy.serve()`")
            process = self.config.process
            budget = self._budget = fd_budget(process.fd_limit == "raise")
            engine = choose_engine(process.engine)
            prepared: List[Listener] = []
            stats_bound: Optional[Tuple[socket.socket, Any]] = None
            try:
                self._begin_takeover(process.takeover)
                if process.stats is not None:
                    # Imported here: prometheus_client loads only for a
                    # proxy that serves metrics.
                    try:
                        from .statsserver import bind_stats
                    except ImportError as exc:
                        raise ConfigError("stats", format_address(*process.stats),
                                          f"needs {exc.name or 'prometheus_client'} (pip install prometheus_client; "
                                          "a dependency of fastproxy-tcp)") from None
                    taken = self._handover.take(STATS_SOCKET, process.stats) if self._handover else None
                    stats_bound = (taken, unix_file_of(taken)) if taken is not None else bind_stats(process.stats)
                self._dns = DnsClient(process.resolver)
                for lst in self._listeners:
                    with naming_listener(lst.name):
                        lst.prepare(engine=engine, max_connections=default_max_connections(budget),
                                    on_log_error=_weak(self._access_log_error), dns=self._dns,
                                    sock=self._inherited_socket(lst))
                    prepared.append(lst)
                self.config = self._listeners[0].config
                workers = self.config.process.workers
                try:
                    plane = _core.DataPlane(self.config.process, hook_slots=hook_slots(self.config),
                                            pool_max=pipe_pool_size(budget, workers))
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        raise ConfigError(
                            "workers", workers, f"too many for the fd budget of {budget} ({exc.strerror})"
                        ) from None
                    raise
                if plane.kernel_fallback is not None:
                    log.warning("engine kernel cannot run here (%s): running epoll", plane.kernel_fallback)
                runner = HookRunner(plane, self.config.hooks.hook_threads, self._loop)
                for lst in self._listeners:
                    lst.attach(plane, runner)
            except BaseException:
                for lst in prepared:
                    lst.stop_watchers()
                    lst.discard()
                self._abort_takeover()
                if stats_bound is not None:
                    close_listening(*stats_bound)
                raise
            self._plane = plane
            self._stopped.clear()
            self._runner = runner
            runner.start()
            self._threads = [
                threading.Thread(target=_run_worker, args=(plane, i, self.config.process.worker_cpus),
                                 name=f"fastproxy-worker-{i}", daemon=True)
                for i in range(workers)
            ]
            for t in self._threads:
                t.start()
            try:
                self._wait_accepting(plane, workers)
            except BaseException:
                self._abort_takeover()
                if stats_bound is not None:
                    close_listening(*stats_bound)
                raise
            self._finish_takeover()
            self._reaper = threading.Thread(target=_every, args=(weakref.ref(self), self._reap_stop, Proxy._reap),
                                            name="fastproxy-reaper", daemon=True)
            self._reaper.start()
            self._start_resolver()
            if stats_bound is not None:
                from .statsserver import StatsServer, admin_handler
                admin, admin_off = admin_handler(weakref.proxy(self), process.stats_admin)
                self._stats_server = StatsServer(stats_bound[0], unix_file=stats_bound[1],
                                                 stats=_weak(self.stats, gone={}),
                                                 admin=admin, admin_off=admin_off)
                self._stats_server.start()
                log.info("stats endpoint on %s", self._stats_server.address_text())
        process = self.config.process
        for lst in self._listeners:
            cfg = lst.config
            # The first line names the process's figures too: one line
            # says it all for the common one-listener proxy.
            log.info("listening on %s%s, forwarding to %s (%s), %smax %d bridges",
                     lst.address_text(),
                     "" if lst.name == format_address(*cfg.listener.listen) else f" (listener {lst.name})",
                     ", ".join(name for _, group in lst.groups() for name in group.names),
                     cfg.balancing.balance,
                     f"engine {self.engine}, {workers} worker{'' if workers == 1 else 's'}, "
                     f"fd budget {budget}, " if lst is self._listeners[0] else "",
                     cfg.limits.max_connections)
        return self

    def reload(self, source: Any = None) -> None:
        """Apply a new configuration (a path, a mapping, a ProxyConfig; None:
        read the config file again, or rebuild this Proxy's own options,
        rereading the files they name) without dropping anything: new
        listeners open; a listener at an unchanged address keeps its socket
        and its figures, and takes its new options for new clients while
        its bridges go on as they were; removed listeners stop accepting
        and their bridges drain (drain_timeout). All or nothing: an invalid
        configuration or a listener that cannot be bound raises ConfigError
        and changes nothing."""
        with self._lock:
            plane, runner = self._plane, self._runner
            if plane is None or runner is None:
                raise RuntimeError("the proxy is not running")
            try:
                configs = self._rebuild() if source is None else _load_configs(source)
                self._check_process(configs[0])
                self._apply(plane, runner, configs)
            except ConfigError as exc:
                where = f"listener {exc.listener!r}: " if exc.listener is not None else ""
                log.error("reload refused, the running configuration stays: %s%s", where, exc)
                raise

    def _check_process(self, config: Config) -> None:
        # The workers and hook threads are the process's: changing them
        # takes a restart (or a takeover, which is one without a gap).
        old, new = self.config, config
        for section, name in (("process", "workers"), ("process", "engine"), ("process", "busy_poll"),
                              ("process", "worker_cpus"), ("process", "fd_limit"), ("process", "takeover"),
                              ("hooks", "hook_threads")):
            before, after = getattr(getattr(old, section), name), getattr(getattr(new, section), name)
            if name == "engine" and after == "auto":
                continue
            if name == "workers" and after is None:
                continue
            if before != after:
                raise ConfigError(name, after, f"cannot change on reload (running with {before!r}): restart")
        # The stats endpoint is bound once, at start, and its admin handler
        # made only when stats_admin was on then: moving it, or turning
        # admin on, takes a restart. The token and turning admin off are
        # read per request, so they apply.
        server = self._stats_server
        # As for listeners: the same address as configured or as bound
        # (127.0.0.1:0, then the port it got).
        bound = server.address if server is not None and isinstance(server.address, tuple) else None
        if new.process.stats not in (old.process.stats, bound):
            shown = format_address(*new.process.stats) if new.process.stats else None
            running = format_address(*old.process.stats) if old.process.stats else "none"
            raise ConfigError("stats", shown, f"cannot change on reload (running with {running}): restart")
        if new.process.stats_admin and server is not None and not server.has_admin:
            raise ConfigError("stats_admin", True, "cannot turn on by reload (started without it): restart")

    def _apply(self, plane: "_core.DataPlane", runner: HookRunner, configs: List[Config]) -> None:
        # A listener is the same one when its address is: as configured,
        # as bound (127.0.0.1:0 then 127.0.0.1:PORT it got), or spelled
        # otherwise (localhost:80 for 127.0.0.1:80, [0::1] for [::1]). Port
        # 0 is the kernel's pick each time: there only the name tells.
        unmatched = list(self._listeners)

        def same_address(cfg: Config) -> Optional[Listener]:
            listen = cfg.listener.listen
            anywhere = listen[1] == 0 and unix_path(listen[0]) is None
            for lst in unmatched:
                if anywhere and lst.config.name != cfg.name:
                    continue
                if listen in (lst.listen, lst.address) or bound_as(listen, lst.address):
                    unmatched.remove(lst)
                    return lst
            return None

        engine = self.config.process.engine
        dns = self._dns
        if dns is None or dns.server != configs[0].process.resolver:
            dns = DnsClient(configs[0].process.resolver)
        kept: List[Listener] = []
        fresh: List[Tuple[Listener, Optional[Listener]]] = []
        try:
            for cfg in configs:
                old = same_address(cfg)
                if old is not None and old.source_config == cfg:
                    kept.append(old)
                    fresh.append((old, None))
                    continue
                # Hooks registered in Python carry over; a hooks option
                # is loaded again (the file may have changed).
                hooks = old.hooks if old is not None and cfg.hooks.hooks is None else None
                with naming_listener(cfg.name):
                    lst = Listener(cfg, hooks=hooks, health_check=self._health_check, clock=self._clock)
                    try:
                        lst.prepare(engine=engine, max_connections=default_max_connections(self._budget),
                                    on_log_error=_weak(self._access_log_error), dns=dns,
                                    sock=old.sock if old is not None else None)
                    finally:
                        fresh.append((lst, old))   # discarded below if anything failed
        except BaseException:
            for lst, old in fresh:
                if lst not in kept:
                    lst.discard(keep_socket=old is not None)
            raise
        # Nothing can fail past here but memory: the data plane takes the
        # new listeners and drops the replaced ones in one step each.
        listeners: List[Listener] = []
        for lst, old in fresh:
            if lst not in kept:
                lst.attach(plane, runner, replaces=old)
            listeners.append(lst)
        deadline_of = time.monotonic()
        for old in unmatched:
            old.retire()
            self._removed.append((old, deadline_of + old.config.timeouts.drain_timeout))
        self._listeners = listeners
        self._dns = dns
        self._start_resolver()
        self.config = listeners[0].config
        log.info("reloaded: %d listener%s (%d new or changed, %d removed)", len(listeners),
                 "" if len(listeners) == 1 else "s", len(fresh) - len(kept), len(unmatched))

    def _reap(self) -> float:
        # The reaper thread, every REAP_S: frees the blocks of replaced
        # listeners once their bridges ended, and closes a removed
        # listener's bridges at its drain deadline.
        # Not blocking: stop() holds the lock while it joins this thread.
        if not self._lock.acquire(blocking=False):
            return REAP_S
        try:
            for lst in self._listeners:
                lst.reap()
            now = time.monotonic()
            for lst, deadline in list(self._removed):
                if now >= deadline:
                    lst.close_bridges()
                lst.reap()
                if lst.drained:
                    self._removed.remove((lst, deadline))
        finally:
            self._lock.release()
        return REAP_S

    def _start_resolver(self) -> None:
        # Only a proxy with names to follow runs the thread; a reload that
        # brings the first one starts it.
        if self._resolver is None and any(lst.next_resolution() < float("inf") for lst in self._listeners):
            self._resolver = threading.Thread(target=_every, args=(weakref.ref(self), self._reap_stop, Proxy._resolve),
                                              name="fastproxy-resolver", daemon=True)
            self._resolver.start()

    def _resolve(self) -> float:
        # The resolver thread: asks DNS again for the upstream names whose
        # answer ran out (discovery.py), and swaps the group of a listener
        # whose upstreams changed. Queries run outside the lock; a reload
        # meanwhile replaces the listener, which then is not swapped.
        dns, now = self._dns, time.monotonic()
        for lst in list(self._listeners):
            if dns is None or lst.next_resolution() > now:
                continue
            try:
                changed = lst.refresh(dns, now)
                if changed:
                    self._swap_resolved(lst, changed)
            except Exception:
                log.exception("re-resolving the upstreams of listener %s failed", lst.name)
        due = min((lst.next_resolution() for lst in list(self._listeners)), default=float("inf"))
        return max(0.0, min(due - time.monotonic(), RESOLVE_IDLE_S))

    def _swap_resolved(self, lst: Listener, changed: List[int]) -> None:
        # Not blocking for good: stop() holds the lock while it joins this thread.
        while not self._lock.acquire(timeout=0.1):
            if self._reap_stop.is_set():
                return
        try:
            if lst in self._listeners and self._plane is not None:
                lst.swap_resolved(changed)
        finally:
            self._lock.release()

    # ---- takeover and socket activation (takeover.py, activation.py)

    def _begin_takeover(self, path: Optional[str]) -> None:
        # Claims the endpoint path first (a live one is an error), then asks
        # the process serving there, if any, for its listening sockets.
        if path is None or self._takeover_server is not None:
            return
        server = TakeoverServer(path, _weak(self._takeover_sockets, gone={}), _weak(self._handed_over))
        server.bind()
        self._takeover_server = server
        self._handover = take_over(path)
        if self._handover is None:
            server.publish(replace=False)

    def _inherited_socket(self, lst: Listener) -> Optional[socket.socket]:
        """A listener's socket taken over from the process serving at the
        takeover path, else one systemd passed (by name, else address);
        None: the listener binds its own (or adopts the application's)."""
        if lst.app_sock is not None:
            return None
        name, address = lst.name, lst.listen
        sock = self._handover.take(name, address) if self._handover is not None else None
        if sock is not None and sock.family != socket.AF_UNIX and not accepts_connections(sock):
            # The old process had set this listener down (its socket stopped
            # listening, still bound): it stays down here until set_down(False).
            lst.down = True
            return sock
        if sock is None:
            sock = activation.take(name, address)
        if sock is not None:
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
        if self._plane is None:
            return {}
        sockets = {lst.name: lst.sock for lst in self._listeners if lst.sock is not None}
        if self._stats_server is not None:
            sockets[STATS_SOCKET] = self._stats_server.sock
        return sockets

    def _handed_over(self) -> None:
        # On the takeover thread, which must not wait for the drain. The
        # socket files are the new process's now: it serves on them, so
        # this one's stop must not remove them.
        for lst in self._listeners:
            lst.unix_file = None
        if self._stats_server is not None:
            self._stats_server.unix_file = None
        threading.Thread(target=self.stop, name="fastproxy-handover", daemon=True).start()

    def reopen_logs(self) -> None:
        """Reopen the access log files at their paths (after a log rotator
        moved them away); lines written meanwhile went to the moved files."""
        for lst in self._listeners:
            lst.reopen_logs()

    def _access_log_error(self) -> None:
        if self._runner is not None:
            self._runner.errors.report("access_log")

    def check_time_windows(self) -> bool:
        """Evaluate the time windows now (a background thread does this
        every second); returns whether new clients are admitted (by the
        first listener)."""
        return all([lst.check_time_windows() for lst in self._listeners][:1])

    def _wait_accepting(self, plane: "_core.DataPlane", workers: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while plane.accepting() < workers:
            if not any(t.is_alive() for t in self._threads) or time.monotonic() > deadline:
                raise RuntimeError("the fastproxy workers did not start")
            time.sleep(0.001)

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
        drain = self.config.timeouts.drain_timeout if timeout is None else max(0.0, float(timeout))
        deadline = time.monotonic() + drain + STOP_GRACE
        server, self._takeover_server = self._takeover_server, None
        if server is not None:
            server.close()
        stats_server, self._stats_server = self._stats_server, None
        if stats_server is not None:
            stats_server.stop(min(STOP_GRACE, _left(deadline)))
        with self._lock:
            plane = self._plane
            if plane is None:
                return
            try:
                self._stop_plane(plane, drain, deadline)
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

    def _stop_plane(self, plane: "_core.DataPlane", drain: float, deadline: float) -> None:
        plane.stop(drain)
        # Close the listening sockets as soon as no worker polls them:
        # new clients are refused at once instead of waiting in a
        # backlog for a proxy that will never serve them.
        while plane.accepting() and time.monotonic() < deadline:
            time.sleep(0.001)
        for lst in self._listeners:
            lst.close_socket()
        # Not bounded: a worker ends at the drain deadline, closing what is
        # left without waiting for anything, and must have ended before its
        # data plane may be freed.
        for t in self._threads:
            t.join()
        if self._reaper is not None:
            self._reap_stop.set()
            self._reaper.join()
            self._reaper = None
        if self._resolver is not None:
            # A query in flight may take its lifetime: not waited for (the
            # thread swaps nothing once the data plane is gone).
            self._reap_stop.set()
            self._resolver.join(min(1.0, _left(deadline)))
            self._resolver = None
        for lst in self._listeners:
            lst.stop_watchers(_left(deadline))
        hooks_done = self._runner is None or self._runner.stop(_left(deadline))
        self._final_stats = self._stats(plane)
        for lst in self._listeners + [lst for lst, _ in self._removed]:
            lst.close()
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
        try:
            self.reload()
        except ConfigError:
            pass   # reload() logged it; the running configuration stays
        except Exception:   # the plumbing failed: keep serving the old one
            log.exception("reload failed, still serving the previous configuration")

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

    def __del__(self) -> None:
        # A started Proxy nobody references any more: none of its threads
        # holds it (they hold weak references), so it is collected rather
        # than serving on, unreachable, until the process ends. Stopped here
        # at once (no drain), and said, as an unclosed file is.
        if getattr(self, "_plane", None) is None:
            return
        try:
            warnings.warn(f"fastproxy.Proxy on {self._addresses_text()} was never stopped: stopped when "
                          "collected (call stop(), or use it as a context manager)", ResourceWarning, source=self)
        finally:
            if threading.current_thread().name.startswith("fastproxy"):
                # Collected on one of the proxy's own threads (every one is
                # named fastproxy-*), which the stop joins: not on it.
                threading.Thread(target=self.stop, args=(0.0,), name="fastproxy-stop", daemon=True).start()
            else:
                self.stop(0.0)

    def _addresses_text(self) -> str:
        return ", ".join(lst.address_text() for lst in self._listeners)

    async def start_async(self) -> "Proxy":
        """start() without blocking the running loop: resolving names and
        starting workers run on a thread. `.address` is valid once it
        returns; coroutine on_connect / on_close hooks are awaited on this
        loop."""
        self._loop = asyncio.get_running_loop()
        started = self._loop.run_in_executor(None, self.start)
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            # The start goes on on its thread: once it is done, undo it, or
            # a cancelled caller would leave a proxy serving that nothing
            # stops.
            started.add_done_callback(self._stop_if_started)
            raise
        return self

    def _stop_if_started(self, started: "asyncio.Future[Any]") -> None:
        if not started.cancelled() and started.exception() is None:
            threading.Thread(target=self.stop, name="fastproxy-stop", daemon=True).start()

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
        try:
            # Inside the try: a cancel while starting stops what started
            # (stop() waits for the start, which holds the lock).
            if self._plane is None:
                await self.start_async()
            await stopped.wait()   # set by a stop() (from a hook, say)
        finally:
            # stop() blocks while bridges drain, and async hooks may need
            # this loop meanwhile: run it on a thread and keep the loop free.
            await asyncio.shield(self._loop.run_in_executor(None, self.stop))

    # ---- run-time control (control.py; admin.py serves it over HTTP)

    def _serving(self) -> "_core.DataPlane":
        plane = self._plane
        if plane is None:
            raise RuntimeError("the proxy is not running")
        return plane

    def upstream(self, name: str, listener: Optional[str] = None, route: Optional[str] = None) -> UpstreamControl:
        """Run-time control of upstream `name` ("host:port" as configured)
        of `listener` (a listener's name; needed only when several
        listeners have that upstream), in the group of its route `route`
        (a route's name, route = "sni"; None: the listener's own group):
        drain(), maint(), ready(), set_weight(w), state. An unknown name
        raises UnknownNameError (a ConfigError); the settings survive a
        reload that keeps the upstream in that listener (and route)."""
        with self._lock:
            self._serving()
            lst = find_upstream(self._listeners, name, listener, route)
        return UpstreamControl(self, lst.name, name, route)

    def upstreams(self) -> Dict[str, Dict[str, Dict[str, Any]]]:
        """Every listener's upstreams (state, admin, weight, health,
        counters), by listener name, then upstream name."""
        self._serving()
        return {lst.name: lst.stats()["upstreams"] for lst in list(self._listeners)}

    def _set_upstream(self, listener: str, name: str, *, state: Optional[str] = None,
                      weight: Optional[int] = None, route: Optional[str] = None) -> Tuple[str, int]:
        with self._lock:
            self._serving()
            return set_upstream(find_upstream(self._listeners, name, listener, route), name, state, weight, route)

    def _upstream_state(self, listener: str, name: str, route: Optional[str] = None) -> Dict[str, Any]:
        self._serving()
        lst = find_upstream(list(self._listeners), name, listener, route)
        figures = lst.stats()
        return dict((figures["upstreams"] if route is None else figures["routes"][route]["upstreams"])[name])

    def _listener_names(self) -> Dict[int, str]:
        # Data-plane listener ids (current and draining blocks) -> names.
        names: Dict[int, str] = {}
        for lst in list(self._listeners) + [lst for lst, _ in list(self._removed)]:
            handles = [h for h, _ in list(lst.draining)] + ([lst.handle] if lst.handle is not None else [])
            for h in handles:
                names[h.id] = lst.name
        return names

    def bridges(self, limit: int = 10000) -> List[Dict[str, Any]]:
        """The live bridges, oldest first (at most `limit`): id, listener
        (its name), client (host, port), upstream (its name, or None when
        on_connect routed it elsewhere: then route), state (header, queued,
        hello: waiting for its TLS ClientHello with route = "sni", hook,
        connecting, active, half-closed), bytes_upstream,
        bytes_downstream, age (seconds), toxics (names of the toxics
        applied to it), paused (its streams pause_bridge stopped). Each
        worker copies its own between event batches: forwarding is not
        held up."""
        plane = self._plane
        if plane is None:
            return []
        found = plane.bridges(limit)
        names = self._listener_names()
        by_name = {lst.name: lst for lst in list(self._listeners)}
        for b in found:
            b["listener"] = names.get(b["listener"], str(b["listener"]))
            lst = by_name.get(b["listener"])
            ids = b.pop("toxic_ids")
            b["toxics"] = lst.toxic_names_of(ids) if lst is not None else [str(i) for i in ids]
        return found

    def close_bridge(self, bridge_id: int) -> bool:
        """Close live bridge `bridge_id` (from bridges()) with a FIN to both
        sides (close reason ADMIN_CLOSED): what was forwarded still
        arrives. Returns False when no live bridge has that id."""
        plane = self._plane
        if plane is None:
            return False
        closed = plane.close_bridge(bridge_id)
        if closed:
            log.info("bridge %d closed at run time", bridge_id)
        return bool(closed)

    # ---- run-time faults: down, then toxics

    def _named_listener(self, listener: Optional[str]) -> Listener:
        # The listener a run-time call (down, toxics) names; None when the
        # proxy has one.
        listeners = list(self._listeners)
        if listener is None:
            if len(listeners) > 1:
                raise ConfigError("listener", None, "this proxy has listeners "
                                  f"{', '.join(lst.name for lst in listeners)}: name one (listener=)")
            return listeners[0]
        for lst in listeners:
            if lst.name == listener:
                return lst
        raise UnknownNameError("listener", listener, "no such listener")

    # ---- down (listener.py: Listener.set_down)

    def set_down(self, down: bool, *, cut: bool = True, listener: Optional[str] = None) -> None:
        """Set a listener down (True) or up again (False), as if its service
        went away: while down, new clients are refused (connection refused,
        as for a closed port) and, with `cut`, its live bridges close (FIN
        both ways, close reason ADMIN_CLOSED, as toxiproxy's disable closes
        its connections); cut=False leaves them flowing. Up again, the same
        socket listens on the same address. `listener`: a listener's name,
        needed only when the proxy has several. A reload keeps a down
        listener down; a restart does not. Returns once every worker
        applied it. TCP listeners only."""
        with self._lock:
            self._serving()
            lst = self._named_listener(listener)
            was = lst.down
            lst.set_down(bool(down), cut)
        if was != bool(down):
            log.info("listener %s %s", lst.name,
                     "up again" if not down else "down (bridges " + ("cut)" if cut else "kept)"))

    def is_down(self, listener: Optional[str] = None) -> bool:
        """Whether the listener is down (set_down)."""
        return self._named_listener(listener).down

    # ---- toxics (toxics.py; the data plane applies them: toxics.pxi)

    def toxics(self, listener: Optional[str] = None) -> List[Toxic]:
        """The toxics of `listener` (its name; needed only when the proxy
        has several), in the order added."""
        with self._lock:
            return list(self._named_listener(listener).toxics)

    def set_toxics(self, toxics: Iterable[Toxic], listener: Optional[str] = None) -> None:
        """Replace the toxics of `listener` with `toxics`, atomically: no
        bridge ever sees part of the new set. Returns once every worker
        applied it: live bridges from their next event (an idle one's
        timers are armed at once), new ones from their accept. Toxics are
        run-time state: they survive a reload of the listener, not a
        restart."""
        wanted = check_toxics(toxics)
        with self._lock:
            self._named_listener(listener).set_toxics(wanted)

    def add_toxic(self, toxic: Toxic, listener: Optional[str] = None) -> Toxic:
        """Add `toxic` to `listener`'s; ToxicError if one has its name."""
        if not isinstance(toxic, Toxic):
            raise ToxicError("toxic", toxic, "expected a Toxic (fastproxy.toxic(...))")
        with self._lock:
            lst = self._named_listener(listener)
            if any(t.name == toxic.name for t in lst.toxics):
                raise ToxicError("name", toxic.name, f"a toxic of that name is already set on listener {lst.name}")
            lst.set_toxics(lst.toxics + [toxic])
        return toxic

    def update_toxic(self, name: str, *, toxicity: Optional[float] = None, listener: Optional[str] = None,
                     **attributes: int) -> Toxic:
        """Change toxic `name`'s toxicity and/or attributes (the others
        kept). A bridge it applied to keeps it (its toxicity is not drawn
        again). UnknownNameError if `listener` has no toxic `name`."""
        with self._lock:
            lst = self._named_listener(listener)
            current = list(lst.toxics)
            for i, t in enumerate(current):
                if t.name == name:
                    current[i] = changed = t.replace(toxicity=toxicity, **attributes)
                    lst.set_toxics(current)
                    return changed
            raise UnknownNameError("toxic", name, f"not a toxic of listener {lst.name}")

    def remove_toxic(self, name: str, listener: Optional[str] = None) -> None:
        """Remove toxic `name`; UnknownNameError if `listener` has none."""
        with self._lock:
            lst = self._named_listener(listener)
            kept = [t for t in lst.toxics if t.name != name]
            if len(kept) == len(lst.toxics):
                raise UnknownNameError("toxic", name, f"not a toxic of listener {lst.name}")
            lst.set_toxics(kept)

    def _bridge_command(self, bridge_id: int, action: str, stream: Optional[str] = None) -> bool:
        plane = self._plane
        if plane is None:
            return False
        if stream is not None and stream not in STREAMS:
            raise ConfigError("stream", stream, f"expected one of {', '.join(STREAMS)}")
        done = plane.bridge_command(bridge_id, action, stream or "")
        if done:
            log.info("bridge %d: %s%s at run time", bridge_id, action, "" if stream is None else f" {stream}")
        return bool(done)

    def reset_bridge(self, bridge_id: int) -> bool:
        """Reset live bridge `bridge_id` (an RST to both sides; close reason
        ADMIN_CLOSED). Returns False when no live bridge has that id."""
        return self._bridge_command(bridge_id, "reset")

    def half_close_bridge(self, bridge_id: int, stream: str) -> bool:
        """Pass a FIN on in `stream` of bridge `bridge_id` after what is
        queued in it ("upstream": the server sees the client's end;
        "downstream": the client sees the server's); the other stream keeps
        flowing. Returns False when no live bridge has that id."""
        return self._bridge_command(bridge_id, "half_close", stream)

    def pause_bridge(self, bridge_id: int, stream: str) -> bool:
        """Stop forwarding `stream` of bridge `bridge_id`: its bytes wait
        (the sender sees the usual backpressure) until resume_bridge.
        Returns False when no live bridge has that id."""
        return self._bridge_command(bridge_id, "pause", stream)

    def resume_bridge(self, bridge_id: int, stream: str) -> bool:
        """Forward `stream` of bridge `bridge_id` again after pause_bridge,
        nothing lost. Returns False when no live bridge has that id."""
        return self._bridge_command(bridge_id, "resume", stream)

    # ---- observation

    @property
    def address(self) -> Union[Tuple[str, int], str]:
        """The (first) listener's bound address (host, port); port 0 shows
        the real one. A Unix listener's is its path, a str: '/run/fp.sock',
        or '@name' for an abstract socket."""
        address = self._listeners[0].address
        if address is None:
            raise RuntimeError("the proxy is not started: no address yet")
        return address  # type: ignore[no-any-return]

    @property
    def addresses(self) -> Dict[str, Union[Tuple[str, int], str]]:
        """Every listener's bound address, by listener name."""
        if self._listeners[0].address is None:
            raise RuntimeError("the proxy is not started: no address yet")
        return {lst.name: lst.address for lst in self._listeners}

    @property
    def stats_address(self) -> Union[Tuple[str, int], str, None]:
        """The stats endpoint's bound address (host, port), or its path for
        unix:PATH; None when there is none (no `stats`, or not running)."""
        server = self._stats_server
        return server.address if server is not None else None

    @property
    def engine(self) -> str:
        plane = self._plane
        return plane.engine if plane is not None else choose_engine(self.config.process.engine)

    @property
    def workers(self) -> int:
        return int(self.config.process.workers)

    def _stats(self, plane: "_core.DataPlane") -> Dict[str, Any]:
        per = {lst.name: lst.stats() for lst in self._listeners}
        stats: Dict[str, Any] = {}
        for figures in per.values():
            add_figures(stats, figures)
        if len(per) > 1:
            # Upstreams are a listener's: the totals do not mix groups.
            stats.pop("upstreams", None)
            stats.pop("routed", None)
            stats.pop("resolution", None)
            stats.pop("toxics", None)
        stats.update(plane.stats())
        stats["hook_errors"] = self._runner.errors.count if self._runner is not None else 0
        stats["listeners"] = per
        return stats

    def stats(self) -> Dict[str, Any]:
        """Counters as a plain dict (see docs/architecture.md for each key):
        every listener's added up (with one listener, its own, upstreams
        included), and each listener's under "listeners" by name."""
        plane = self._plane
        if plane is not None:
            try:
                return self._stats(plane)
            except RuntimeError:
                # stop() freed the listeners meanwhile: its final figures
                # were taken first.
                if self._final_stats is None:
                    raise
        if self._final_stats is not None:
            return dict(self._final_stats)
        raise RuntimeError("the proxy is not started: no stats yet")
