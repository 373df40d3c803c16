# Toxics: faults injected into a listener's bridges, in the worker, on the
# splice and copy paths alike (no Python per chunk). See docs/faults.md.
#
# A listener's toxics are one immutable ToxicSet (built by the control
# plane, published under ListenerC.toxic_gen); a bridge takes it when it
# becomes active and is moved to a new one when a worker syncs. A bridge
# with toxics has a ToxicState: per toxic, whether its toxicity draw said
# it applies (kept while the toxic's id is kept), and per stream what the
# applied toxics add up to. flow_run asks toxic_allow how much it may write,
# and a per-worker heap wakes the bridge when what held it ends.
#
# Return codes, here as elsewhere: 0 or a count on success, -errno
# (-ENOMEM) on failure; toxic_allow: > 0 bytes that may go, 0 held, -1 a
# limit_data toxic's count is reached (the bridge closes).

cdef enum:
    TOXIC_RING = 256       # latency stamps per flow: a full ring holds reads
    TOXIC_CHUNK = 1460     # bandwidth: fewer bytes than this wait for more tokens
    TOXIC_WAKES = 4096     # heap entries run per loop round, at most

cdef int64_t TOXIC_NONE = 0x7fffffffffffffff


cdef inline uint64_t worker_rand(Worker *w) noexcept nogil:
    # xorshift64*, as the balancer's (never 0).
    cdef uint64_t x = w.rng
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    w.rng = x
    return x * XORSHIFT_STAR


cdef inline void toxic_set_ref(ToxicSet *s) noexcept nogil:
    if s != NULL:
        fp_atomic_add(&s.refs, 1)


cdef void toxic_set_unref(ToxicSet *s) noexcept nogil:
    if s != NULL and fp_atomic_add(&s.refs, -1) == 0:   # (returns the new count)
        free(s.t)
        free(s)


# ---- the wake-up heap: bridges by ToxicState.due_ns (min at 0)

cdef inline int64_t theap_due(Worker *w, int i) noexcept nogil:
    return w.theap[i].tx.due_ns


cdef inline void theap_put(Worker *w, int i, Bridge *b) noexcept nogil:
    w.theap[i] = b
    b.tx.heap_at = i


cdef void theap_sift(Worker *w, int i) noexcept nogil:
    # Moves entry i up or down to its place.
    cdef Bridge *b = w.theap[i]
    cdef int64_t due = b.tx.due_ns
    cdef int p, c
    while i > 0:
        p = (i - 1) // 2
        if theap_due(w, p) <= due:
            break
        theap_put(w, i, w.theap[p])
        i = p
    while True:
        c = 2 * i + 1
        if c >= w.ntheap:
            break
        if c + 1 < w.ntheap and theap_due(w, c + 1) < theap_due(w, c):
            c += 1
        if theap_due(w, c) >= due:
            break
        theap_put(w, i, w.theap[c])
        i = c
    theap_put(w, i, b)


cdef void theap_remove(Worker *w, Bridge *b) noexcept nogil:
    cdef int i = b.tx.heap_at
    cdef Bridge *last
    if i < 0:
        return
    b.tx.heap_at = -1
    w.ntheap -= 1
    if i == w.ntheap:
        return
    last = w.theap[w.ntheap]
    theap_put(w, i, last)
    theap_sift(w, i)


cdef int theap_set(Worker *w, Bridge *b, int64_t due) noexcept nogil:
    # due 0: off the heap. Returns: 0, or -ENOMEM (the bridge then gets no
    # wake-up; its next event moves it on).
    cdef Bridge **grown
    cdef int cap
    cdef ToxicState *x = b.tx
    if due == 0:
        theap_remove(w, b)
        return 0
    if x.heap_at >= 0:
        x.due_ns = due
        theap_sift(w, x.heap_at)
        return 0
    if w.ntheap == w.cap_theap:
        cap = w.cap_theap * 2 if w.cap_theap else 64
        grown = <Bridge **>realloc(w.theap, cap * sizeof(Bridge *))
        if grown == NULL:
            return -ENOMEM
        w.theap = grown
        w.cap_theap = cap
    x.due_ns = due
    theap_put(w, w.ntheap, b)
    w.ntheap += 1
    theap_sift(w, w.ntheap - 1)
    return 0


# ---- a bridge's state

cdef ToxicState *toxic_state(Bridge *b) noexcept nogil:
    # The bridge's state, allocated on first need. Returns NULL short of memory.
    cdef ToxicState *x = b.tx
    if x != NULL:
        return x
    x = <ToxicState *>calloc(1, sizeof(ToxicState))
    if x == NULL:
        return NULL
    x.heap_at = -1
    x.flow[0].fin_delay_ns = -1
    x.flow[1].fin_delay_ns = -1
    b.tx = x
    return x


cdef void toxic_free(Worker *w, Bridge *b) noexcept nogil:
    cdef ToxicState *x = b.tx
    if x == NULL:
        return
    theap_remove(w, b)
    toxic_set_unref(x.set)
    free(x.picks)
    free(x.flow[0].ring)
    free(x.flow[1].ring)
    free(x)
    b.tx = NULL


cdef int toxic_derive(Worker *w, ToxicState *x, int64_t now) noexcept nogil:
    # What the applied toxics add up to per stream: latencies add, the
    # lowest rate and the longest slow_close win, the first slicer counts,
    # any timeout holds the stream. Running state (tokens, stamps, counts)
    # is kept. Returns: 0, or -ENOMEM (no latency ring: the stream is left
    # without latency, and the caller ends the bridge).
    cdef int i, s, r = 0
    cdef ToxicC *t
    cdef ToxicFlow *tf
    cdef int64_t rate[2]
    rate[0] = 0
    rate[1] = 0
    for s in range(2):
        tf = &x.flow[s]
        tf.latency_ns = 0
        tf.jitter_ns = 0
        tf.slice_avg = 0
        tf.slice_var = 0
        tf.slice_delay_ns = 0
        tf.fin_delay_ns = -1
        tf.hold = tf.paused
        tf.limited = 0
    if x.set != NULL:
        for i in range(x.set.n):
            if not x.picks[i].on:
                continue
            t = &x.set.t[i]
            tf = &x.flow[t.stream]
            if t.kind == TX_LATENCY:
                tf.latency_ns += t.a
                tf.jitter_ns += t.b
            elif t.kind == TX_BANDWIDTH:
                if t.a > 0 and (rate[t.stream] == 0 or t.a < rate[t.stream]):
                    rate[t.stream] = t.a
            elif t.kind == TX_SLOW_CLOSE:
                if t.a > tf.fin_delay_ns:
                    tf.fin_delay_ns = t.a
            elif t.kind == TX_TIMEOUT or t.kind == TX_RESET_PEER:
                tf.hold = 1
            elif t.kind == TX_SLICER:
                if tf.slice_avg == 0 and t.a > 0:
                    tf.slice_avg = t.a
                    tf.slice_var = t.b
                    tf.slice_delay_ns = t.c
            elif t.kind == TX_LIMIT_DATA:
                tf.limited = 1
    for s in range(2):
        tf = &x.flow[s]
        if tf.latency_ns == 0 and tf.jitter_ns == 0:
            if tf.ring != NULL:
                # Removed: what waited for its release time goes now.
                free(tf.ring)
                tf.ring = NULL
                tf.rcount = 0
        elif tf.ring == NULL:
            tf.ring = <ToxicStamp *>malloc(TOXIC_RING * sizeof(ToxicStamp))
            tf.rhead = 0
            tf.rcount = 0
            tf.released = tf.rd   # bytes read before it applied are not delayed
            if tf.ring == NULL:
                tf.latency_ns = 0
                tf.jitter_ns = 0
                r = -ENOMEM
        if rate[s] != tf.rate:
            if tf.rate == 0:
                tf.refill_ns = now
            tf.rate = rate[s]
            # 20 ms' worth, and room for a few segments: a wake-up that a
            # busy CPU delays that long loses no tokens (the rate holds over
            # seconds), while bursts stay short; at low rates no more than
            # a fifth of a second's.
            tf.burst = min(max(<double>tf.rate / 50.0, 4.0 * TOXIC_CHUNK), max(<double>tf.rate / 5.0, 1.0))
            if tf.tokens > tf.burst or tf.rate == 0:
                tf.tokens = tf.burst
        if tf.fin_delay_ns < 0:
            tf.fin_due_ns = 0
    return r


cdef int toxic_move(Worker *w, Bridge *b, ToxicSet *set, int64_t now) noexcept nogil:
    # Moves b to `set` (NULL or empty: none): a toxic it had (same id) keeps
    # its draw and start, a new one is drawn now. Returns: 0, or -ENOMEM
    # (b cannot have the set as it is: the caller ends b).
    cdef ToxicState *x = b.tx
    cdef ToxicPick *picks = NULL
    cdef ToxicC *t
    cdef int i, j
    cdef bint found
    if set != NULL and set.n == 0:
        set = NULL
    if x == NULL:
        if set == NULL:
            return 0
        x = toxic_state(b)
        if x == NULL:
            return -ENOMEM
    elif x.set == set:
        return 0
    if set != NULL:
        picks = <ToxicPick *>malloc(set.n * sizeof(ToxicPick))
        if picks == NULL:
            return -ENOMEM
        for i in range(set.n):
            t = &set.t[i]
            found = 0
            if x.set != NULL:
                for j in range(x.set.n):
                    if x.picks[j].id == t.id:
                        picks[i] = x.picks[j]
                        found = 1
                        break
            if not found:
                picks[i].id = t.id
                picks[i].on = (worker_rand(w) >> 32) < t.threshold
                picks[i].since_ns = now
                picks[i].base = x.flow[t.stream].wr
                if t.kind == TX_RESET_PEER:
                    # As toxiproxy's: its clock starts at the stream's first
                    # bytes (or its end) after this (toxic_rearm).
                    picks[i].since_ns = 0
                    picks[i].base = x.flow[t.stream].rd
        toxic_set_ref(set)
    toxic_set_unref(x.set)
    free(x.picks)
    x.set = set
    x.picks = picks
    if toxic_derive(w, x, now) < 0:
        return -ENOMEM   # the set is b's; only a latency went without a ring
    if set == NULL and not (x.flow[0].paused or x.flow[1].paused):
        toxic_free(w, b)
    return 0


cdef int64_t toxic_limit_left(ToxicState *x, int stream) noexcept nogil:
    # Bytes the stream's limit_data toxics still let through (the least).
    cdef int64_t left = TOXIC_NONE, n
    cdef int i
    cdef ToxicC *t
    for i in range(x.set.n if x.set != NULL else 0):
        t = &x.set.t[i]
        if x.picks[i].on and t.kind == TX_LIMIT_DATA and t.stream == stream:
            n = t.a - <int64_t>(x.flow[stream].wr - x.picks[i].base)
            if n < left:
                left = n
    return left


cdef inline void toxic_wake_at(ToxicFlow *tf, int64_t at) noexcept nogil:
    if tf.wake_ns == 0 or at < tf.wake_ns:
        tf.wake_ns = at


cdef int64_t toxic_allow(Worker *w, Bridge *b, ToxicFlow *tf, int stream,
                         int64_t want, int64_t now) noexcept nogil:
    # How many of `want` bytes the stream may write now. Returns > 0, 0
    # (held: tf.wake_ns says until when, if time ends it), or -1 (a
    # limit_data count is reached: close).
    cdef int64_t n = want, left, size
    cdef double need
    cdef ToxicStamp *st
    if tf.hold:
        return 0
    if tf.limited:
        left = toxic_limit_left(b.tx, stream)
        if left <= 0:
            return -1
        if left < n:
            n = left
    if tf.ring != NULL:
        while tf.rcount > 0:
            st = &tf.ring[tf.rhead]
            if st.release_ns > now:
                break
            tf.released = st.end
            tf.rhead = (tf.rhead + 1) % TOXIC_RING
            tf.rcount -= 1
        if tf.released <= tf.wr:
            if tf.rcount > 0:
                toxic_wake_at(tf, tf.ring[tf.rhead].release_ns)
            return 0
        if <int64_t>(tf.released - tf.wr) < n:
            n = <int64_t>(tf.released - tf.wr)
    if tf.slice_avg:
        if now < tf.next_ns:
            toxic_wake_at(tf, tf.next_ns)
            return 0
        size = tf.slice_avg - tf.slice_var + <int64_t>(worker_rand(w) % <uint64_t>(2 * tf.slice_var + 1))
        if size < 1:
            size = 1
        if size < n:
            n = size
    if tf.rate:
        tf.tokens += <double>(now - tf.refill_ns) * <double>tf.rate / 1e9
        tf.refill_ns = now
        if tf.tokens > tf.burst:
            tf.tokens = tf.burst
        # Wait for an eighth of the burst (at least a segment): at high
        # rates fewer, larger writes, at low ones segment by segment.
        need = min(<double>n, tf.burst, max(<double>TOXIC_CHUNK, tf.burst / 8.0))
        if tf.tokens < need:
            toxic_wake_at(tf, now + 1 + <int64_t>((need - tf.tokens) * 1e9 / <double>tf.rate))
            return 0
        if <double>n > tf.tokens:
            n = <int64_t>tf.tokens
    return n


cdef bint toxic_wrote(Worker *w, Bridge *b, ToxicFlow *tf, int stream,
                      int64_t r, int64_t now) noexcept nogil:
    # r bytes were written. Returns 1 when a limit_data count is now
    # reached: the bridge closes at once (as toxiproxy's does).
    tf.wr += <uint64_t>r
    if tf.rate:
        tf.tokens -= <double>r
    if tf.slice_avg and tf.slice_delay_ns:
        tf.next_ns = now + tf.slice_delay_ns
    return tf.limited and toxic_limit_left(b.tx, stream) <= 0


cdef bint toxic_may_read(Worker *w, Flow *f, ToxicFlow *tf) noexcept nogil:
    # Returns 0 when the stream must read nothing now (its latency stamps
    # are full). Under latency a flow holds latency x rate bytes: its pipe
    # grows to the system's maximum (throughput <= pipe size / latency).
    cdef int r
    if tf.ring == NULL:
        return 1
    if tf.rcount == TOXIC_RING:
        return 0
    if f.pipe_r >= 0 and f.cap < <uint32_t>w.sh.pipe_max:
        r = fp_pipe_size(f.pipe_w, w.sh.pipe_max)
        if r > 0 and <uint32_t>r > f.cap:
            f.cap = <uint32_t>r
    return 1


cdef void toxic_read(Worker *w, ToxicFlow *tf, int64_t n, int64_t now) noexcept nogil:
    # n bytes entered the flow (read, or answered by on_data): stamped with
    # their release time when the stream has latency. Jitter is drawn
    # uniformly in [-jitter, +jitter]; a release never comes before the
    # previous one's, so order is kept.
    cdef int64_t release
    cdef ToxicStamp *last
    cdef int at
    tf.rd += <uint64_t>n
    if tf.ring == NULL:
        return
    release = now + tf.latency_ns
    if tf.jitter_ns:
        release += <int64_t>(worker_rand(w) % <uint64_t>(2 * tf.jitter_ns + 1)) - tf.jitter_ns
    if release < now:
        release = now
    if tf.rcount > 0:
        last = &tf.ring[(tf.rhead + tf.rcount - 1) % TOXIC_RING]
        if release < last.release_ns:
            release = last.release_ns
        if release == last.release_ns:
            last.end = tf.rd   # same release: one stamp
            return
    elif release <= now:
        tf.released = tf.rd
        return
    at = (tf.rhead + tf.rcount) % TOXIC_RING
    tf.ring[at].end = tf.rd
    tf.ring[at].release_ns = release
    tf.rcount += 1


cdef bint toxic_fin_ok(ToxicFlow *tf, int64_t now) noexcept nogil:
    # May the FIN that ends this stream go on now? Held streams hold it;
    # slow_close delays it.
    if tf.hold:
        return 0
    if tf.fin_delay_ns < 0:
        return 1
    if tf.fin_due_ns == 0:
        tf.fin_due_ns = now + tf.fin_delay_ns
    if now >= tf.fin_due_ns:
        return 1
    toxic_wake_at(tf, tf.fin_due_ns)
    return 0


cdef int toxic_rearm(Worker *w, Bridge *b) noexcept nogil:
    # After a pump: the bridge's next wake-up, the earliest of what held
    # its streams and of its timeout and reset_peer deadlines (a reset_peer
    # whose stream brought its first bytes or its end since the last pump
    # starts its clock here). Returns: 0,
    # or -ENOMEM (no room on the heap: the caller ends the bridge, which
    # would otherwise wait for a wake-up that never comes).
    cdef ToxicState *x = b.tx
    cdef int64_t due = 0, at
    cdef int i, s
    cdef ToxicC *t
    for s in range(2):
        at = x.flow[s].wake_ns
        if at and (due == 0 or at < due):
            due = at
    for i in range(x.set.n if x.set != NULL else 0):
        t = &x.set.t[i]
        if not x.picks[i].on:
            continue
        if t.kind == TX_RESET_PEER and x.picks[i].since_ns == 0:
            if x.flow[t.stream].rd == x.picks[i].base and not (b.up.eof if t.stream == 0 else b.down.eof):
                continue   # nothing came on its stream yet
            x.picks[i].since_ns = w.now_ns
        if t.kind == TX_RESET_PEER or (t.kind == TX_TIMEOUT and t.a > 0):
            at = x.picks[i].since_ns + t.a
            if due == 0 or at < due:
                due = at
    return theap_set(w, b, due)


cdef void toxic_wake(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # Its wake-up came: a reset_peer or timeout toxic whose time came ends
    # the bridge; otherwise what was held may go.
    cdef ToxicState *x = b.tx
    cdef int i
    cdef ToxicC *t
    for i in range(x.set.n if x.set != NULL else 0):
        t = &x.set.t[i]
        if not x.picks[i].on or x.picks[i].since_ns == 0 or x.picks[i].since_ns + t.a > now:
            continue
        if t.kind == TX_RESET_PEER:
            bridge_close(w, b, TOXIC_CLOSED, 1, 1)
            return
        if t.kind == TX_TIMEOUT and t.a > 0:
            bridge_close(w, b, TOXIC_CLOSED, 0, 0)
            return
    bridge_pump(w, b, now)


cdef void toxics_run(Worker *w, int64_t now) noexcept nogil:
    cdef Bridge *b
    cdef int n = 0
    while w.ntheap > 0 and n < TOXIC_WAKES:
        b = w.theap[0]
        if b.tx.due_ns > now:
            break
        theap_remove(w, b)
        toxic_wake(w, b, now)
        n += 1


cdef void worker_sync_toxics(Worker *w, ListenerC *ls, ListenerSlot *s, int64_t now) noexcept nogil:
    # The listener's set changed: its live bridges here move to the new
    # one, newest first (a close moves the last bridge into the freed
    # place, which this walk has passed). Each is pumped: a removed toxic
    # releases what it held, a new one arms its timers.
    cdef int i = w.nbridges - 1
    cdef Bridge *b
    cdef bint had
    s.toxics = <ToxicSet *>fp_ptr_get(<void **>&ls.toxics)
    while i >= 0:
        if i < w.nbridges:
            b = w.bridges[i]
            if b.ls == ls and b.state == B_ACTIVE:
                had = b.tx != NULL
                if toxic_move(w, b, s.toxics, now) < 0:
                    # It would keep the old set until the next change:
                    # no bridge flows without the listener's faults.
                    bridge_no_memory(w, b)
                elif had or b.tx != NULL:
                    bridge_pump(w, b, now)
        i -= 1


cdef int bridge_command(Worker *w, Bridge *b, int action, int stream, int64_t now) noexcept nogil:
    # A control-plane command on one live bridge (BA_*). Returns 1 when
    # carried out, 0 when it could not be (not connected yet, short of
    # memory).
    cdef ToxicState *x
    cdef Flow *f
    if action == BA_CLOSE:
        bridge_close(w, b, ADMIN_CLOSED, 0, 0)
        return 1
    if action == BA_RESET:
        bridge_close(w, b, ADMIN_CLOSED, 1, 1)
        return 1
    if b.state != B_ACTIVE:
        return 0
    if action == BA_HALF_CLOSE:
        # As if its sender had sent FIN: what is queued goes first, then
        # the FIN; the other stream flows on.
        f = &b.up if stream == 0 else &b.down
        f.eof = 1
        bridge_pump(w, b, now)
        return 1
    x = toxic_state(b)
    if x == NULL:
        return 0
    x.flow[stream].paused = action == BA_PAUSE
    if toxic_derive(w, x, now) < 0:
        bridge_no_memory(w, b)
        return 1
    if x.set == NULL and not (x.flow[0].paused or x.flow[1].paused):
        toxic_free(w, b)
    bridge_pump(w, b, now)
    return 1


cdef void toxic_snapshot(ToxicState *x, BridgeInfo *e) noexcept nogil:
    # What bridges() shows: the ids of the toxics applied, paused streams.
    cdef int i, n = 0
    e.paused = (1 if x.flow[0].paused else 0) | (2 if x.flow[1].paused else 0)
    for i in range(x.set.n if x.set != NULL else 0):
        if x.picks[i].on and n < 16:
            e.toxic_ids[n] = x.picks[i].id
            n += 1
    e.ntoxics = <uint8_t>n
