# Bridges: one client socket joined to one upstream socket, both directions
# moved by splice through a pooled pipe, or copied through a pooled buffer.
# Everything here runs on a worker thread without the GIL.

cdef enum:
    SMALL_READ = 16384      # a splice this small into an empty pipe: not bulk


cdef enum FlowResult:
    FLOW_OK = 0
    FLOW_SRC_RESET = 1      # reading src failed: it reset (or broke)
    FLOW_DST_RESET = 2      # writing dst failed: its peer is gone
    FLOW_HOOK_FAILED = 3    # on_data could not be asked, held too much, or said CLOSE
    FLOW_HOOK_ERROR = 4     # on_data raised (what it answered before is sent first)
    FLOW_TOXIC = 5          # a limit_data toxic's count is reached
    FLOW_NO_MEMORY = 6      # no buffer for the flow: the bridge ends (SHUTDOWN)
    FLOW_BROKEN = 7         # kernel engine: a FIN after bytes the verdict dropped (kern_broken)


cdef inline void flow_release(Worker *w, Flow *f) noexcept nogil:
    # An empty pipe goes back to the pool for the next flow; one that still
    # holds bytes (the bridge is closing) cannot be reused and is closed.
    if f.pipe_r >= 0:
        if f.len == 0 and w.npipes < w.sh.pool_max:
            w.pipe_pool[3 * w.npipes] = f.pipe_r
            w.pipe_pool[3 * w.npipes + 1] = f.pipe_w
            w.pipe_pool[3 * w.npipes + 2] = <int>f.cap
            w.npipes += 1
        else:
            close(f.pipe_r)
            close(f.pipe_w)
        f.pipe_r = -1
        f.pipe_w = -1
    elif f.buf != NULL:
        # Buffers grown for held data, or replacements, are not a pool's size.
        if w.nbufs < w.sh.pool_max and f.cap == <uint32_t>w.sh.buf_size and not f.hook:
            w.buf_pool[w.nbufs] = f.buf
            w.nbufs += 1
        elif w.nhooks < w.sh.hook_pool_max and f.cap == <uint32_t>w.sh.hook_read and f.hook:
            w.hook_pool[w.nhooks] = f.buf
            w.nhooks += 1
        else:
            free(f.buf)
        f.buf = NULL
    f.cap = 0
    f.len = 0
    f.off = 0
    f.held = 0
    f.hold_at = 0


cdef void bridge_no_memory(Worker *w, Bridge *b) noexcept nogil:
    # Something the bridge cannot go on without could not be allocated: it
    # ends (SHUTDOWN, FIN both ways), counted in no_memory. Waiting instead
    # could stall it for good: nothing wakes a bridge when memory comes back.
    fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
    bridge_close(w, b, SHUTDOWN, 0, 0)


cdef int flow_acquire(Worker *w, Bridge *b, Flow *f) noexcept nogil:
    # Returns: 0 with a pipe or buffer held; -ENOMEM.
    # Out of fds for a pipe, the bridge falls back to copying: it keeps
    # flowing, and a buffer costs memory, not fds.
    cdef int fds[2]
    cdef int r
    # Small exchanges are copied (recv + send beat three splices for a
    # ping); a flow whose reads fill the buffer turns to splice (bulk).
    if f.bulk and not b.copy and not f.hook:
        if w.npipes > 0:
            w.npipes -= 1
            f.pipe_r = w.pipe_pool[3 * w.npipes]
            f.pipe_w = w.pipe_pool[3 * w.npipes + 1]
            f.cap = <uint32_t>w.pipe_pool[3 * w.npipes + 2]
            return 0
        r = fp_pipe(fds)
        if r == 0:
            f.pipe_r = fds[0]
            f.pipe_w = fds[1]
            r = fp_pipe_size(fds[1], w.sh.pipe_size)
            f.cap = <uint32_t>r if r > 0 else 65536
            return 0
        b.copy = 1
    if f.hook:
        # A hooked flow reads several chunks per recv and sends what
        # on_data answers for them in one send: a quarter of the syscalls
        # and of the receiver's wake-ups, with on_data still called per chunk.
        if w.nhooks > 0:
            w.nhooks -= 1
            f.buf = w.hook_pool[w.nhooks]
        else:
            f.buf = <char *>malloc(w.sh.hook_read)
            if f.buf == NULL:
                return -ENOMEM
        f.cap = <uint32_t>w.sh.hook_read
        return 0
    if w.nbufs > 0:
        w.nbufs -= 1
        f.buf = w.buf_pool[w.nbufs]
    else:
        f.buf = <char *>malloc(w.sh.buf_size)
        if f.buf == NULL:
            return -ENOMEM
    f.cap = <uint32_t>w.sh.buf_size
    return 0


cdef int flow_make_room(Worker *w, Bridge *b, Flow *f) noexcept nogil:
    # Held data (on_data said WAIT) stays at the front of the buffer and the
    # next read goes after it.
    # Returns: 0, -EMSGSIZE (max_hold reached), or -ENOMEM.
    cdef char *grown
    cdef uint32_t cap
    if not f.held:
        return 0
    if f.len >= <uint32_t>b.ls.max_hold:
        return -EMSGSIZE
    if f.len < f.cap:
        return 0
    cap = f.len + <uint32_t>w.sh.buf_size
    grown = <char *>realloc(f.buf, cap)
    if grown == NULL:
        return -ENOMEM
    f.buf = grown
    f.cap = cap
    return 0


cdef int flow_lend(Worker *w, Bridge *b, Flow *f, int direction,
                   uint32_t held) noexcept nogil:
    # Hands buf[0:len] to on_data, of which buf[0:held] was held by WAIT,
    # and parks the flow until it answers. Returns: 0, or -ENOMEM.
    cdef HookEvent ev
    ev.kind = EVT_DATA
    ev.buf = f.buf
    ev.len = f.len
    ev.held = held
    if hook_call(w, b, CALL_UP + direction, &ev) < 0:
        return -ENOMEM
    f.lent = f.buf
    f.buf = NULL
    f.waiting = 1
    return 0


cdef inline void flow_sent(Flow *f) noexcept nogil:
    # buf[off:end] is out. What on_data holds moves to the front, where the
    # next read joins it.
    if f.hold_at:
        memmove(f.buf, f.buf + f.hold_at, f.len - f.hold_at)
        f.len -= f.hold_at
        f.hold_at = 0
        f.held = 1
    else:
        f.len = 0
    f.off = 0


cdef int flow_run(Worker *w, Bridge *b, Flow *f, int src, int dst,
                  uint8_t *src_rd, uint8_t *dst_wr, int direction,
                  uint64_t *total, uint64_t *per_upstream, ToxicFlow *tf) noexcept nogil:
    # Moves what src and dst allow (and the stream's toxics, tf, when the
    # bridge has any: NULL otherwise, the one test the fast path pays per
    # step). Returns FLOW_OK, or why the bridge must end (FLOW_SRC_RESET,
    # FLOW_DST_RESET, FLOW_HOOK_FAILED, FLOW_HOOK_ERROR, FLOW_TOXIC,
    # FLOW_NO_MEMORY).
    cdef ssize_t r
    cdef uint32_t end
    cdef int64_t want
    if f.waiting:
        return FLOW_OK
    while True:
        if f.then and f.len == 0:
            # on_data said CLOSE (or raised) after answering earlier chunks
            # of the same read: those are sent, now the bridge ends.
            return FLOW_HOOK_ERROR if f.then == V_ERROR else FLOW_HOOK_FAILED
        # Drain first: it makes room, and a slow dst stops the reads below
        # (backpressure), since nothing is read once the pipe is full.
        end = f.hold_at if f.hold_at else f.len
        if end > f.off and not f.held and dst_wr[0]:
            want = f.len if f.pipe_r >= 0 else end - f.off
            if tf != NULL:
                want = toxic_allow(w, b, tf, direction, want, w.now_ns)
                if want < 0:
                    return FLOW_TOXIC
            if want > 0:
                if f.pipe_r >= 0:
                    r = fp_splice(f.pipe_r, dst, <size_t>want)
                else:
                    r = fp_send(dst, f.buf + f.off, <size_t>want)
                if r > 0:
                    if f.pipe_r >= 0:
                        f.len -= <uint32_t>r
                    else:
                        f.off += <uint32_t>r
                        if f.off == end:
                            flow_sent(f)
                    f.bytes += <uint64_t>r
                    fp_bump(total, <uint64_t>r)
                    fp_bump(per_upstream, <uint64_t>r)
                    if tf != NULL and toxic_wrote(w, b, tf, direction, r, w.now_ns):
                        return FLOW_TOXIC
                    continue
                if r != -EAGAIN:
                    return FLOW_DST_RESET
                dst_wr[0] = 0
        if f.eof or not src_rd[0]:
            break
        # A hooked flow reads its next chunk only once the last one is out,
        # so every byte it forwards went through on_data.
        if f.hook and f.len > f.off and not f.held:
            break
        if f.bulk and f.buf != NULL and f.len == 0 and not f.hook and not b.copy:
            flow_release(w, f)   # turning to splice: give the buffer back
        if f.cap == 0 and flow_acquire(w, b, f) < 0:
            # Waiting would stall it for good: nothing wakes a flow when
            # memory comes back.
            return FLOW_NO_MEMORY
        if tf != NULL and not toxic_may_read(w, f, tf):
            break
        # Past max_hold and out of memory both end the bridge as HOOK_CLOSED:
        # on_data cannot be given more, as when flow_lend cannot ask it.
        r = flow_make_room(w, b, f)
        if r < 0:
            if r == -ENOMEM:
                fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
            return FLOW_HOOK_FAILED
        if f.len >= f.cap:
            break
        if f.pipe_r >= 0:
            r = fp_splice(src, f.pipe_w, f.cap - f.len)
        else:
            r = fp_recv(src, f.buf + f.len, f.cap - f.len)
        if r > 0:
            # Only a short recv surely ended on an skb's end (it took all
            # that was queued); a splice may stop where the pipe filled.
            f.cut = f.pipe_r >= 0 or <uint32_t>r == f.cap - f.len
            f.len += <uint32_t>r
            if tf != NULL and not f.hook:
                toxic_read(w, tf, r, w.now_ns)
            if f.hook:
                f.held = 0
                if flow_lend(w, b, f, direction, f.len - <uint32_t>r) < 0:
                    fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
                    return FLOW_HOOK_FAILED
                return FLOW_OK
            if f.pipe_r >= 0:
                if f.len == <uint32_t>r and r < SMALL_READ:
                    f.bulk = 0   # small again: copy once this pipe is empty
            else:
                if f.len == f.cap:
                    f.bulk = 1
                elif not f.src_hup and w.epfd >= 0:
                    # recv returns all that was queued: a short read drained
                    # the socket, and data arriving later raises a new edge.
                    # (Not after a FIN was announced: the EOF must be read.)
                    src_rd[0] = 0
            continue
        if r == 0:
            f.eof = 1
            if f.held:   # a message that never completed is not forwarded
                f.len = 0
                f.held = 0
            break
        if r == -EAGAIN:
            # A pipe can run out of buffer slots before it runs out of
            # bytes, so EAGAIN with a non-empty pipe may mean "pipe full":
            # keep the readiness and read again once the pipe drained.
            # With an empty pipe (or a buffer) the socket really is empty.
            if f.pipe_r < 0 or f.len == 0:
                src_rd[0] = 0
                f.cut = 0
            break
        if (r == -EINVAL or r == -ENOSYS) and f.pipe_r >= 0:
            # This socket cannot splice: copy from now on.
            b.copy = 1
            if f.len == 0:
                flow_release(w, f)
                continue
            break
        return FLOW_SRC_RESET
    if f.len == 0 and f.cap != 0:
        flow_release(w, f)   # an idle bridge holds no pipe
    if f.eof and f.len == 0 and not f.shut and not b.kern and (tf == NULL or toxic_fin_ok(tf, w.now_ns)):
        # With the other direction already done the bridge closes next, and
        # close() sends the FIN itself (nothing is left unread on either
        # socket, so it is a FIN, not a reset).
        if not (b.up.shut if f == &b.down else b.down.shut):
            shutdown(dst, SHUT_WR)
        f.shut = 1
    return FLOW_OK


cdef void bridge_close(Worker *w, Bridge *b, int reason,
                       bint reset_client, bint reset_upstream) noexcept nogil:
    cdef int64_t now
    if b.state == B_CLOSED:
        return
    if b.state == B_QUEUED:
        # It leaves the queue by closing (queue_timeout, the client gave
        # up): its queue_time is that wait, not 0 (HAProxy's Tw with sQ/CQ).
        timing_left_queue(b, w.now_ns)
    timing_closed(w, b)
    # Off the wait queue before the client can see the close, so a stats()
    # read after it never counts this bridge as queued.
    queue_leave(w, b)
    # Its slots too (active, per IP, the upstream's): a client that saw the
    # close and connects again finds them free, and stats() read then does
    # not count this bridge.
    slots_release(w, b)
    if b.kern:
        kern_leave(w, b)
    if reset_client:
        fp_set_reset_on_close(b.cfd)
    close(b.cfd)
    if b.ufd >= 0:
        if reset_upstream:
            fp_set_reset_on_close(b.ufd)
        close(b.ufd)
    flow_release(w, &b.up)
    flow_release(w, &b.down)
    timer_del_all(w, b)
    if b.tx != NULL:
        toxic_free(w, b)
    bridges_remove(w, b)
    b.reason = <uint8_t>reason
    if b.ls.hooks & HOOK_RECORDS:
        now = fp_now_ns()
        record_push(w, b, now)
    bridge_drop_group(b)
    b.state = B_CLOSED
    # Freed after the event batch, since later events of this batch may
    # name it; or, while a hook has it, when the hook answers.
    if b.hook_pending > 0:   # (queue_leave may have added one)
        b.grave_next = w.limbo
        w.limbo = b
    else:
        b.grave_next = w.grave
        w.grave = b
    if w.accept_resume_ns != 0:
        w.accept_resume_ns = 1   # fds were freed: accept again now


cdef void bridge_pump(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    cdef UpstreamCounters *uc = b.uc if b.uc != NULL else &lslot(w, b.ls).routed
    cdef uint64_t moved = b.up.bytes + b.down.bytes
    cdef ToxicFlow *tup = NULL
    cdef ToxicFlow *tdown = NULL
    cdef int r
    if b.tx != NULL:
        tup = &b.tx.flow[0]
        tdown = &b.tx.flow[1]
        tup.wake_ns = 0
        tdown.wake_ns = 0
    if b.kern:
        r = kern_flow(w, b, &b.up, b.cfd, b.ufd, &b.c_rd, &b.u_wr, 0,
                      &lslot(w, b.ls).ctr.bytes_upstream, &uc.bytes_upstream, tup)
    else:
        r = flow_run(w, b, &b.up, b.cfd, b.ufd, &b.c_rd, &b.u_wr, 0,
                     &lslot(w, b.ls).ctr.bytes_upstream, &uc.bytes_upstream, tup)
    if r != FLOW_OK:
        if r == FLOW_TOXIC:
            bridge_close(w, b, TOXIC_CLOSED, 0, 0)
        elif r == FLOW_SRC_RESET:
            bridge_close(w, b, CLIENT_RESET, 0, 1)
        elif r == FLOW_DST_RESET:
            bridge_close(w, b, UPSTREAM_RESET, 1, 0)
        elif r == FLOW_NO_MEMORY:
            bridge_no_memory(w, b)
        elif r == FLOW_BROKEN:
            kern_reset_broken(w, b)
        else:
            bridge_close(w, b, HOOK_ERROR if r == FLOW_HOOK_ERROR else HOOK_CLOSED, 0, 0)
        return
    if b.kern:
        r = kern_flow(w, b, &b.down, b.ufd, b.cfd, &b.u_rd, &b.c_wr, 1,
                      &lslot(w, b.ls).ctr.bytes_downstream, &uc.bytes_downstream, tdown)
    else:
        r = flow_run(w, b, &b.down, b.ufd, b.cfd, &b.u_rd, &b.c_wr, 1,
                     &lslot(w, b.ls).ctr.bytes_downstream, &uc.bytes_downstream, tdown)
    if r != FLOW_OK:
        if r == FLOW_TOXIC:
            bridge_close(w, b, TOXIC_CLOSED, 0, 0)
        elif r == FLOW_SRC_RESET:
            bridge_close(w, b, UPSTREAM_RESET, 1, 0)
        elif r == FLOW_DST_RESET:
            bridge_close(w, b, CLIENT_RESET, 0, 1)
        elif r == FLOW_NO_MEMORY:
            bridge_no_memory(w, b)
        elif r == FLOW_BROKEN:
            kern_reset_broken(w, b)
        else:
            bridge_close(w, b, HOOK_ERROR if r == FLOW_HOOK_ERROR else HOOK_CLOSED, 0, 0)
        return
    if b.up.bytes + b.down.bytes != moved:
        b.last_active_ns = now
    if b.reason == CLOSE_NONE and (b.up.eof or b.down.eof):
        # The side that sent FIN first names the reason the bridge ends:
        # named here, before the check below, since one pass may read both
        # FINs (the upstream answering the one just passed on).
        b.reason = CLIENT_CLOSED if b.up.eof else UPSTREAM_CLOSED
    if b.up.shut and b.down.shut:
        bridge_close(w, b, b.reason, 0, 0)
    elif (b.up.eof or b.down.eof) and b.tl[SLOT_HALF_CLOSE].list == T_NONE:
        timer_add(w, b, T_HALF_CLOSE, now + b.ls.half_close_timeout_ns)
    if b.tx != NULL and b.state != B_CLOSED and toxic_rearm(w, b) < 0:
        bridge_no_memory(w, b)
    elif w.sh.engine == ENGINE_KERNEL and kern_may_join(b):
        kern_join(w, b)


cdef void bridge_data_answer(Worker *w, Bridge *b, HookResult *res,
                             int64_t now) noexcept nogil:
    cdef Flow *f = &b.up if res.dir == 0 else &b.down
    f.waiting = 0
    if res.verdict == V_CLOSE or res.verdict == V_ERROR:
        bridge_close(w, b, HOOK_ERROR if res.verdict == V_ERROR else HOOK_CLOSED, 0, 0)
        return
    if res.verdict == V_REPLACE:
        free(f.lent)
        f.buf = res.buf
        f.cap = res.cap
        f.len = res.len
    else:
        f.buf = f.lent
        f.held = res.verdict == V_WAIT
        if res.verdict == V_PASS and res.len < f.len:
            f.len = res.len   # the chunks after a CLOSE are dropped
    if res.hold and not f.held:
        # Some chunks were answered, the last ones are held: the answers go
        # out first (flow_sent), then the held bytes wait for the next read.
        if res.hold >= f.len:
            f.held = 1
        else:
            f.hold_at = f.len - res.hold
    f.then = res.then
    f.lent = NULL
    f.off = 0
    if b.tx != NULL:
        # Toxics apply to what on_data answered: it is stamped now.
        toxic_read(w, &b.tx.flow[res.dir], <int64_t>((f.hold_at if f.hold_at else (0 if f.held else f.len))), now)
    # Both flows: the answer may unblock the reverse direction's FIN too.
    bridge_pump(w, b, now)


cdef bint client_gave_up(Bridge *b) noexcept nogil:
    # A waiting client sent FIN. TCP cannot tell a close from a half-close;
    # one that sent a request first may wait for the answer, so it keeps its
    # place. One that sent nothing has given up: its place goes to others.
    cdef char byte
    return fp_recv_peek(b.cfd, &byte, 1) == 0


cdef void bridge_event(Worker *w, Bridge *b, int side, int ev,
                       int64_t now) noexcept nogil:
    # ev: EV_RD / EV_WR / EV_ERR, already translated from epoll or poll.
    cdef int err
    if side == 0:
        if ev & EV_RD:
            b.c_rd = 1
        if ev & EV_HUP:
            b.up.src_hup = 1
        if ev & EV_WR:
            b.c_wr = 1
        if b.state == B_HEADER:
            if ev & EV_RD:
                bridge_read_header(w, b, now)
            return
        if b.state == B_HELLO:
            if ev & (EV_RD | EV_ERR):
                bridge_read_hello(w, b, now)
            return
        if b.state != B_ACTIVE:
            if ev & EV_ERR:
                bridge_close(w, b, CLIENT_RESET, 0, 1)
            elif (b.state == B_QUEUED and (ev & EV_HUP or (POLLRDHUP == 0 and ev & EV_RD))
                  and client_gave_up(b)):
                bridge_close(w, b, CLIENT_CLOSED, 0, 0)
            return
    else:
        if ev & EV_RD:
            b.u_rd = 1
        if ev & EV_HUP:
            b.down.src_hup = 1
        if ev & EV_WR:
            b.u_wr = 1
        if b.state == B_CONNECTING:
            if not (ev & (EV_WR | EV_ERR)):
                return
            # A failed connect always reports an error or hang-up with its
            # writability, so a plain EV_WR needs no getsockopt.
            if ev & EV_ERR:
                err = fp_sock_error(b.ufd)
                if err != 0:
                    bridge_retry(w, b, err, now)
                    return
            if not bridge_connected(w, b, now):
                return
            if w.epfd < 0:
                # The poll engine did not watch the client while it
                # connected: what it sent meanwhile is read now, not
                # after one more wait over every socket.
                b.c_rd = 1
    bridge_pump(w, b, now)
