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

include "hashing.pxi"
include "addresses.pxi"
include "access.pxi"
include "acl.pxi"
include "ratelimit.pxi"
include "proxyproto.pxi"
include "balancer.pxi"
include "hooks.pxi"
include "limits.pxi"
include "timers.pxi"
include "worker.pxi"
include "bridge.pxi"
include "connect.pxi"

ENGINES = ("epoll", "poll") if FP_HAVE_EPOLL else ("poll",)
# What this build has, for the control plane to ask instead of the
# interpreter's platform: a portable build (FASTPROXY_FORCE_PORTABLE) on
# Linux has neither, though the socket module there has TCP_NOTSENT_LOWAT.
PORTABLE = bool(FP_PORTABLE)
HAVE_NOTSENT_LOWAT = bool(FP_HAVE_NOTSENT_LOWAT)
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


cdef class DataPlane:
    """The data plane of one listener: its workers, bridges and counters.

    group: the UpstreamGroup to balance over (with resolved addresses);
    swap_group() replaces it while workers serve. Durations are in seconds.
    """

    def __cinit__(self):
        memset(&self.sh, 0, sizeof(Shared))
        self.workers = NULL
        self.nworkers = 0

    def __init__(self, int listen_fd, UpstreamGroup group not None, config, *,
                 int hooks=0, int pool_max=64, int pipe_size=262144, int buf_size=65536,
                 int hook_read=262144):
        """config: a resolved fastproxy.config.Config, read by option name.
        hooks: the HOOK_* bits; the rest are sizes of the data plane's own."""
        cdef int i, err
        cdef AccessList acl = None, accept_proxy_from = None
        cdef RateLimiter rate = None
        process, limits, access = config.process, config.limits, config.access
        timeouts, proxy_protocol = config.timeouts, config.proxy_protocol
        engine = process.engine
        workers = process.workers
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not available here")
        if workers < 1:
            raise ValueError("an engine needs workers")
        if workers > 0xFFFF:
            raise ValueError("a hook call's handle names its worker in 16 bits")
        group._attach(workers, 0)
        self._group = group
        self._swap_lock = threading.Lock()
        group_ref(group.g)      # the current pointer's
        self.sh.group = group.g
        self.sh.retries = config.retry_count
        self.sh.max_connections = limits.max_connections
        self.sh.max_connections_per_ip = limits.max_connections_per_ip or 0
        self.sh.on_limit = ON_LIMIT_QUEUE if limits.on_limit == "queue" else ON_LIMIT_REJECT
        self.sh.queue_size = limits.queue_size
        self.sh.queue_timeout_ns = seconds_to_ns(limits.queue_timeout)
        pthread_mutex_init(&self.sh.wait.mu, NULL)
        rules = (access.allow + access.allow_file, access.deny + access.deny_file)
        if rules[0] or rules[1]:
            acl = AccessList(*rules)
        if access.rate_limit_per_ip is not None:
            rate = RateLimiter(*access.rate_limit_per_ip, access.rate_limit_table)
        if proxy_protocol.accept_proxy_from:
            accept_proxy_from = AccessList(proxy_protocol.accept_proxy_from)
        self._access = (acl, rate, accept_proxy_from)
        self.sh.acl = &acl.table if acl is not None and len(acl) else NULL
        self.sh.rate = &rate.table if rate is not None else NULL
        self.sh.accept_proxy_from = &accept_proxy_from.table if accept_proxy_from is not None and len(accept_proxy_from) else NULL
        self.sh.admit_open = 1
        self.sh.reject_with = REJECT_RESET if access.reject_with == "reset" else REJECT_CLOSE
        self.sh.send_proxy = <uint8_t>(int(proxy_protocol.send_proxy[1]) if proxy_protocol.send_proxy else 0)
        self.sh.accept_proxy = proxy_protocol.accept_proxy
        self.sh.proxy_header_max = proxy_protocol.proxy_header_max
        self.sh.proxy_header_timeout_ns = seconds_to_ns(proxy_protocol.proxy_header_timeout)
        if self.sh.max_connections_per_ip and iptable_init(&self.sh.ips, max(self.sh.max_connections, 1024) + 1) < 0:
            iptable_free(&self.sh.ips)
            raise MemoryError()
        self.engine = engine
        self.sh.engine = ENGINE_EPOLL if engine == "epoll" else ENGINE_POLL
        self.sh.listen_fd = listen_fd
        self.sh.notsent_lowat = config.listener.notsent_lowat
        unix_listener = listen_family(listen_fd) == AF_UNIX
        # A Unix listener's clients take no TCP options: none to set, on it
        # or per client ("inherited" skips the latter); upstream sockets
        # still get theirs.
        if not unix_listener:
            fp_set_nodelay(listen_fd)
        self.sh.nodelay_inherited = FP_NODELAY_INHERITED or unix_listener
        if self.sh.notsent_lowat and not unix_listener:
            err = fp_set_notsent_lowat(listen_fd, self.sh.notsent_lowat)
            if err < 0:
                raise OSError(-err, f"notsent_lowat {self.sh.notsent_lowat}: " + strerror(-err).decode())
        self.sh.connect_timeout_ns = seconds_to_ns(timeouts.connect_timeout)
        self.sh.half_close_timeout_ns = seconds_to_ns(timeouts.half_close_timeout)
        self.sh.idle_timeout_ns = seconds_to_ns(timeouts.idle_timeout or 0)
        self.sh.max_lifetime_ns = seconds_to_ns(timeouts.max_lifetime or 0)
        self.sh.pipe_size = pipe_size
        self.sh.buf_size = buf_size
        self.sh.hook_read = max(hook_read, buf_size)
        self.sh.busy_poll_ns = seconds_to_ns(process.busy_poll)
        self.sh.pool_max = pool_max
        self.sh.hook_pool_max = max(1, pool_max * self.sh.buf_size // self.sh.hook_read)
        self.sh.hooks = hooks
        self.sh.max_hold = config.hooks.max_hold
        self.sh.hook_timeout_ns = seconds_to_ns(config.hooks.hook_timeout or 0)
        hook_threads = config.hooks.hook_threads
        # With a deadline, each hook thread may be written off and replaced
        # once at a time: twice the slots.
        if self.sh.hook_timeout_ns and hook_threads > 0:
            hook_threads *= 2
        if queue_init(&self.sh, hook_threads) < 0:
            queue_destroy(&self.sh)
            raise MemoryError()
        self.queues_ready = 1
        self.workers = <Worker *>calloc(workers, sizeof(Worker))
        if self.workers == NULL:
            raise MemoryError()
        self.sh.workers = self.workers
        for i in range(workers):
            self.nworkers = i + 1   # counted first: _free() undoes a partial init
            self._init_worker(&self.workers[i], i)

    cdef int _init_worker(self, Worker *w, int i) except -1:
        cdef int fds[2]
        cdef int r
        w.id = i
        w.sh = &self.sh
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
        if balance_cursor_init(self.sh.group, &w.cursor) < 0:
            raise MemoryError()
        w.group = self.sh.group
        if self.sh.accept_proxy:
            w.scratch = <uint8_t *>malloc(16 + self.sh.proxy_header_max)
            if w.scratch == NULL:
                raise MemoryError()
        w.events = <epoll_event *>malloc(MAX_EVENTS * sizeof(epoll_event))
        if not (w.pipe_pool and w.buf_pool and w.hook_pool and w.events):
            raise MemoryError()
        if self.sh.engine == ENGINE_EPOLL:
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

    def set_admit(self, bint open_):
        """Time windows: False refuses new clients (counted in outside_window)."""
        fp_atomic_set(&self.sh.admit_open, 1 if open_ else 0)

    def close_all(self):
        """Close every live bridge (a time window ended)."""
        cdef int i
        for i in range(self.nworkers):
            fp_atomic_add(&self.workers[i].cmd_close_all, 1)
            write(self.workers[i].wake_w, b"x", 1)

    def accepting(self):
        """How many workers are in their loop and accepting."""
        cdef int i, n = 0
        for i in range(self.nworkers):
            n += <int>fp_atomic_get(&self.workers[i].accepting)
        return n

    @property
    def group(self):
        """The current UpstreamGroup: new clients pick from it."""
        return self._group

    def swap_group(self, UpstreamGroup group not None):
        """Make `group` (built for this engine, never attached before) the
        one new clients pick from. Live bridges keep the group they were
        bridged with, which is freed when the last of them ends (and its
        object is gone). Returns once every running worker has moved to it."""
        cdef UpstreamGroup old
        cdef int64_t gen
        cdef int i
        cdef Worker *w
        with self._swap_lock:
            if self.workers == NULL:
                raise RuntimeError("the engine is closed")
            old = self._group
            gen = fp_atomic_get(&self.sh.group_gen) + 1
            group._attach(self.nworkers, gen)
            group_ref(group.g)
            fp_ptr_set(<void **>&self.sh.group, group.g)
            fp_atomic_set(&self.sh.group_gen, gen)
            fp_fence()
            for i in range(self.nworkers):
                write(self.workers[i].wake_w, b"x", 1)
            # Until each worker has looked, one may be about to read the old
            # pointer: its current reference is dropped only after.
            with nogil:
                for i in range(self.nworkers):
                    w = &self.workers[i]
                    while fp_atomic_get(&w.in_loop) and fp_atomic_get(&w.group_gen) < gen:
                        usleep(200)
            self._group = group
            group_unref(old.g)
            # Waiters get a retry each: the new group may have room where
            # the old one was full (those still without one wait again).
            with nogil:
                for i in range(<int>fp_atomic_get(&self.sh.wait.count)):
                    queue_kick(&self.sh)

    def stats(self):
        cdef Counters total
        cdef UpstreamCounters routed
        cdef int i
        memset(&total, 0, sizeof(Counters))
        memset(&routed, 0, sizeof(UpstreamCounters))
        for i in range(self.nworkers):
            counters_add(&total, &self.workers[i].ctr)
            upstream_counters_add(&routed, &self.workers[i].routed)
        result = counters_dict(&total)
        result["active"] = fp_atomic_get(&self.sh.gauges.active)
        result["peak_active"] = fp_atomic_get(&self.sh.gauges.peak_active)
        result["queued"] = fp_atomic_get(&self.sh.wait.count)
        result["dropped_records"] = fp_atomic_get(&self.sh.gauges.dropped_records)
        result["hook_timeouts"] = fp_atomic_get(&self.sh.gauges.hook_timeouts)
        result["stale_answers"] = fp_atomic_get(&self.sh.gauges.stale_answers)
        result["upstreams"] = self._group.stats()
        # Routes have no passive health: always "up".
        result["routed"] = upstream_entry(&self.sh.routed, &routed, "up", True)
        return result

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
        (EVT_CONNECT, handle, id, client, accepted_ns) or
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
            return (ev.kind, handle, ev.id, client, ev.accepted_ns)
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
        return (ev.kind, handle, ev.id, ev.call - CALL_UP, chunks, client, ev.accepted_ns)

    def answer_connect(self, handle, int verdict, int upstream=-1, list route=None,
                       UpstreamGroup group=None):
        """on_connect's answer: V_PROCEED, V_REFUSE, V_ERROR, or V_ROUTE to
        upstream index `upstream` of `group` (the name was looked up there;
        None: the current group) or to `route`, [(family, sockaddr)]. After
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
                group = self._group
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
        (id, client, upstream name or None, route, bytes_up, bytes_down, accepted_ns,
        closed_ns, reason), [] on time-out, None once closed and empty."""
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
                    rec.id,
                    format_client(rec.client_ip, rec.client_port, rec.client_v4),
                    g.names[rec.upstream].decode() if g != NULL else None,
                    format_addr(&rec.route) if rec.route.family else None,
                    rec.bytes_upstream, rec.bytes_downstream,
                    rec.accepted_ns, rec.closed_ns, rec.reason,
                ))
            return out
        finally:
            for i in range(n):
                group_unref(batch[i].group)
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
        """Free what the workers held. Only once every run_worker returned."""
        if self._swap_lock is None:
            self._free()
            return
        with self._swap_lock:   # a swap in progress still reads the workers
            self._free()

    cdef void _free(self) noexcept:
        cdef int i, j, fd
        cdef Worker *w
        if self.workers != NULL:
            for i in range(self.nworkers):
                w = &self.workers[i]
                free_limbo(w)
                balance_cursor_free(&w.cursor)
                free(w.scratch)
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
                free(w.bridges)
                free(w.calls)
                free(w.pfds)
                free(w.pbridges)
            free(self.workers)
            self.workers = NULL
            self.nworkers = 0
        if self.queues_ready:
            queue_destroy(&self.sh)
            pthread_mutex_destroy(&self.sh.wait.mu)
            iptable_free(&self.sh.ips)
            self.queues_ready = 0
        if self.sh.group != NULL:
            group_unref(self.sh.group)
            self.sh.group = NULL

    def __dealloc__(self):
        self._free()
