# Connection limits, each a listener's: its slot count (max_connections),
# its per-IP table, and its wait queue where clients past a limit wait in
# arrival order. Workers share all three; each is a CAS or a short critical
# section.


# ---- the listener's limit: `active` is the number of slots held

cdef bint limit_take(ListenerC *ls) noexcept nogil:
    # Returns: 1 with a slot held (and `active` counting it), else 0.
    # CAS, not add-then-check: `active` never exceeds the limit, even for an
    # instant another worker could see.
    cdef int64_t cur = fp_atomic_get(&ls.gauges.active)
    while True:
        if ls.max_connections and cur >= ls.max_connections:
            return 0
        if fp_atomic_cas(&ls.gauges.active, &cur, cur + 1):
            break
    fp_atomic_max(&ls.gauges.peak_active, cur + 1)
    return 1


# ---- per-IP counts: exact, and bounded by the global limit

cdef int iptable_init(IpTable *t, int64_t capacity) noexcept nogil:
    # Returns: 0, or -ENOMEM.
    cdef int i
    pthread_mutex_init(&t.mu, NULL)
    t.nchains = 1
    while t.nchains < capacity:
        t.nchains <<= 1
    t.entries = <IpEntry *>calloc(capacity, sizeof(IpEntry))
    t.chains = <int *>malloc(t.nchains * sizeof(int))
    if t.entries == NULL or t.chains == NULL:
        return -ENOMEM
    for i in range(t.nchains):
        t.chains[i] = -1
    for i in range(capacity):
        t.entries[i].next = i + 1 if i + 1 < capacity else -1
    t.free_head = 0
    return 0


cdef void iptable_free(IpTable *t) noexcept nogil:
    if t.entries != NULL:
        pthread_mutex_destroy(&t.mu)
    free(t.entries)
    free(t.chains)
    t.entries = NULL
    t.chains = NULL


cdef inline int ip_chain(IpTable *t, const uint8_t *key) noexcept nogil:
    return <int>(hash_bytes(FNV_OFFSET, key, 16) & <uint32_t>(t.nchains - 1))


cdef bint ip_take(IpTable *t, const uint8_t *key, int64_t limit) noexcept nogil:
    # Returns: 1 when this address had fewer than `limit` bridges (now one
    # more), else 0. The table holds one entry per address with a bridge, and
    # there are never more bridges than the global limit, its capacity.
    cdef int c = ip_chain(t, key)
    cdef int i
    cdef bint ok = 0
    pthread_mutex_lock(&t.mu)
    i = t.chains[c]
    while i >= 0 and memcmp(t.entries[i].key, key, 16) != 0:
        i = t.entries[i].next
    if i >= 0:
        if t.entries[i].count < limit:
            t.entries[i].count += 1
            ok = 1
    elif t.free_head >= 0:
        i = t.free_head
        t.free_head = t.entries[i].next
        memcpy(t.entries[i].key, key, 16)
        t.entries[i].count = 1
        t.entries[i].next = t.chains[c]
        t.chains[c] = i
        ok = 1
    pthread_mutex_unlock(&t.mu)
    return ok


cdef void ip_give(IpTable *t, const uint8_t *key) noexcept nogil:
    cdef int c = ip_chain(t, key)
    cdef int *p
    cdef int i
    pthread_mutex_lock(&t.mu)
    p = &t.chains[c]
    while p[0] >= 0 and memcmp(t.entries[p[0]].key, key, 16) != 0:
        p = &t.entries[p[0]].next
    i = p[0]
    if i >= 0:
        t.entries[i].count -= 1
        if t.entries[i].count == 0:
            p[0] = t.entries[i].next
            t.entries[i].next = t.free_head
            t.free_head = i
    pthread_mutex_unlock(&t.mu)


# ---- the wait queue

cdef inline bint queue_busy(ListenerC *ls) noexcept nogil:
    # Someone is waiting, or about to retry: a newcomer goes behind them.
    return fp_atomic_get(&ls.wait.count) != 0 or fp_atomic_get(&ls.wait.kicked) != 0


cdef bint queue_wait(Worker *w, Bridge *b, bint front, int64_t now) noexcept nogil:
    # Parks b until a slot frees (front: a retry that lost keeps its place).
    # Returns: 0 when the queue is full (or queueing is off): reject b.
    cdef WaitQueue *q = &b.ls.wait
    if b.ls.on_limit != ON_LIMIT_QUEUE:
        return 0
    pthread_mutex_lock(&q.mu)
    if not front and q.count >= b.ls.queue_size:
        pthread_mutex_unlock(&q.mu)
        return 0
    if front:
        b.wprev = NULL
        b.wnext = q.head
        if q.head != NULL:
            q.head.wprev = b
        else:
            q.tail = b
        q.head = b
    else:
        b.wnext = NULL
        b.wprev = q.tail
        if q.tail != NULL:
            q.tail.wnext = b
        else:
            q.head = b
        q.tail = b
    b.in_queue = 1
    fp_atomic_add(&q.count, 1)
    pthread_mutex_unlock(&q.mu)
    if b.state != B_QUEUED:
        b.state = B_QUEUED
        timer_add(w, b, T_QUEUE, now + b.ls.queue_timeout_ns)
    return 1


cdef inline void queue_unlink(WaitQueue *q, Bridge *b) noexcept nogil:
    # Under q.mu.
    if b.wprev != NULL:
        b.wprev.wnext = b.wnext
    else:
        q.head = b.wnext
    if b.wnext != NULL:
        b.wnext.wprev = b.wprev
    else:
        q.tail = b.wprev
    b.wprev = NULL
    b.wnext = NULL
    b.in_queue = 0
    fp_atomic_add(&q.count, -1)


cdef void queue_kick(ListenerC *ls) noexcept nogil:
    # A slot was freed: the oldest waiter tries again, on its own worker.
    cdef WaitQueue *q = &ls.wait
    cdef Bridge *b
    if fp_atomic_get(&q.count) == 0:
        return
    pthread_mutex_lock(&q.mu)
    b = q.head
    if b != NULL:
        queue_unlink(q, b)
        b.kicked = 1
        fp_atomic_add(&q.kicked, 1)
        if retry_push(&ls.sh.workers[b.worker], b):
            write(ls.sh.workers[b.worker].wake_w, b"x", 1)
    pthread_mutex_unlock(&q.mu)


cdef void queue_leave(Worker *w, Bridge *b) noexcept nogil:
    # b closes: off the queue, or, if a retry is already on its way, kept
    # allocated (limbo) until it arrives.
    cdef WaitQueue *q = &b.ls.wait
    if not b.in_queue and not b.kicked:
        return
    pthread_mutex_lock(&q.mu)
    if b.in_queue:
        queue_unlink(q, b)
    elif b.kicked:
        b.hook_pending += 1
    pthread_mutex_unlock(&q.mu)


cdef bint queue_retry_arrived(Worker *w, Bridge *b) noexcept nogil:
    # Returns: 1 when b can use its retry; 0 when it closed meanwhile (the
    # retry then passes to the next waiter).
    cdef WaitQueue *q = &b.ls.wait
    pthread_mutex_lock(&q.mu)
    b.kicked = 0
    fp_atomic_add(&q.kicked, -1)
    pthread_mutex_unlock(&q.mu)
    if b.state == B_CLOSED:
        queue_kick(b.ls)
        return 0
    return 1


# ---- giving slots back

cdef inline bint upstream_release(Worker *w, Bridge *b) noexcept nogil:
    # Returns: 1 when a slot was given back (the caller kicks the queue).
    if not b.up_slot:
        return 0
    balance_release(b.group, b.upstream)
    b.up_slot = 0
    return 1


cdef void slots_release(Worker *w, Bridge *b) noexcept nogil:
    # Everything a closing bridge holds. One kick however many slots it
    # freed: two kicks would send two waiters racing (on two workers) for
    # what may be one slot, and the later could win.
    cdef bint freed = upstream_release(w, b)
    if b.routed:
        fp_atomic_add(&b.ls.routed.active, -1)
        b.routed = 0
    if b.ip_counted:
        ip_give(&b.ls.ips, b.client_ip)
        b.ip_counted = 0
    if b.admitted:
        fp_atomic_add(&b.ls.gauges.active, -1)
        b.admitted = 0
        freed = 1
    if freed:
        queue_kick(b.ls)
