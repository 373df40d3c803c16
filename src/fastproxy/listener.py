"""One listener's control plane: its socket, upstream group, hooks, access
log and watchers over the data plane's ListenerHandle, and its counters,
which outlive the data-plane blocks a reload replaces."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from . import _core
from .accesslog import AccessLog
from .config import Config
from .discovery import DnsClient, Resolution, first_resolution, hosts_names
from .discovery import build_group as build_resolved_group
from .dispatch import HookRunner, ListenerHooks
from .hooks import Hooks, access_log_fields, load_hooks
from .routes import Route
from .sockets import (LISTEN_BACKLOG, UnixFile, adopt_socket, check_listening, close_listening, listen_socket, listen_unix,
                      remove_unix_file, restore_unix_file, reown_unix_file, unix_file_of)
from .timewindows import Clock, TimeWindows
from .toxics import KINDS, STREAMS, Toxic
from .upstreams import Upstream
from .values import ConfigError, format_address, unix_path
from .watch import Watchers

log = logging.getLogger(__name__)

# Figures that are highs, not sums, when blocks of one listener are added up.
_HIGHS = ("peak_active",)
# Numbers that say how things are now, not counts (a setting; a gauge that a
# success resets): the first block's (the current one) stands.
_CURRENT = ("weight", "consecutive_failures")


def add_figures(into: Dict[str, Any], more: Dict[str, Any]) -> None:
    """Adds `more` (a listener's or upstream's figures) into `into`: counts
    add up, highs take the larger, words (state) and current figures keep
    `into`'s; a
    histogram's counts add bucket by bucket and its sum adds (its bounds are
    fixed: the same in every block)."""
    for key, value in more.items():
        if isinstance(value, dict):
            add_figures(into.setdefault(key, {}), value)
        elif key == "counts" and isinstance(value, list):
            have = into.get(key)
            into[key] = list(value) if have is None else [a + b for a, b in zip(have, value)]
        elif key == "sum" and isinstance(value, float):
            # Each block's sum is whole nanoseconds / 1e9 (timings.pxi):
            # added as integers, so the result does not depend on the order
            # blocks are added in (a reload moves a drained block into
            # `carried`), which float addition would, and a Prometheus
            # _sum never steps back.
            into[key] = (round(into.get(key, 0.0) * 1e9) + round(value * 1e9)) / 1e9
        elif isinstance(value, bool) or not isinstance(value, int) or key in _CURRENT:
            into.setdefault(key, value)
        elif key in _HIGHS:
            into[key] = max(into.get(key, 0), value)
        else:
            into[key] = into.get(key, 0) + value


def toxic_spec(toxic_id: int, t: Toxic) -> Tuple[int, int, int, float, int, int, int]:
    """A toxic as ListenerHandle.set_toxics takes it: (id, kind, stream,
    toxicity, a, b, c), times in ns and rates in bytes/s (toxics.pxi)."""
    at = t.attributes
    ms = 1_000_000
    a = b = c = 0
    if t.kind == "latency":
        a, b = at["latency"] * ms, at["jitter"] * ms
    elif t.kind == "bandwidth":
        a = at["rate"] * 1000   # toxiproxy's KB: 1000 bytes
    elif t.kind == "slow_close":
        a = at["delay"] * ms
    elif t.kind in ("timeout", "reset_peer"):
        a = at["timeout"] * ms
    elif t.kind == "slicer":
        a, b, c = at["average_size"], at["size_variation"], at["delay"] * 1000
    elif t.kind == "limit_data":
        a = at["bytes"]
    return (toxic_id, KINDS.index(t.kind), STREAMS.index(t.stream), t.toxicity, a, b, c)


def bound_address(sock: socket.socket) -> Any:
    """(host, port) of a TCP socket; a Unix one's path (a str)."""
    if sock.family == socket.AF_UNIX:
        host, _ = check_listening(sock)
        return host[len("unix:"):]
    host, port = sock.getsockname()[:2]
    return (host, port)


def resolve_upstreams(upstreams: Sequence[Upstream], config: Config, dns: DnsClient) -> List[Resolution]:
    """What each of `upstreams` (specs of `config`'s listener: its own, or
    a route's) resolves to now (ConfigError when one does not)."""
    local = hosts_names()
    interval = config.process.resolve_interval
    return [first_resolution(u, dns, interval, local) for u in upstreams]


def build_group(resolutions: Sequence[Resolution], balancing: Any) -> "_core.UpstreamGroup":
    """An upstream group from what its upstream specs resolve to, balanced
    as `balancing` (a Config's balancing section, or a route's:
    route_balancing) says. The one place groups are built: a listener's own
    group (again when a DNS answer changes) and each route's."""
    return build_resolved_group(resolutions, balance=balancing.balance, max_fails=balancing.max_fails,
                                fail_timeout=balancing.fail_timeout)


def carry_health(new: "_core.UpstreamGroup", old: "_core.UpstreamGroup") -> None:
    # An upstream the active checks found down stays down in the group
    # that replaces its group, until the checks say otherwise.
    for j, name in enumerate(old.names):
        i = new.index.get(name)
        if i is not None and old.state(j)["health"] == "down":
            new.set_health(i, False)


def route_balancing(config: Config, route: Route) -> Any:
    """A route's balancing section: the listener's, with what the route sets."""
    return dataclasses.replace(config.balancing, **dict(route.balancing))


def routes_of(config: Config) -> Tuple[Route, ...]:
    """The routes the data plane serves: none unless route = "sni"."""
    routing = config.routing
    return tuple(routing.routes) if routing.route == "sni" else ()


def build_routes(config: Config, resolutions: Sequence[Sequence[Resolution]],
                 ) -> List[Tuple[str, Tuple[str, ...], "_core.UpstreamGroup", int]]:
    """DataPlane.add_listener's routes: (name, server names, group,
    retries; -1: every other upstream of the group), from what each route's
    upstream specs resolve to (route_resolutions)."""
    out = []
    for route, resolved in zip(routes_of(config), resolutions):
        balancing = route_balancing(config, route)
        retries = -1 if balancing.retries is None else balancing.retries
        out.append((route.name, route.server_names, build_group(resolved, balancing), retries))
    return out


def relisten(sock: socket.socket, address: Tuple[str, int]) -> None:
    """Listen again on a socket that stopped listening (shutdown SHUT_RD),
    at `address`. A socket bound to port 0 lost its port when it stopped
    listening (the kernel keeps only an explicitly bound one): it is bound
    to the same port again, which fails only if another socket took it
    meanwhile (ConfigError)."""
    try:
        sock.bind(address[:2])
    except OSError:
        pass   # EINVAL: still bound (an explicit port): nothing to redo
    try:
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        raise ConfigError("listen", format_address(*address[:2]),
                          f"cannot listen again: {exc.strerror or exc}") from None
    if bound_address(sock)[1] != address[1]:
        raise ConfigError("listen", format_address(*address[:2]),
                          f"the port was taken while the listener was down (now {bound_address(sock)[1]})")


class Listener:
    """A listener of a Proxy. prepare() does everything that can fail
    (resolving, binding, opening the access log) and nothing visible;
    attach() then serves it; a reload prepares the new listeners first and
    attaches only when all of them prepared."""

    def __init__(self, config: Config, *, hooks: Optional[Hooks] = None, sock: Optional[socket.socket] = None,
                 health_check: Optional[Callable[[str, int], bool]] = None,
                 clock: Optional[Clock] = None, given_unix: Optional[Dict[str, Any]] = None) -> None:
        self.config = config
        self.source_config = config   # as given: what a reload compares
        self.name = config.name
        self.hooks = hooks if hooks is not None else Hooks()
        if hooks is None and config.hooks.hooks is not None:
            self.hooks.load(load_hooks(config.hooks.hooks))
        access = config.access
        self.windows = (TimeWindows(access.allow_time, access.time_zone, clock)
                        if access.allow_time is not None else None)
        self.health_check = health_check
        self.app_sock = sock
        # unix_user and unix_group as the user wrote them, for chown's errors.
        self.given_unix = given_unix if given_unix is not None else {
            "unix_user": config.listener.unix_user, "unix_group": config.listener.unix_group}
        self.sock: Optional[socket.socket] = None
        self.unix_file: Optional[UnixFile] = None   # a socket file this listener bound
        # A kept socket file whose mode or owner prepare() changed, and what it had.
        self._reowned: Optional[Tuple[str, Optional[Tuple[int, int, int]]]] = None
        self.address: Any = None   # bound, once prepared
        self._group: Optional["_core.UpstreamGroup"] = None   # prepared, until attached
        self._routes: List[Tuple[str, Tuple[str, ...], "_core.UpstreamGroup", int]] = []
        self._prepared = False
        # What each upstream spec resolves to (discovery.py); the resolver
        # thread refreshes those from DNS and swaps the group.
        self.resolutions: List[Resolution] = []
        # Per route, what its upstream specs resolve to (followed like
        # the listener's own).
        self.route_resolutions: List[List[Resolution]] = []
        # Groups a DNS change swapped out, while bridges bridged with them
        # live: their upstreams' figures add to the current group's.
        # (route name, "" for the listener's own group; the group)
        self.retired: List[Tuple[str, "_core.UpstreamGroup"]] = []
        self.access_log: Optional[AccessLog] = None
        self.handle: Optional["_core.ListenerHandle"] = None
        self.watchers: Optional[Watchers] = None
        self._errors: Optional[Callable[[], None]] = None
        # Blocks this listener had before a reload, still draining, with
        # their access logs, and the figures of those already freed:
        # stats() adds them up.
        self.draining: List[Tuple["_core.ListenerHandle", Optional[AccessLog]]] = []
        self.carried: Dict[str, Any] = {}
        self.runner: Optional[HookRunner] = None
        self._closed_bridges = False
        # Run-time faults (toxics.py), carried across a reload like the
        # upstreams' admin states; the data plane holds them as one set.
        self.toxics: List[Toxic] = []
        self.toxic_ids: Dict[str, int] = {}     # name -> the data plane's id
        self.toxic_names: Dict[int, str] = {}   # every id given -> its name
        self._next_toxic_id = 0
        self._lock = threading.Lock()   # draining and carried: the reaper against stats()
        self.down = False   # set down at run time (Proxy.set_down): refuses clients

    @property
    def group(self) -> Optional["_core.UpstreamGroup"]:
        """The upstream group new clients pick from; None for a listener of
        route = "sni" without upstreams."""
        if self.handle is not None:
            return self.handle.group
        if not self._prepared:
            raise RuntimeError(f"listener {self.name} is not prepared")
        return self._group

    def group_of(self, route: Optional[str]) -> Optional["_core.UpstreamGroup"]:
        """The current group of route `route` (by name; None: the
        listener's own group), or None when there is no such group."""
        handle = self.handle
        if handle is None:
            return None
        if route is None:
            return handle.group
        return dict(zip(handle.route_names, handle.route_groups)).get(route)

    def groups(self) -> List[Tuple[str, "_core.UpstreamGroup"]]:
        """Every current group: ("", the default group) if there is one,
        then (route name, group) per route."""
        handle = self.handle
        out: List[Tuple[str, "_core.UpstreamGroup"]] = []
        if handle is None:
            return out
        if handle.group is not None:
            out.append(("", handle.group))
        out.extend(zip(handle.route_names, handle.route_groups))
        return out

    @property
    def listen(self) -> Tuple[str, int]:
        return self.config.listener.listen  # type: ignore[no-any-return]

    def prepare(self, *, engine: str, max_connections: int, on_log_error: Callable[[], None],
                dns: DnsClient, sock: Optional[socket.socket] = None) -> None:
        """Resolve, build the group, open the access log, and bind (or
        take `sock`, a kept socket of the listener this one replaces).
        Raises ConfigError; undo with discard()."""
        self.config = cfg = self.config.resolve(engine=engine, max_connections=max_connections)
        upstreams = cfg.upstream_group.upstreams or ()
        self.resolutions = resolve_upstreams(upstreams, cfg, dns)
        self._group = build_group(self.resolutions, cfg.balancing) if upstreams else None
        self.route_resolutions = [resolve_upstreams(r.upstreams, cfg, dns) for r in routes_of(cfg)]
        self._routes = build_routes(cfg, self.route_resolutions)
        self._prepared = True
        try:
            self.access_log = AccessLog(self, cfg.hooks.access_log, on_log_error)
        except OSError as exc:
            raise ConfigError("access_log", cfg.hooks.access_log, exc.strerror or str(exc)) from None
        listener = cfg.listener
        if sock is not None:
            # Kept over a reload, or taken over from another process: its
            # file, if it has one, is this listener's to remove at stop.
            self.sock = sock
            self.unix_file = unix_file_of(sock)
            path = unix_path(listener.listen[0])
            if self.unix_file is not None and path is not None and not path.startswith("@"):
                self._reowned = (path, reown_unix_file(path, listener.unix_mode, listener.unix_user,
                                                       listener.unix_group, self.given_unix))
        elif self.app_sock is not None:
            self.sock = adopt_socket(self.app_sock)
        elif unix_path(listener.listen[0]) is not None:
            self.sock, self.unix_file = listen_unix(
                listener.listen, mode=listener.unix_mode, user=listener.unix_user,
                group=listener.unix_group, given=self.given_unix)
        else:
            self.sock = listen_socket(listener.listen)
        self.address = bound_address(self.sock)

    def discard(self, keep_socket: bool = False) -> None:
        """Undo prepare() of a listener that will not be attached (and, at
        stop, close what an attached one held)."""
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None
        if self._reowned is not None and self._reowned[1] is not None:
            restore_unix_file(self._reowned[0], self._reowned[1])   # a reload given up: the file as it was
        self._reowned = None
        if not keep_socket:
            self.close_socket()
        self.sock = None

    def close_socket(self) -> None:
        """Close the listening socket, and remove the socket file it bound."""
        if self.sock is not None:
            close_listening(self.sock, self.unix_file)
        elif self.unix_file is not None:
            remove_unix_file(self.unix_file)
        self.sock = None
        self.unix_file = None

    def address_text(self) -> str:
        address = self.address
        return "unix:" + address if isinstance(address, str) else format_address(*address)

    def hook_address(self) -> Tuple[str, int]:
        # Hooks see the listener as (host, port): a Unix one as (path, 0).
        address = self.address
        return (address, 0) if isinstance(address, str) else address

    def attach(self, plane: "_core.DataPlane", runner: HookRunner,
               replaces: Optional["Listener"] = None) -> None:
        """Serve: the data plane takes the socket up (in the same step as
        `replaces` stops accepting on it), hook threads learn the listener,
        watchers start."""
        assert self.sock is not None and self._prepared
        self._reowned = None   # committed: the file keeps what this configuration gave it
        cfg = self.config
        logged = cfg.hooks.access_log is not None
        old = replaces.handle if replaces is not None else None
        if old is not None:
            # Drained, in maintenance or reweighted at run time stays so
            # across a reload that keeps the upstream (by name; a route's
            # by route name, then upstream name).
            if self._group is not None and old.group is not None:
                self._group.carry_admin(old.group)
            before = dict(zip(old.route_names, old.route_groups))
            for name, _, group, _ in self._routes:
                if name in before:
                    group.carry_admin(before[name])
        # Run-time faults and down stay across a reload: the new block has
        # them before any worker sees it (same toxic ids: bridges keep their
        # draws), so no client slips through in between.
        # (Toxics set before attach, on a listener that replaces none, too.)
        carried = replaces if replaces is not None and replaces.handle is not None else self
        toxics = [toxic_spec(carried.toxic_ids[t.name], t) for t in carried.toxics]
        # Down stays down: across a reload, and across a takeover (the proxy
        # set self.down when the socket it took was not listening).
        down = self.down or (replaces is not None and replaces.down)
        self.handle = plane.add_listener(self.sock.fileno(), self._group, cfg,
                                         hooks=self.hooks.flags(logged), replaces=old,
                                         routes=list(self._routes), toxics=toxics,
                                         accepting=not down)
        if down:
            self.down = True
        # From now on the handle holds the current groups (a swap replaces
        # them): holding the first here would keep a retired group alive.
        self._group = None
        self._routes = []
        self.runner = runner
        runner.register(self.handle.id, ListenerHooks(
            self.name, self.hooks, self.hook_address(), self.handle, self.access_log if logged else None,
            cfg.hooks.max_hold, float(cfg.hooks.hook_timeout or 0.0),
            access_log_fields(cfg.hooks.access_log_format)))
        if replaces is not None and old is not None:
            # The old block drains under this listener: its figures stay
            # this listener's, its access log open until its last record.
            self.draining = replaces.draining + [(old, replaces.access_log)]
            self.carried = replaces.carried
            self.retired = replaces.retired
            self.toxics = replaces.toxics
            self.toxic_ids = replaces.toxic_ids
            self.toxic_names = replaces.toxic_names
            self._next_toxic_id = replaces._next_toxic_id
            # The socket is the same: so is the file it is bound to, which
            # whoever holds the socket last removes.
            self.unix_file, replaces.unix_file = replaces.unix_file, None
            replaces.stop_watchers()
        self.watchers = Watchers(cfg, self.windows, self.handle, self.health_check)
        self.watchers.start()

    # ---- down (Proxy.set_down)

    def set_down(self, down: bool, cut: bool) -> None:
        """Down: no worker accepts, and the socket stops listening, so the
        kernel refuses new clients (RST to a SYN, as for a closed port) and
        resets those left in the backlog; with `cut`, every bridge of the
        listener (draining blocks' too) closes with FIN both ways. Up: the
        same socket listens again on the same address, then the workers
        accept. Raises ConfigError for a Unix listener (a Unix socket
        cannot stop listening and keep its name)."""
        handle, sock = self.handle, self.sock
        if handle is None or sock is None:
            raise RuntimeError(f"listener {self.name} is not serving")
        if isinstance(self.address, str):
            raise ConfigError("listener", self.name, "a Unix listener cannot be set down (only TCP ones)")
        if down and not self.down:
            handle.stop_accepting()
            # Linux: shutdown(SHUT_RD) of a listening socket is
            # listen-stop: pending clients get RST, new SYNs get RST.
            sock.shutdown(socket.SHUT_RD)
            self.down = True
        elif not down and self.down:
            relisten(sock, self.address)
            handle.resume_accepting()
            self.down = False
        if down and cut:
            handle.close_all(_core.CloseReason.ADMIN_CLOSED)
            for h, _ in list(self.draining):
                h.close_all(_core.CloseReason.ADMIN_CLOSED)

    # ---- toxics

    def set_toxics(self, toxics: List[Toxic]) -> None:
        """Make `toxics` this listener's set: published to the data plane
        (when serving) before it becomes the listener's list, so a failure
        leaves both as they were. A toxic keeps its id (and each bridge
        its toxicity draw) while its name, kind and stream stay."""
        ids = {}
        for t in toxics:
            old = self.toxic_ids.get(t.name)
            same = [o for o in self.toxics if o.name == t.name and o.kind == t.kind and o.stream == t.stream]
            if old is not None and same:
                ids[t.name] = old
            else:
                self._next_toxic_id += 1
                ids[t.name] = self._next_toxic_id
        spec = [toxic_spec(ids[t.name], t) for t in toxics]
        if self.handle is not None:
            self.handle.set_toxics(spec)
        with self._lock:
            draining = [h for h, _ in self.draining]
        for h in draining:
            # Bridges of blocks a reload replaced are live bridges of this
            # listener too.
            try:
                h.set_toxics(spec)
            except RuntimeError:
                pass   # freed meanwhile: no bridge left
        self.toxics = list(toxics)
        self.toxic_ids = ids
        for t in toxics:
            self.toxic_names[ids[t.name]] = t.name

    def toxic_names_of(self, ids: List[int]) -> List[str]:
        """Names of the toxics with these ids (as bridges() reports them)."""
        return [self.toxic_names.get(i, str(i)) for i in ids]

    # ---- upstreams from DNS

    def _resolved_groups(self) -> List[Tuple[int, str, List[Resolution], Any]]:
        # What each current group is built from: (its index as swap_group
        # takes it, its route's name or "" for the listener's own group,
        # its specs' resolutions, its balancing section).
        out: List[Tuple[int, str, List[Resolution], Any]] = []
        if self.resolutions:
            out.append((0, "", self.resolutions, self.config.balancing))
        for i, (route, resolved) in enumerate(zip(routes_of(self.config), self.route_resolutions), 1):
            out.append((i, route.name, resolved, route_balancing(self.config, route)))
        return out

    def next_resolution(self) -> float:
        """When (time.monotonic()) a name of this listener is due again."""
        return min((r.due for _, _, resolved, _ in self._resolved_groups() for r in resolved if r.dynamic),
                   default=float("inf"))

    def refresh(self, dns: DnsClient, now: float) -> List[int]:
        """Ask DNS again for the names that are due (on the resolver
        thread, not under the Proxy's lock); the indexes of the groups
        whose upstreams changed, for swap_resolved()."""
        interval = self.config.process.resolve_interval
        changed = []
        for index, _, resolved, _ in self._resolved_groups():
            moved = False
            for r in resolved:
                if r.dynamic and r.due <= now:
                    moved = r.refresh(dns, interval) or moved
            if moved:
                changed.append(index)
        return changed

    def swap_resolved(self, indexes: List[int]) -> None:
        """Serve the upstreams the names now resolve to, in each group of
        `indexes` (0: the listener's own, i: route i): a new group, with the
        run-time settings and health verdicts of the upstreams it keeps,
        swapped in without a lock on the data path; live bridges stay with
        the group they picked from (retired, their figures still counted)."""
        handle = self.handle
        if handle is None:
            return
        sources = {index: (name, resolved, balancing)
                   for index, name, resolved, balancing in self._resolved_groups()}
        for index in indexes:
            name, resolved, balancing = sources[index]
            old = handle.group if index == 0 else handle.route_groups[index - 1]
            if old is None:
                continue
            new = build_group(resolved, balancing)
            new.carry_admin(old)
            carry_health(new, old)
            handle.swap_group(new, route=index)
            with self._lock:
                self.retired.append((name, old))
            if self.watchers is not None:
                self.watchers.group_changed(index)

    def stop_watchers(self, timeout: float = 5.0) -> None:
        """Stop the health checks and watchers; returns within `timeout`."""
        if self.watchers is not None:
            self.watchers.stop(timeout)
            self.watchers = None

    def retire(self) -> None:
        """A reload removed this listener: no worker accepts on it from now
        on and its socket closes (new clients are refused rather than left
        in a backlog nobody serves); its bridges drain (reap())."""
        self.stop_watchers()
        if self.handle is not None:
            self.handle.stop_accepting()
            self.draining.append((self.handle, self.access_log))
            self.handle = None
            self.access_log = None
        self.close_socket()

    def close_bridges(self) -> None:
        """A removed listener's drain ran out: close what is left."""
        if not self._closed_bridges:
            self._closed_bridges = True
            for h, _ in self.draining:
                h.close_all(_core.CloseReason.SHUTDOWN)

    @property
    def drained(self) -> bool:
        return self.handle is None and not self.draining

    def reap(self) -> None:
        """Frees the drained blocks (no bridge left), keeping their figures;
        their access logs close once their last records are written. Drops
        the swapped-out groups no bridge uses any more, keeping their
        upstreams' figures."""
        for retired in list(self.retired):
            route, group = retired
            if group.live_bridges == 0:
                with self._lock:
                    into = self.carried if not route else \
                        self.carried.setdefault("routes", {}).setdefault(route, {})
                    add_figures(into.setdefault("upstreams", {}), group.stats())
                    self.retired.remove(retired)
        for entry in list(self.draining):
            h, access_log = entry
            if h.bridges:
                continue
            with self._lock:
                add_figures(self.carried, h.stats())
                self.draining.remove(entry)
                h.free()
            if access_log is not None:
                if self.runner is not None:
                    self.runner.after_records(access_log.close)
                else:
                    access_log.close()

    def reopen_logs(self) -> None:
        for access_log in [self.access_log] + [log_ for _, log_ in self.draining]:
            if access_log is not None:
                access_log.reopen()

    def check_time_windows(self) -> bool:
        if self.watchers is not None:
            return self.watchers.check_time_windows()
        return self.windows is None or self.windows.is_open()

    def close(self) -> None:
        """After the data plane stopped: watchers, socket, access logs."""
        self.stop_watchers()
        self.discard()
        for _, access_log in self.draining:
            if access_log is not None:
                access_log.close()

    def stats(self) -> Dict[str, Any]:
        figures: Dict[str, Any] = {}
        handle = self.handle
        if handle is not None:
            add_figures(figures, handle.stats())
        names = None
        # Per route, the upstreams it shows: those of its current group and
        # of blocks still draining (like the listener's own upstreams).
        route_names: Optional[Dict[str, Set[str]]] = None
        if handle is not None:
            names = set(handle.group.names) if handle.group is not None else set()
            route_names = {r: set(g.names) for r, g in zip(handle.route_names, handle.route_groups)}
        with self._lock:
            for h, _ in self.draining:
                more = h.stats()
                if names is not None:
                    names.update(more["upstreams"])
                if route_names is not None:
                    for r, route in more.get("routes", {}).items():
                        route_names.setdefault(r, set()).update(route["upstreams"])
                add_figures(figures, more)
            for route, group in self.retired:
                more = group.stats()
                # An upstream DNS no longer gives shows while its bridges live.
                live = {n for n, v in more.items() if v["active"]}
                if not route:
                    if names is not None:
                        names.update(live)
                    add_figures(figures.setdefault("upstreams", {}), more)
                else:
                    if route_names is not None:
                        route_names.setdefault(route, set()).update(live)
                    into = figures.setdefault("routes", {}).setdefault(route, {})
                    add_figures(into.setdefault("upstreams", {}), more)
            add_figures(figures, self.carried)
        if names is not None:
            # Upstreams a reload removed show while bridges to them live.
            figures["upstreams"] = {n: v for n, v in figures["upstreams"].items() if n in names}
        if route_names is not None and "routes" in figures:
            figures["routes"] = {
                r: dict(route, upstreams={n: v for n, v in route["upstreams"].items() if n in route_names[r]})
                for r, route in figures["routes"].items() if r in route_names}
            if not figures["routes"] and not route_names:
                del figures["routes"]
        now = time.monotonic()
        for _, route, resolved, _ in self._resolved_groups():
            resolution = {r.spec.address: r.stats(now) for r in resolved if r.dynamic}
            if not resolution:
                continue
            if not route:
                figures["resolution"] = resolution
            elif route in figures.get("routes", {}):
                figures["routes"][route]["resolution"] = resolution
        figures["toxics"] = [t.name for t in self.toxics]
        return figures
