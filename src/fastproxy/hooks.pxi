# The hand-over between workers and the control plane's hook threads.
#
# A worker never waits for Python: it queues a HookEvent (under a mutex held
# for a few instructions), parks the bridge, and serves other bridges. A
# hook thread answers with a HookResult on the worker's ResultQueue and a
# byte on its wake pipe. A bridge with an unanswered call stays allocated
# (in limbo if it closed meanwhile) so the buffer it lent stays valid.
#
# No pointer crosses into Python: an event carries the bridge's id, the
# call's seq and what on_connect/on_data show (client, accepted_ns), and an
# answer names its call by (worker, id, seq). The worker finds the bridge
# in its own table (Worker.calls, by id) and applies the answer only if that
# call is still out; any other answer (repeated, late, forged) is counted
# in stale_answers and dropped.
#
# Waking a sleeping hook thread costs a futex call and two context switches,
# and a second thread awake only fights the first for the GIL. So a thread
# that has just taken a call ("fresh") keeps taking calls without sleeping,
# and a push wakes a sleeper only when no thread is fresh. A thread whose
# call has run longer than HOOK_STALL_NS no longer counts: its hook may be
# blocked, and the next call must not wait behind it. Workers look at the
# queue at least that often while it holds calls and a thread sleeps
# (hook_nudge), so a call queued just before the fresh thread blocked is
# taken by another.

cdef int RECORD_RING_CAP = 65536
cdef int64_t HOOK_STALL_NS = 1000000


cdef int queue_init(Shared *sh, int hook_threads) noexcept nogil:
    # Returns: 0, or -ENOMEM.
    pthread_mutex_init(&sh.events.mu, NULL)
    if fp_sem_init(&sh.events.wake) < 0:
        return -ENOMEM
    pthread_mutex_init(&sh.records.mu, NULL)
    pthread_cond_init(&sh.records.cv, NULL)
    sh.records.cap = RECORD_RING_CAP
    sh.records.items = <CloseRecordC *>malloc(RECORD_RING_CAP * sizeof(CloseRecordC))
    sh.events.nslots = hook_threads if hook_threads > 0 else 1
    sh.events.busy_ns = <int64_t *>calloc(sh.events.nslots, sizeof(int64_t))
    return 0 if sh.records.items != NULL and sh.events.busy_ns != NULL else -ENOMEM


cdef void queue_destroy(Shared *sh) noexcept nogil:
    cdef int i
    for i in range(sh.records.count):
        group_unref(sh.records.items[(sh.records.head + i) % sh.records.cap].group)
        free(sh.records.items[(sh.records.head + i) % sh.records.cap].hello)
    for i in range(sh.events.count):
        free(sh.events.items[(sh.events.head + i) % sh.events.cap].hello)
    pthread_mutex_destroy(&sh.events.mu)
    fp_sem_destroy(&sh.events.wake)
    pthread_mutex_destroy(&sh.records.mu)
    pthread_cond_destroy(&sh.records.cv)
    free(sh.events.items)
    free(sh.records.items)
    free(sh.events.busy_ns)
    sh.events.items = NULL
    sh.records.items = NULL
    sh.events.busy_ns = NULL


cdef bint hook_fresh(HookQueue *q, int64_t now) noexcept nogil:
    # Under q.mu. True when some thread will take the next call soon: one
    # was signalled, or one took a call less than HOOK_STALL_NS ago.
    cdef int i
    if q.signalled > 0:
        return True
    for i in range(q.nslots):
        if q.busy_ns[i] != 0 and now - q.busy_ns[i] < HOOK_STALL_NS:
            return True
    return False


cdef inline void hook_publish(HookQueue *q) noexcept nogil:
    # Under q.mu, before each unlock: what workers read without the lock,
    # the calls a sleeping thread could be woken for. With every thread
    # inside a hook there are none to watch for, and workers sleep.
    fp_atomic_set(&q.backlog, q.count if q.idle > 0 else 0)


cdef inline bint hook_claim(HookQueue *q, int64_t now) noexcept nogil:
    # Under q.mu. True when a sleeper must be woken; it is counted out of
    # idle now, so that the next push does not wake a second one for the
    # same work. The caller signals after unlocking: a thread woken while
    # the mutex is held would run (one CPU) only to block on the mutex.
    if q.idle == 0 or q.count == 0 or q.closed or hook_fresh(q, now):
        return False
    q.idle -= 1
    q.signalled += 1
    return True


cdef int event_push(Shared *sh, HookEvent *ev) noexcept nogil:
    # Returns: 0, or -ENOMEM (the caller closes the bridge).
    cdef HookQueue *q = &sh.events
    cdef HookEvent *grown
    cdef int i, cap
    cdef bint wake
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
    wake = hook_claim(q, fp_now_ns())
    hook_publish(q)
    pthread_mutex_unlock(&q.mu)
    if wake:
        fp_sem_post(&q.wake)
    return 0


cdef void hook_nudge(Shared *sh, int64_t now) noexcept nogil:
    # A worker's look at a queue that holds calls: if every thread that
    # took one is past HOOK_STALL_NS (blocked, or slow), wake a sleeper.
    cdef HookQueue *q = &sh.events
    cdef bint wake
    if fp_atomic_get(&q.backlog) == 0:
        return
    pthread_mutex_lock(&q.mu)
    wake = hook_claim(q, now)
    hook_publish(q)
    pthread_mutex_unlock(&q.mu)
    if wake:
        fp_sem_post(&q.wake)


cdef bint event_cancel(Shared *sh, uint64_t id, uint32_t seq) noexcept nogil:
    # Takes call (id, seq) back out of the queue if no hook thread took it
    # yet (it timed out: running it later would be wasted). Returns: 1 if
    # it was taken back. Rare (a time-out), so a scan is fine.
    cdef HookQueue *q = &sh.events
    cdef int i, j
    cdef bint found = False
    pthread_mutex_lock(&q.mu)
    for i in range(q.count):
        j = (q.head + i) % q.cap
        if q.items[j].id == id and q.items[j].seq == seq:
            found = True
            break
    if found:
        free(q.items[j].hello)
        while i + 1 < q.count:
            q.items[(q.head + i) % q.cap] = q.items[(q.head + i + 1) % q.cap]
            i += 1
        q.count -= 1
    hook_publish(q)
    pthread_mutex_unlock(&q.mu)
    return found


cdef int event_pop(Shared *sh, int slot, HookEvent *out, int timeout_ms) noexcept nogil:
    # Takes the next call for hook thread `slot`, sleeping up to timeout_ms
    # if there is none (0: do not sleep). Returns: 1 with *out set, 0 on
    # time-out, -1 once the queue is closed.
    cdef HookQueue *q = &sh.events
    cdef int r = 0
    cdef int woke
    pthread_mutex_lock(&q.mu)
    if q.count == 0 and timeout_ms > 0 and not q.closed:
        q.busy_ns[slot] = 0
        q.idle += 1
        hook_publish(q)
        pthread_mutex_unlock(&q.mu)
        # A post made between the unlock and the wait is not lost: the
        # semaphore counts it.
        woke = fp_sem_wait_ms(&q.wake, timeout_ms)
        pthread_mutex_lock(&q.mu)
        # A thread that took a post was counted out of idle by its poster;
        # one that timed out leaves idle itself.
        if woke == 0:
            q.signalled -= 1
        else:
            q.idle -= 1
    if q.closed:
        r = -1
    elif q.count > 0:
        out[0] = q.items[q.head]
        q.head = (q.head + 1) % q.cap
        q.count -= 1
        q.busy_ns[slot] = fp_now_ns()
        r = 1
    hook_publish(q)
    pthread_mutex_unlock(&q.mu)
    return r


# ---- the bridges a worker's answers may name, by id

cdef inline uint32_t calls_bucket(Worker *w, uint64_t id) noexcept nogil:
    return <uint32_t>((id * <uint64_t>0x9E3779B97F4A7C15) >> 32) & <uint32_t>(w.cap_calls - 1)


cdef int calls_add(Worker *w, Bridge *b) noexcept nogil:
    # Returns: 0, or -ENOMEM.
    cdef Bridge **grown
    cdef Bridge *e
    cdef Bridge *next_
    cdef int cap, i, old
    cdef uint32_t h
    if b.hk != NULL:
        return 0
    if w.ncalls >= w.cap_calls:
        cap = w.cap_calls * 2 if w.cap_calls else 64
        grown = <Bridge **>calloc(cap, sizeof(Bridge *))
        if grown == NULL:
            return -ENOMEM
        old = w.cap_calls
        w.cap_calls = cap
        for i in range(old):
            e = w.calls[i]
            while e != NULL:
                next_ = e.hk.next
                h = calls_bucket(w, e.id)
                e.hk.next = grown[h]
                grown[h] = e
                e = next_
        free(w.calls)
        w.calls = grown
    b.hk = <HookCalls *>calloc(1, sizeof(HookCalls))
    if b.hk == NULL:
        return -ENOMEM
    h = calls_bucket(w, b.id)
    b.hk.next = w.calls[h]
    w.calls[h] = b
    w.ncalls += 1
    return 0


cdef Bridge *calls_find(Worker *w, uint64_t id) noexcept nogil:
    # Returns: the bridge with that id that made a call and is not freed
    # yet, or NULL.
    cdef Bridge *b
    if w.cap_calls == 0:
        return NULL
    b = w.calls[calls_bucket(w, id)]
    while b != NULL and b.id != id:
        b = b.hk.next
    return b


cdef void calls_remove(Worker *w, Bridge *b) noexcept nogil:
    # Before b is freed: no answer may find it after.
    cdef Bridge **p
    if b.hk == NULL:
        return
    p = &w.calls[calls_bucket(w, b.id)]
    while p[0] != NULL and p[0] != b:
        p = &p[0].hk.next
    if p[0] == b:
        p[0] = b.hk.next
    w.ncalls -= 1
    free(b.hk)   # after the walk above, which may have followed it
    b.hk = NULL


cdef int hook_call(Worker *w, Bridge *b, int call, HookEvent *ev) noexcept nogil:
    # Queues ev (kind, buf, len, held set) as b's call `call`: names it,
    # copies what the hook shows of b, and arms the deadline if there is
    # one. Returns: 0, or -ENOMEM (nothing was queued).
    cdef HookCall *c
    if calls_add(w, b) < 0:
        return -ENOMEM
    c = &b.hk.call[call]
    b.hk.seq += 1
    if b.hk.seq == 0:
        b.hk.seq = 1
    ev.call = <uint8_t>call
    ev.worker = w.id
    ev.listener = b.ls.id
    ev.id = b.id
    ev.seq = b.hk.seq
    ev.client_v4 = b.client_v4
    ev.client_port = b.client_port
    memcpy(ev.client_ip, b.client_ip, 16)
    ev.accepted_ns = b.accepted_ns
    ev.route = b.route_id
    ev.hello = NULL
    if call == CALL_CONNECT and b.hello != NULL:
        # A copy: the bridge may close (its record taking b.hello) before
        # a hook thread reads the call.
        ev.hello = hello_copy(b.hello)
        if ev.hello == NULL:
            return -ENOMEM
    if event_push(w.sh, ev) < 0:
        free(ev.hello)
        return -ENOMEM
    fp_bump(&lslot(w, b.ls).ctr.hook_calls, 1)
    # The answer comes through this worker's result queue: setting these
    # after the push races with nothing.
    c.seq = b.hk.seq
    c.expired = 0
    b.hook_pending += 1
    if b.ls.hook_timeout_ns:
        c.due_ns = fp_now_ns() + b.ls.hook_timeout_ns
        if b.hk.tl.list == T_NONE:
            timer_add(w, b, T_HOOK, c.due_ns)
    return 0


cdef int64_t hook_next_due(Bridge *b) noexcept nogil:
    # Returns: the earliest deadline of b's calls still waited for, or 0.
    cdef int i
    cdef int64_t due = 0
    if b.hk == NULL:
        return 0
    for i in range(CALLS):
        if b.hk.call[i].seq != 0 and not b.hk.call[i].expired and (due == 0 or b.hk.call[i].due_ns < due):
            due = b.hk.call[i].due_ns
    return due


cdef void hook_expire(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # b's earliest call is due: past hook_timeout, b closes (HOOK_TIMEOUT).
    # A call no thread took yet is taken back; one a thread has stays out
    # (marked expired): the buffer it was lent stays valid until its late
    # answer, which is then stale.
    cdef int i
    cdef HookCall *c
    cdef int64_t due = hook_next_due(b)
    if due == 0:
        timer_del(w, b, SLOT_HOOK)
        return
    if due > now:
        timer_add(w, b, T_HOOK, due)
        return
    for i in range(CALLS):
        c = &b.hk.call[i]
        if c.seq == 0 or c.expired:
            continue
        if event_cancel(w.sh, b.id, c.seq):
            c.seq = 0
            b.hook_pending -= 1
        else:
            c.expired = 1
    fp_atomic_add(&b.ls.gauges.hook_timeouts, 1)
    bridge_close(w, b, HOOK_TIMEOUT, 0, 0)


cdef void record_push(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # Full ring: the record is dropped and counted; a worker never waits.
    cdef RecordRing *q = &w.sh.records
    cdef CloseRecordC *rec
    cdef bint first
    pthread_mutex_lock(&q.mu)
    if q.count == q.cap or q.closed:
        pthread_mutex_unlock(&q.mu)
        fp_atomic_add(&b.ls.gauges.dropped_records, 1)
        return
    rec = &q.items[(q.head + q.count) % q.cap]
    rec.id = b.id
    rec.listener = b.ls.id
    memcpy(rec.client_ip, b.client_ip, 16)
    rec.client_port = b.client_port
    rec.client_v4 = b.client_v4
    rec.reason = b.reason
    rec.upstream = b.upstream
    # The record names the upstream after a swap too: it keeps the group.
    rec.group = b.group if b.upstream >= 0 else NULL
    if rec.group != NULL:
        group_ref(rec.group)
    rec.connected = b.state == B_ACTIVE or b.up.bytes != 0 or b.down.bytes != 0
    if b.route != NULL and b.addr < b.nroute:
        rec.route = b.route[b.addr]
    else:
        rec.route.family = 0
    rec.bytes_upstream = b.up.bytes
    rec.bytes_downstream = b.down.bytes
    rec.accepted_ns = b.accepted_ns
    rec.closed_ns = now
    rec.queue_ns = <int64_t>b.queue_us * 1000
    # Only bridge_connected makes a bridge B_ACTIVE, and it stays so until here.
    rec.connect_ns = <int64_t>b.connect_us * 1000 if b.state == B_ACTIVE else -1
    rec.hello = b.hello   # the bridge is closing: the record takes it
    b.hello = NULL
    q.count += 1
    first = q.count == 1
    pthread_mutex_unlock(&q.mu)
    if first:   # after the unlock: the woken thread need not wait for it
        pthread_cond_signal(&q.cv)


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
    was_empty = q.count == 1 and q.retries == NULL
    pthread_mutex_unlock(&q.mu)
    return was_empty


cdef bint retry_push(Worker *w, Bridge *b) noexcept nogil:
    # Hands waiter b (off its wait queue) a retry on its worker w.
    # Returns: 1 when w must be woken (nothing was on its way to it).
    cdef ResultQueue *q = &w.results
    cdef bint was_empty
    pthread_mutex_lock(&q.mu)
    was_empty = q.count == 0 and q.retries == NULL
    b.wnext = q.retries
    q.retries = b
    pthread_mutex_unlock(&q.mu)
    return was_empty


cdef void hook_result_free(HookResult *res) noexcept nogil:
    # A replacement buffer or a route the bridge will not use.
    if res.kind == EVT_DATA and res.verdict == V_REPLACE:
        free(res.buf)
    free(res.route)
    res.route = NULL
    group_unref(res.group)
    res.group = NULL


cdef void limbo_release(Worker *w, Bridge *b) noexcept nogil:
    # The last answer for a closed bridge came: free it and what it lent.
    cdef Bridge **p = &w.limbo
    if b.hook_pending > 0:
        return
    while p[0] != NULL and p[0] != b:
        p = &p[0].grave_next
    if p[0] == b:
        p[0] = b.grave_next
    calls_remove(w, b)
    bridge_free(b)


cdef Bridge *answer_claim(Worker *w, HookResult *res) noexcept nogil:
    # Returns: the bridge whose call out `res` answers (the call is then no
    # longer out), or NULL for an answer to no call out (counted).
    cdef Bridge *b
    cdef HookCall *c
    cdef int64_t due
    if res.call >= CALLS or (res.kind == EVT_CONNECT) != (res.call == CALL_CONNECT) or res.seq == 0:
        b = NULL
    else:
        b = calls_find(w, res.id)
    if b == NULL or b.hk.call[res.call].seq != res.seq:
        fp_atomic_add(&w.sh.gauges.stale_answers, 1)
        hook_result_free(res)
        return NULL
    c = &b.hk.call[res.call]
    c.seq = 0
    b.hook_pending -= 1
    if c.expired:
        # Late: b closed at the deadline and waited only to be freed.
        fp_atomic_add(&w.sh.gauges.stale_answers, 1)
        hook_result_free(res)
        limbo_release(w, b)
        return NULL
    if b.hk.tl.list != T_NONE:
        due = hook_next_due(b)
        if due == 0:
            timer_del(w, b, SLOT_HOOK)
        elif due != b.hk.tl.deadline_ns:
            timer_add(w, b, T_HOOK, due)
    return b


cdef void worker_take_results(Worker *w, int64_t now) noexcept nogil:
    cdef ResultQueue *q = &w.results
    cdef HookResult *items
    cdef int n, i
    cdef Bridge *b
    cdef Bridge *retries
    cdef Bridge *oldest = NULL
    pthread_mutex_lock(&q.mu)
    items = q.items
    n = q.count
    q.items = NULL
    q.count = 0
    q.cap = 0
    retries = q.retries
    q.retries = NULL
    pthread_mutex_unlock(&q.mu)
    while retries != NULL:   # oldest first, as they were kicked
        b = retries
        retries = b.wnext
        b.wnext = oldest
        oldest = b
    while oldest != NULL:
        b = oldest
        oldest = b.wnext   # before the retry: waiting again relinks b
        b.wnext = NULL
        bridge_queue_retry(w, b, now)
    for i in range(n):
        if items[i].kind == EVT_RETRY:
            bridge_queue_retry(w, items[i].bridge, now)
            continue
        b = answer_claim(w, &items[i])
        if b == NULL:
            continue
        if b.state == B_CLOSED:
            hook_result_free(&items[i])
            limbo_release(w, b)
        elif items[i].kind == EVT_CONNECT:
            bridge_connect_answer(w, b, &items[i], now)
        else:
            bridge_data_answer(w, b, &items[i], now)
    free(items)
