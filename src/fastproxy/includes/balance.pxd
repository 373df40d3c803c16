# C structures of an upstream group and of balancing over it. Declarations
# only: the functions are in balancer.pxi. A group's block (GroupC) is
# reference counted: the UpstreamGroup object, the engine's current pointer
# and each bridge bridged with it hold one; each worker owns one cursor,
# built for the group it last saw.

from libc.stdint cimport int64_t, uint8_t, uint64_t
from .system cimport sockaddr_storage, socklen_t


cdef enum:  # algorithms, in the order of BALANCE_ALGORITHMS
    BAL_ROUNDROBIN = 0
    BAL_LEASTCONN = 1
    BAL_RANDOM = 2
    BAL_SOURCE = 3
    BAL_FIRST = 4

cdef enum:  # what balance_acquire returns when it finds no upstream
    BALANCE_NONE = -1    # none up (down, drained, or already tried)
    BALANCE_FULL = -2    # some are up but at their max_connections: waiting helps

cdef enum:  # UpstreamState.admin, set by the control plane at run time
    ADMIN_READY = 0      # takes clients as its health allows
    ADMIN_DRAIN = 1      # no new clients; live bridges go on; health still checked
    ADMIN_MAINT = 2      # as drain, and reported as in maintenance


# What the configuration says about one upstream; never changes (the
# weight balancing reads is UpstreamState.weight, which starts as this one).
cdef struct UpstreamSpec:
    int weight               # 0-256 as configured; 0 = drained: no new clients
    uint8_t backup           # used only when no regular upstream is
    int64_t max_connections  # 0 = no limit


# What every worker sees of one upstream, read and written with atomics.
# Eight words, one cache line: workers hitting neighbouring upstreams do not
# contend on each other's counters.
cdef struct UpstreamState:
    int64_t active           # slots held: bridges connecting or live
    int64_t peak_active
    int64_t accepted         # slots ever taken: clients sent to it
    int64_t fails            # consecutive connect failures
    int64_t down_until_ns    # passive health: skipped until then (0 = up)
    int64_t health           # active checks' verdict: 1 up, 0 down
    int64_t admin            # ADMIN_*: the control plane's say
    int64_t weight           # 0-256, what balancing uses: the spec's until changed at run time


cdef struct UpstreamAddr:
    sockaddr_storage sa
    socklen_t salen
    int family


# Where an upstream is: its resolved addresses, tried in order.
cdef struct UpstreamAddrs:
    UpstreamAddr *addrs
    int naddrs


# Counters of one upstream that one worker writes (read with relaxed loads).
cdef struct UpstreamCounters:
    uint64_t bytes_upstream
    uint64_t bytes_downstream
    uint64_t connect_failures


cdef struct GroupC:
    int64_t refs             # atomic; freed by whoever drops the last
    int64_t bridges          # atomic: live bridges bridged with this group
    int algorithm
    int n
    UpstreamSpec *spec
    UpstreamState *state
    UpstreamAddrs *addrs     # per upstream
    char **names             # per upstream, "host:port" as configured
    UpstreamCounters *ctr    # [worker * n + upstream], sized when attached
    int nworkers             # 0 until attached to an engine
    # source: sorted points, (hash << 32) | upstream index; weight points
    # per upstream, hashed from its address so rebuilding a group without
    # one upstream keeps every other client where it was.
    uint64_t *ring
    int ring_len
    int64_t max_fails        # 0 = passive health off
    int64_t fail_timeout_ns
    int64_t changes          # bumped at each up/down transition (atomic)
    int64_t generation       # the engine's group generation it was attached at


# One worker's private balancing state: no sharing, no atomics.
cdef struct BalanceCursor:
    int n
    int64_t *current         # smooth weighted round-robin, per upstream
    int rr                   # leastconn: where the tie-breaking scan starts
    uint64_t rng             # xorshift64* state, never 0
    uint8_t *skip            # scratch of one acquire: bitmap of upstreams passed over
    uint8_t full             # scratch: an upstream was passed over for its limit
