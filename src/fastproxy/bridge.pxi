# Bridges: one client socket joined to one upstream socket, both directions
# moved by splice through a pooled pipe, or copied through a pooled buffer.
# Everything here runs on a worker thread without the GIL.

cdef enum FlowResult:
    FLOW_OK = 0
    FLOW_SRC_RESET = 1      # reading src failed: it reset (or broke)
    FLOW_DST_RESET = 2      # writing dst failed: its peer is gone
    FLOW_HOOK_FAILED = 3    # on_data could not be asked, or held too much


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
        # Buffers grown for held data are not the pool's size.
        if w.nbufs < w.sh.pool_max and f.cap == <uint32_t>w.sh.buf_size:
            w.buf_pool[w.nbufs] = f.buf
            w.nbufs += 1
        else:
            free(f.buf)
        f.buf = NULL
    f.cap = 0
    f.len = 0
    f.off = 0
    f.held = 0


cdef int flow_acquire(Worker *w, Bridge *b, Flow *f) noexcept nogil:
    # Returns: 0 with a pipe or buffer held; -ENOMEM.
    # Out of fds for a pipe, the bridge falls back to copying: it keeps
    # flowing, and a buffer costs memory, not fds.
    cdef int fds[2]
    cdef int r
    if not b.copy and not f.hook:
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
    if w.nbufs > 0:
        w.nbufs -= 1
        f.buf = w.buf_pool[w.nbufs]
    else:
        f.buf = <char *>malloc(w.sh.buf_size)
        if f.buf == NULL:
            return -ENOMEM
    f.cap = <uint32_t>w.sh.buf_size
    return 0


cdef int flow_make_room(Worker *w, Flow *f) noexcept nogil:
    # Held data (on_data said WAIT) stays at the front of the buffer and the
    # next read goes after it. Returns: 0, or -1 past max_hold.
    cdef char *grown
    cdef uint32_t cap
    if not f.held or f.len < f.cap:
        return 0
    if f.len >= <uint32_t>w.sh.max_hold:
        return -1
    cap = f.len + <uint32_t>w.sh.buf_size
    grown = <char *>realloc(f.buf, cap)
    if grown == NULL:
        return -1
    f.buf = grown
    f.cap = cap
    return 0


cdef int flow_lend(Worker *w, Bridge *b, Flow *f, int direction) noexcept nogil:
    # Hands buf[0:len] to on_data and parks the flow until it answers.
    # Returns: 0, or -ENOMEM.
    cdef HookEvent ev
    ev.kind = EVT_DATA
    ev.dir = <uint8_t>direction
    ev.worker = w.id
    ev.bridge = b
    ev.buf = f.buf
    ev.len = f.len
    if event_push(w.sh, &ev) < 0:
        return -ENOMEM
    f.lent = f.buf
    f.buf = NULL
    f.waiting = 1
    b.hook_pending += 1
    return 0


cdef int flow_run(Worker *w, Bridge *b, Flow *f, int src, int dst,
                  uint8_t *src_rd, uint8_t *dst_wr, int direction,
                  uint64_t *total, uint64_t *per_upstream) noexcept nogil:
    # Moves what src and dst allow. Returns FLOW_OK, or why the bridge must
    # end (FLOW_SRC_RESET, FLOW_DST_RESET, FLOW_HOOK_FAILED).
    cdef ssize_t r
    if f.waiting:
        return FLOW_OK
    while True:
        # Drain first: it makes room, and a slow dst stops the reads below
        # (backpressure), since nothing is read once the pipe is full.
        if f.len > f.off and not f.held and dst_wr[0]:
            if f.pipe_r >= 0:
                r = fp_splice(f.pipe_r, dst, f.len)
            else:
                r = fp_send(dst, f.buf + f.off, f.len - f.off)
            if r > 0:
                if f.pipe_r >= 0:
                    f.len -= <uint32_t>r
                else:
                    f.off += <uint32_t>r
                    if f.off == f.len:
                        f.off = 0
                        f.len = 0
                f.bytes += <uint64_t>r
                fp_bump(total, <uint64_t>r)
                fp_bump(per_upstream, <uint64_t>r)
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
        if f.cap == 0 and flow_acquire(w, b, f) < 0:
            break
        if flow_make_room(w, f) < 0:
            return FLOW_HOOK_FAILED
        if f.len >= f.cap:
            break
        if f.pipe_r >= 0:
            r = fp_splice(src, f.pipe_w, f.cap - f.len)
        else:
            r = fp_recv(src, f.buf + f.len, f.cap - f.len)
        if r > 0:
            f.len += <uint32_t>r
            if f.hook:
                f.held = 0
                if flow_lend(w, b, f, direction) < 0:
                    return FLOW_HOOK_FAILED
                return FLOW_OK
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
    if f.eof and f.len == 0 and not f.shut:
        shutdown(dst, SHUT_WR)
        f.shut = 1
    return FLOW_OK


cdef void bridge_close(Worker *w, Bridge *b, int reason,
                       bint reset_client, bint reset_upstream) noexcept nogil:
    cdef int64_t now
    if b.state == B_CLOSED:
        return
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
    bridges_remove(w, b)
    fp_atomic_add(&w.sh.gauges.active, -1)
    if b.upstream >= 0:
        fp_atomic_add(&w.sh.upstreams[b.upstream].gauges.active, -1)
    b.reason = <uint8_t>reason
    if w.sh.hooks & HOOK_RECORDS:
        now = fp_now_ns()
        record_push(w, b, now)
    b.state = B_CLOSED
    # Freed after the event batch, since later events of this batch may
    # name it; or, while a hook has it, when the hook answers.
    if b.hook_pending > 0:
        b.grave_next = w.limbo
        w.limbo = b
    else:
        b.grave_next = w.grave
        w.grave = b
    if not w.listening and w.accept_resume_ns != 0:
        w.accept_resume_ns = 1   # fds were freed: accept again now


cdef void bridge_pump(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    cdef int ui = b.upstream if b.upstream >= 0 else w.sh.nupstreams
    cdef Counters *uc = &w.up_ctr[ui]
    cdef uint64_t moved = b.up.bytes + b.down.bytes
    cdef int r = flow_run(w, b, &b.up, b.cfd, b.ufd, &b.c_rd, &b.u_wr, 0,
                          &w.ctr.bytes_upstream, &uc.bytes_upstream)
    if r != FLOW_OK:
        if r == FLOW_SRC_RESET:
            bridge_close(w, b, CLIENT_RESET, 0, 1)
        elif r == FLOW_DST_RESET:
            bridge_close(w, b, UPSTREAM_RESET, 1, 0)
        else:
            bridge_close(w, b, HOOK_CLOSED, 0, 0)
        return
    r = flow_run(w, b, &b.down, b.ufd, b.cfd, &b.u_rd, &b.c_wr, 1,
                 &w.ctr.bytes_downstream, &uc.bytes_downstream)
    if r != FLOW_OK:
        if r == FLOW_SRC_RESET:
            bridge_close(w, b, UPSTREAM_RESET, 1, 0)
        elif r == FLOW_DST_RESET:
            bridge_close(w, b, CLIENT_RESET, 0, 1)
        else:
            bridge_close(w, b, HOOK_CLOSED, 0, 0)
        return
    if b.up.bytes + b.down.bytes != moved:
        b.last_active_ns = now
    if b.up.shut and b.down.shut:
        bridge_close(w, b, b.reason, 0, 0)
    elif (b.up.eof or b.down.eof) and b.tl[SLOT_HALF_CLOSE].list == T_NONE:
        # The side that sent FIN first names the reason the bridge ends.
        b.reason = CLIENT_CLOSED if b.up.eof else UPSTREAM_CLOSED
        timer_add(w, b, T_HALF_CLOSE, now + w.sh.half_close_timeout_ns)


cdef inline UpstreamAddr *bridge_addrs(Worker *w, Bridge *b, int *n) noexcept nogil:
    if b.route != NULL:
        n[0] = b.nroute
        return b.route
    n[0] = w.sh.upstreams[b.upstream].naddrs
    return w.sh.upstreams[b.upstream].addrs


cdef int bridge_connect(Worker *w, Bridge *b, int err, int64_t now) noexcept nogil:
    # Starts a non-blocking connect to the next address of the bridge's
    # upstream (or route). Returns: 0 when one is under way; else the last
    # -errno (`err` when no address was left to try).
    cdef int naddrs
    cdef UpstreamAddr *addrs = bridge_addrs(w, b, &naddrs)
    cdef UpstreamAddr *a
    cdef int fd, r
    while b.addr < naddrs:
        a = &addrs[b.addr]
        fd = fp_socket(a.family)
        if fd < 0:
            return fd
        fp_set_nodelay(fd)
        r = fp_connect(fd, <sockaddr *>&a.sa, a.salen)
        if r == 0 or r == -EINPROGRESS:
            # Even an immediate success is finished by the writable event.
            if w.epfd >= 0:
                r = fp_epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, EV_BRIDGE,
                                 <uint64_t>b | 1)
                if r < 0:
                    close(fd)
                    return r
            b.ufd = fd
            b.u_rd = 0
            b.u_wr = 0
            b.state = B_CONNECTING
            timer_add(w, b, T_CONNECT, now + w.sh.connect_timeout_ns)
            return 0
        close(fd)
        err = r
        b.addr += 1
    return err


cdef void bridge_connect_failed(Worker *w, Bridge *b, int err) noexcept nogil:
    # Closed before counted: whoever sees the count sees the bridge gone.
    cdef int ui = b.upstream if b.upstream >= 0 else w.sh.nupstreams
    if err == -EMFILE or err == -ENFILE:
        bridge_close(w, b, REFUSED, 0, 0)
        fp_bump(&w.ctr.fd_exhausted, 1)
        worker_pause_accept(w, fp_now_ns())
        return
    bridge_close(w, b, CONNECT_FAILED, 0, 0)
    fp_bump(&w.ctr.connect_failures, 1)
    fp_bump(&w.up_ctr[ui].connect_failures, 1)


cdef void bridge_retry(Worker *w, Bridge *b, int err, int64_t now) noexcept nogil:
    # The address being tried failed: go on with the next, or give up.
    timer_del(w, b, SLOT_PHASE)
    close(b.ufd)
    b.ufd = -1
    b.addr += 1
    err = bridge_connect(w, b, err, now)
    if err < 0:
        bridge_connect_failed(w, b, err)


cdef void bridge_start_upstream(Worker *w, Bridge *b, int chosen, int64_t now) noexcept nogil:
    # Takes an upstream (the one on_connect chose, or the next in turn, or
    # none when the bridge has a route of its own) and connects to it.
    cdef int64_t active
    cdef int r
    if b.route == NULL:
        if chosen < 0:
            chosen = w.rr
            w.rr = (w.rr + 1) % w.sh.nupstreams
        b.upstream = chosen
        fp_bump(&w.up_ctr[chosen].accepted, 1)
        active = fp_atomic_add(&w.sh.upstreams[chosen].gauges.active, 1)
        fp_atomic_max(&w.sh.upstreams[chosen].gauges.peak_active, active)
    r = bridge_connect(w, b, -ECONNREFUSED, now)
    if r < 0:
        bridge_connect_failed(w, b, r)


cdef void bridge_ask_connect(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    cdef HookEvent ev
    ev.kind = EVT_CONNECT
    ev.dir = 0
    ev.worker = w.id
    ev.bridge = b
    ev.buf = NULL
    ev.len = 0
    if event_push(w.sh, &ev) < 0:
        bridge_close(w, b, HOOK_ERROR, 0, 0)
        return
    b.state = B_HOOK
    b.hook_pending += 1


cdef void bridge_connect_answer(Worker *w, Bridge *b, HookResult *res,
                                int64_t now) noexcept nogil:
    if res.verdict == V_PROCEED:
        bridge_start_upstream(w, b, -1, now)
    elif res.verdict == V_ROUTE:
        if res.route != NULL:
            b.route = res.route
            b.nroute = res.nroute
            res.route = NULL
        bridge_start_upstream(w, b, res.upstream, now)
    else:
        bridge_close(w, b, HOOK_ERROR if res.verdict == V_ERROR else REFUSED, 0, 0)
    hook_result_free(res)


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
    f.lent = NULL
    f.off = 0
    # Both flows: the answer may unblock the reverse direction's FIN too.
    bridge_pump(w, b, now)


cdef void bridge_open(Worker *w, int fd, sockaddr_storage *peer, int64_t now) noexcept nogil:
    cdef Bridge *b = <Bridge *>calloc(1, sizeof(Bridge))
    cdef int64_t active
    if b == NULL or bridges_add(w, b) < 0:
        free(b)
        close(fd)
        return
    b.id = <uint64_t>fp_atomic_add(&w.sh.next_id, 1)
    b.cfd = fd
    b.ufd = -1
    b.upstream = -1
    b.up.pipe_r = b.up.pipe_w = b.down.pipe_r = b.down.pipe_w = -1
    b.up.hook = (w.sh.hooks & HOOK_DATA_UP) != 0
    b.down.hook = (w.sh.hooks & HOOK_DATA_DOWN) != 0
    b.state = B_CONNECTING
    b.copy = w.sh.engine == ENGINE_POLL
    b.accepted_ns = now
    b.last_active_ns = now
    if w.sh.max_lifetime_ns:
        timer_add(w, b, T_LIFETIME, now + w.sh.max_lifetime_ns)
    if w.sh.idle_timeout_ns:
        timer_add(w, b, T_IDLE, now + w.sh.idle_timeout_ns)
    client_address(peer, b)
    fp_set_nodelay(fd)
    fp_bump(&w.ctr.accepted, 1)
    active = fp_atomic_add(&w.sh.gauges.active, 1)
    fp_atomic_max(&w.sh.gauges.peak_active, active)
    if w.epfd >= 0 and fp_epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, EV_BRIDGE,
                                    <uint64_t>b) < 0:
        bridge_close(w, b, REFUSED, 0, 0)
        return
    if w.sh.hooks & HOOK_CONNECT:
        bridge_ask_connect(w, b, now)
    else:
        bridge_start_upstream(w, b, -1, now)


cdef void client_address(sockaddr_storage *peer, Bridge *b) noexcept nogil:
    # Kept as IPv6 (IPv4 mapped) so that rules and tables use one key shape.
    cdef sockaddr_in *s4
    cdef sockaddr_in6 *s6
    if peer.ss_family == AF_INET:
        s4 = <sockaddr_in *>peer
        memset(b.client_ip, 0, 10)
        b.client_ip[10] = 0xff
        b.client_ip[11] = 0xff
        memcpy(&b.client_ip[12], &s4.sin_addr, 4)
        b.client_port = ntohs(s4.sin_port)
        b.client_v4 = 1
    elif peer.ss_family == AF_INET6:
        s6 = <sockaddr_in6 *>peer
        memcpy(b.client_ip, &s6.sin6_addr, 16)
        b.client_port = ntohs(s6.sin6_port)


cdef void bridge_event(Worker *w, Bridge *b, int side, int ev,
                       int64_t now) noexcept nogil:
    # ev: EV_RD / EV_WR / EV_ERR, already translated from epoll or poll.
    cdef int err
    if side == 0:
        if ev & EV_RD:
            b.c_rd = 1
        if ev & EV_WR:
            b.c_wr = 1
        if b.state != B_ACTIVE:
            if ev & EV_ERR:
                bridge_close(w, b, CLIENT_RESET, 0, 1)
            return
    else:
        if ev & EV_RD:
            b.u_rd = 1
        if ev & EV_WR:
            b.u_wr = 1
        if b.state == B_CONNECTING:
            if not (ev & (EV_WR | EV_ERR)):
                return
            err = fp_sock_error(b.ufd)
            if err != 0:
                bridge_retry(w, b, -err, now)
                return
            timer_del(w, b, SLOT_PHASE)
            b.state = B_ACTIVE
    bridge_pump(w, b, now)
