# C-level structures of the data plane. Everything here is touched by worker
# threads without the GIL; the DataPlane class is the only Python-facing part.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from .includes.access cimport AclTable, RateTable
from .includes.balance cimport BalanceCursor, GroupC, UpstreamAddr, UpstreamCounters, UpstreamState
from .includes.sockmap cimport fp_sm
from .includes.system cimport (epoll_event, fp_sem_t, pollfd, pthread_cond_t, pthread_mutex_t,
                               sockaddr_storage, socklen_t)


cdef enum:
    ENGINE_EPOLL = 0
    ENGINE_POLL = 1
    ENGINE_KERNEL = 2    # epoll, plus established bridges forwarded in the kernel

# Why a bridge ended. Cython exposes the named enums below to Python as
# IntEnum classes (_core.CloseReason is fastproxy.CloseReason): the one
# definition of these numbers.
cpdef enum CloseReason:
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
    HOOK_TIMEOUT = 11     # a hook call was not answered within hook_timeout
    ADMIN_CLOSED = 12     # the control plane closed it (DataPlane.close_bridge)
    TOXIC_CLOSED = 13     # a toxic ended it (limit_data, timeout, reset_peer): a fault, not a real close

cdef enum:
    CLOSE_NONE = 0        # not a reason a bridge ends with: not in CloseReason

# Bridge states, in the order a bridge goes through them.
cdef enum:
    B_HEADER = 0          # waiting for the client's PROXY protocol header
    B_QUEUED = 1          # waiting for a free slot (global or upstream)
    B_HOOK = 2            # waiting for on_connect
    B_CONNECTING = 3
    B_ACTIVE = 4
    B_CLOSED = 5
    B_HELLO = 6           # waiting for the client's TLS ClientHello (after admission)

# Timer lists. Each holds one duration, so appending keeps it sorted; a
# bridge sits on at most one list per slot (SLOT_OF in worker.pxi).
cdef enum:
    T_NONE = 0
    T_CONNECT = 1
    T_HALF_CLOSE = 2
    T_IDLE = 3
    T_LIFETIME = 4
    T_QUEUE = 5
    T_HEADER = 6
    T_HOOK = 7            # the earliest unanswered hook call's deadline
    T_HELLO = 8           # route_timeout: the ClientHello's deadline
    T_LISTS = 9
    T_SLOTS = 4           # links in Bridge.tl; SLOT_HOOK (4) is Bridge.hk.tl

# Which hooks the control plane registered (Shared.hooks bits).
cpdef enum HookBit:
    HOOK_CONNECT = 1
    HOOK_DATA_UP = 2
    HOOK_DATA_DOWN = 4
    HOOK_RECORDS = 8      # on_close or the access log

# Hook answers.
cpdef enum Verdict:
    V_PROCEED = 0
    V_REFUSE = 1
    V_ERROR = 2
    V_ROUTE = 3           # to a configured upstream, or to HookResult.route
    V_PASS = 4            # forward the chunk unchanged
    V_REPLACE = 5         # forward HookResult.buf instead
    V_WAIT = 6            # hold the chunk, call again with more
    V_CLOSE = 7

# The choices of the on_limit and reject_with options.
cdef enum:
    ON_LIMIT_QUEUE = 0
    ON_LIMIT_REJECT = 1

cdef enum:
    REJECT_CLOSE = 0      # FIN
    REJECT_RESET = 1      # RST

cpdef enum EventKind:
    EVT_CONNECT = 0
    EVT_DATA = 1

cdef enum:
    EVT_RETRY = 2         # worker to worker: a slot was freed, a queued bridge tries again

# The calls a bridge can have out at once, one of each: on_connect, then
# on_data per direction. Bridge.calls is indexed by these.
cdef enum:
    CALL_CONNECT = 0
    CALL_UP = 1
    CALL_DOWN = 2
    CALLS = 3


cdef struct Bridge
cdef struct Worker

cdef struct TimerLink:
    Bridge *prev
    Bridge *next
    int64_t deadline_ns
    uint8_t list


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
    uint8_t hook         # each chunk goes through on_data first
    uint8_t waiting      # on_data has the chunk: read nothing until it answers
    uint8_t held         # on_data said WAIT: buf[0:len] waits for more
    uint8_t then         # V_CLOSE or V_ERROR: close once buf is sent
    uint32_t hold_at     # buf[hold_at:len] waits for more once buf[off:hold_at] is sent
    uint8_t bulk         # a read filled the buffer: splice from now on
    uint8_t src_hup      # src sent FIN (an event said so): read until EOF
    uint8_t cut          # the last read from src may have stopped inside an skb
    char *lent           # the buffer on_data is looking at
    uint64_t bytes


# A hook call a bridge has out. (Bridge.id, seq) names it for its answer:
# ids are never reused and seq grows per call, so an answer whose pair does
# not match a call out is stale (or forged) and is ignored.
cdef struct HookCall:
    uint32_t seq         # 0: no call out
    uint8_t expired      # past hook_timeout: its answer is stale, but frees the bridge
    int64_t due_ns


# What a bridge needs only once it makes a hook call, allocated then (most
# bridges of most listeners make none, and an idle bridge's size is the
# proxy's memory per connection): its calls, its link in Worker.calls, and
# its link in the T_HOOK timer list.
cdef struct HookCalls:
    uint32_t seq         # the last call's seq
    HookCall call[3]     # CALLS
    Bridge *next         # Worker.calls hash chain
    TimerLink tl         # SLOT_HOOK: the earliest call's deadline


cdef struct ListenerC
cdef struct ListenerSlot


# Toxics (toxics.pxi): faults a listener injects into its bridges. A set is
# built by the control plane from the listener's list, immutable once
# published, and reference counted (the listener's current one, plus each
# bridge's).
cdef enum ToxicKind:
    TX_LATENCY = 0
    TX_BANDWIDTH = 1
    TX_SLOW_CLOSE = 2
    TX_TIMEOUT = 3
    TX_RESET_PEER = 4
    TX_SLICER = 5
    TX_LIMIT_DATA = 6

cdef struct ToxicC:
    uint32_t id           # stable across updates of this toxic: its draw is kept
    uint8_t kind          # TX_*
    uint8_t stream        # 0: upstream (client -> server), 1: downstream
    uint64_t threshold    # applies when a 32-bit draw is below it (2**32: always, 0: never)
    int64_t a             # latency/slow_close/timeout/reset_peer: ns; bandwidth: bytes/s;
                          # slicer: average size; limit_data: bytes
    int64_t b             # latency: jitter ns; slicer: size variation
    int64_t c             # slicer: delay ns

cdef struct ToxicSet:
    int64_t refs          # atomic
    int n
    ToxicC *t


# One toxic of a bridge's set as that bridge drew it.
cdef struct ToxicPick:
    uint32_t id
    uint8_t on            # the draw said it applies
    int64_t since_ns      # when it first applied (timeout); reset_peer: when its stream's first bytes came (0: not yet)
    uint64_t base         # limit_data: the flow's written bytes then; reset_peer: its read bytes


# Latency stamps: bytes read up to `end` (a flow's running count) may be
# written from `release_ns` on.
cdef struct ToxicStamp:
    uint64_t end
    int64_t release_ns


# A stream's toxic state in one bridge: what its applied toxics add up to,
# and their running state.
cdef struct ToxicFlow:
    int64_t latency_ns    # 0: none
    int64_t jitter_ns
    int64_t rate          # bytes/s; 0: none
    double tokens
    double burst
    int64_t refill_ns
    int64_t slice_avg     # 0: no slicer
    int64_t slice_var
    int64_t slice_delay_ns
    int64_t next_ns       # slicer: no write before
    int64_t fin_delay_ns  # slow_close; -1: none
    int64_t fin_due_ns    # slow_close: when the FIN may go (0: not yet asked)
    uint8_t hold          # timeout toxic or pause: forward nothing
    uint8_t paused        # pause_bridge
    uint8_t limited       # a limit_data toxic applies
    uint64_t rd           # bytes read into the flow (or answered by on_data) since the state began
    uint64_t wr           # bytes written out of it
    uint64_t released     # latency: bytes before the first stamp, free to go
    ToxicStamp *ring      # latency stamps (TOXIC_RING), or NULL
    int rhead
    int rcount
    int64_t wake_ns       # the last step was held until then (0: not by time)


# What a bridge with toxics (or a paused stream) keeps: allocated only then,
# so a bridge without costs one pointer.
cdef struct ToxicState:
    ToxicSet *set         # a reference, or NULL (a pause without toxics)
    ToxicPick *picks      # set.n of them
    ToxicFlow flow[2]     # upstream, downstream
    int heap_at           # index in Worker.theap, -1: not on it
    int64_t due_ns


cdef struct Bridge:
    uint64_t id
    ListenerC *ls         # its listener (a reference, dropped when the bridge is freed)
    int cfd
    int ufd
    uint8_t state
    uint8_t copy         # this bridge copies instead of splicing
    # Edge-triggered readiness, cleared when a call meets EAGAIN.
    uint8_t c_rd
    uint8_t c_wr
    uint8_t u_rd
    uint8_t u_wr
    uint8_t reason       # CloseReason
    uint8_t client_v4    # the client came over IPv4 (client_ip is mapped)
    uint16_t client_port
    uint8_t client_ip[16]
    uint8_t *hdr         # a PROXY header's first part, taken off the socket
    uint8_t *hello       # the ClientHello's server name and ALPN (sni.pxi), or NULL
    int route_id         # its route (1..), 0: the listener's default group
    uint16_t hello_need  # bytes the ClientHello needs before it is parsed again
    uint8_t hello_lowat  # SO_RCVLOWAT was raised on the client socket
    uint16_t hdr_len
    uint8_t has_dst      # dst_* came from a PROXY header
    uint16_t dst_port
    uint8_t dst_ip[16]
    int hook_pending     # answers not received yet: keeps the bridge allocated
    HookCalls *hk        # from its first hook call until it is freed: in Worker.calls
    int worker
    uint8_t admitted     # holds a slot of the global limit (and counts in `active`)
    uint8_t ip_counted   # counted in the per-IP table
    uint8_t up_slot      # holds a slot on `upstream` (balance_release it)
    uint8_t routed       # counts in ListenerC.routed.active (a route outside the group)
    uint8_t in_queue     # on the wait queue (guarded by WaitQueue.mu)
    uint8_t kicked       # a retry is on its way (guarded by WaitQueue.mu)
    uint8_t poll_dirty   # poll engine: on Worker.poll_dirty, its entries to be synced
    int tries            # upstreams tried so far
    uint8_t *tried       # bitmap of failed upstreams, allocated on the first failure
    Bridge *wprev
    Bridge *wnext
    # The group the bridge was bridged with (a reference, taken when it
    # first picks and moved when a retry picks from a newer group) and its
    # upstream there; a swap leaves both alone.
    GroupC *group
    int upstream         # index into group, -1 if none (yet)
    UpstreamCounters *uc # the upstream's (or routed) counters of this worker
    int addr             # which address is being tried
    UpstreamAddr *route  # on_connect chose an address outside the group
    int nroute
    int slot             # index in Worker.bridges
    int poll_at[2]       # poll engine: 1 + index of the client's / upstream's entry in Worker.pfds' bridge part; 0: none
    Bridge *poll_next    # poll engine: next on Worker.poll_dirty
    int64_t accepted_ns
    # Timings (timings.pxi), from the worker's loop clock: 16 bytes, since
    # an idle bridge's size is the proxy's memory per connection.
    int64_t connect_start_ns  # the connect to the address being tried began
    uint32_t queue_us     # left the wait queue, after accept (0: never waited)
    uint32_t connect_us   # established - connect_start_ns (once B_ACTIVE)
    TimerLink tl[4]      # T_SLOTS; SLOT_HOOK's link is in hk
    int64_t last_active_ns
    # Kernel engine: kern, its sockets are in the sockmap at slots kslot
    # (client) and kslot + 1 (upstream); knever, it cannot join (stays on
    # the splice path); on Worker.kwait (kprev/knext) while user space
    # waits for the kernel to pass bytes on; kseen, bytes forwarded at the
    # last idle check.
    uint8_t kern
    uint8_t knever
    uint8_t kwaiting
    uint32_t kslot
    Bridge *kprev
    Bridge *knext
    uint64_t kseen
    uint64_t kfolded[2]  # forwarded bytes already in the byte counters (kern_fold)
    Bridge *grave_next
    Flow up              # client -> upstream
    Flow down            # upstream -> client
    ToxicState *tx       # toxics.pxi: NULL unless a toxic or a pause is on it


# Counters a single worker writes (read by stats() with relaxed loads).
cdef struct Counters:
    uint64_t accepted
    uint64_t connect_failures
    uint64_t bytes_upstream
    uint64_t bytes_downstream
    uint64_t fd_exhausted
    uint64_t rejected
    uint64_t queue_timeouts
    uint64_t denied
    uint64_t rate_limited
    uint64_t outside_window
    uint64_t proxy_header_errors
    uint64_t hook_refused     # on_connect said refuse
    uint64_t hook_calls       # hook calls made (on_connect and on_data)
    uint64_t route_refused    # no route and no default group (or not TLS, with route_non_tls reject)
    uint64_t route_timeouts   # no whole ClientHello within route_timeout
    uint64_t route_aborted    # FIN or reset before the whole ClientHello
    uint64_t no_memory        # bridges ended (or clients refused) for want of memory


# A worker's own loop, written by that worker only (DataPlane.stats()
# reads them with relaxed loads): where its time goes when it is busy.
cdef struct LoopCounters:
    uint64_t iterations   # rounds of the loop (one wait each)
    uint64_t events       # ready events (epoll) or fds (poll) handled
    uint64_t wakeups      # woken through its wake pipe (control plane, results)
    uint64_t accept_calls # accept4() calls, including the one that met EAGAIN


# Counters every worker updates atomically.
cdef struct Gauges:
    int64_t active
    int64_t peak_active
    int64_t dropped_records
    int64_t hook_timeouts
    int64_t stale_answers


# Clients waiting for a slot, oldest first, across all workers.
cdef struct WaitQueue:
    pthread_mutex_t mu
    Bridge *head
    Bridge *tail
    int64_t count
    int64_t kicked        # retries handed out and not yet run


# Live bridges per client address, for the per-IP limit.
cdef struct IpEntry:
    uint8_t key[16]
    int64_t count
    int next             # hash chain, or free list; -1 ends


cdef struct IpTable:
    pthread_mutex_t mu
    IpEntry *entries
    int *chains
    int nchains
    int free_head


# A hook call handed from a worker to the hook threads: all they need, so
# that they never read a Bridge.
cdef struct HookEvent:
    uint8_t kind
    uint8_t call         # CALL_*
    int worker
    int listener         # ListenerC.id: whose hooks to call
    uint64_t id
    uint32_t seq
    char *buf            # the lent buffer: valid until the call is answered
    uint32_t len
    uint32_t held        # buf[0:held] was held by WAIT: joined to the first chunk
    uint8_t client_v4
    uint16_t client_port
    uint8_t client_ip[16]
    int64_t accepted_ns
    int route            # CALL_CONNECT: the bridge's route (0: the default group)
    uint8_t *hello       # CALL_CONNECT: a copy of Bridge.hello (the event's, freed with it), or NULL


# A hook's answer, handed back to the bridge's worker, which looks the call
# up by (id, seq). Only EVT_RETRY, made by workers, carries a Bridge.
cdef struct HookResult:
    Bridge *bridge        # EVT_RETRY only
    uint64_t id
    uint32_t seq
    uint8_t call          # CALL_*
    uint8_t kind
    uint8_t dir
    uint8_t verdict
    uint8_t then          # V_CLOSE or V_ERROR: close once the answer is sent
    int upstream
    char *buf             # V_REPLACE: what to send
    uint32_t len          # V_REPLACE: of buf; V_PASS: of the lent buffer, kept from its front
    uint32_t cap
    uint32_t hold         # the last `hold` bytes kept wait for more (WAIT)
    UpstreamAddr *route
    int nroute
    GroupC *group         # V_ROUTE to an upstream: the group `upstream` indexes (a reference)


# What on_close and the access log learn of a bridge.
cdef struct CloseRecordC:
    uint64_t id
    int listener         # ListenerC.id
    uint8_t client_ip[16]
    uint16_t client_port
    uint8_t client_v4
    uint8_t reason
    uint8_t connected
    GroupC *group         # a reference while the record waits, or NULL
    int upstream
    UpstreamAddr route
    uint64_t bytes_upstream
    uint64_t bytes_downstream
    int64_t accepted_ns
    int64_t closed_ns
    int64_t queue_ns     # time in the wait queue (0: never waited)
    int64_t connect_ns   # time to connect to the upstream that took it; -1: never connected
    uint8_t *hello       # the bridge's Bridge.hello, handed over (the record's, freed with it)


cdef struct HookQueue:
    pthread_mutex_t mu
    fp_sem_t wake        # one post per sleeper claimed (hook_claim)
    HookEvent *items
    int head
    int count
    int cap
    int closed
    # Wake-ups cost two context switches a call, so a hook thread that has
    # just answered takes the next call itself and a sleeping one is woken
    # only when no thread is on its way (see hooks.pxi).
    int idle             # hook threads asleep and not yet signalled
    int signalled        # posts not yet taken by a waking thread
    int nslots           # hook threads: one busy_ns slot each
    int64_t *busy_ns     # when each thread took its call; 0 while it sleeps
    int64_t backlog      # count while a thread sleeps, else 0 (hook_publish)


cdef struct RecordRing:
    pthread_mutex_t mu
    pthread_cond_t cv
    CloseRecordC *items
    int head
    int count
    int cap
    int closed


cdef struct ResultQueue:
    pthread_mutex_t mu
    HookResult *items
    int count
    int cap
    # Waiters a freed slot was handed to (limits.pxi queue_kick), linked
    # by their wnext (free once off the wait queue), newest first: a kick
    # allocates nothing, so no waiter is lost for want of memory.
    Bridge *retries


# A histogram over fixed bounds (timings.pxi): counts per bucket (the last
# is +Inf) and the sum of what was counted. One writer (a worker), relaxed
# stores; stats() adds the workers' up.
cdef enum:
    HIST_MAX = 20         # buckets, +Inf included

cdef struct Histogram:
    uint64_t counts[20]   # HIST_MAX
    uint64_t sum_ns


# What a worker keeps of one listener; written by that worker only (stats()
# reads the counters with relaxed loads).
cdef struct ListenerSlot:
    Counters ctr
    Histogram connect_hist    # upstream connect times
    Histogram duration_hist   # bridges' lives, accept to close
    UpstreamCounters routed   # on_connect routes outside the group
    BalanceCursor cursor
    GroupC *group         # the group `cursor` is built for
    int64_t group_gen     # ListenerC.group_gen it was built at
    int64_t seen_close    # ListenerC.cmd_close done
    uint8_t listening     # the socket is in this worker's set
    uint8_t *scratch      # PROXY headers are peeked into it
    ToxicSet *toxics      # the set this worker synced to (the listener holds its reference)
    int64_t toxic_gen     # ListenerC.toxic_gen it synced to
    # Timer lists, one per duration of this listener, ordered by deadline.
    Bridge *thead[9]      # T_LISTS
    Bridge *ttail[9]
    # Route groups (route i at i - 1) and this worker's cursors for them,
    # rebuilt with `cursor` when group_gen moves.
    GroupC **rgroup
    BalanceCursor *rcursor


# A listener's server names (sni.pxi): open addressing, hashed with FNV-1a
# and mix64; built by the control plane, read-only after.
cdef struct RouteEntry:
    uint64_t hash
    uint32_t off          # the name in RouteTable.pool
    uint32_t len
    int route             # 1..nroutes; 0: an empty slot


cdef struct RouteTable:
    uint32_t mask         # slots - 1 (a power of two, at most half full)
    RouteEntry *exact     # "a.example"
    RouteEntry *wild      # "*.b.example", kept as "b.example"
    int nwild             # 0: no wildcard to look for
    char *pool


# One listener: its socket and everything a listener configures (upstream
# group, limits, access rules, timeouts, PROXY protocol, hooks) and counts.
# Read-only once published in Shared.listeners, except the atomics, the
# queues and what the control plane swaps under a new Shared.gen.
cdef struct ListenerC:
    int id               # its index in Shared.listeners, named by hook events and records
    int listen_fd
    int hooks            # HOOK_* bits
    int64_t refs         # atomic: the control plane's, plus one per bridge not yet freed
    int64_t closing      # atomic: stop accepting (removed from the configuration)
    int64_t cmd_close    # atomic generation: close every bridge of this listener
    int64_t close_reason # atomic: the CloseReason they close with
    bint nodelay_inherited   # accepted sockets got TCP_NODELAY (and TCP_NOTSENT_LOWAT) from the listener
    int notsent_lowat        # TCP_NOTSENT_LOWAT for both sockets of a bridge; 0: off
    int socket_buffer        # SO_SNDBUF and SO_RCVBUF for both sockets of a bridge; 0: the kernel's;
                             # -N: N on a socket whose peer is a loopback address ("auto")
    char congestion[16]      # TCP_CONGESTION for both sockets of a bridge (TCP_CA_NAME_MAX); "": the host's
    bint congestion_loopback # ... only on a socket whose peer is a loopback address ("auto")
    bint keepalive           # SO_KEEPALIVE on both TCP sockets of a bridge (tcp_keepalive)
    bint keepalive_clients   # ... and its clients are TCP (not a Unix listener's)
    int keepalive_idle       # TCP_KEEPIDLE, TCP_KEEPINTVL (seconds), TCP_KEEPCNT; 0: the kernel's
    int keepalive_interval
    int keepalive_count
    unsigned int user_timeout_ms   # TCP_USER_TIMEOUT on both TCP sockets of a bridge; 0: none
    int64_t connect_timeout_ns
    int64_t half_close_timeout_ns
    int64_t idle_timeout_ns       # 0: none
    int64_t max_lifetime_ns       # 0: none
    int max_hold
    # The current toxic set (one reference; NULL: none), swapped like
    # `group` under toxic_gen: workers move their live bridges to it.
    ToxicSet *toxics
    int64_t toxic_gen
    int64_t hook_timeout_ns   # 0: hook calls have no deadline
    # The current upstream group (one reference), swapped by the control
    # plane; a worker rereads it when group_gen moves (worker_sync).
    GroupC *group         # NULL: none (route sni without upstreams)
    int64_t group_gen
    # Routing by TLS server name: the route table, and each route's group
    # (route i at i - 1, each one reference, swapped like `group`).
    uint8_t sni
    uint8_t reject_non_tls    # route_non_tls reject: no name, no default
    int64_t route_timeout_ns
    RouteTable *routes
    int nroutes
    GroupC **route_groups
    int *route_retries
    UpstreamState routed          # on_connect routes outside the group (atomic gauges)
    int retries          # other upstreams to try after a failed connect; -1: all of the group's
    int64_t max_connections
    int64_t max_connections_per_ip    # 0: no per-IP limit
    uint8_t on_limit      # ON_LIMIT_*
    int64_t queue_size
    int64_t queue_timeout_ns
    WaitQueue wait
    IpTable ips
    # access control
    AclTable *acl             # NULL: every client
    RateTable *rate           # NULL: no rate limit
    int64_t admit_open        # time windows: 0 refuses new clients (atomic)
    uint8_t reject_with       # REJECT_*: how refused clients are closed
    uint8_t send_proxy        # PROXY protocol version to send upstream, 0: none
    uint8_t accept_proxy
    AclTable *accept_proxy_from      # who may send a PROXY header; NULL: anyone
    int proxy_header_max
    int64_t proxy_header_timeout_ns
    Gauges gauges
    Shared *sh
    ListenerSlot *slots   # one per worker


cdef enum:
    MAX_LISTENERS = 4096

# Per-bridge commands (DataPlane.bridge_command).
cdef enum:
    BA_CLOSE = 0
    BA_RESET = 1
    BA_HALF_CLOSE = 2
    BA_PAUSE = 3
    BA_RESUME = 4


# One bridge as DataPlane.bridges() shows it: what its worker copied when
# asked (worker_snapshot), so the control plane never reads a Bridge.
cdef struct BridgeInfo:
    uint64_t id
    int listener         # ListenerC.id
    uint8_t state        # B_*
    uint8_t half_closed  # one side sent FIN
    uint8_t paused       # bit 0: upstream paused, bit 1: downstream
    uint8_t ntoxics      # toxics applied (ids in toxic_ids, at most 16 listed)
    uint32_t toxic_ids[16]
    uint8_t client_v4
    uint16_t client_port
    uint8_t client_ip[16]
    GroupC *group        # a reference (the reader drops it), or NULL
    int upstream
    UpstreamAddr route   # family 0: none
    uint64_t bytes_upstream
    uint64_t bytes_downstream
    int64_t accepted_ns


# The process's part: workers, pools, hook queues, and the listeners table.
# Read-only after start, except the gauges, the queues and the table.
cdef struct Shared:
    int engine
    fp_sm sm             # kernel engine: the program and its maps
    uint64_t kbudget     # kernel engine: bytes a peer may hold unacked
    int hooks            # HOOK_* bits of every listener ever added (the loop's "any hooks")
    int pipe_size
    int buf_size
    int hook_read        # a hooked flow reads up to this; on_data sees buf_size slices
    int64_t busy_poll_ns  # keep polling this long after the last event; 0: sleep
    int pool_max         # idle pipes (or buffers) one worker keeps
    int hook_pool_max    # idle hook_read buffers: as many bytes as pool_max buffers
    Worker *workers
    int nworkers
    Gauges gauges        # process-wide: dropped_records, stale_answers
    int64_t next_id
    HookQueue events
    RecordRing records
    # The listeners, by id (NULL: a free id). The control plane stores a
    # pointer, then moves `gen`; a worker that sees a new gen walks the
    # table (worker_sync) and says so in Worker.gen_seen.
    ListenerC *listeners[4096]    # MAX_LISTENERS
    int64_t nlisteners    # ids in use are below this (atomic)
    int64_t gen
    # Commands a worker carries out when it syncs, each a generation bumped
    # with gen (one at a time, under DataPlane._lock): copy your bridges
    # into Worker.snap; act on the bridge called kill_id (kill_action
    # BA_*, on stream kill_stream).
    int64_t cmd_snap
    int64_t cmd_kill
    uint64_t kill_id
    int kill_action
    int kill_stream
    int pipe_max         # /proc/sys/fs/pipe-max-size: a flow under latency grows its pipe to it


cdef struct Worker:
    int id
    Shared *sh
    Bridge *kwait         # kernel engine: bridges re-checked every 1 ms
    uint32_t *kfree       # kernel engine: free slot pairs of this worker (their first slot)
    int nkfree
    int nkern             # kernel engine: bridges offloaded now
    int64_t kfold_ns      # kernel engine: next kern_fold_all, while nkern
    int epfd
    int wake_r
    int wake_w
    # Control plane -> worker: set, then a byte on wake_w.
    int64_t cmd_stop      # a generation: each stop() bumps it
    int64_t drain_ns
    int64_t seen_stop
    ResultQueue results
    # Worker -> control plane.
    int64_t accepting
    uint8_t stopping
    int64_t accept_resume_ns  # out of fds: every listener paused until then
    int64_t last_event_ns  # busy polling: when the loop last had events
    int64_t drain_deadline_ns
    int64_t gen_seen      # atomic: the Shared.gen this worker has synced to
    int64_t seen_snap     # Shared.cmd_snap done
    int64_t seen_kill     # Shared.cmd_kill done
    BridgeInfo *snap      # the control plane's buffer for cmd_snap, snap_cap entries
    int snap_cap
    int snap_len          # entries written
    int snap_total        # bridges the worker had (more than snap_cap: cut)
    int kill_found        # cmd_kill found its bridge here
    int64_t in_loop       # atomic: 1 while in worker_run's loop
    int64_t now_ns        # the loop's clock, read once per wake-up: what timings stamp
    uint8_t *hello_buf    # ClientHellos are peeked into it (and joined: twice HELLO_MAX)
    LoopCounters loop
    uint64_t rng          # xorshift64* state (toxicity draws, jitter, slice sizes)
    # Toxic wake-ups: a binary min-heap of bridges by ToxicState.due_ns
    # (latency release times are arbitrary, unlike the one-duration lists).
    Bridge **theap
    int ntheap
    int cap_theap
    Bridge **bridges
    int nbridges
    int cap_bridges
    Bridge *grave         # closed: freed after the event batch
    Bridge *limbo         # closed, a hook still has them: freed on its answer
    Bridge **calls        # bridges that made a hook call, hashed by id (chained on hk.next)
    int ncalls
    int cap_calls         # a power of two, or 0
    int *pipe_pool        # idle pipes: read end, write end, capacity
    int npipes
    char **buf_pool
    int nbufs
    char **hook_pool      # idle buffers of hook_read bytes
    int nhooks
    epoll_event *events
    # The poll engine's array, kept between waits: pfds[0] the wake pipe,
    # then poll_head - 1 listener entries, then npfds bridge entries
    # (pbridges: the owner of each, its address | 1 for an upstream socket).
    pollfd *pfds
    Bridge **pbridges
    ListenerC **plisteners  # poll: the listener of each listening pfd
    int cap_pfds
    int poll_head
    int npfds
    Bridge *poll_dirty    # bridges whose entries are synced after this wake
    uint8_t poll_refresh  # every bridge's entries are synced before the next wait


cdef class UpstreamGroup:
    cdef GroupC *g
    cdef BalanceCursor cursor
    cdef readonly str algorithm
    cdef readonly tuple names
    cdef readonly tuple upstreams
    cdef readonly dict index
    cdef GroupC *_alloc(self, int n) except NULL
    cdef int _build_ring(self) except -1
    cdef int _attach(self, int nworkers, int64_t generation) except -1
    cdef int _index(self, int i) except -1


cdef class DataPlane

cdef class ListenerHandle:
    cdef ListenerC *c
    cdef DataPlane _plane
    cdef readonly int id
    cdef readonly UpstreamGroup group   # the current one: new clients pick from it (c.group holds its own reference); None: no default group
    cdef readonly list route_groups     # route i's current group at i - 1
    cdef readonly tuple route_names     # route i's name at i - 1
    cdef readonly tuple route_server_names
    cdef object access     # keeps the tables the workers read alive
    cdef object __weakref__
    cdef int _check(self) except -1
    cdef void _kick_all(self) noexcept


cdef class DataPlane:
    cdef Shared sh
    cdef Worker *workers
    cdef int nworkers
    cdef int queues_ready
    cdef readonly str engine
    cdef readonly object kernel_fallback   # engine "kernel" asked, epoll runs: why (one line)
    cdef dict _listeners    # id -> ListenerHandle, until freed
    cdef int next_lid
    cdef object _lock       # one control-plane change at a time
    cdef object _open_sockmap(self, int workers)
    cdef int _init_worker(self, Worker *w, int i) except -1
    cdef ListenerHandle _handle(self, int listener)
    cdef int _publish(self) except -1
    cdef void _free(self) noexcept
    cdef int _answer(self, object handle, HookResult *res) except -1
