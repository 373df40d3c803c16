# Balancing: choosing an upstream of a group for each client and holding a
# slot on it, and passive health. The C functions run on worker threads
# without the GIL. Workers share the group, so what they change in it is
# atomic; what only steers one worker's choices lives in its own cursor.
# Balancer (at the end) owns a group, for the control plane and the tests.

from libc.stdlib cimport qsort
from libc.string cimport memcpy
from posix.stdlib cimport posix_memalign

# The index of a name is its BAL_* value.
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "random", "source", "first")

cdef enum:
    RING_POINTS = 64       # source: ring points per unit of weight

cdef uint64_t XORSHIFT_STAR = 0x2545f4914f6cdd1d


# ---- small helpers: bitmaps, random numbers (hashing is hashing.pxi's)

cdef inline int balance_tried_bytes(int n) noexcept nogil:
    # Size of a `tried` bitmap for a group of n upstreams.
    return (n + 7) >> 3


cdef inline bint bits_has(const uint8_t *bits, int i) noexcept nogil:
    return (bits[i >> 3] >> (i & 7)) & 1


cdef inline void bits_set(uint8_t *bits, int i) noexcept nogil:
    bits[i >> 3] |= <uint8_t>(1 << (i & 7))


cdef inline uint64_t rng_next(BalanceCursor *c) noexcept nogil:
    # xorshift64*: a few cycles, and plenty to choose among upstreams.
    cdef uint64_t x = c.rng
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    c.rng = x
    return x * XORSHIFT_STAR


cdef inline void rng_seed(BalanceCursor *c, uint64_t seed) noexcept nogil:
    c.rng = mix64(seed) or 1    # xorshift never leaves 0


# ---- who may take a client now

cdef int64_t usable(BalanceGroup *g, BalanceCursor *c, int i, int backup,
                    int64_t now) noexcept nogil:
    # Returns: the upstream's active count when it may take a client now,
    # else -1 (setting c.full when its limit is all that stands in the way).
    cdef UpstreamSpec *s = &g.spec[i]
    cdef UpstreamState *st = &g.state[i]
    cdef int64_t active
    if s.backup != backup or s.weight == 0 or bits_has(c.skip, i):
        return -1
    if fp_atomic_get(&st.health) == 0 or fp_atomic_get(&st.down_until_ns) > now:
        return -1
    active = fp_atomic_get(&st.active)
    if s.max_connections and active >= s.max_connections:
        c.full = 1
        return -1
    return active


cdef inline bint lighter(int64_t a_active, int a_weight, int64_t b_active,
                         int b_weight) noexcept nogil:
    # a_active / a_weight < b_active / b_weight, without dividing.
    return a_active * b_weight < b_active * a_weight


# ---- the algorithms: each returns an index or -1, reserving nothing

cdef int pick_roundrobin(BalanceGroup *g, BalanceCursor *c, int backup,
                         int64_t now) noexcept nogil:
    # Smooth weighted round-robin (nginx's): every usable upstream gains its
    # weight, the richest is chosen and pays the total back, so 5/1/1 gives
    # a a b a c a a rather than five a in a row.
    cdef int i, best = -1
    cdef int64_t total = 0
    for i in range(g.n):
        if usable(g, c, i, backup, now) < 0:
            continue
        c.current[i] += g.spec[i].weight
        total += g.spec[i].weight
        if best < 0 or c.current[i] > c.current[best]:
            best = i
    if best >= 0:
        c.current[best] -= total
    return best


cdef int pick_leastconn(BalanceGroup *g, BalanceCursor *c, int backup,
                        int64_t now) noexcept nogil:
    # The scan starts after the last choice, so ties go round-robin.
    cdef int k, i, best = -1
    cdef int64_t a, best_active = 0
    for k in range(g.n):
        i = (c.rr + k) % g.n
        a = usable(g, c, i, backup, now)
        if a >= 0 and (best < 0 or lighter(a, g.spec[i].weight, best_active,
                                           g.spec[best].weight)):
            best = i
            best_active = a
    if best >= 0:
        c.rr = (best + 1) % g.n
    return best


cdef int pick_weighted(BalanceGroup *g, BalanceCursor *c, int backup,
                       int64_t now, int64_t *active) noexcept nogil:
    # One weighted random draw in one pass: each usable upstream replaces
    # the draw with probability weight / (weights seen so far).
    cdef int i, best = -1
    cdef int64_t a, total = 0
    for i in range(g.n):
        a = usable(g, c, i, backup, now)
        if a < 0:
            continue
        total += g.spec[i].weight
        if <int64_t>(rng_next(c) % <uint64_t>total) < g.spec[i].weight:
            best = i
            active[0] = a
    return best


cdef int pick_random(BalanceGroup *g, BalanceCursor *c, int backup,
                     int64_t now) noexcept nogil:
    # Power of two choices: of two weighted draws the lighter wins, the
    # first on a tie, so an idle group follows the weights.
    cdef int64_t a1 = 0, a2 = 0
    cdef int i1 = pick_weighted(g, c, backup, now, &a1)
    cdef int i2
    if i1 < 0:
        return -1
    i2 = pick_weighted(g, c, backup, now, &a2)
    if i2 >= 0 and lighter(a2, g.spec[i2].weight, a1, g.spec[i1].weight):
        return i2
    return i1


cdef int ring_find(BalanceGroup *g, uint32_t h) noexcept nogil:
    # Returns: the first point at or after hash h, wrapping round to 0.
    cdef uint64_t key = (<uint64_t>h) << 32
    cdef int lo = 0, hi = g.ring_len, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if g.ring[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < g.ring_len else 0


cdef int pick_source(BalanceGroup *g, BalanceCursor *c, uint32_t h, int backup,
                     int64_t now) noexcept nogil:
    # The owner of the first ring point after the client's hash or, when it
    # cannot take the client, the next owner along the ring: an upstream
    # going away moves its own clients and no others.
    cdef int k, i, left = 0
    cdef int p
    for i in range(g.n):
        if g.spec[i].backup == backup and g.spec[i].weight > 0 and not bits_has(c.skip, i):
            left += 1
    if left == 0:
        return -1
    p = ring_find(g, h)
    for k in range(g.ring_len):
        i = <int>(g.ring[(p + k) % g.ring_len] & 0xffffffffu)
        if g.spec[i].backup != backup or bits_has(c.skip, i):
            continue
        if usable(g, c, i, backup, now) >= 0:
            return i
        bits_set(c.skip, i)    # its other points need no second look
        left -= 1
        if left == 0:
            break
    return -1


cdef int pick_first(BalanceGroup *g, BalanceCursor *c, int backup,
                    int64_t now) noexcept nogil:
    cdef int i
    for i in range(g.n):
        if usable(g, c, i, backup, now) >= 0:
            return i
    return -1


cdef int pick(BalanceGroup *g, BalanceCursor *c, uint32_t h, int backup,
              int64_t now) noexcept nogil:
    if g.algorithm == BAL_LEASTCONN:
        return pick_leastconn(g, c, backup, now)
    if g.algorithm == BAL_RANDOM:
        return pick_random(g, c, backup, now)
    if g.algorithm == BAL_SOURCE:
        return pick_source(g, c, h, backup, now)
    if g.algorithm == BAL_FIRST:
        return pick_first(g, c, backup, now)
    return pick_roundrobin(g, c, backup, now)


# ---- slots

cdef bint slot_take(UpstreamSpec *s, UpstreamState *st) noexcept nogil:
    # A CAS loop rather than add-then-check: the limit is never exceeded,
    # not even for the instant another worker could see.
    cdef int64_t cur
    if s.max_connections == 0:
        cur = fp_atomic_add(&st.active, 1) - 1
    else:
        cur = fp_atomic_get(&st.active)
        while True:
            if cur >= s.max_connections:
                return 0
            if fp_atomic_cas(&st.active, &cur, cur + 1):
                break
    fp_atomic_max(&st.peak_active, cur + 1)
    return 1


cdef bint probe_claim(BalanceGroup *g, UpstreamState *st, int64_t now) noexcept nogil:
    # An upstream whose fail_timeout ran out gets one client to probe it;
    # the others keep skipping it until that client's connect succeeds.
    cdef int64_t until = fp_atomic_get(&st.down_until_ns)
    if until == 0:
        return 1
    return until <= now and fp_atomic_cas(&st.down_until_ns, &until,
                                          now + g.fail_timeout_ns)


cdef bint reserve(BalanceGroup *g, BalanceCursor *c, int i, int64_t now) noexcept nogil:
    # Returns: 1 with a slot held on upstream i; 0 when another worker took
    # its last slot (c.full set) or its probe first.
    cdef UpstreamState *st = &g.state[i]
    if not slot_take(&g.spec[i], st):
        c.full = 1
        return 0
    if not probe_claim(g, st, now):
        fp_atomic_add(&st.active, -1)
        return 0
    fp_atomic_add(&st.total, 1)
    return 1


cdef int balance_acquire(BalanceGroup *g, BalanceCursor *c, const uint8_t *client16,
                         const uint8_t *tried, int64_t now_ns) noexcept nogil:
    # Chooses an upstream for a client and holds a slot on it, given back
    # with balance_release. client16: the client's address as 16 bytes (IPv4 mapped);
    # tried: bitmap of the upstreams this client already failed on, or NULL.
    # Returns: the upstream's index; BALANCE_FULL when every upstream that is
    # up is at its max_connections (waiting may help); BALANCE_NONE when none
    # is up. Backups are considered only when no regular upstream could be.
    cdef uint32_t h = 0
    cdef int backup, i
    if g.algorithm == BAL_SOURCE:
        h = hash_bytes(FNV_OFFSET, client16, 16)
    if tried != NULL:
        memcpy(c.skip, tried, balance_tried_bytes(g.n))
    else:
        memset(c.skip, 0, balance_tried_bytes(g.n))
    c.full = 0
    for backup in range(2):
        while True:
            i = pick(g, c, h, backup, now_ns)
            if i < 0:
                break
            if reserve(g, c, i, now_ns):
                return i
            bits_set(c.skip, i)   # lost a race for it: choose again
    return BALANCE_FULL if c.full else BALANCE_NONE


cdef void balance_release(BalanceGroup *g, int i) noexcept nogil:
    fp_atomic_add(&g.state[i].active, -1)


# ---- health

cdef inline bint note_change(BalanceGroup *g, bint changed) noexcept nogil:
    if changed:
        fp_atomic_add(&g.changes, 1)
    return changed


cdef int balance_connect_result(BalanceGroup *g, int i, bint ok,
                                int64_t now_ns) noexcept nogil:
    # Passive health: max_fails connect failures in a row mark upstream i
    # down for fail_timeout; a success brings it back.
    # Returns: 1 when this call marked it down or back up (g.changes is
    # bumped too, for the control plane to log), else 0.
    cdef UpstreamState *st = &g.state[i]
    cdef int64_t until
    if ok:
        # Loads before stores: most connects succeed, and a store on each
        # would bounce the cache line between workers.
        if fp_atomic_get(&st.fails) != 0:
            fp_atomic_set(&st.fails, 0)
        until = fp_atomic_get(&st.down_until_ns)
        return until != 0 and note_change(g, fp_atomic_cas(&st.down_until_ns, &until, 0))
    if g.max_fails <= 0 or fp_atomic_add(&st.fails, 1) < g.max_fails:
        return 0
    until = 0
    if note_change(g, fp_atomic_cas(&st.down_until_ns, &until, now_ns + g.fail_timeout_ns)):
        return 1
    fp_atomic_max(&st.down_until_ns, now_ns + g.fail_timeout_ns)   # already down: extend
    return 0


cdef int balance_set_health(BalanceGroup *g, int i, bint up) noexcept nogil:
    # The active health checks' verdict on upstream i.
    # Returns: 1 when it changed (g.changes bumped), else 0.
    cdef int64_t was = fp_atomic_get(&g.state[i].health)
    if was == up:
        return 0
    return note_change(g, fp_atomic_cas(&g.state[i].health, &was, up))


# ---- cursors: one per worker

cdef void balance_cursor_free(BalanceCursor *c) noexcept nogil:
    free(c.current)
    free(c.skip)
    c.current = NULL
    c.skip = NULL


cdef int balance_cursor_init(BalanceGroup *g, BalanceCursor *c) noexcept nogil:
    # Returns: 0, or -ENOMEM with nothing held.
    memset(c, 0, sizeof(BalanceCursor))
    c.n = g.n
    c.current = <int64_t *>calloc(g.n, sizeof(int64_t))
    c.skip = <uint8_t *>calloc(balance_tried_bytes(g.n), 1)
    if c.current == NULL or c.skip == NULL:
        balance_cursor_free(c)
        return -ENOMEM
    # Each worker its own sequence: the cursor's address differs per worker.
    rng_seed(c, <uint64_t><size_t>c ^ <uint64_t>fp_now_ns())
    return 0


cdef int cmp_u64(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t *>a)[0]
    cdef uint64_t y = (<const uint64_t *>b)[0]
    return (x > y) - (x < y)


cdef class Balancer:
    """An upstream group and how clients are spread over it.

    upstreams: fastproxy.Upstream objects or their strings
    ("HOST:PORT[@WEIGHT][,max-connections=N][,backup]"); algorithm: one of
    BALANCE_ALGORITHMS; max_fails consecutive connect failures (0: never)
    mark an upstream down for fail_timeout seconds.

    The data plane shares `self.group` (kept alive by holding this object)
    and gives each worker a cursor (balance_cursor_init). The methods here
    serve the control plane and tests, with a cursor of their own.
    """

    cdef BalanceGroup group
    cdef BalanceCursor cursor
    cdef readonly str algorithm
    cdef readonly tuple names

    def __cinit__(self):
        memset(&self.group, 0, sizeof(BalanceGroup))
        memset(&self.cursor, 0, sizeof(BalanceCursor))

    def __init__(self, upstreams, str algorithm="roundrobin", *, int max_fails=3,
                 double fail_timeout=10.0, seed=None):
        from .upstreams import parse_upstream
        specs = [parse_upstream(u, "upstreams") for u in upstreams]
        if not specs:
            raise ValueError("a balancer needs upstreams")
        if algorithm not in BALANCE_ALGORITHMS:
            raise ValueError(f"unknown balancing algorithm {algorithm!r}")
        if self.group.n:
            raise RuntimeError("a Balancer is built once: workers may share its group")
        self._alloc(len(specs))
        g = &self.group
        g.algorithm = BALANCE_ALGORITHMS.index(algorithm)
        g.max_fails = max(0, max_fails)
        g.fail_timeout_ns = seconds_to_ns(fail_timeout)
        for i, u in enumerate(specs):
            g.spec[i].weight = u.weight
            g.spec[i].backup = u.backup
            g.spec[i].max_connections = u.max_connections or 0
            g.state[i].health = 1
        self.names = tuple(u.address for u in specs)
        self.algorithm = algorithm
        if g.algorithm == BAL_SOURCE:
            self._build_ring()
        if balance_cursor_init(g, &self.cursor) < 0:
            raise MemoryError()
        if seed is not None:
            rng_seed(&self.cursor, <uint64_t>(hash(seed) & 0xffffffffffffffff))

    cdef int _alloc(self, int n) except -1:
        cdef void *state = NULL
        self.group.spec = <UpstreamSpec *>calloc(n, sizeof(UpstreamSpec))
        # Aligned to a cache line, so the padding of UpstreamState works.
        if posix_memalign(&state, 64, n * sizeof(UpstreamState)) == 0:
            self.group.state = <UpstreamState *>state
        if self.group.spec == NULL or self.group.state == NULL:
            raise MemoryError()
        memset(state, 0, n * sizeof(UpstreamState))
        self.group.n = n
        return 0

    cdef int _build_ring(self) except -1:
        # Points hash the address, not the index: a group rebuilt without
        # one upstream keeps every other upstream's points where they were.
        cdef BalanceGroup *g = &self.group
        cdef int i, v, k = 0
        cdef bytes key
        cdef uint64_t base
        cdef uint32_t h
        cdef int points = 0
        for i in range(g.n):
            points += g.spec[i].weight * RING_POINTS
        if points == 0:
            return 0
        g.ring = <uint64_t *>malloc(points * sizeof(uint64_t))
        if g.ring == NULL:
            raise MemoryError()
        for i in range(g.n):
            key = self.names[i].encode()
            base = fnv1a(FNV_OFFSET, key, len(key))
            for v in range(g.spec[i].weight * RING_POINTS):
                h = hash_bytes(base, <const uint8_t *>&v, sizeof(int))
                g.ring[k] = ((<uint64_t>h) << 32) | <uint64_t>i
                k += 1
        g.ring_len = k
        qsort(g.ring, k, sizeof(uint64_t), cmp_u64)
        return 0

    cdef void _free(self) noexcept:
        balance_cursor_free(&self.cursor)
        free(self.group.spec)
        free(self.group.state)
        free(self.group.ring)
        memset(&self.group, 0, sizeof(BalanceGroup))

    def __dealloc__(self):
        self._free()

    def __len__(self):
        return self.group.n

    cdef int _index(self, int i) except -1:
        if not 0 <= i < self.group.n:
            raise IndexError(f"no upstream {i} in a group of {self.group.n}")
        return i

    @staticmethod
    def _now(now_ns):
        return fp_now_ns() if now_ns is None else now_ns

    def acquire(self, str client_ip="127.0.0.1", tried=(), now_ns=None):
        """Choose an upstream for a client from `client_ip`, avoiding the
        indexes in `tried`, and hold a slot on it (give it back with
        release()). Returns its index, -1 when none is up, -2 when those
        that are up are all at their max_connections."""
        cdef uint8_t key[16]
        cdef bytearray tried_bits = bytearray(balance_tried_bytes(self.group.n))
        cdef uint8_t *bits = <uint8_t *><char *>tried_bits
        for i in tried:
            bits_set(bits, self._index(i))
        addr16_from_py(client_ip, key)
        return balance_acquire(&self.group, &self.cursor, key, bits, self._now(now_ns))

    def release(self, int i):
        balance_release(&self.group, self._index(i))

    def connect_result(self, int i, bint ok, now_ns=None):
        """Passive health. Returns True when this marked upstream i down or
        back up."""
        return bool(balance_connect_result(&self.group, self._index(i), ok,
                                           self._now(now_ns)))

    def set_health(self, int i, bint up):
        """The active health checks' verdict. Returns True when it changed."""
        return bool(balance_set_health(&self.group, self._index(i), up))

    @property
    def changes(self):
        """Bumped at each up/down transition (passive or active): poll it to
        learn when to look at state() again."""
        return fp_atomic_get(&self.group.changes)

    def state(self, int i, now_ns=None):
        cdef UpstreamState *st = &self.group.state[self._index(i)]
        cdef bint health = fp_atomic_get(&st.health) != 0
        cdef bint failed = fp_atomic_get(&st.down_until_ns) > self._now(now_ns)
        if self.group.spec[i].weight == 0:
            state = "drained"
        else:
            state = "up" if health and not failed else "down"
        return {
            "state": state,
            "health": "up" if health else "down",
            "active": fp_atomic_get(&st.active),
            "peak_active": fp_atomic_get(&st.peak_active),
            "total": fp_atomic_get(&st.total),
            "consecutive_failures": fp_atomic_get(&st.fails),
        }

    def _stress(self, int rounds, int hold):
        """Test and benchmark support: `rounds` times, take up to `hold`
        slots and give them back, without the GIL (from several threads at
        once, native threads race on the limits). Returns: slots taken."""
        cdef BalanceCursor c
        cdef uint8_t key[16]
        cdef int *held = <int *>malloc(max(hold, 1) * sizeof(int))
        cdef int r, k, got, i
        cdef int64_t taken = 0, now
        if held == NULL or balance_cursor_init(&self.group, &c) < 0:
            free(held)
            raise MemoryError()
        memset(key, 0, 16)
        with nogil:
            for r in range(rounds):
                now = fp_now_ns()
                got = 0
                for k in range(hold):
                    i = balance_acquire(&self.group, &c, key, NULL, now)
                    if i < 0:
                        break
                    held[got] = i
                    got += 1
                taken += got
                for k in range(got):
                    balance_release(&self.group, held[k])
        balance_cursor_free(&c)
        free(held)
        return taken
