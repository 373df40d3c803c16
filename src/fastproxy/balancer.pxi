# Upstream groups: choosing an upstream of a group for each client and
# holding a slot on it, passive health, and the group's lifetime. The C
# functions run on worker threads without the GIL. Workers share the group,
# so what they change in it is atomic; what only steers one worker's
# choices lives in its own cursor. UpstreamGroup (at the end) builds a
# group from parsed values, for the engine, the control plane and tests.

from libc.stdlib cimport qsort
from libc.string cimport memcpy
from posix.stdlib cimport posix_memalign

# The index of a name is its BAL_* value.
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "random", "source", "first")
# The index of a name is its ADMIN_* value.
ADMIN_STATES = ("ready", "drain", "maint")

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

cdef inline int run_weight(UpstreamState *st) noexcept nogil:
    # The weight balancing uses, set at run time (set_weight): read once per
    # look at an upstream, so one pick never sees two values of it.
    return <int>fp_atomic_get(&st.weight)


cdef int64_t usable(GroupC *g, BalanceCursor *c, int i, int backup,
                    int64_t now, int *weight) noexcept nogil:
    # Returns: the upstream's active count when it may take a client now
    # (its weight, > 0, in *weight), else -1 (setting c.full when its limit
    # is all that stands in the way).
    cdef UpstreamSpec *s = &g.spec[i]
    cdef UpstreamState *st = &g.state[i]
    cdef int64_t active
    cdef int w
    if s.backup != backup or bits_has(c.skip, i):
        return -1
    w = run_weight(st)
    if w <= 0 or fp_atomic_get(&st.admin) != ADMIN_READY:
        return -1
    if fp_atomic_get(&st.health) == 0 or fp_atomic_get(&st.down_until_ns) > now:
        return -1
    active = fp_atomic_get(&st.active)
    if s.max_connections and active >= s.max_connections:
        c.full = 1
        return -1
    weight[0] = w
    return active


cdef inline bint lighter(int64_t a_active, int a_weight, int64_t b_active,
                         int b_weight) noexcept nogil:
    # a_active / a_weight < b_active / b_weight, without dividing.
    return a_active * b_weight < b_active * a_weight


# ---- the algorithms: each returns an index or -1, reserving nothing

cdef int pick_roundrobin(GroupC *g, BalanceCursor *c, int backup,
                         int64_t now) noexcept nogil:
    # Smooth weighted round-robin (nginx's): every usable upstream gains its
    # weight, the richest is chosen and pays the total back, so 5/1/1 gives
    # a a b a c a a rather than five a in a row.
    cdef int i, w = 0, best = -1
    cdef int64_t total = 0
    for i in range(g.n):
        if usable(g, c, i, backup, now, &w) < 0:
            continue
        c.current[i] += w
        total += w
        if best < 0 or c.current[i] > c.current[best]:
            best = i
    if best >= 0:
        c.current[best] -= total
    return best


cdef int pick_leastconn(GroupC *g, BalanceCursor *c, int backup,
                        int64_t now) noexcept nogil:
    # The scan starts after the last choice, so ties go round-robin.
    cdef int k, i, w = 0, best = -1, best_weight = 1
    cdef int64_t a, best_active = 0
    for k in range(g.n):
        i = (c.rr + k) % g.n
        a = usable(g, c, i, backup, now, &w)
        if a >= 0 and (best < 0 or lighter(a, w, best_active, best_weight)):
            best = i
            best_active = a
            best_weight = w
    if best >= 0:
        c.rr = (best + 1) % g.n
    return best


cdef int pick_weighted(GroupC *g, BalanceCursor *c, int backup,
                       int64_t now, int64_t *active, int *weight) noexcept nogil:
    # One weighted random draw in one pass: each usable upstream replaces
    # the draw with probability weight / (weights seen so far).
    cdef int i, w = 0, best = -1
    cdef int64_t a, total = 0
    for i in range(g.n):
        a = usable(g, c, i, backup, now, &w)
        if a < 0:
            continue
        total += w
        if <int64_t>(rng_next(c) % <uint64_t>total) < w:
            best = i
            active[0] = a
            weight[0] = w
    return best


cdef int pick_random(GroupC *g, BalanceCursor *c, int backup,
                     int64_t now) noexcept nogil:
    # Power of two choices: of two weighted draws the lighter wins, the
    # first on a tie, so an idle group follows the weights.
    cdef int64_t a1 = 0, a2 = 0
    cdef int w1 = 1, w2 = 1
    cdef int i1 = pick_weighted(g, c, backup, now, &a1, &w1)
    cdef int i2
    if i1 < 0:
        return -1
    i2 = pick_weighted(g, c, backup, now, &a2, &w2)
    if i2 >= 0 and lighter(a2, w2, a1, w1):
        return i2
    return i1


cdef int ring_find(GroupC *g, uint32_t h) noexcept nogil:
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


cdef int pick_source(GroupC *g, BalanceCursor *c, uint32_t h, int backup,
                     int64_t now) noexcept nogil:
    # The owner of the first ring point after the client's hash or, when it
    # cannot take the client, the next owner along the ring: an upstream
    # going away moves its own clients and no others. The ring holds the
    # configured weights; a run-time weight only says in (> 0) or out (0).
    cdef int k, i, w = 0, left = 0
    cdef int p
    for i in range(g.n):
        if g.spec[i].backup != backup or bits_has(c.skip, i):
            continue
        if run_weight(&g.state[i]) > 0:
            left += 1
        else:
            bits_set(c.skip, i)    # out for both passes: not counted in left
    if left == 0 or g.ring_len == 0:
        return -1
    p = ring_find(g, h)
    for k in range(g.ring_len):
        i = <int>(g.ring[(p + k) % g.ring_len] & 0xffffffffu)
        if g.spec[i].backup != backup or bits_has(c.skip, i):
            continue
        if usable(g, c, i, backup, now, &w) >= 0:
            return i
        bits_set(c.skip, i)    # its other points need no second look
        left -= 1
        if left == 0:
            break
    return -1


cdef int pick_first(GroupC *g, BalanceCursor *c, int backup,
                    int64_t now) noexcept nogil:
    cdef int i, w = 0
    for i in range(g.n):
        if usable(g, c, i, backup, now, &w) >= 0:
            return i
    return -1


cdef int pick(GroupC *g, BalanceCursor *c, uint32_t h, int backup,
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


cdef bint probe_claim(GroupC *g, UpstreamState *st, int64_t now) noexcept nogil:
    # An upstream whose fail_timeout ran out gets one client to probe it;
    # the others keep skipping it until that client's connect succeeds.
    cdef int64_t until = fp_atomic_get(&st.down_until_ns)
    if until == 0:
        return 1
    return until <= now and fp_atomic_cas(&st.down_until_ns, &until,
                                          now + g.fail_timeout_ns)


cdef bint reserve(GroupC *g, BalanceCursor *c, int i, int64_t now) noexcept nogil:
    # Returns: 1 with a slot held on upstream i; 0 when another worker took
    # its last slot (c.full set) or its probe first.
    cdef UpstreamState *st = &g.state[i]
    if not slot_take(&g.spec[i], st):
        c.full = 1
        return 0
    if not probe_claim(g, st, now):
        fp_atomic_add(&st.active, -1)
        return 0
    fp_atomic_add(&st.accepted, 1)
    return 1


cdef int balance_acquire(GroupC *g, BalanceCursor *c, const uint8_t *client16,
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


cdef void balance_release(GroupC *g, int i) noexcept nogil:
    fp_atomic_add(&g.state[i].active, -1)


# ---- health

cdef inline bint note_change(GroupC *g, bint changed) noexcept nogil:
    if changed:
        fp_atomic_add(&g.changes, 1)
    return changed


cdef int balance_connect_result(GroupC *g, int i, bint ok,
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


cdef int balance_set_health(GroupC *g, int i, bint up) noexcept nogil:
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


cdef int balance_cursor_init(GroupC *g, BalanceCursor *c) noexcept nogil:
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


# ---- a group's lifetime: reference counted, freed without the GIL

# Group blocks allocated and not yet freed, in this process (atomic): what
# tests watch to see a retired group go, and nothing leak.
cdef int64_t group_blocks = 0


cdef void group_free(GroupC *g) noexcept nogil:
    cdef int i
    if g.addrs != NULL:
        for i in range(g.n):
            free(g.addrs[i].addrs)
    if g.names != NULL:
        for i in range(g.n):
            free(g.names[i])
    free(g.addrs)
    free(g.names)
    free(g.spec)
    free(g.state)
    free(g.ring)
    free(g.ctr)
    free(g)
    fp_atomic_add(&group_blocks, -1)


cdef inline void group_ref(GroupC *g) noexcept nogil:
    fp_ref_add(&g.refs, 1)


cdef inline void group_unref(GroupC *g) noexcept nogil:
    # Whichever holder drops the last reference frees the block: a worker
    # ending the last bridge of a retired group, or the control plane.
    if g != NULL and fp_ref_add(&g.refs, -1) == 0:
        group_free(g)


cdef int group_find(GroupC *g, const char *name) noexcept nogil:
    # Returns: the index of the upstream called `name` in g, or -1.
    cdef int i
    for i in range(g.n):
        if strcmp(g.names[i], name) == 0:
            return i
    return -1


cdef dict upstream_entry(UpstreamState *st, UpstreamCounters *sum, str state,
                         bint health):
    return {
        "state": state,
        "health": "up" if health else "down",
        "active": fp_atomic_get(&st.active),
        "peak_active": fp_atomic_get(&st.peak_active),
        "accepted": fp_atomic_get(&st.accepted),
        "consecutive_failures": fp_atomic_get(&st.fails),
        "bytes_upstream": sum.bytes_upstream,
        "bytes_downstream": sum.bytes_downstream,
        "connect_failures": sum.connect_failures,
    }


cdef void upstream_counters_add(UpstreamCounters *total, UpstreamCounters *c) noexcept nogil:
    total.bytes_upstream += fp_load(&c.bytes_upstream)
    total.bytes_downstream += fp_load(&c.bytes_downstream)
    total.connect_failures += fp_load(&c.connect_failures)


cdef class UpstreamGroup:
    """The upstreams a listener balances over, and how clients are spread.

    upstreams: parsed upstreams (fastproxy.Upstream, read by attribute:
    address, weight, max_connections, backup); addresses: per upstream, its
    resolved [(family, sockaddr), ...] with numeric hosts, or None for a
    group that only chooses (tests; an engine refuses it). balance: one of
    BALANCE_ALGORITHMS; max_fails consecutive connect failures (0: never)
    mark an upstream down for fail_timeout seconds.

    The data plane shares the C block (reference counted: this object, the
    engine while the group is current, and each bridge bridged with it hold
    one). The methods serve the control plane and tests, with a cursor of
    their own.
    """

    def __cinit__(self):
        self.g = NULL
        memset(&self.cursor, 0, sizeof(BalanceCursor))

    def __init__(self, upstreams, addresses=None, *, str balance="roundrobin",
                 int max_fails=3, double fail_timeout=10.0, seed=None):
        cdef GroupC *g
        cdef int i, j
        ups = tuple(upstreams)
        if not ups:
            raise ValueError("an upstream group needs upstreams")
        if balance not in BALANCE_ALGORITHMS:
            raise ValueError(f"unknown balancing algorithm {balance!r}")
        if addresses is not None:
            addresses = list(addresses)
            if len(addresses) != len(ups):
                raise ValueError(f"{len(addresses)} address lists for {len(ups)} upstreams")
        if self.g != NULL:
            raise RuntimeError("an UpstreamGroup is built once: workers may share it")
        names = tuple(str(u.address) for u in ups)
        if len(set(names)) != len(names):
            raise ValueError("an upstream is listed twice")
        for u in ups:
            if not 0 <= u.weight <= 256:
                raise ValueError(f"upstream {u.address}: weight {u.weight} is out of range (0-256)")
        self.g = g = self._alloc(len(ups))
        g.algorithm = BALANCE_ALGORITHMS.index(balance)
        g.max_fails = max(0, max_fails)
        g.fail_timeout_ns = seconds_to_ns(fail_timeout)
        for i, u in enumerate(ups):
            g.spec[i].weight = u.weight
            g.spec[i].backup = bool(u.backup)
            g.spec[i].max_connections = u.max_connections or 0
            g.state[i].health = 1
            g.state[i].weight = u.weight
            key = names[i].encode()
            g.names[i] = <char *>malloc(len(key) + 1)
            if g.names[i] == NULL:
                raise MemoryError()
            memcpy(g.names[i], <char *>key, len(key) + 1)
            if addresses is None:
                continue
            addrs = list(addresses[i])
            if not addrs:
                raise ValueError(f"upstream {names[i]}: no address")
            g.addrs[i].addrs = <UpstreamAddr *>calloc(len(addrs), sizeof(UpstreamAddr))
            if g.addrs[i].addrs == NULL:
                raise MemoryError()
            for j, (family, sa) in enumerate(addrs):
                fill_sockaddr(&g.addrs[i].addrs[j], family, tuple(sa))
                g.addrs[i].naddrs = j + 1
        self.names = names
        self.upstreams = ups
        self.index = {name: i for i, name in enumerate(names)}
        self.algorithm = balance
        if g.algorithm == BAL_SOURCE:
            self._build_ring()
        if balance_cursor_init(g, &self.cursor) < 0:
            raise MemoryError()
        if seed is not None:
            rng_seed(&self.cursor, <uint64_t>(hash(seed) & 0xffffffffffffffff))

    cdef GroupC *_alloc(self, int n) except NULL:
        cdef void *state = NULL
        cdef GroupC *g = <GroupC *>calloc(1, sizeof(GroupC))
        if g == NULL:
            raise MemoryError()
        fp_atomic_add(&group_blocks, 1)
        g.refs = 1    # this object's
        g.n = n
        g.spec = <UpstreamSpec *>calloc(n, sizeof(UpstreamSpec))
        g.addrs = <UpstreamAddrs *>calloc(n, sizeof(UpstreamAddrs))
        g.names = <char **>calloc(n, sizeof(char *))
        # Aligned to a cache line, so the padding of UpstreamState works.
        if posix_memalign(&state, 64, n * sizeof(UpstreamState)) == 0:
            g.state = <UpstreamState *>state
            memset(state, 0, n * sizeof(UpstreamState))
        if g.spec == NULL or g.state == NULL or g.addrs == NULL or g.names == NULL:
            group_free(g)
            raise MemoryError()
        return g

    cdef int _build_ring(self) except -1:
        # Points hash the address, not the index: a group rebuilt without
        # one upstream keeps every other upstream's points where they were.
        cdef GroupC *g = self.g
        cdef int i, v, k = 0
        cdef bytes key
        cdef uint64_t base
        cdef uint32_t h
        cdef int points = 0
        # An upstream configured with weight 0 gets the points of weight 1,
        # skipped while its run-time weight is 0: set_weight can bring it in.
        for i in range(g.n):
            points += max(g.spec[i].weight, 1) * RING_POINTS
        if points == 0:
            return 0
        g.ring = <uint64_t *>malloc(points * sizeof(uint64_t))
        if g.ring == NULL:
            raise MemoryError()
        for i in range(g.n):
            key = self.names[i].encode()
            base = fnv1a(FNV_OFFSET, key, len(key))
            for v in range(max(g.spec[i].weight, 1) * RING_POINTS):
                h = hash_bytes(base, <const uint8_t *>&v, sizeof(int))
                g.ring[k] = ((<uint64_t>h) << 32) | <uint64_t>i
                k += 1
        g.ring_len = k
        qsort(g.ring, k, sizeof(uint64_t), cmp_u64)
        return 0

    cdef int _attach(self, int nworkers, int64_t generation) except -1:
        # Called by the engine (with the GIL) before its workers may see the
        # group: the per-worker counters get their size here.
        cdef GroupC *g = self.g
        cdef int i
        if g == NULL:
            raise ValueError("this upstream group was never built")
        if g.nworkers:
            raise ValueError("this upstream group already serves an engine; build a new one")
        for i in range(g.n):
            if g.addrs[i].naddrs == 0:
                raise ValueError(f"upstream {self.names[i]} has no resolved address")
        g.ctr = <UpstreamCounters *>calloc(<size_t>nworkers * g.n, sizeof(UpstreamCounters))
        if g.ctr == NULL:
            raise MemoryError()
        g.nworkers = nworkers
        g.generation = generation
        return 0

    def __dealloc__(self):
        balance_cursor_free(&self.cursor)
        group_unref(self.g)
        self.g = NULL

    def __len__(self):
        return self.g.n

    cdef int _index(self, int i) except -1:
        if not 0 <= i < self.g.n:
            raise IndexError(f"no upstream {i} in a group of {self.g.n}")
        return i

    @staticmethod
    def _now(now_ns):
        return fp_now_ns() if now_ns is None else now_ns

    @property
    def refs(self):
        """References held on the C block: this object's, the engine's while
        the group is current, one per live bridge (and close record in
        flight)."""
        return fp_atomic_get(&self.g.refs)

    @property
    def live_bridges(self):
        """Bridges bridged with this group that have not closed yet."""
        return fp_atomic_get(&self.g.bridges)

    def acquire(self, str client_ip="127.0.0.1", tried=(), now_ns=None):
        """Choose an upstream for a client from `client_ip`, avoiding the
        indexes in `tried`, and hold a slot on it (give it back with
        release()). Returns its index, -1 when none is up, -2 when those
        that are up are all at their max_connections."""
        cdef uint8_t key[16]
        cdef bytearray tried_bits = bytearray(balance_tried_bytes(self.g.n))
        cdef uint8_t *bits = <uint8_t *><char *>tried_bits
        for i in tried:
            bits_set(bits, self._index(i))
        addr16_from_py(client_ip, key)
        return balance_acquire(self.g, &self.cursor, key, bits, self._now(now_ns))

    def release(self, int i):
        balance_release(self.g, self._index(i))

    def connect_result(self, int i, bint ok, now_ns=None):
        """Passive health. Returns True when this marked upstream i down or
        back up."""
        return bool(balance_connect_result(self.g, self._index(i), ok,
                                           self._now(now_ns)))

    def set_health(self, int i, bint up):
        """The active health checks' verdict. Returns True when it changed."""
        return bool(balance_set_health(self.g, self._index(i), up))

    @property
    def changes(self):
        """Bumped at each up/down transition (passive or active): poll it to
        learn when to look at state() again."""
        return fp_atomic_get(&self.g.changes)

    def state(self, int i, now_ns=None):
        """Upstream i's state and counters (the counters are 0 until the
        group serves an engine)."""
        cdef UpstreamState *st = &self.g.state[self._index(i)]
        cdef bint health = fp_atomic_get(&st.health) != 0
        cdef bint failed = fp_atomic_get(&st.down_until_ns) > self._now(now_ns)
        cdef UpstreamCounters sum
        cdef int k
        memset(&sum, 0, sizeof(UpstreamCounters))
        for k in range(self.g.nworkers):
            upstream_counters_add(&sum, &self.g.ctr[k * self.g.n + i])
        admin = <int>fp_atomic_get(&st.admin)
        weight = run_weight(st)
        if admin == ADMIN_MAINT:
            state = "maint"
        elif admin == ADMIN_DRAIN or weight == 0:
            state = "drained"
        else:
            state = "up" if health and not failed else "down"
        entry = upstream_entry(st, &sum, state, health)
        entry["admin"] = ADMIN_STATES[admin]
        entry["weight"] = weight
        return entry

    def admin(self, int i):
        """Upstream i's admin state: "ready", "drain" or "maint"."""
        return ADMIN_STATES[<int>fp_atomic_get(&self.g.state[self._index(i)].admin)]

    def weight(self, int i):
        """Upstream i's run-time weight (its configured one until set_weight)."""
        return run_weight(&self.g.state[self._index(i)])

    def set_admin(self, int i, str state):
        """Set upstream i's admin state (one of ADMIN_STATES): "drain" and
        "maint" send it no new client, its live bridges go on. Workers read
        it at their next pick. Returns True when it came back to "ready"
        (waiters may now find room: the caller kicks the wait queue)."""
        if state not in ADMIN_STATES:
            raise ValueError(f"unknown admin state {state!r} (expected one of {', '.join(ADMIN_STATES)})")
        # Not counted in `changes`: those are health's transitions, which
        # the watcher logs; the control plane logs its own.
        cdef int64_t was = fp_atomic_get(&self.g.state[self._index(i)].admin)
        fp_atomic_set(&self.g.state[i].admin, ADMIN_STATES.index(state))
        return was != ADMIN_READY and state == "ready"

    def set_weight(self, int i, int weight):
        """Set upstream i's run-time weight (0-256; 0 drains it). Returns
        True when it rose (the caller kicks the wait queue)."""
        if not 0 <= weight <= 256:
            raise ValueError(f"weight {weight} is out of range (0-256)")
        cdef int64_t was = fp_atomic_get(&self.g.state[self._index(i)].weight)
        fp_atomic_set(&self.g.state[i].weight, weight)
        return weight > was

    def carry_admin(self, UpstreamGroup old not None):
        """Take over the run-time settings of `old` (the group this one
        replaces) by upstream name: its admin state, and a weight set at run
        time unless the configured weight changed (the new configuration
        then wins). Before this group serves."""
        cdef int i, j
        for j, name in enumerate(old.names):
            i = self.index.get(name, -1)
            if i < 0:
                continue
            fp_atomic_set(&self.g.state[i].admin, fp_atomic_get(&old.g.state[j].admin))
            if (run_weight(&old.g.state[j]) != old.g.spec[j].weight
                    and old.g.spec[j].weight == self.g.spec[i].weight):
                fp_atomic_set(&self.g.state[i].weight, run_weight(&old.g.state[j]))

    def stats(self):
        """{name: state(i)} for every upstream, in order."""
        cdef int64_t now = fp_now_ns()
        return {name: self.state(i, now) for i, name in enumerate(self.names)}

    def _stress(self, int rounds, int hold):
        """Test and benchmark support: `rounds` times, take up to `hold`
        slots and give them back, without the GIL (from several threads at
        once, native threads race on the limits). Returns: slots taken."""
        cdef BalanceCursor c
        cdef uint8_t key[16]
        cdef int *held = <int *>malloc(max(hold, 1) * sizeof(int))
        cdef int r, k, got, i
        cdef int64_t taken = 0, now
        cdef GroupC *g = self.g
        if held == NULL or balance_cursor_init(g, &c) < 0:
            free(held)
            raise MemoryError()
        memset(key, 0, 16)
        with nogil:
            for r in range(rounds):
                now = fp_now_ns()
                got = 0
                for k in range(hold):
                    i = balance_acquire(g, &c, key, NULL, now)
                    if i < 0:
                        break
                    held[got] = i
                    got += 1
                taken += got
                for k in range(got):
                    balance_release(g, held[k])
        balance_cursor_free(&c)
        free(held)
        return taken


def live_group_blocks():
    """Upstream group C blocks allocated and not yet freed in this process."""
    return fp_atomic_get(&group_blocks)
