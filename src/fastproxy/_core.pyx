# cython: language_level=3, cdivision=True
# boundscheck and wraparound are setup.py's: a directive here would win over
# its debug build's (Cython 3 lets the file's comment override cythonize's).
"""The data plane: workers that accept, connect and bridge without the GIL.

Python reaches in only through DataPlane: it hands over an immutable config
(the listening fd, resolved upstream addresses, timeouts), runs each worker
on a thread of its own, asks for stats and asks workers to stop.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset, strcmp, strerror

import threading

from .includes.system cimport *
from .includes.balance cimport *
from .includes.access cimport *
from .includes.sockmap cimport *

include "hashing.pxi"
include "addresses.pxi"
include "access.pxi"
include "acl.pxi"
include "ratelimit.pxi"
include "proxyproto.pxi"
include "sni.pxi"
include "balancer.pxi"
include "hooks.pxi"
include "limits.pxi"
include "timers.pxi"
include "worker.pxi"
include "timings.pxi"
include "bridge.pxi"
include "kernel.pxi"
include "toxics.pxi"
include "connect.pxi"

# "kernel" is epoll with established bridges forwarded by a BPF sockmap
# program; whether the kernel allows it is decided when a data plane starts
# (DataPlane.kernel_fallback says why it runs epoll instead).
ENGINES = ("epoll", "kernel", "poll") if FP_HAVE_EPOLL else ("poll",)
KSLOTS = 16384   # sockmap slots per worker: 8192 bridges offloaded at once
cdef int kernel_trim_calls = FP_SM_TRIM_CALLS


def _kernel_trim_calls(int calls):
    """Build later engines' verdict with `calls` cut calls (0..256; 256 is
    the default) and return the previous number. Private, for tests only:
    fewer calls make an overlap uncuttable, the one way to reach the broken
    path (drop, reset both ways) on purpose."""
    global kernel_trim_calls
    cdef int previous = kernel_trim_calls
    if not 0 <= calls <= FP_SM_TRIM_CALLS:
        raise ValueError("calls: %d is not within 0..%d" % (calls, FP_SM_TRIM_CALLS))
    kernel_trim_calls = calls
    return previous


def kernel_engine_check():
    """None where engine "kernel" can run, else why not (the line the
    proxy logs when it falls back to epoll)."""
    cdef fp_sm sm
    cdef char log[4096]
    cdef int r
    if not FP_HAVE_EPOLL:
        return "no epoll on this platform"
    sm.trim_calls = FP_SM_TRIM_CALLS
    r = fp_sm_open(&sm, 2, FP_SM_BUDGET_ACKED, log, sizeof(log))
    if r == 0:
        fp_sm_close(&sm)
        return None
    return strerror(-r).decode()
# What this build has, for the control plane to ask instead of the
# interpreter's platform: a portable build (FASTPROXY_FORCE_PORTABLE) on
# Linux has neither, though the socket module there has TCP_NOTSENT_LOWAT.
PORTABLE = bool(FP_PORTABLE)
HAVE_NOTSENT_LOWAT = bool(FP_HAVE_NOTSENT_LOWAT)
# tcp_keepalive's IDLE, INTERVAL and COUNT (SO_KEEPALIVE alone is everywhere).
HAVE_KEEPALIVE_TIMERS = bool(FP_HAVE_KEEPALIVE_TIMERS)
HAVE_TCP_CONGESTION = bool(FP_HAVE_TCP_CONGESTION)
HAVE_TCP_USER_TIMEOUT = bool(FP_HAVE_TCP_USER_TIMEOUT)
# CloseReason, Verdict, HookBit and EventKind (cpdef enums in _core.pxd)
# are the control plane's names for the data plane's numbers.

cdef int64_t NS = 1000000000
# Longer durations mean "never"; clamping keeps deadlines far from overflow.
cdef double MAX_SECONDS = 1e9


cdef int64_t seconds_to_ns(double seconds):
    if seconds <= 0:
        return 0
    return <int64_t>(min(seconds, MAX_SECONDS) * NS)


cdef int listen_family(int fd) noexcept nogil:
    # Returns: the socket's address family, or -1.
    cdef sockaddr_storage ss
    cdef socklen_t n = sizeof(ss)
    if getsockname(fd, <sockaddr *>&ss, &n) < 0:
        return -1
    return ss.ss_family


cdef void free_limbo(Worker *w) noexcept nogil:
    cdef Bridge *b
    while w.limbo != NULL:
        b = w.limbo
        w.limbo = b.grave_next
        bridge_free(b)


cdef dict counters_dict(Counters *c):
    return {
        "accepted": c.accepted,
        "bytes_upstream": c.bytes_upstream,
        "bytes_downstream": c.bytes_downstream,
        "connect_failures": c.connect_failures,
        "fd_exhausted": c.fd_exhausted,
        "rejected": c.rejected,
        "queue_timeouts": c.queue_timeouts,
        "denied": c.denied,
        "rate_limited": c.rate_limited,
        "outside_window": c.outside_window,
        "proxy_header_errors": c.proxy_header_errors,
        "hook_refused": c.hook_refused,
        "hook_calls": c.hook_calls,
        "route_refused": c.route_refused,
        "route_timeouts": c.route_timeouts,
        "route_aborted": c.route_aborted,
        "no_memory": c.no_memory,
    }


cdef void counters_add(Counters *total, Counters *c) noexcept nogil:
    total.accepted += fp_load(&c.accepted)
    total.bytes_upstream += fp_load(&c.bytes_upstream)
    total.bytes_downstream += fp_load(&c.bytes_downstream)
    total.connect_failures += fp_load(&c.connect_failures)
    total.fd_exhausted += fp_load(&c.fd_exhausted)
    total.rejected += fp_load(&c.rejected)
    total.queue_timeouts += fp_load(&c.queue_timeouts)
    total.denied += fp_load(&c.denied)
    total.rate_limited += fp_load(&c.rate_limited)
    total.outside_window += fp_load(&c.outside_window)
    total.proxy_header_errors += fp_load(&c.proxy_header_errors)
    total.hook_refused += fp_load(&c.hook_refused)
    total.hook_calls += fp_load(&c.hook_calls)
    total.route_refused += fp_load(&c.route_refused)
    total.route_timeouts += fp_load(&c.route_timeouts)
    total.route_aborted += fp_load(&c.route_aborted)
    total.no_memory += fp_load(&c.no_memory)


# What bridges() calls each B_* state.
BRIDGE_STATES = ("header", "queued", "hook", "connecting", "active", "closed", "hello")
# DataPlane.bridge_command's actions, in BA_* order.
BRIDGE_ACTIONS = ("close", "reset", "half_close", "pause", "resume")


def pipe_max_size():
    """The largest pipe an unprivileged process may ask for
    (/proc/sys/fs/pipe-max-size; 1 MiB where it cannot be read)."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return min(int(f.read().strip()), 1 << 30)
    except (OSError, ValueError):
        return 1 << 20


cdef str bridge_state_name(int state, bint half_closed):
    if state == B_ACTIVE and half_closed:
        return "half-closed"
    return BRIDGE_STATES[state]


cdef void listener_free(ListenerC *ls, int nworkers) noexcept nogil:
    # Once no worker reads it: removed from the table and synced, and no
    # bridge left (refs 1), or the data plane is gone.
    cdef int i, j
    if ls == NULL:
        return
    if ls.slots != NULL:
        for i in range(nworkers):
            balance_cursor_free(&ls.slots[i].cursor)
            free(ls.slots[i].scratch)
            if ls.slots[i].rcursor != NULL:
                for j in range(ls.nroutes):
                    balance_cursor_free(&ls.slots[i].rcursor[j])
            free(ls.slots[i].rcursor)
            free(ls.slots[i].rgroup)
        free(ls.slots)
    pthread_mutex_destroy(&ls.wait.mu)
    iptable_free(&ls.ips)
    group_unref(ls.group)
    if ls.route_groups != NULL:
        for j in range(ls.nroutes):
            group_unref(ls.route_groups[j])
    toxic_set_unref(ls.toxics)
    free(ls.route_groups)
    free(ls.route_retries)
    route_table_free(ls.routes)
    free(ls)



cdef int toxic_set_build(list toxics, ToxicSet **out) except -1:
    # ListenerHandle.set_toxics' list as a ToxicSet with one reference in
    # *out (NULL for an empty list).
    cdef ToxicSet *new
    cdef ToxicC *t
    cdef int i
    out[0] = NULL
    if not toxics:
        return 0
    new = <ToxicSet *>calloc(1, sizeof(ToxicSet))
    if new == NULL:
        raise MemoryError()
    new.refs = 1
    new.t = <ToxicC *>calloc(len(toxics), sizeof(ToxicC))
    if new.t == NULL:
        free(new)
        raise MemoryError()
    for i, (tid, kind, stream, toxicity, a, b, c) in enumerate(toxics):
        t = &new.t[i]
        if not (0 <= kind <= TX_LIMIT_DATA and stream in (0, 1) and 0.0 <= toxicity <= 1.0
                and min(a, b, c) >= 0):
            toxic_set_unref(new)
            raise ValueError(f"toxic {i}: {(tid, kind, stream, toxicity, a, b, c)!r} is not a toxic")
        t.id = tid
        t.kind = kind
        t.stream = stream
        t.threshold = <uint64_t>(toxicity * 4294967296.0)
        t.a = a
        t.b = b
        t.c = c
    new.n = len(toxics)
    out[0] = new
    return 0

cdef class ListenerHandle:
    """One listener of a DataPlane (DataPlane.add_listener): its upstream
    group, admission switch, counters, and removal. Its id names it in hook
    events and close records."""

    def __cinit__(self):
        self.c = NULL

    @property
    def bridges(self):
        """Bridges of this listener not yet freed (open, or closed with a
        hook call still out)."""
        self._check()
        return fp_atomic_get(&self.c.refs) - 1

    cdef int _check(self) except -1:
        if self.c == NULL:
            raise RuntimeError(f"listener {self.id} was freed")
        return 0

    def swap_group(self, UpstreamGroup group not None, route=None):
        """Make `group` (built for this data plane, never attached before)
        the one new clients pick from: of the listener's default group
        (route None or 0), or of route `route` (1.., as route_groups[route
        - 1]). Live bridges keep the group they were bridged with, which is
        freed when the last of them ends (and its object is gone). Returns
        once every running worker has moved to it."""
        cdef UpstreamGroup old
        cdef int64_t gen
        cdef int i = 0 if route is None else route
        cdef GroupC **slot
        plane = self._plane
        with plane._lock:
            self._check()
            if plane.workers == NULL:
                raise RuntimeError("the data plane is closed")
            if not 0 <= i <= self.c.nroutes:
                raise IndexError(f"no route {route} (this listener has {self.c.nroutes})")
            if i == 0 and self.group is None:
                raise ValueError("this listener has no default group to swap")
            old = self.group if i == 0 else self.route_groups[i - 1]
            slot = &self.c.group if i == 0 else &self.c.route_groups[i - 1]
            gen = self.c.group_gen + 1
            group._attach(plane.nworkers, gen)
            group_ref(group.g)
            fp_ptr_set(<void **>slot, group.g)
            fp_atomic_set(&self.c.group_gen, gen)
            # Until each worker has synced, one may be about to read the old
            # pointer: its current reference is dropped only after.
            plane._publish()
            if i == 0:
                self.group = group
            else:
                self.route_groups[i - 1] = group
            group_unref(old.g)
            # Waiters get a retry each: the new group may have room where
            # the old one was full (those still without one wait again).
            self._kick_all()

    cdef void _kick_all(self) noexcept:
        cdef int i
        with nogil:
            for i in range(<int>fp_atomic_get(&self.c.wait.count)):
                queue_kick(self.c)

    def kick_waiters(self):
        """Give every waiter one retry: an upstream came back to ready or
        its weight rose (UpstreamGroup.set_admin, set_weight), so there may
        be room. Those still without a slot wait again."""
        self._check()
        self._kick_all()

    def free(self):
        """DataPlane.free_listener(self)."""
        self._plane.free_listener(self)

    def set_admit(self, bint open_):
        """Time windows: False refuses new clients (counted in outside_window)."""
        self._check()
        fp_atomic_set(&self.c.admit_open, 1 if open_ else 0)

    def close_all(self, int reason=TIMEOUT):
        """Close every bridge of this listener with `reason` (TIMEOUT: a
        time window ended; SHUTDOWN: a removed listener's drain ran out).
        Returns once the running workers did."""
        plane = self._plane
        with plane._lock:
            self._check()
            fp_atomic_set(&self.c.close_reason, reason)
            fp_atomic_add(&self.c.cmd_close, 1)
            plane._publish()

    def set_toxics(self, list toxics):
        """Make `toxics` this listener's toxic set, as one step: a list of
        (id, kind, stream, toxicity, a, b, c) (toxics.pxi's ToxicC; kind
        and stream as indexes into fastproxy.toxics.KINDS and STREAMS;
        times in ns, rates in bytes/s). Live bridges move to it; returns
        once every running worker has."""
        cdef ToxicSet *new = NULL
        cdef ToxicSet *old
        plane = self._plane
        toxic_set_build(toxics, &new)
        with plane._lock:
            if self.c == NULL:
                toxic_set_unref(new)
                self._check()
            old = self.c.toxics
            fp_ptr_set(<void **>&self.c.toxics, new)
            fp_atomic_add(&self.c.toxic_gen, 1)
            # Until each worker has synced, one may be about to read the
            # old set: its reference is dropped only after.
            plane._publish()
            toxic_set_unref(old)

    def stop_accepting(self):
        """Take the listener out of every worker's set for good (it was
        removed): returns once no running worker will accept on its socket,
        which the caller may then close. Its bridges go on."""
        plane = self._plane
        with plane._lock:
            self._check()
            fp_atomic_set(&self.c.closing, 1)
            plane._publish()

    def resume_accepting(self):
        """Undo stop_accepting() (a listener set down at run time, whose
        socket listens again): returns once every running worker has it
        back in its set. Never for a block a reload replaced or removed."""
        plane = self._plane
        with plane._lock:
            self._check()
            fp_atomic_set(&self.c.closing, 0)
            plane._publish()

    def stats(self):
        cdef Counters total
        cdef UpstreamCounters routed
        cdef Histogram connect_hist, duration_hist
        cdef int i
        self._check()
        memset(&total, 0, sizeof(Counters))
        memset(&routed, 0, sizeof(UpstreamCounters))
        memset(&connect_hist, 0, sizeof(Histogram))
        memset(&duration_hist, 0, sizeof(Histogram))
        for i in range(self._plane.nworkers):
            counters_add(&total, &self.c.slots[i].ctr)
            upstream_counters_add(&routed, &self.c.slots[i].routed)
            hist_sum(&connect_hist, &self.c.slots[i].connect_hist)
            hist_sum(&duration_hist, &self.c.slots[i].duration_hist)
        result = counters_dict(&total)
        result["active"] = fp_atomic_get(&self.c.gauges.active)
        result["peak_active"] = fp_atomic_get(&self.c.gauges.peak_active)
        result["queued"] = fp_atomic_get(&self.c.wait.count)
        result["dropped_records"] = fp_atomic_get(&self.c.gauges.dropped_records)
        result["hook_timeouts"] = fp_atomic_get(&self.c.gauges.hook_timeouts)
        result["upstreams"] = self.group.stats() if self.group is not None else {}
        if self.c.sni:
            result["routes"] = {
                name: {"server_names": list(names), "upstreams": group.stats()}
                for name, names, group in zip(self.route_names, self.route_server_names, self.route_groups)}
        # Routes have no passive health: always "up".
        result["routed"] = upstream_entry(&self.c.routed, &routed, "up", True)
        result["histograms"] = {"connect_seconds": hist_dict(&connect_hist, CONNECT_BOUNDS),
                                "duration_seconds": hist_dict(&duration_hist, DURATION_BOUNDS)}
        return result


cdef congestion_set(ListenerC *ls, name, loopback_name):
    # Tried on a socket of its own first, so that a name this process may
    # not use (not loaded; not in tcp_allowed_congestion_control without
    # CAP_NET_ADMIN) fails the start, not every bridge after it silently.
    # "auto" never fails it: where its algorithm cannot be set, the host's
    # stays on every socket.
    cdef bint auto = name == "auto"
    cdef bytes raw = (loopback_name if auto else name or "").encode()
    cdef int fd, err
    ls.congestion[0] = 0
    ls.congestion_loopback = auto
    if not raw or (auto and not FP_HAVE_TCP_CONGESTION):
        return
    memcpy(ls.congestion, <char *>raw, len(raw))   # parse_congestion_control: under 16 bytes
    ls.congestion[len(raw)] = 0
    fd = fp_socket(AF_INET)
    if fd < 0:
        raise OSError(-fd, f"congestion_control {name}: " + strerror(-fd).decode())
    err = fp_set_congestion(fd, ls.congestion)
    close(fd)
    if err < 0 and auto:
        ls.congestion[0] = 0
    elif err < 0:
        from .values import ConfigError   # (values imports this module)
        ls.congestion[0] = 0
        raise ConfigError("congestion_control", name, "this process may not set it (not in "
                          "tcp_allowed_congestion_control, and no CAP_NET_ADMIN)" if err == -EPERM
                          else "cannot be set: " + strerror(-err).decode())


cdef class DataPlane:
    """The data plane of a process: its workers, and the listeners they
    serve (add_listener). Durations are in seconds."""

    def __cinit__(self):
        memset(&self.sh, 0, sizeof(Shared))
        self.workers = NULL
        self.nworkers = 0
        self._listeners = {}

    def __init__(self, process, *, int hook_slots=16, int pool_max=64, int pipe_size=262144,
                 int buf_size=65536, int hook_read=262144, uint64_t kernel_budget=1048576):
        """process: the process section of a resolved fastproxy Config
        (engine, workers, busy_poll). hook_slots: how many hook threads may
        wait for calls at once; the rest are sizes of the data plane's own."""
        cdef int i
        engine = process.engine
        workers = process.workers
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not available here")
        if workers < 1:
            raise ValueError("a data plane needs workers")
        if workers > 0xFFFF:
            raise ValueError("a hook call's handle names its worker in 16 bits")
        self._lock = threading.Lock()
        self.engine = engine
        self.sh.engine = ENGINE_EPOLL if engine == "epoll" else (ENGINE_KERNEL if engine == "kernel" else ENGINE_POLL)
        self.kernel_fallback = None
        if engine == "kernel":
            self.sh.kbudget = kernel_budget
            self.kernel_fallback = self._open_sockmap(workers)
            if self.kernel_fallback is not None:
                self.sh.engine = ENGINE_EPOLL
                self.engine = engine = "epoll"
        self.sh.pipe_size = pipe_size
        self.sh.buf_size = buf_size
        self.sh.hook_read = max(hook_read, buf_size)
        self.sh.busy_poll_ns = seconds_to_ns(process.busy_poll)
        self.sh.pool_max = pool_max
        self.sh.pipe_max = max(pipe_size, pipe_max_size())
        self.sh.hook_pool_max = max(1, pool_max * self.sh.buf_size // self.sh.hook_read)
        if queue_init(&self.sh, hook_slots) < 0:
            queue_destroy(&self.sh)
            raise MemoryError()
        self.queues_ready = 1
        self.workers = <Worker *>calloc(workers, sizeof(Worker))
        if self.workers == NULL:
            raise MemoryError()
        self.sh.workers = self.workers
        for i in range(workers):
            self.nworkers = i + 1   # counted first: _free() undoes a partial init
            self.sh.nworkers = self.nworkers
            self._init_worker(&self.workers[i], i)

    def add_listener(self, int listen_fd, UpstreamGroup group, config, *, int hooks=0,
                     ListenerHandle replaces=None, list routes=None, list toxics=None,
                     bint accepting=True):
        """Serve `listen_fd` (bound, listening, non-blocking) with the
        listener options of `config` (a resolved fastproxy Config, read by
        option name) and upstream `group`. Running workers take it up
        before this returns; returns its ListenerHandle.

        With config.routing.route "sni", `routes` lists the listener's
        routes, each (name, server_names, UpstreamGroup, retries): server
        names normalized ("*.x" a wildcard), none twice. `group` is then
        the default group, or None for none (unknown names are refused).

        `replaces`: a listener on the same socket (a reload changed its
        options) that stops accepting in the same step, so that there is no
        moment when neither accepts; its bridges go on.

        `toxics` (as set_toxics takes them): the set the listener has from
        its first client on, so a reload that replaces a listener under
        toxics lets no client through without them. `accepting` False: the
        listener starts as after stop_accepting() (a down one's reload)."""
        from .values import LOOPBACK_CONGESTION, LOOPBACK_SOCKET_BUFFER   # (values imports this module)
        cdef ListenerC *ls
        cdef ListenerHandle h
        cdef AccessList acl = None, accept_proxy_from = None
        cdef RateLimiter rate = None
        cdef int i, j, k, err, lid
        cdef UpstreamGroup rg
        cdef ToxicSet *tset = NULL
        limits, access = config.limits, config.access
        timeouts, proxy_protocol = config.timeouts, config.proxy_protocol
        routing = getattr(config, "routing", None)
        sni = routing is not None and routing.route == "sni"
        routes = list(routes or ()) if sni else []
        if group is None and not routes:
            raise ValueError("a listener needs an upstream group, or routes")
        with self._lock:
            if self.workers == NULL:
                raise RuntimeError("the data plane is closed")
            if replaces is not None:
                replaces._check()
            # Ids go round: a close record of a freed listener still on its
            # way names an id no new listener has taken meanwhile.
            lid = -1
            for k in range(MAX_LISTENERS):
                if self.sh.listeners[(self.next_lid + k) % MAX_LISTENERS] == NULL:
                    lid = (self.next_lid + k) % MAX_LISTENERS
                    break
            if lid < 0:
                raise ValueError(f"a process serves at most {MAX_LISTENERS} listeners")
            self.next_lid = lid + 1
            rules = (access.allow + access.allow_file, access.deny + access.deny_file)
            if rules[0] or rules[1]:
                acl = AccessList(*rules)
            if access.rate_limit_per_ip is not None:
                rate = RateLimiter(*access.rate_limit_per_ip, access.rate_limit_table)
            if proxy_protocol.accept_proxy_from:
                accept_proxy_from = AccessList(proxy_protocol.accept_proxy_from)
            if group is not None:
                group._attach(self.nworkers, 0)
            for route in routes:
                (<UpstreamGroup>route[2])._attach(self.nworkers, 0)
            ls = <ListenerC *>calloc(1, sizeof(ListenerC))
            if ls == NULL:
                raise MemoryError()
            pthread_mutex_init(&ls.wait.mu, NULL)
            ls.sh = &self.sh
            ls.id = lid
            ls.refs = 1
            if group is not None:
                group_ref(group.g)      # the current pointer's
                ls.group = group.g
            try:
                if sni:
                    ls.sni = 1
                    ls.reject_non_tls = routing.route_non_tls == "reject"
                    ls.route_timeout_ns = seconds_to_ns(routing.route_timeout)
                    ls.routes = route_table_build([list(route[1]) for route in routes])
                if routes:
                    ls.route_groups = <GroupC **>calloc(len(routes), sizeof(GroupC *))
                    ls.route_retries = <int *>calloc(len(routes), sizeof(int))
                    if ls.route_groups == NULL or ls.route_retries == NULL:
                        raise MemoryError()
                    for j, route in enumerate(routes):
                        rg = route[2]
                        group_ref(rg.g)
                        ls.route_groups[j] = rg.g
                        ls.route_retries[j] = route[3]
                        ls.nroutes = j + 1
                ls.slots = <ListenerSlot *>calloc(self.nworkers, sizeof(ListenerSlot))
                if ls.slots == NULL:
                    raise MemoryError()
                for i in range(self.nworkers):
                    if group is not None and balance_cursor_init(group.g, &ls.slots[i].cursor) < 0:
                        raise MemoryError()
                    ls.slots[i].group = ls.group
                    if ls.nroutes:
                        ls.slots[i].rgroup = <GroupC **>calloc(ls.nroutes, sizeof(GroupC *))
                        ls.slots[i].rcursor = <BalanceCursor *>calloc(ls.nroutes, sizeof(BalanceCursor))
                        if ls.slots[i].rgroup == NULL or ls.slots[i].rcursor == NULL:
                            raise MemoryError()
                        for j in range(ls.nroutes):
                            if balance_cursor_init(ls.route_groups[j], &ls.slots[i].rcursor[j]) < 0:
                                raise MemoryError()
                            ls.slots[i].rgroup[j] = ls.route_groups[j]
                    if proxy_protocol.accept_proxy:
                        ls.slots[i].scratch = <uint8_t *>malloc(16 + proxy_protocol.proxy_header_max)
                        if ls.slots[i].scratch == NULL:
                            raise MemoryError()
                ls.retries = config.retry_count
                ls.max_connections = limits.max_connections
                ls.max_connections_per_ip = limits.max_connections_per_ip or 0
                ls.on_limit = ON_LIMIT_QUEUE if limits.on_limit == "queue" else ON_LIMIT_REJECT
                ls.queue_size = limits.queue_size
                ls.queue_timeout_ns = seconds_to_ns(limits.queue_timeout)
                ls.acl = &acl.table if acl is not None and len(acl) else NULL
                ls.rate = &rate.table if rate is not None else NULL
                ls.accept_proxy_from = &accept_proxy_from.table if accept_proxy_from is not None and len(accept_proxy_from) else NULL
                ls.admit_open = 1
                ls.reject_with = REJECT_RESET if access.reject_with == "reset" else REJECT_CLOSE
                ls.send_proxy = <uint8_t>(int(proxy_protocol.send_proxy[1]) if proxy_protocol.send_proxy else 0)
                ls.accept_proxy = proxy_protocol.accept_proxy
                ls.proxy_header_max = proxy_protocol.proxy_header_max
                ls.proxy_header_timeout_ns = seconds_to_ns(proxy_protocol.proxy_header_timeout)
                if ls.max_connections_per_ip and iptable_init(&ls.ips, max(ls.max_connections, 1024) + 1) < 0:
                    raise MemoryError()
                ls.listen_fd = listen_fd
                ls.notsent_lowat = config.listener.notsent_lowat
                # Negative: "auto", that size on a socket whose peer is a
                # loopback address (decided per socket), none elsewhere.
                sb = config.listener.socket_buffer
                ls.socket_buffer = -LOOPBACK_SOCKET_BUFFER if sb == "auto" else sb
                congestion_set(ls, config.listener.congestion_control, LOOPBACK_CONGESTION)
                unix_listener = listen_family(listen_fd) == AF_UNIX
                # A Unix listener's clients take no TCP options: none to set,
                # on it or per client ("inherited" skips the latter);
                # upstream sockets still get theirs.
                if not unix_listener:
                    fp_set_nodelay(listen_fd)
                ls.nodelay_inherited = FP_NODELAY_INHERITED or unix_listener
                if config.listener.tcp_keepalive is not None:
                    ls.keepalive = True
                    ls.keepalive_clients = not unix_listener
                    ls.keepalive_idle, ls.keepalive_interval, ls.keepalive_count = config.listener.tcp_keepalive
                # parse_tcp_user_timeout: whole milliseconds, under 2^31.
                ls.user_timeout_ms = round((config.listener.tcp_user_timeout or 0) * 1000)
                if ls.notsent_lowat and not unix_listener:
                    err = fp_set_notsent_lowat(listen_fd, ls.notsent_lowat)
                    if err < 0:
                        raise OSError(-err, f"notsent_lowat {ls.notsent_lowat}: " + strerror(-err).decode())
                ls.connect_timeout_ns = seconds_to_ns(timeouts.connect_timeout)
                ls.half_close_timeout_ns = seconds_to_ns(timeouts.half_close_timeout)
                ls.idle_timeout_ns = seconds_to_ns(timeouts.idle_timeout or 0)
                ls.max_lifetime_ns = seconds_to_ns(timeouts.max_lifetime or 0)
                ls.hooks = hooks
                ls.max_hold = config.hooks.max_hold
                ls.hook_timeout_ns = seconds_to_ns(config.hooks.hook_timeout or 0)
                ls.closing = 0 if accepting else 1
                toxic_set_build(toxics or [], &tset)
                if tset != NULL:
                    # In every worker's slot before any worker sees the
                    # block: its first client already gets the set.
                    ls.toxics = tset
                    ls.toxic_gen = 1
                    for i in range(self.nworkers):
                        ls.slots[i].toxics = tset
                        ls.slots[i].toxic_gen = 1
            except BaseException:
                listener_free(ls, self.nworkers)
                raise
            h = ListenerHandle()
            h.c = ls
            h.id = lid
            h.group = group
            h.route_groups = [route[2] for route in routes]
            h.route_names = tuple(route[0] for route in routes)
            h.route_server_names = tuple(tuple(route[1]) for route in routes)
            h.access = (acl, rate, accept_proxy_from)
            h._plane = self
            self.sh.hooks |= hooks
            if replaces is not None:
                fp_atomic_set(&replaces.c.closing, 1)
            fp_ptr_set(<void **>&self.sh.listeners[lid], ls)
            if lid >= self.sh.nlisteners:
                fp_atomic_set(&self.sh.nlisteners, lid + 1)
            self._listeners[lid] = h
            self._publish()
            return h

    def listener(self, int listener):
        """The ListenerHandle of id `listener` (until freed)."""
        return self._handle(listener)

    cdef ListenerHandle _handle(self, int listener):
        h = self._listeners.get(listener)
        if h is None:
            raise KeyError(f"no listener {listener}")
        return h

    def free_listener(self, ListenerHandle h not None):
        """Forget a listener that stopped accepting and has no bridge left
        (or whose workers are all out of their loops): its id may be
        reused."""
        cdef ListenerC *ls
        with self._lock:
            ls = h.c
            if ls == NULL:
                return
            if not fp_atomic_get(&ls.closing) and self.running():
                raise RuntimeError(f"listener {h.id} still accepts: stop_accepting() first")
            if fp_atomic_get(&ls.refs) > 1 and self.running():
                raise RuntimeError(f"listener {h.id} still has bridges")
            fp_ptr_set(<void **>&self.sh.listeners[h.id], NULL)
            self._publish()
            h.c = NULL
            del self._listeners[h.id]
            listener_free(ls, self.nworkers)

    cdef int _publish(self) except -1:
        # Under self._lock, after a change to the table or to a listener:
        # returns once every worker in its loop has synced to it.
        cdef int64_t gen
        cdef int i
        cdef Worker *w
        gen = fp_atomic_get(&self.sh.gen) + 1
        fp_atomic_set(&self.sh.gen, gen)
        fp_fence()
        for i in range(self.nworkers):
            write(self.workers[i].wake_w, b"x", 1)
        with nogil:
            for i in range(self.nworkers):
                w = &self.workers[i]
                while fp_atomic_get(&w.in_loop) and fp_atomic_get(&w.gen_seen) < gen:
                    usleep(200)
        return 0

    def running(self):
        """How many workers are in their loop."""
        cdef int i, n = 0
        for i in range(self.nworkers):
            n += <int>fp_atomic_get(&self.workers[i].in_loop)
        return n

    cdef object _open_sockmap(self, int workers):
        # Returns None, or why the kernel engine cannot run here (one line).
        cdef char *log = <char *>malloc(65536)
        cdef int r
        if log == NULL:
            raise MemoryError()
        try:
            self.sh.sm.trim_calls = kernel_trim_calls
            r = fp_sm_open(&self.sh.sm, <uint32_t>(workers * KSLOTS), FP_SM_BUDGET_ACKED, log, 65536)
            if r == 0:
                return None
            text = (<bytes>log).decode("utf-8", "replace").strip().splitlines()
            # The verifier's last lines say what it refused.
            # (No negative index: this module is compiled with wraparound off.)
            why = [t for t in text if t and not t.startswith("processed ")]
            return strerror(-r).decode() + ((": " + why[len(why) - 1]) if why else "")
        finally:
            free(log)

    cdef int _init_worker(self, Worker *w, int i) except -1:
        cdef int fds[2]
        cdef int r
        w.id = i
        w.sh = &self.sh
        w.rng = mix64(<uint64_t>fp_now_ns() ^ (<uint64_t>i << 32)) or 1
        w.epfd = -1
        w.wake_r = -1
        w.wake_w = -1
        r = fp_pipe(fds)
        if r < 0:
            raise OSError(-r, strerror(-r).decode())
        w.wake_r = fds[0]
        w.wake_w = fds[1]
        w.pipe_pool = <int *>malloc(3 * self.sh.pool_max * sizeof(int))
        w.buf_pool = <char **>malloc(self.sh.pool_max * sizeof(char *))
        w.hook_pool = <char **>malloc(self.sh.hook_pool_max * sizeof(char *))
        pthread_mutex_init(&w.results.mu, NULL)
        w.events = <epoll_event *>malloc(MAX_EVENTS * sizeof(epoll_event))
        w.hello_buf = <uint8_t *>malloc(2 * HELLO_MAX)
        if not (w.pipe_pool and w.buf_pool and w.hook_pool and w.events and w.hello_buf):
            raise MemoryError()
        if self.sh.engine == ENGINE_KERNEL:
            w.kfree = <uint32_t *>malloc((KSLOTS // 2) * sizeof(uint32_t))
            if w.kfree == NULL:
                raise MemoryError()
            for r in range(KSLOTS // 2):
                w.kfree[r] = <uint32_t>(i * KSLOTS + KSLOTS - 2 - 2 * r)
            w.nkfree = KSLOTS // 2
        if self.sh.engine != ENGINE_POLL:
            r = fp_epoll_create()
            if r < 0:
                raise OSError(-r, strerror(-r).decode())
            w.epfd = r
            r = fp_epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.wake_r, EPOLLIN, TAG_WAKE)
            if r < 0:
                raise OSError(-r, strerror(-r).decode())
        return 0

    @property
    def workers(self):
        return self.nworkers

    def run_worker(self, int i):
        """Run worker i on the calling thread until it stops. The GIL is
        released for the whole run."""
        if not 0 <= i < self.nworkers:
            raise IndexError(i)
        cdef Worker *w = &self.workers[i]
        cdef int r
        with nogil:
            r = worker_run(w)
        if r < 0:
            raise OSError(-r, f"worker {i}: {strerror(-r).decode()}")

    def stop(self, double drain):
        """Ask every worker to stop accepting and to close its bridges once
        they end or `drain` seconds have passed (a later call may shorten it)."""
        cdef Worker *w
        cdef int i
        for i in range(self.nworkers):
            w = &self.workers[i]
            fp_atomic_set(&w.drain_ns, seconds_to_ns(drain))
            fp_atomic_add(&w.cmd_stop, 1)
            write(w.wake_w, b"x", 1)

    def accepting(self):
        """How many workers are in their loop and accepting."""
        cdef int i, n = 0
        for i in range(self.nworkers):
            n += <int>fp_atomic_get(&self.workers[i].accepting)
        return n

    def listeners(self):
        """The ListenerHandles not yet freed, by id."""
        return dict(self._listeners)

    def bridges(self, int limit=10000):
        """The live bridges, as each worker copies them when asked (one
        command, like a swap's): a list of dicts (id, listener: the
        ListenerHandle id, client, upstream name or None, route or None,
        state, bytes_upstream, bytes_downstream, age in seconds), at most
        `limit` of them, oldest first. Forwarding does not wait for it: a
        worker copies between event batches."""
        cdef Worker *w
        cdef BridgeInfo *buf = NULL
        cdef BridgeInfo *e
        cdef int i, j, cap
        cdef int64_t now
        if limit < 0:
            raise ValueError(f"limit {limit} is negative")
        out = []
        with self._lock:
            if self.workers == NULL:
                return out
            # Each worker's share is at most `limit` and at most what it
            # had a moment ago (and some room for new ones).
            cap = 0
            for i in range(self.nworkers):
                cap += min(limit, self.workers[i].nbridges + 64)
            buf = <BridgeInfo *>calloc(max(cap, 1), sizeof(BridgeInfo))
            if buf == NULL:
                raise MemoryError()
            try:
                j = 0
                for i in range(self.nworkers):
                    w = &self.workers[i]
                    w.snap = buf + j
                    w.snap_cap = min(limit, w.nbridges + 64)
                    w.snap_len = 0
                    j += w.snap_cap
                fp_atomic_add(&self.sh.cmd_snap, 1)
                self._publish()
                now = fp_now_ns()
                for i in range(self.nworkers):
                    w = &self.workers[i]
                    for j in range(w.snap_len):
                        e = &w.snap[j]
                        out.append({
                            "id": e.id,
                            "listener": e.listener,
                            "client": format_client(e.client_ip, e.client_port, e.client_v4),
                            "upstream": e.group.names[e.upstream].decode() if e.group != NULL else None,
                            "route": format_addr(&e.route) if e.route.family else None,
                            "state": bridge_state_name(e.state, e.half_closed),
                            "bytes_upstream": e.bytes_upstream,
                            "bytes_downstream": e.bytes_downstream,
                            "age": max(0, now - e.accepted_ns) / 1e9,
                            "toxic_ids": [e.toxic_ids[k] for k in range(e.ntoxics)],
                            "paused": [name for k, name in enumerate(("upstream", "downstream"))
                                       if e.paused & (1 << k)],
                        })
            finally:
                for i in range(self.nworkers):
                    w = &self.workers[i]
                    for j in range(w.snap_len):
                        group_unref(w.snap[j].group)
                    w.snap = NULL
                    w.snap_cap = 0
                    w.snap_len = 0
                free(buf)
        out.sort(key=lambda b: b["id"])
        return out[:limit]

    def close_bridge(self, bridge_id):
        """Close the live bridge `bridge_id` (an id bridges() listed) with
        FIN both ways, close reason ADMIN_CLOSED. Returns True once its
        worker closed it, False when no live bridge has that id."""
        return self.bridge_command(bridge_id, "close")

    def bridge_command(self, bridge_id, str action, str stream=""):
        """Act on live bridge `bridge_id`: action "close" (FIN both ways),
        "reset" (RST both sides; both close reason ADMIN_CLOSED),
        "half_close" (FIN on `stream` after what it holds), "pause" or
        "resume" (`stream`'s forwarding). stream: "upstream" or
        "downstream". Returns True once its worker did it, False when no
        live, connected (for the last three) bridge has that id."""
        cdef int i
        cdef bint found = 0
        cdef int code, st
        try:
            code = BRIDGE_ACTIONS.index(action)
        except ValueError:
            raise ValueError(f"action {action!r}: expected one of {', '.join(BRIDGE_ACTIONS)}") from None
        if code >= BA_HALF_CLOSE and stream not in ("upstream", "downstream"):
            raise ValueError(f"stream {stream!r}: expected upstream or downstream")
        st = 1 if stream == "downstream" else 0
        if type(bridge_id) is not int or not 0 <= bridge_id < 2 ** 64:
            return False
        with self._lock:
            if self.workers == NULL:
                return False
            for i in range(self.nworkers):
                self.workers[i].kill_found = 0
            self.sh.kill_id = <uint64_t>bridge_id
            self.sh.kill_action = code
            self.sh.kill_stream = st
            fp_atomic_add(&self.sh.cmd_kill, 1)
            self._publish()
            for i in range(self.nworkers):
                found = found or self.workers[i].kill_found
        return bool(found)

    def stats(self):
        """The process's own figures; each listener's are its handle's.
        "workers": one dict per worker of its loop's counters; "hook_queue":
        hook calls waiting for a hook thread."""
        cdef int i
        cdef int queued
        cdef LoopCounters *c
        workers = []
        for i in range(self.nworkers):
            c = &self.workers[i].loop
            workers.append({"iterations": fp_load(&c.iterations), "events": fp_load(&c.events),
                            "wakeups": fp_load(&c.wakeups), "accept_calls": fp_load(&c.accept_calls)})
        with nogil:
            pthread_mutex_lock(&self.sh.events.mu)
            queued = self.sh.events.count
            pthread_mutex_unlock(&self.sh.events.mu)
        return {"stale_answers": fp_atomic_get(&self.sh.gauges.stale_answers),
                "hook_queue": queued,
                "listeners": len(self._listeners), "workers": workers}

    # ---- hooks: called from the control plane's hook threads

    def now_ns(self):
        """The data plane's clock (CLOCK_MONOTONIC, as time.monotonic_ns)."""
        return fp_now_ns()

    @property
    def hook_slots(self):
        """How many hook threads may call next_event at once (slots
        0 .. hook_slots-1): hook_threads, twice that with a hook_timeout."""
        return self.sh.events.nslots

    def next_event(self, int slot, int timeout_ms=100):
        """Hook thread `slot` (0 <= slot < hook_slots) waits, GIL released,
        for the next hook call. Returns None on time-out, False once hooks
        are closed, else a tuple:
        (EVT_CONNECT, handle, id, client, accepted_ns, server_name, alpn,
        route) or
        (EVT_DATA, handle, id, direction, chunks, client, accepted_ns):
        on_data's calls for one read, in order, each up to buf_size bytes
        (the first is joined to what WAIT held, so it may be longer).
        `handle` names the call for answer_connect / answer_data; it is an
        opaque int, good for one answer."""
        cdef HookEvent ev
        cdef int r
        cdef uint32_t at, cut, step
        if not self.queues_ready:
            return False
        if not 0 <= slot < self.sh.events.nslots:
            raise ValueError(f"hook thread slot {slot} is not below {self.sh.events.nslots}")
        # A call already queued is taken without letting go of the GIL.
        r = event_pop(&self.sh, slot, &ev, 0)
        if r == 0:
            with nogil:
                r = event_pop(&self.sh, slot, &ev, timeout_ms)
        if r <= 0:
            return None if r == 0 else False
        handle = (<object>ev.id << 64) | (<object>ev.seq << 32) | (ev.call << 16) | ev.worker
        client = format_client(ev.client_ip, ev.client_port, ev.client_v4)
        if ev.kind == EVT_CONNECT:
            try:
                server_name, alpn = hello_names(ev.hello)
            finally:
                free(ev.hello)
            return (ev.kind, ev.listener, handle, ev.id, client, ev.accepted_ns, server_name, alpn, ev.route)
        # The buffer stays lent (valid) until this call is answered, even
        # if its bridge closes or the call times out meanwhile.
        step = <uint32_t>self.sh.buf_size
        cut = min(ev.held + step, ev.len)
        chunks = [ev.buf[:cut]]
        at = cut
        while at < ev.len:
            cut = min(at + step, ev.len)
            chunks.append(ev.buf[at:cut])
            at = cut
        return (ev.kind, ev.listener, handle, ev.id, ev.call - CALL_UP, chunks, client, ev.accepted_ns)

    def answer_connect(self, handle, int verdict, int upstream=-1, list route=None,
                       UpstreamGroup group=None):
        """on_connect's answer: V_PROCEED, V_REFUSE, V_ERROR, or V_ROUTE to
        upstream index `upstream` of `group` (the name was looked up there)
        or to `route`, [(family, sockaddr)]. After
        a swap the worker takes the same name in the group then current.
        An answer to no call out (repeated, late, forged) is counted in
        stale_answers and dropped."""
        cdef HookResult res
        memset(&res, 0, sizeof(HookResult))
        res.kind = EVT_CONNECT
        res.verdict = <uint8_t>verdict
        res.upstream = upstream
        if upstream >= 0 and not route:
            if group is None:
                raise ValueError("an answer naming an upstream names its group")
            group._index(upstream)
            res.group = group.g
            group_ref(res.group)
        if route:
            res.route = <UpstreamAddr *>calloc(len(route), sizeof(UpstreamAddr))
            if res.route == NULL:
                raise MemoryError()
            res.nroute = len(route)
            for i, (family, sa) in enumerate(route):
                try:
                    fill_sockaddr(&res.route[i], family, tuple(sa))
                except BaseException:
                    free(res.route)
                    raise
        self._answer(handle, &res)

    def answer_data(self, handle, int verdict, bytes data=None, *,
                    long long keep=-1, bytes tail=None, long long hold=0, int then=0):
        """on_data's answer for one read's chunks: V_WAIT, V_CLOSE, V_ERROR;
        V_PASS, sending the first `keep` bytes of the read (-1: all); or
        V_REPLACE, sending `data` instead. Of what V_PASS keeps, the last
        `hold` bytes are held, as WAIT holds; V_REPLACE holds `tail`, kept
        after `data`. `then` (V_CLOSE or V_ERROR) closes the bridge once the
        rest is sent. Stale answers are dropped as answer_connect's."""
        cdef HookResult res
        cdef Py_ssize_t n = 0, t = 0
        memset(&res, 0, sizeof(HookResult))
        res.kind = EVT_DATA
        res.verdict = <uint8_t>verdict
        res.then = <uint8_t>then
        res.len = <uint32_t>keep if keep >= 0 else <uint32_t>0xFFFFFFFF
        res.hold = <uint32_t>hold
        if verdict == V_REPLACE:
            n = len(data)
            t = len(tail) if tail is not None else 0
            res.cap = <uint32_t>max(n + t, self.sh.buf_size)
            res.buf = <char *>malloc(res.cap)
            if res.buf == NULL:
                raise MemoryError()
            if n:
                memcpy(res.buf, <char *>data, n)
            if t:
                memcpy(res.buf + n, <char *>tail, t)
            res.len = <uint32_t>(n + t)
            res.hold = <uint32_t>t
        self._answer(handle, &res)

    cdef int _answer(self, object handle, HookResult *res) except -1:
        # The handle is only trusted as far as the worker's table confirms
        # it; here it just has to name a worker.
        cdef int r, worker
        if type(handle) is not int:
            hook_result_free(res)
            raise TypeError(f"a hook call's handle is an int, not {type(handle).__name__}")
        if handle < 0 or handle >> 128:
            worker = -1
        else:
            worker = <int>(handle & 0xFFFF)
            res.call = <uint8_t>min((handle >> 16) & 0xFFFF, 255)
            res.seq = <uint32_t>((handle >> 32) & 0xFFFFFFFF)
            res.id = <uint64_t>(handle >> 64)
            res.dir = <uint8_t>(res.call - CALL_UP) if res.call >= CALL_UP else 0
        if self.workers == NULL:
            hook_result_free(res)
            return 0   # the engine is gone: nobody waits for this answer
        if not 0 <= worker < self.nworkers:
            fp_atomic_add(&self.sh.gauges.stale_answers, 1)
            hook_result_free(res)
            return 0
        r = result_push(&self.workers[worker], res)
        if r < 0:
            hook_result_free(res)
            raise MemoryError()
        if r == 1:
            write(self.workers[worker].wake_w, b"x", 1)
        return 0

    def next_records(self, int max_records=1024, int timeout_ms=100):
        """Wait (GIL released) for close records; return a list of tuples
        (listener, id, client, upstream name or None, route, bytes_up, bytes_down,
        accepted_ns, closed_ns, reason, queue_ns, connect_ns, server_name, alpn), []
        on time-out, None once closed and empty. connect_ns is -1 when the bridge
        never connected; server_name None and alpn () without a ClientHello."""
        cdef RecordRing *q = &self.sh.records
        cdef CloseRecordC *batch
        cdef CloseRecordC *rec
        cdef int n = 0, i, closed = 0
        cdef GroupC *g
        if not self.queues_ready:
            return None
        batch = <CloseRecordC *>malloc(max_records * sizeof(CloseRecordC))
        if batch == NULL:
            raise MemoryError()
        with nogil:
            pthread_mutex_lock(&q.mu)
            if q.count == 0 and not q.closed:
                fp_cond_wait_ms(&q.cv, &q.mu, timeout_ms)
            while n < max_records and q.count > 0:
                batch[n] = q.items[q.head]
                q.head = (q.head + 1) % q.cap
                q.count -= 1
                n += 1
            closed = q.closed
            pthread_mutex_unlock(&q.mu)
        try:
            if n == 0 and closed:
                return None
            out = []
            for i in range(n):
                rec = &batch[i]
                g = rec.group
                out.append((
                    rec.listener, rec.id,
                    format_client(rec.client_ip, rec.client_port, rec.client_v4),
                    g.names[rec.upstream].decode() if g != NULL else None,
                    format_addr(&rec.route) if rec.route.family else None,
                    rec.bytes_upstream, rec.bytes_downstream,
                    rec.accepted_ns, rec.closed_ns, rec.reason,
                    rec.queue_ns, rec.connect_ns,
                ) + hello_names(rec.hello))
            return out
        finally:
            for i in range(n):
                group_unref(batch[i].group)
                free(batch[i].hello)
            free(batch)

    def close_hooks(self):
        """Wake every hook thread: next_event returns False from now on and
        next_records None once drained."""
        cdef int i
        if not self.queues_ready:
            return
        with nogil:
            pthread_mutex_lock(&self.sh.events.mu)
            self.sh.events.closed = 1
            pthread_mutex_unlock(&self.sh.events.mu)
            for i in range(self.sh.events.nslots):
                fp_sem_post(&self.sh.events.wake)
            pthread_mutex_lock(&self.sh.records.mu)
            self.sh.records.closed = 1
            pthread_cond_broadcast(&self.sh.records.cv)
            pthread_mutex_unlock(&self.sh.records.mu)

    def close(self):
        """Free what the workers and listeners held. Only once every
        run_worker returned."""
        if self._lock is None:
            self._free()
            return
        with self._lock:   # a change in progress still reads the workers
            self._free()

    cdef void _free(self) noexcept:
        cdef int i, j, fd
        cdef Worker *w
        cdef ListenerHandle h
        if self.workers != NULL:
            for i in range(self.nworkers):
                w = &self.workers[i]
                free_limbo(w)
                for j in range(w.results.count):
                    hook_result_free(&w.results.items[j])
                free(w.results.items)
                pthread_mutex_destroy(&w.results.mu)
                for j in range(w.npipes):
                    close(w.pipe_pool[3 * j])
                    close(w.pipe_pool[3 * j + 1])
                for j in range(w.nbufs):
                    free(w.buf_pool[j])
                for j in range(w.nhooks):
                    free(w.hook_pool[j])
                for fd in (w.epfd, w.wake_r, w.wake_w):
                    if fd >= 0:
                        close(fd)
                free(w.pipe_pool)
                free(w.buf_pool)
                free(w.hook_pool)
                free(w.events)
                free(w.hello_buf)
                free(w.theap)
                free(w.bridges)
                free(w.calls)
                free(w.pfds)
                free(w.pbridges)
                free(w.plisteners)
                free(w.kfree)
            free(self.workers)
            self.workers = NULL
        if self.sh.engine == ENGINE_KERNEL:
            fp_sm_close(&self.sh.sm)
            self.sh.engine = ENGINE_EPOLL
        if self.queues_ready:
            queue_destroy(&self.sh)
            self.queues_ready = 0
        # After the limbo bridges (their references) and the records. The
        # C table, not the dict, says what to free: in a collected cycle the
        # dict may be gone already.
        if self._listeners is not None:
            for h in self._listeners.values():
                h.c = NULL
            self._listeners.clear()
        for i in range(<int>self.sh.nlisteners):
            listener_free(self.sh.listeners[i], self.nworkers)
            self.sh.listeners[i] = NULL
        self.sh.nlisteners = 0
        self.nworkers = 0

    def __dealloc__(self):
        self._free()


# ---- the FASTPROXY_FAULTS build only (setup.py, compat.h)

def _fail_allocs(int count, int every=0, int size=0):
    """Fail the next `count` allocations made without the GIL (the worker
    path), only each `every`th of them, only those of exactly `size` bytes
    (0: any); `count` 0 disarms. A test build's hook: other builds have none."""
    if count < 0 or every < 0 or size < 0:
        raise ValueError("count, every and size are not negative")
    fp_fault_arm(count, every, size)


def _failed_allocs():
    """How many allocations _fail_allocs made fail so far."""
    return fp_fault_count()


def _fault_sizes():
    """Sizes of the worker's allocations a test may aim _fail_allocs at
    (size=): a bridge's block, its toxic state, one toxic's pick, a
    latency ring, the toxic heap's first block."""
    return {"bridge": sizeof(Bridge), "toxic_state": sizeof(ToxicState), "toxic_pick": sizeof(ToxicPick),
            "latency_ring": TOXIC_RING * sizeof(ToxicStamp), "toxic_heap": 64 * sizeof(Bridge *)}


if not FP_FAULTS:
    del globals()["_fail_allocs"], globals()["_failed_allocs"], globals()["_fault_sizes"]

