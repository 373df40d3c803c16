# The hand-over between workers and the control plane's hook threads.
#
# A worker never waits for Python: it queues a HookEvent (under a mutex held
# for a few instructions), parks the bridge, and serves other bridges. A
# hook thread answers with a HookResult on the worker's ResultQueue and a
# byte on its wake pipe. A bridge with an unanswered call stays allocated
# (in limbo if it closed meanwhile) so an answer never meets freed memory.

cdef int RECORD_RING_CAP = 65536


cdef int queue_init(Shared *sh) noexcept nogil:
    # Returns: 0, or -ENOMEM.
    pthread_mutex_init(&sh.events.mu, NULL)
    pthread_cond_init(&sh.events.cv, NULL)
    pthread_mutex_init(&sh.records.mu, NULL)
    pthread_cond_init(&sh.records.cv, NULL)
    sh.records.cap = RECORD_RING_CAP
    sh.records.items = <CloseRecordC *>malloc(RECORD_RING_CAP * sizeof(CloseRecordC))
    return 0 if sh.records.items != NULL else -ENOMEM


cdef void queue_destroy(Shared *sh) noexcept nogil:
    pthread_mutex_destroy(&sh.events.mu)
    pthread_cond_destroy(&sh.events.cv)
    pthread_mutex_destroy(&sh.records.mu)
    pthread_cond_destroy(&sh.records.cv)
    free(sh.events.items)
    free(sh.records.items)
    sh.events.items = NULL
    sh.records.items = NULL


cdef int event_push(Shared *sh, HookEvent *ev) noexcept nogil:
    # Returns: 0, or -ENOMEM (the caller closes the bridge).
    cdef HookQueue *q = &sh.events
    cdef HookEvent *grown
    cdef int i, cap
    pthread_mutex_lock(&q.mu)
    if q.count == q.cap:
        cap = q.cap * 2 if q.cap else 256
        grown = <HookEvent *>malloc(cap * sizeof(HookEvent))
        if grown == NULL:
            pthread_mutex_unlock(&q.mu)
            return -ENOMEM
        for i in range(q.count):   # unwrap the ring into the new array
            grown[i] = q.items[(q.head + i) % q.cap]
        free(q.items)
        q.items = grown
        q.head = 0
        q.cap = cap
    q.items[(q.head + q.count) % q.cap] = ev[0]
    q.count += 1
    pthread_cond_signal(&q.cv)
    pthread_mutex_unlock(&q.mu)
    return 0


cdef int event_pop(Shared *sh, HookEvent *out, int timeout_ms) noexcept nogil:
    # Blocks up to timeout_ms. Returns: 1 with *out set, 0 on time-out,
    # -1 once the queue is closed.
    cdef HookQueue *q = &sh.events
    cdef int r = 0
    pthread_mutex_lock(&q.mu)
    if q.count == 0 and not q.closed:
        fp_cond_wait_ms(&q.cv, &q.mu, timeout_ms)
    if q.closed:
        r = -1
    elif q.count > 0:
        out[0] = q.items[q.head]
        q.head = (q.head + 1) % q.cap
        q.count -= 1
        r = 1
    pthread_mutex_unlock(&q.mu)
    return r


cdef void record_push(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # Full ring: the record is dropped and counted; a worker never waits.
    cdef RecordRing *q = &w.sh.records
    cdef CloseRecordC *rec
    pthread_mutex_lock(&q.mu)
    if q.count == q.cap or q.closed:
        pthread_mutex_unlock(&q.mu)
        fp_atomic_add(&w.sh.gauges.dropped_records, 1)
        return
    rec = &q.items[(q.head + q.count) % q.cap]
    rec.id = b.id
    memcpy(rec.client_ip, b.client_ip, 16)
    rec.client_port = b.client_port
    rec.client_v4 = b.client_v4
    rec.reason = b.reason
    rec.upstream = b.upstream
    rec.connected = b.state == B_ACTIVE or b.up.bytes != 0 or b.down.bytes != 0
    if b.route != NULL and b.addr < b.nroute:
        rec.route = b.route[b.addr]
    else:
        rec.route.family = 0
    rec.bytes_upstream = b.up.bytes
    rec.bytes_downstream = b.down.bytes
    rec.accepted_ns = b.accepted_ns
    rec.closed_ns = now
    q.count += 1
    if q.count == 1:
        pthread_cond_signal(&q.cv)
    pthread_mutex_unlock(&q.mu)


cdef int result_push(Worker *w, HookResult *res) noexcept nogil:
    # Returns: 1 when the worker must be woken (the queue was empty), 0 if a
    # wake-up is already on its way, -ENOMEM.
    cdef ResultQueue *q = &w.results
    cdef HookResult *grown
    cdef int cap, was_empty
    pthread_mutex_lock(&q.mu)
    if q.count == q.cap:
        cap = q.cap * 2 if q.cap else 64
        grown = <HookResult *>realloc(q.items, cap * sizeof(HookResult))
        if grown == NULL:
            pthread_mutex_unlock(&q.mu)
            return -ENOMEM
        q.items = grown
        q.cap = cap
    q.items[q.count] = res[0]
    q.count += 1
    was_empty = q.count == 1
    pthread_mutex_unlock(&q.mu)
    return was_empty


cdef void hook_result_free(HookResult *res) noexcept nogil:
    # A replacement buffer or a route the bridge will not use.
    if res.kind == EVT_DATA and res.verdict == V_REPLACE:
        free(res.buf)
    free(res.route)
    res.route = NULL


cdef void limbo_release(Worker *w, Bridge *b) noexcept nogil:
    # The last answer for a closed bridge came: free it and what it lent.
    cdef Bridge **p = &w.limbo
    if b.hook_pending > 0:
        return
    while p[0] != NULL and p[0] != b:
        p = &p[0].grave_next
    if p[0] == b:
        p[0] = b.grave_next
    bridge_free(b)


cdef void worker_take_results(Worker *w, int64_t now) noexcept nogil:
    cdef ResultQueue *q = &w.results
    cdef HookResult *items
    cdef int n, i
    cdef Bridge *b
    pthread_mutex_lock(&q.mu)
    items = q.items
    n = q.count
    q.items = NULL
    q.count = 0
    q.cap = 0
    pthread_mutex_unlock(&q.mu)
    for i in range(n):
        b = items[i].bridge
        if items[i].kind == EVT_RETRY:
            bridge_queue_retry(w, b, now)
            continue
        b.hook_pending -= 1
        if b.state == B_CLOSED:
            hook_result_free(&items[i])
            limbo_release(w, b)
        elif items[i].kind == EVT_CONNECT:
            bridge_connect_answer(w, b, &items[i], now)
        else:
            bridge_data_answer(w, b, &items[i], now)
    free(items)
