# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The data plane: workers that accept, connect and bridge without the GIL.

Python reaches in only through Engine: it hands over an immutable config
(the listening fd, resolved upstream addresses, timeouts), runs each worker
on a thread of its own, asks for stats and asks workers to stop.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memset, strerror

from .includes.system cimport *

include "access.pxi"
include "balancer.pxi"
include "worker.pxi"
include "bridge.pxi"

ENGINES = ("epoll", "poll") if FP_HAVE_EPOLL else ("poll",)

cdef int64_t NS = 1000000000
# Longer durations mean "never"; clamping keeps deadlines far from overflow.
cdef double MAX_SECONDS = 1e9


cdef int64_t seconds_to_ns(double seconds):
    if seconds <= 0:
        return 0
    return <int64_t>(min(seconds, MAX_SECONDS) * NS)


cdef int fill_sockaddr(UpstreamAddr *a, int family, tuple sa) except -1:
    cdef bytes host = str(sa[0]).split("%", 1)[0].encode()
    cdef int port = sa[1]
    cdef sockaddr_in *s4
    cdef sockaddr_in6 *s6
    memset(a, 0, sizeof(UpstreamAddr))
    a.family = family
    if family == AF_INET:
        s4 = <sockaddr_in *>&a.sa
        s4.sin_family = AF_INET
        s4.sin_port = htons(port)
        ok = inet_pton(AF_INET, host, &s4.sin_addr)
        a.salen = sizeof(sockaddr_in)
    elif family == AF_INET6:
        s6 = <sockaddr_in6 *>&a.sa
        s6.sin6_family = AF_INET6
        s6.sin6_port = htons(port)
        s6.sin6_flowinfo = sa[2]
        s6.sin6_scope_id = sa[3]
        ok = inet_pton(AF_INET6, host, &s6.sin6_addr)
        a.salen = sizeof(sockaddr_in6)
    else:
        raise ValueError(f"unsupported address family {family}")
    if ok != 1:
        raise ValueError(f"not a numeric address: {sa[0]!r}")
    return 0


cdef dict counters_dict(Counters *c):
    return {
        "accepted": fp_load(&c.accepted),
        "bytes_upstream": fp_load(&c.bytes_upstream),
        "bytes_downstream": fp_load(&c.bytes_downstream),
        "connect_failures": fp_load(&c.connect_failures),
    }


cdef void counters_add(Counters *total, Counters *c) noexcept nogil:
    total.accepted += fp_load(&c.accepted)
    total.bytes_upstream += fp_load(&c.bytes_upstream)
    total.bytes_downstream += fp_load(&c.bytes_downstream)
    total.connect_failures += fp_load(&c.connect_failures)
    total.fd_exhausted += fp_load(&c.fd_exhausted)


cdef class Engine:
    """The data plane of one listener: its workers, bridges and counters.

    upstreams: [(name, [(family, sockaddr), ...]), ...] with numeric
    addresses, already resolved. Durations are in seconds.
    """

    def __cinit__(self):
        memset(&self.sh, 0, sizeof(Shared))
        self.workers = NULL
        self.nworkers = 0

    def __init__(self, int listen_fd, list upstreams, *, int workers,
                 str engine, double connect_timeout, double half_close_timeout,
                 int pipe_size=262144, int buf_size=65536, int pool_max=64):
        cdef int i, j
        cdef Upstream *up
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is not available here")
        if not upstreams or workers < 1:
            raise ValueError("an engine needs upstreams and workers")
        self.engine = engine
        self.sh.engine = ENGINE_EPOLL if engine == "epoll" else ENGINE_POLL
        self.sh.listen_fd = listen_fd
        self.sh.connect_timeout_ns = seconds_to_ns(connect_timeout)
        self.sh.half_close_timeout_ns = seconds_to_ns(half_close_timeout)
        self.sh.pipe_size = pipe_size
        self.sh.buf_size = buf_size
        self.sh.pool_max = pool_max
        self._upstream_names = [name for name, _ in upstreams]
        self.sh.upstreams = <Upstream *>calloc(len(upstreams), sizeof(Upstream))
        if self.sh.upstreams == NULL:
            raise MemoryError()
        for i, (name, addrs) in enumerate(upstreams):
            up = &self.sh.upstreams[i]
            up.addrs = <UpstreamAddr *>calloc(len(addrs), sizeof(UpstreamAddr))
            if up.addrs == NULL:
                raise MemoryError()
            self.sh.nupstreams = i + 1
            for j, (family, sa) in enumerate(addrs):
                fill_sockaddr(&up.addrs[j], family, tuple(sa))
                up.naddrs = j + 1
        self.workers = <Worker *>calloc(workers, sizeof(Worker))
        if self.workers == NULL:
            raise MemoryError()
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
        w.up_ctr = <Counters *>calloc(self.sh.nupstreams, sizeof(Counters))
        w.events = <epoll_event *>malloc(MAX_EVENTS * sizeof(epoll_event))
        if not (w.pipe_pool and w.buf_pool and w.up_ctr and w.events):
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

    def accepting(self):
        """How many workers are in their loop and accepting."""
        cdef int i, n = 0
        for i in range(self.nworkers):
            n += <int>fp_atomic_get(&self.workers[i].accepting)
        return n

    def stats(self):
        cdef Counters total
        cdef Counters per
        cdef int i, j
        cdef Upstream *up
        memset(&total, 0, sizeof(Counters))
        for i in range(self.nworkers):
            counters_add(&total, &self.workers[i].ctr)
        result = counters_dict(&total)
        result["active"] = fp_atomic_get(&self.sh.gauges.active)
        result["peak_active"] = fp_atomic_get(&self.sh.gauges.peak_active)
        result["fd_exhausted"] = total.fd_exhausted
        ups = {}
        for j in range(self.sh.nupstreams):
            up = &self.sh.upstreams[j]
            memset(&per, 0, sizeof(Counters))
            for i in range(self.nworkers):
                counters_add(&per, &self.workers[i].up_ctr[j])
            d = counters_dict(&per)
            d["active"] = fp_atomic_get(&up.gauges.active)
            d["peak_active"] = fp_atomic_get(&up.gauges.peak_active)
            ups[self._upstream_names[j]] = d
        result["upstreams"] = ups
        return result

    def close(self):
        """Free what the workers held. Only once every run_worker returned."""
        self._free()

    cdef void _free(self) noexcept:
        cdef int i, j, fd
        cdef Worker *w
        if self.workers != NULL:
            for i in range(self.nworkers):
                w = &self.workers[i]
                for j in range(w.npipes):
                    close(w.pipe_pool[3 * j])
                    close(w.pipe_pool[3 * j + 1])
                for j in range(w.nbufs):
                    free(w.buf_pool[j])
                for fd in (w.epfd, w.wake_r, w.wake_w):
                    if fd >= 0:
                        close(fd)
                free(w.pipe_pool)
                free(w.buf_pool)
                free(w.up_ctr)
                free(w.events)
                free(w.bridges)
                free(w.pfds)
                free(w.pbridges)
            free(self.workers)
            self.workers = NULL
            self.nworkers = 0
        if self.sh.upstreams != NULL:
            for j in range(self.sh.nupstreams):
                free(self.sh.upstreams[j].addrs)
            free(self.sh.upstreams)
            self.sh.upstreams = NULL
            self.sh.nupstreams = 0

    def __dealloc__(self):
        self._free()
