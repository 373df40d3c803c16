# Per-address rate limits: a bounded GCRA table shared by the workers.

# ---- rate limits

# mix64 (murmur3's finaliser) is hashing.pxi's: both spread similar keys apart.


cdef inline uint32_t rate_chain(const RateTable *t, const uint8_t *key) noexcept nogil:
    cdef Addr128 a = addr_load(key)
    return <uint32_t>(mix64(mix64(a.hi ^ t.seed0) ^ a.lo ^ t.seed1) & t.mask)


cdef uint32_t rate_find(RateTable *t, uint32_t c, const uint8_t *key) noexcept nogil:
    # Returns: the entry holding key, or RATE_NIL.
    cdef uint32_t i = t.chains[c]
    while i != RATE_NIL and memcmp(t.entries[i].key, key, 16) != 0:
        i = t.entries[i].hnext
    return i


cdef void rate_unlink(RateTable *t, uint32_t i) noexcept nogil:
    # Takes entry i off the recency list.
    cdef RateEntry *e = &t.entries[i]
    if e.newer != RATE_NIL:
        t.entries[e.newer].older = e.older
    else:
        t.newest = e.older
    if e.older != RATE_NIL:
        t.entries[e.older].newer = e.newer
    else:
        t.oldest = e.newer


cdef void rate_push_newest(RateTable *t, uint32_t i) noexcept nogil:
    cdef RateEntry *e = &t.entries[i]
    e.newer = RATE_NIL
    e.older = t.newest
    if t.newest != RATE_NIL:
        t.entries[t.newest].newer = i
    else:
        t.oldest = i
    t.newest = i


cdef void rate_unhash(RateTable *t, uint32_t i) noexcept nogil:
    # Takes entry i out of its hash chain (chains are about one long).
    cdef uint32_t *p = &t.chains[rate_chain(t, t.entries[i].key)]
    while p[0] != i:
        p = &t.entries[p[0]].hnext
    p[0] = t.entries[i].hnext


cdef uint32_t rate_claim(RateTable *t, uint32_t c, const uint8_t *key) noexcept nogil:
    # Returns: an entry for a new key, linked in: a never used one while
    # any is left, else the least recently seen one, forgotten.
    cdef uint32_t i
    if t.used < t.capacity:
        i = t.used
        t.used += 1
    else:
        i = t.oldest
        rate_unlink(t, i)
        rate_unhash(t, i)
    memcpy(t.entries[i].key, key, 16)
    t.entries[i].hnext = t.chains[c]
    t.chains[c] = i
    rate_push_newest(t, i)
    return i


cdef int rate_take(RateTable *t, const uint8_t *addr16, int64_t now_ns) noexcept nogil:
    # Returns: 1 allowed (a token taken), 0 limited. A bucket is a GCRA
    # timestamp: a new client starts full (tat = now), each token moves
    # tat one interval on, and tat may run at most burst_ns ahead of now.
    cdef uint32_t c, i
    cdef int64_t tat
    cdef int ok = 0
    pthread_mutex_lock(&t.lock)
    c = rate_chain(t, addr16)
    i = rate_find(t, c, addr16)
    if i == RATE_NIL:
        i = rate_claim(t, c, addr16)
        t.entries[i].tat = now_ns
    else:
        rate_unlink(t, i)
        rate_push_newest(t, i)
    tat = t.entries[i].tat
    if tat < now_ns:
        tat = now_ns
    if tat - now_ns <= t.burst_ns:
        t.entries[i].tat = tat + t.interval_ns
        ok = 1
    pthread_mutex_unlock(&t.lock)
    return ok


cdef uint32_t pow2_at_least(uint32_t n) noexcept nogil:
    cdef uint32_t p = 1
    while p < n:
        p <<= 1
    return p


cdef class RateLimiter:
    """Per-client token buckets: `count` tokens, refilled `count` per
    `period_seconds`, for at most `rate_limit_table` clients (the least recently
    seen is forgotten: it comes back with a full bucket). The engine calls
    rate_take(&limiter.table, ...) from any worker; the table locks itself."""

    cdef RateTable table
    cdef bint ready
    cdef readonly long count
    cdef readonly double period

    def __cinit__(self):
        memset(&self.table, 0, sizeof(RateTable))
        self.ready = False

    def __init__(self, long count, double period_seconds, long rate_limit_table=65536):
        cdef int64_t period_ns
        cdef uint32_t nchains, i
        if self.ready:
            raise RuntimeError("a RateLimiter is initialised once")
        if count < 1 or rate_limit_table < 1 or rate_limit_table > (1 << 30):
            raise ValueError("count >= 1 and 1 <= rate_limit_table <= 2**30 required")
        if not 1e-9 <= period_seconds < RATE_MAX_PERIOD_NS / 1e9:
            raise ValueError(f"period {period_seconds!r}s is out of range")
        period_ns = <int64_t>(period_seconds * 1e9)
        self.count = count
        self.period = period_seconds
        self.table.interval_ns = max(1, period_ns // count)
        self.table.burst_ns = (count - 1) * self.table.interval_ns
        seeds = _os.urandom(16)
        self.table.seed0 = int.from_bytes(seeds[:8], "little")
        self.table.seed1 = int.from_bytes(seeds[8:], "little")
        nchains = pow2_at_least(<uint32_t>rate_limit_table)
        self.table.entries = <RateEntry *>calloc(rate_limit_table, sizeof(RateEntry))
        self.table.chains = <uint32_t *>malloc(nchains * sizeof(uint32_t))
        if self.table.entries == NULL or self.table.chains == NULL:
            raise MemoryError()
        for i in range(nchains):
            self.table.chains[i] = RATE_NIL
        self.table.mask = nchains - 1
        self.table.capacity = <uint32_t>rate_limit_table
        self.table.newest = RATE_NIL
        self.table.oldest = RATE_NIL
        if pthread_mutex_init(&self.table.lock, NULL) != 0:
            raise MemoryError()
        self.ready = True

    def take(self, ip, int64_t now_ns):
        """Take a token for `ip` at monotonic time now_ns: True if allowed."""
        cdef uint8_t a[16]
        cdef int r
        if not self.ready:
            raise RuntimeError("RateLimiter not initialised")
        addr16_from_py(ip, a)
        with nogil:
            r = rate_take(&self.table, a, now_ns)
        return r == 1

    def entries(self):
        """How many clients the table remembers (at most rate_limit_table)."""
        cdef uint32_t n
        if not self.ready:
            return 0
        with nogil:
            pthread_mutex_lock(&self.table.lock)
            n = self.table.used
            pthread_mutex_unlock(&self.table.lock)
        return n

    @property
    def rate_limit_table(self):
        return self.table.capacity

    def __dealloc__(self):
        if self.ready:
            pthread_mutex_destroy(&self.table.lock)
        free(self.table.entries)
        free(self.table.chains)
