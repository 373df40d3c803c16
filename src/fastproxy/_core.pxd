# C-level structures of the data plane. Everything here is touched by worker
# threads without the GIL; the Engine class is the only Python-facing part.

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from .includes.system cimport epoll_event, pollfd, sockaddr_storage, socklen_t


cdef enum:
    ENGINE_EPOLL = 0
    ENGINE_POLL = 1

# Why a bridge ended; the values are CloseReason's in hooks to come.
cdef enum:  # CloseReason
    CLOSE_NONE = 0
    CLIENT_CLOSED = 1
    UPSTREAM_CLOSED = 2
    CLIENT_RESET = 3
    UPSTREAM_RESET = 4
    CONNECT_FAILED = 5
    REFUSED = 6
    TIMEOUT = 7
    HOOK_CLOSED = 8
    HOOK_ERROR = 9
    SHUTDOWN = 10

cdef enum:  # bridge state
    B_CONNECTING = 1
    B_ACTIVE = 2
    B_CLOSED = 3

cdef enum:  # timer lists
    T_NONE = 0
    T_CONNECT = 1
    T_HALF_CLOSE = 2
    T_COUNT = 3


# One direction of a bridge: bytes read from `src` wait in a pipe (splice
# path) or a heap buffer (copy path) until written to `dst`.
cdef struct Flow:
    int pipe_r
    int pipe_w
    char *buf
    uint32_t cap         # capacity of the pipe or buffer held, 0 if none
    uint32_t off         # copy path: first unsent byte in buf
    uint32_t len         # bytes held (pipe fill, or end of data in buf)
    uint8_t eof          # src sent FIN
    uint8_t shut         # FIN passed on: shutdown(dst, SHUT_WR) done
    uint64_t bytes


cdef struct Bridge:
    int cfd
    int ufd
    uint8_t state
    uint8_t copy         # this bridge copies instead of splicing
    # Edge-triggered readiness, cleared when a call meets EAGAIN.
    uint8_t c_rd
    uint8_t c_wr
    uint8_t u_rd
    uint8_t u_wr
    uint8_t reason       # CloseReason, set once
    uint8_t timer        # TimerList the bridge is linked on
    int upstream         # index into Shared.upstreams
    int addr             # which of the upstream's addresses is being tried
    int slot             # index in Worker.bridges
    int64_t accepted_ns
    int64_t deadline_ns
    Bridge *tprev
    Bridge *tnext
    Bridge *grave_next
    Flow up              # client -> upstream
    Flow down            # upstream -> client


cdef struct UpstreamAddr:
    sockaddr_storage sa
    socklen_t salen
    int family


# Counters a single worker writes (read by stats() with relaxed loads).
cdef struct Counters:
    uint64_t accepted
    uint64_t connect_failures
    uint64_t bytes_upstream
    uint64_t bytes_downstream
    uint64_t fd_exhausted


# Counters every worker updates atomically.
cdef struct Gauges:
    int64_t active
    int64_t peak_active


cdef struct Upstream:
    UpstreamAddr *addrs
    int naddrs
    Gauges gauges


# Read-only after start, except the gauges.
cdef struct Shared:
    int engine
    int listen_fd
    int64_t connect_timeout_ns
    int64_t half_close_timeout_ns
    int pipe_size
    int buf_size
    int pool_max         # idle pipes (or buffers) one worker keeps
    int nupstreams
    Upstream *upstreams
    Gauges gauges


cdef struct Worker:
    int id
    Shared *sh
    int epfd
    int wake_r
    int wake_w
    # Control plane -> worker: set, then a byte on wake_w.
    int64_t cmd_stop      # a generation: each stop() bumps it
    int64_t drain_ns
    int64_t seen_stop
    # Worker -> control plane.
    int64_t accepting
    int64_t error
    uint8_t listening
    uint8_t stopping
    int64_t accept_resume_ns
    int64_t drain_deadline_ns
    int rr                # round-robin position
    Bridge *thead[3]      # timer lists, ordered by deadline (one duration each)
    Bridge *ttail[3]
    Bridge **bridges
    int nbridges
    int cap_bridges
    Bridge *grave
    int *pipe_pool        # idle pipes, read end then write end
    int npipes
    char **buf_pool
    int nbufs
    epoll_event *events
    pollfd *pfds
    Bridge **pbridges
    int cap_pfds
    Counters ctr
    Counters *up_ctr


cdef class Engine:
    cdef Shared sh
    cdef Worker *workers
    cdef int nworkers
    cdef readonly str engine
    cdef object _upstream_names
    cdef int _init_worker(self, Worker *w, int i) except -1
    cdef void _free(self) noexcept
