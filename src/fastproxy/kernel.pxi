# The kernel engine: an established bridge's two sockets join the sockmap
# (sockmap.h) and its verdict program forwards their bytes inside the
# kernel. The worker moves only what the verdict passed to a socket's own
# queue (its peer held a budget not yet acked: backpressure), and passes a
# FIN on, each once the peer has taken every byte forwarded before it.
# Direction 0 is client -> upstream (the client socket's slot, kslot),
# 1 upstream -> client (kslot + 1).

cdef enum:
    KFOLD_MS = 100   # how stale an offloaded bridge's bytes may be in stats


cdef inline fp_sm_state *kstate(Worker *w, Bridge *b, int direction) noexcept nogil:
    return &w.sh.sm.st[b.kslot + <uint32_t>direction]


cdef bint kern_may_join(Bridge *b) noexcept nogil:
    # Established, nothing that user space must see. Bytes a flow holds
    # (a fast sender's) join as owed: see fp_sm_prepare. And no skb at the
    # head of either receive queue was read in part: the verdict gets whole
    # skbs (tcp_read_skb ignores copied_seq), so it would forward that
    # skb's head again, and advance copied_seq past rcv_nxt, after which no
    # arrival wakes the socket (the bridge hangs).
    return (b.state == B_ACTIVE and not b.kern and not b.knever and b.tx == NULL
            and not b.up.cut and not b.down.cut
            and not b.up.hook and not b.down.hook and not b.up.waiting and not b.down.waiting
            and not b.up.held and not b.down.held
            and not b.up.eof and not b.down.eof and not b.up.src_hup and not b.down.src_hup
            and not b.up.shut and not b.down.shut)


cdef void kern_join(Worker *w, Bridge *b) noexcept nogil:
    # Any failure leaves the bridge on the splice path for good (knever).
    cdef uint32_t slot
    cdef uint64_t tc = 0
    cdef uint64_t tu = 0
    if w.nkfree == 0 or fp_sm_taken(b.cfd, &tc) < 0 or fp_sm_taken(b.ufd, &tu) < 0:
        b.knever = 1
        return
    slot = w.kfree[w.nkfree - 1]
    # Both states exist before either socket joins: the first skb may come
    # as soon as one is in.
    if (fp_sm_prepare(&w.sh.sm, b.cfd, slot, slot + 1, w.sh.kbudget, tu, b.up.len - b.up.off) < 0
            or fp_sm_prepare(&w.sh.sm, b.ufd, slot + 1, slot, w.sh.kbudget, tc, b.down.len - b.down.off) < 0):
        fp_sm_leave(&w.sh.sm, b.cfd, slot)
        b.knever = 1
        return
    fp_sm_nodelay(b.cfd)
    fp_sm_nodelay(b.ufd)
    # Autotuning would grow the receive buffer (what passed bytes may pin)
    # far past the budget; a socket_buffer the user set is already a bound.
    if b.ls.socket_buffer <= 0:
        fp_sm_rcvbuf(b.cfd, <int>w.sh.kbudget)
        fp_sm_rcvbuf(b.ufd, <int>w.sh.kbudget)
    if fp_sm_join(&w.sh.sm, b.cfd, slot) < 0 or fp_sm_join(&w.sh.sm, b.ufd, slot + 1) < 0:
        # (EOPNOTSUPP: a FIN came in meanwhile.) Nothing was forwarded yet:
        # what either socket received is still in its own queue.
        fp_sm_leave(&w.sh.sm, b.cfd, slot)
        fp_sm_leave(&w.sh.sm, b.ufd, slot + 1)
        b.knever = 1
        return
    w.nkfree -= 1
    w.nkern += 1
    b.kern = 1
    b.kslot = slot
    b.kseen = 0
    b.kfolded[0] = 0
    b.kfolded[1] = 0
    # recv reads the verdict's queue; splice would read the socket's own.
    # A pipe that holds bytes still empties into dst, then goes back.
    b.copy = 1
    if b.up.len == 0:
        flow_release(w, &b.up)
    if b.down.len == 0:
        flow_release(w, &b.down)
    # What arrived before the join waits in the receive queue until the
    # low-water mark is set again, which runs the verdict over it.
    fp_set_rcvlowat(b.cfd, 1)
    fp_set_rcvlowat(b.ufd, 1)
    b.c_rd = 1
    b.u_rd = 1


cdef uint64_t kern_forwarded(Worker *w, Bridge *b, int direction) noexcept nogil:
    return fp_sm_get(&kstate(w, b, direction).forwarded)


cdef bint kern_caught_up(Worker *w, Bridge *b, int direction) noexcept nogil:
    # The peer (dst) has taken every byte forwarded to it into its send
    # queue: what user space sends now queues behind them.
    cdef fp_sm_state *st = kstate(w, b, direction)
    cdef uint64_t t = 0
    cdef int dst = b.ufd if direction == 0 else b.cfd
    if fp_sm_taken(dst, &t) < 0:
        return 1   # the socket broke: the send reports it
    return <int64_t>(t - st.adj - fp_sm_get(&st.forwarded)) >= 0


cdef void kwait_add(Worker *w, Bridge *b) noexcept nogil:
    if b.kwaiting:
        return
    b.kwaiting = 1
    b.kprev = NULL
    b.knext = w.kwait
    if w.kwait != NULL:
        w.kwait.kprev = b
    w.kwait = b


cdef void kwait_del(Worker *w, Bridge *b) noexcept nogil:
    if not b.kwaiting:
        return
    b.kwaiting = 0
    if b.kprev != NULL:
        b.kprev.knext = b.knext
    else:
        w.kwait = b.knext
    if b.knext != NULL:
        b.knext.kprev = b.kprev
    b.kprev = NULL
    b.knext = NULL


cdef void kwait_run(Worker *w, int64_t now) noexcept nogil:
    # Every 1 ms while any bridge waits for its peer to catch up: nothing
    # wakes user space when a psock's backlog drains.
    cdef Bridge *b = w.kwait
    cdef Bridge *nxt
    w.kwait = NULL
    while b != NULL:
        nxt = b.knext
        b.kwaiting = 0
        b.kprev = NULL
        b.knext = NULL
        if b.state == B_ACTIVE:
            bridge_pump(w, b, now)
        b = nxt


cdef void kern_check_eof(Worker *w, Bridge *b, Flow *f, fp_sm_state *st, uint64_t before,
                         uint8_t *src_rd) noexcept nogil:
    # recv said EOF, but bytes the verdict passed may still be on their
    # way: a PASS queues behind the socket's psock backlog (what its peer
    # redirected to it) and reaches recv from a kworker later. EOF counts
    # once every passed byte was received.
    if f.eof and not f.shut and fp_sm_get(&st.passed) != st.drained + (f.bytes - before) + (f.len - f.off):
        f.eof = 0
        src_rd[0] = 1
        kwait_add(w, b)


cdef int kern_flow(Worker *w, Bridge *b, Flow *f, int src, int dst, uint8_t *src_rd,
                   uint8_t *dst_wr, int direction, uint64_t *total,
                   uint64_t *per_upstream, ToxicFlow *tf) noexcept nogil:
    # flow_run for an offloaded bridge. Returns what flow_run returns.
    # Bytes received are sent only once the peer caught up; while user
    # space holds any, passed != drained and the verdict redirects
    # nothing, so the check stays true for the whole flow_run.
    cdef fp_sm_state *st = kstate(w, b, direction)
    cdef uint64_t before = f.bytes
    cdef uint64_t delta
    cdef uint64_t budget = 0 if tf != NULL else w.sh.kbudget
    cdef uint8_t no = 0
    cdef int r = FLOW_OK
    if st.budget != budget:
        # Toxics or a pause on an offloaded bridge: a zero budget has the
        # verdict pass every new skb to user space, where flow_run applies
        # them; the bridge never leaves the sockmap (leaving would drop
        # what the kernel queued), and redirecting resumes when they go.
        fp_sm_put(&st.budget, budget)
    if f.len == f.off:
        r = flow_run(w, b, f, src, dst, src_rd, &no, direction, total, per_upstream, tf)
        kern_check_eof(w, b, f, st, before, src_rd)
    if r == FLOW_OK and (f.len > f.off or (f.eof and not f.shut)):
        if kern_caught_up(w, b, direction):
            if f.len > f.off:
                r = flow_run(w, b, f, src, dst, src_rd, dst_wr, direction, total, per_upstream, tf)
                kern_check_eof(w, b, f, st, before, src_rd)
            if r == FLOW_OK and f.eof and f.len == 0 and not f.shut:
                if kern_broken(w, b):
                    # The FIN came before the next fold: passed on, it would
                    # have the peer take what it got for the whole stream.
                    r = FLOW_BROKEN
                else:
                    if not (b.up.shut if f == &b.down else b.down.shut):
                        shutdown(dst, SHUT_WR)
                    f.shut = 1
        else:
            kwait_add(w, b)
    delta = f.bytes - before
    if delta:
        # adj first: once drained == passed the verdict may read it.
        fp_sm_put(&st.adj, st.adj + delta)
        fp_sm_put(&st.drained, st.drained + delta)
    return r


cdef void kern_fold(Worker *w, Bridge *b) noexcept nogil:
    # What the kernel forwarded since the last fold into the listener's and
    # the upstream's byte counters, so that stats and metrics move while an
    # offloaded bridge flows, not only when it closes.
    cdef UpstreamCounters *uc = b.uc if b.uc != NULL else &lslot(w, b.ls).routed
    cdef uint64_t up = kern_forwarded(w, b, 0) - b.kfolded[0]
    cdef uint64_t down = kern_forwarded(w, b, 1) - b.kfolded[1]
    b.kfolded[0] += up
    b.kfolded[1] += down
    fp_bump(&lslot(w, b.ls).ctr.bytes_upstream, up)
    fp_bump(&uc.bytes_upstream, up)
    fp_bump(&lslot(w, b.ls).ctr.bytes_downstream, down)
    fp_bump(&uc.bytes_downstream, down)


cdef bint kern_broken(Worker *w, Bridge *b) noexcept nogil:
    # The verdict dropped an skb it could not cut (sockmap.h) and drops
    # everything after it: the bridge must end in a reset, never a FIN.
    return ((kstate(w, b, 0).flags | kstate(w, b, 1).flags) & FP_SM_BROKEN) != 0


cdef void kern_reset_broken(Worker *w, Bridge *b) noexcept nogil:
    fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
    bridge_close(w, b, SHUTDOWN, 1, 1)


cdef void kern_fold_all(Worker *w, int64_t now) noexcept nogil:
    # Every KFOLD_MS while any bridge of this worker is offloaded. Also where
    # a broken bridge ends when no FIN brings the worker to it first
    # (kern_flow). Downwards: closing moves the last bridge into slot i.
    cdef int i = w.nbridges - 1
    cdef Bridge *b
    while i >= 0:
        b = w.bridges[i]
        if b.kern:
            if kern_broken(w, b):
                kern_reset_broken(w, b)
            else:
                kern_fold(w, b)
        i -= 1
    w.kfold_ns = now + KFOLD_MS * 1000000


cdef void kern_leave(Worker *w, Bridge *b) noexcept nogil:
    # At close, before the sockets: the bytes the kernel forwarded count in
    # the stats and the access log like those the worker moved.
    kwait_del(w, b)
    kern_fold(w, b)
    b.up.bytes += b.kfolded[0]
    b.down.bytes += b.kfolded[1]
    fp_sm_leave(&w.sh.sm, b.cfd, b.kslot)
    fp_sm_leave(&w.sh.sm, b.ufd, b.kslot + 1)
    w.kfree[w.nkfree] = b.kslot
    w.nkfree += 1
    w.nkern -= 1
    b.kern = 0


cdef bint kern_active(Worker *w, Bridge *b) noexcept nogil:
    # The idle timer's question for an offloaded bridge: did the kernel
    # forward anything since the last time it asked?
    cdef uint64_t seen = kern_forwarded(w, b, 0) + kern_forwarded(w, b, 1)
    if seen == b.kseen:
        return 0
    b.kseen = seen
    return 1

