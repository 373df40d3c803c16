# C-level structures of access control (IP rules, rate limits, PROXY
# protocol). Addresses are 16 bytes everywhere: IPv4 as IPv4-mapped IPv6
# (::ffff:a.b.c.d), so one table serves both families and mapped clients
# match IPv4 rules. The functions live in access.pxi.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from .system cimport pthread_mutex_t


# A 128-bit address as two host-order halves: compares as integers.
cdef struct Addr128:
    uint64_t hi
    uint64_t lo


# Inclusive range of addresses; a CIDR is one range.
cdef struct AclRange:
    Addr128 first
    Addr128 last


# Sorted, disjoint, non-adjacent ranges: a lookup is one binary search.
cdef struct AclSet:
    AclRange *ranges
    size_t n


# Read-only once built, so workers share it without locking.
cdef struct AclTable:
    AclSet allow        # empty: every client not denied is admitted
    AclSet deny


# One client's bucket, kept as GCRA (an exact token bucket): `tat` is when
# the bucket will be full again; tat <= now means full.
cdef struct RateEntry:
    uint8_t key[16]
    int64_t tat
    uint32_t hnext      # next entry in the same hash chain, RATE_NIL ends
    uint32_t newer      # recency list: towards the most recently seen
    uint32_t older


# Bounded: `capacity` entries preallocated, the least recently seen one is
# reused when full. Shared by the workers, so every operation holds `lock`.
cdef struct RateTable:
    pthread_mutex_t lock
    int64_t interval_ns     # one token's worth of time: period / count
    int64_t burst_ns        # period - interval: how far tat may run ahead
    uint64_t seed0          # hash keys, random: clients cannot aim at one chain
    uint64_t seed1
    RateEntry *entries
    uint32_t *chains        # heads of the hash chains
    uint32_t mask           # number of chains - 1 (a power of two)
    uint32_t capacity
    uint32_t used
    uint32_t newest
    uint32_t oldest


# What a PROXY header said. `family` is AF_INET (the header was TCP4) or
# AF_INET6 (TCP6); 0 with is_local = 1 when the peer's own address counts
# (v2 LOCAL, v2 UNSPEC or UNIX, v1 UNKNOWN). Ports in host order.
cdef struct ProxyInfo:
    uint8_t is_local
    uint8_t version
    int family
    uint8_t src[16]
    uint8_t dst[16]
    uint16_t src_port
    uint16_t dst_port
