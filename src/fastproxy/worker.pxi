# Workers: one native thread each, with its own epoll set (or poll array),
# its own bridges, timers and pools. The loop runs without the GIL from
# start to stop.

cdef enum:
    ACCEPT_BATCH = 32          # accepts per wake-up: other workers get a turn
    MAX_EVENTS = 256
    EV_RD = 1
    EV_WR = 2
    EV_ERR = 4
    EV_HUP = 8                 # the peer sent FIN (or is gone)
    TAG_WAKE = 2               # epoll tags; a bridge's tag is its (even)
    TAG_LISTEN = 4             # address, plus 1 for its upstream side

cdef int64_t ACCEPT_BACKOFF_NS = 100 * 1000 * 1000
cdef int64_t MAX_SLEEP_NS = 3600 * 1000000000LL
# Edge-triggered: a bridge's sockets are registered once and never modified;
# readiness is remembered in the bridge until a call meets EAGAIN.
cdef uint32_t EV_BRIDGE = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET


# ---- timers that came due (the lists are timers.pxi's)

cdef void timers_run(Worker *w, int64_t now) noexcept nogil:
    while timer_due(w, T_CONNECT, now):
        bridge_retry(w, w.thead[T_CONNECT], -ETIMEDOUT, now)
    while timer_due(w, T_HALF_CLOSE, now):
        bridge_close(w, w.thead[T_HALF_CLOSE], TIMEOUT, 0, 0)
    while timer_due(w, T_LIFETIME, now):
        bridge_close(w, w.thead[T_LIFETIME], TIMEOUT, 0, 0)
    while timer_due(w, T_IDLE, now):
        idle_expire(w, w.thead[T_IDLE], now)
    while timer_due(w, T_QUEUE, now):
        bridge_queue_timeout(w, w.thead[T_QUEUE])
    while timer_due(w, T_HEADER, now):
        fp_bump(&w.ctr.proxy_header_errors, 1)
        bridge_close(w, w.thead[T_HEADER], TIMEOUT, 0, 0)
    while timer_due(w, T_HOOK, now):
        hook_expire(w, w.thead[T_HOOK], now)


cdef void idle_expire(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # Activity only stamps last_active_ns (no list work per transfer); the
    # timer checks it when due and re-arms for what is left.
    cdef int64_t due = b.last_active_ns + w.sh.idle_timeout_ns
    if due <= now:
        bridge_close(w, b, TIMEOUT, 0, 0)
    else:
        timer_add(w, b, T_IDLE, due)


cdef int worker_timeout_ms(Worker *w, int64_t now) noexcept nogil:
    # Returns: how long the loop may sleep, -1 for "until an event".
    cdef int64_t d = -1
    cdef int t
    cdef int64_t due
    for t in range(1, T_LISTS):
        if w.thead[t] != NULL:
            due = tlink(w.thead[t], SLOT_OF[t]).deadline_ns
            if d < 0 or due < d:
                d = due
    if w.accept_resume_ns != 0 and (d < 0 or w.accept_resume_ns < d):
        d = w.accept_resume_ns
    if w.stopping and (d < 0 or w.drain_deadline_ns < d):
        d = w.drain_deadline_ns
    if w.sh.hooks and fp_atomic_get(&w.sh.events.backlog) > 0:
        # Queued hook calls and a sleeping thread: look again soon in case
        # the thread that would take them blocked.
        if d < 0 or now + HOOK_STALL_NS < d:
            d = now + HOOK_STALL_NS
    if d < 0:
        return -1
    if d <= now:
        return 0
    if d - now > MAX_SLEEP_NS:
        return <int>(MAX_SLEEP_NS // 1000000)   # far deadlines: wake, recompute
    return <int>((d - now + 999999) // 1000000)


# ---- the bridges a worker owns (closing at drain, and the poll array)

cdef int bridges_add(Worker *w, Bridge *b) noexcept nogil:
    # Returns: 0, or -ENOMEM.
    cdef Bridge **grown
    cdef int cap
    if w.nbridges == w.cap_bridges:
        cap = w.cap_bridges * 2 if w.cap_bridges else 64
        grown = <Bridge **>realloc(w.bridges, cap * sizeof(Bridge *))
        if grown == NULL:
            return -ENOMEM
        w.bridges = grown
        w.cap_bridges = cap
    b.slot = w.nbridges
    w.bridges[w.nbridges] = b
    w.nbridges += 1
    return 0


cdef inline void bridges_remove(Worker *w, Bridge *b) noexcept nogil:
    cdef Bridge *last = w.bridges[w.nbridges - 1]
    w.bridges[b.slot] = last
    last.slot = b.slot
    w.nbridges -= 1


cdef void bridge_free(Bridge *b) noexcept nogil:
    free(b.hdr)
    free(b.up.lent)
    free(b.down.lent)
    free(b.route)
    free(b.tried)
    free(b.hk)
    free(b)


cdef void grave_free(Worker *w) noexcept nogil:
    # Bridges with a hook call out are in w.limbo, not here.
    cdef Bridge *b
    while w.grave != NULL:
        b = w.grave
        w.grave = b.grave_next
        calls_remove(w, b)
        bridge_free(b)


# ---- accepting

cdef void listener_on(Worker *w) noexcept nogil:
    if w.listening:
        return
    # EPOLLEXCLUSIVE wakes one worker per client instead of all of them;
    # it refuses EPOLL_CTL_MOD, so pausing is DEL and resuming is ADD.
    if w.epfd >= 0 and fp_epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.sh.listen_fd,
                                    EPOLLIN | EPOLLEXCLUSIVE, TAG_LISTEN) < 0:
        return
    w.listening = 1


cdef void listener_off(Worker *w) noexcept nogil:
    if not w.listening:
        return
    if w.epfd >= 0:
        fp_epoll_ctl(w.epfd, EPOLL_CTL_DEL, w.sh.listen_fd, 0, 0)
    w.listening = 0


cdef void worker_pause_accept(Worker *w, int64_t now) noexcept nogil:
    # Out of fds: leave clients in the kernel's backlog rather than spin on
    # accept; retry after a back-off, or sooner when a bridge frees fds.
    listener_off(w)
    if not w.stopping:
        w.accept_resume_ns = now + ACCEPT_BACKOFF_NS


cdef void worker_accept(Worker *w, int64_t now) noexcept nogil:
    cdef int i, fd
    cdef sockaddr_storage peer
    cdef socklen_t peer_len
    for i in range(ACCEPT_BATCH):
        peer_len = sizeof(peer)
        fd = fp_accept(w.sh.listen_fd, <sockaddr *>&peer, &peer_len)
        if fd >= 0:
            bridge_open(w, fd, &peer, now)
        elif fd == -EAGAIN:
            return
        elif fd == -EMFILE or fd == -ENFILE or fd == -ENOBUFS or fd == -ENOMEM:
            worker_pause_accept(w, now)
            return
        # else: that client was gone before we took it (ECONNABORTED)


# ---- the upstream group

cdef void worker_check_group(Worker *w) noexcept nogil:
    # swap_group installs a group, then moves the generation: a worker that
    # sees a new generation rebuilds its cursor for the group current now
    # and says so, after which swap_group lets the old group's current
    # reference go (this worker no longer reads it but through bridges,
    # which hold their own). Short of memory it keeps the old group and
    # cursor, and says nothing, until a later round succeeds. Generations,
    # not pointers, are compared: swaps made before the worker ran may have
    # freed its first group and put a new one at the same address.
    cdef int64_t gen = fp_atomic_get(&w.sh.group_gen)
    cdef GroupC *g
    cdef BalanceCursor c
    if gen == w.group_gen:
        return
    g = <GroupC *>fp_ptr_get(<void **>&w.sh.group)
    if balance_cursor_init(g, &c) < 0:
        return
    balance_cursor_free(&w.cursor)
    w.cursor = c
    w.group = g
    fp_atomic_set(&w.group_gen, gen)


# ---- stopping

cdef void worker_check_stop(Worker *w, int64_t now) noexcept nogil:
    cdef int64_t gen = fp_atomic_get(&w.cmd_stop)
    cdef int64_t deadline
    if gen == 0 or gen == w.seen_stop:
        return
    w.seen_stop = gen
    deadline = now + fp_atomic_get(&w.drain_ns)
    if not w.stopping or deadline < w.drain_deadline_ns:
        w.drain_deadline_ns = deadline
    w.stopping = 1
    w.accept_resume_ns = 0
    listener_off(w)
    fp_atomic_set(&w.accepting, 0)


cdef void worker_check_close_all(Worker *w) noexcept nogil:
    # The control plane asked to close every live bridge (a time window
    # ended with close_outside_window).
    cdef int64_t gen = fp_atomic_get(&w.cmd_close_all)
    if gen != w.seen_close_all:
        w.seen_close_all = gen
        worker_close_all(w, TIMEOUT)


cdef void worker_close_all(Worker *w, int reason) noexcept nogil:
    # Closed with FIN, not RST: what was already sent still arrives.
    while w.nbridges > 0:
        bridge_close(w, w.bridges[w.nbridges - 1], reason, 0, 0)


cdef inline int translate_epoll(uint32_t e) noexcept nogil:
    cdef int ev = 0
    if e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        ev |= EV_RD
    if e & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        ev |= EV_WR
    if e & (EPOLLHUP | EPOLLERR):
        ev |= EV_ERR
    if e & (EPOLLRDHUP | EPOLLHUP):
        ev |= EV_HUP
    return ev


cdef inline int translate_poll(short e) noexcept nogil:
    cdef int ev = 0
    if e & (POLLIN | POLLRDHUP | POLLHUP | POLLERR):
        ev |= EV_RD
    if e & (POLLOUT | POLLHUP | POLLERR):
        ev |= EV_WR
    if e & (POLLHUP | POLLERR | POLLNVAL):
        ev |= EV_ERR
    if e & (POLLRDHUP | POLLHUP):
        ev |= EV_HUP
    return ev


cdef void drain_wake(Worker *w) noexcept nogil:
    cdef char buf[64]
    while read(w.wake_r, buf, sizeof(buf)) > 0:
        pass


cdef int worker_wait_epoll(Worker *w, int timeout, int64_t *now) noexcept nogil:
    # Returns: the number of events handled, or -errno when epoll itself
    # failed.
    cdef int n = fp_epoll_wait(w.epfd, w.events, MAX_EVENTS, timeout)
    cdef int i
    cdef uint64_t tag
    cdef Bridge *b
    if n < 0:
        return n
    now[0] = fp_now_ns()
    for i in range(n):
        tag = w.events[i].data.u64
        if tag == TAG_LISTEN:
            if w.listening:
                worker_accept(w, now[0])
        elif tag == TAG_WAKE:
            drain_wake(w)
            worker_take_results(w, now[0])
        else:
            b = <Bridge *>(tag & ~(<uint64_t>1))
            if b.state != B_CLOSED:
                bridge_event(w, b, <int>(tag & 1),
                             translate_epoll(w.events[i].events), now[0])
    return n


cdef inline short poll_interest(Flow *rd_flow, uint8_t rd, Flow *wr_flow,
                                uint8_t wr) noexcept nogil:
    # Level-triggered: ask only for what the bridge can act on now, or a
    # full buffer would wake the loop forever.
    cdef short e = 0
    if not rd and not rd_flow.eof and (rd_flow.cap == 0 or rd_flow.len < rd_flow.cap):
        e |= POLLIN | POLLRDHUP
    if not wr and wr_flow.len > wr_flow.off:
        e |= POLLOUT
    return e


cdef inline short poll_client_interest(Bridge *b) noexcept nogil:
    if b.state == B_ACTIVE:
        return poll_interest(&b.up, b.c_rd, &b.down, b.c_wr)
    if b.state == B_HEADER and not b.c_rd:
        return POLLIN
    # A waiting client is watched for hanging up (once: level-triggered, a
    # FIN seen would wake the loop forever); others for errors only.
    if b.state != B_QUEUED:
        return 0
    if POLLRDHUP == 0:
        # No POLLRDHUP (macOS): a FIN shows as readable, as a request does,
        # so watch until the client sent anything; one that sent a request
        # keeps its place even if it hangs up after (client_gave_up).
        return POLLIN if not b.c_rd else 0
    return POLLRDHUP if not b.up.src_hup else 0


cdef inline short poll_upstream_interest(Bridge *b) noexcept nogil:
    if b.state == B_ACTIVE:
        return poll_interest(&b.down, b.u_rd, &b.up, b.u_wr)
    return POLLOUT if b.state == B_CONNECTING else 0


cdef int worker_wait_poll(Worker *w, int timeout, int64_t *now) noexcept nogil:
    # Returns: the number of ready fds, or -errno (-ENOMEM growing the poll
    # array).
    # Only open fds get an entry: poll() refuses (EINVAL) more entries than
    # RLIMIT_NOFILE, and a bridge not yet connected has no upstream fd.
    cdef int need = 2 + 2 * w.nbridges
    cdef int i, k, r, cap, first
    cdef Bridge *b
    cdef pollfd *p
    cdef void *grown
    if need > w.cap_pfds:
        cap = need * 2
        grown = realloc(w.pfds, cap * sizeof(pollfd))
        if grown == NULL:
            return -ENOMEM
        w.pfds = <pollfd *>grown
        grown = realloc(w.pbridges, cap * sizeof(Bridge *))
        if grown == NULL:
            return -ENOMEM
        w.pbridges = <Bridge **>grown
        w.cap_pfds = cap
    w.pfds[0].fd = w.wake_r
    w.pfds[0].events = POLLIN
    k = 1
    if w.listening:
        w.pfds[1].fd = w.sh.listen_fd
        w.pfds[1].events = POLLIN
        k = 2
    first = k
    for i in range(w.nbridges):
        b = w.bridges[i]
        w.pbridges[k] = b
        w.pfds[k].fd = b.cfd
        w.pfds[k].events = poll_client_interest(b)
        k += 1
        if b.ufd >= 0:
            w.pbridges[k] = b
            w.pfds[k].fd = b.ufd
            w.pfds[k].events = poll_upstream_interest(b)
            k += 1
    r = fp_poll(w.pfds, <nfds_t>k, timeout)
    if r < 0:
        return r
    now[0] = fp_now_ns()
    if w.pfds[0].revents:
        drain_wake(w)
        worker_take_results(w, now[0])
    if first == 2 and w.pfds[1].revents and w.listening:
        worker_accept(w, now[0])
    for i in range(first, k):
        p = &w.pfds[i]
        b = w.pbridges[i]
        # Closed, or (a retried connect) no longer this fd: skip; the
        # bridge's state already moved on.
        if p.revents == 0 or b.state == B_CLOSED:
            continue
        if p.fd == b.cfd:
            bridge_event(w, b, 0, translate_poll(p.revents), now[0])
        elif p.fd == b.ufd:
            bridge_event(w, b, 1, translate_poll(p.revents), now[0])
    return r


cdef int worker_run(Worker *w) noexcept nogil:
    # The worker's whole life. Returns: 0 after a stop, or -errno when the
    # event loop itself failed (its bridges are closed first).
    cdef int64_t now = fp_now_ns()
    cdef int r = 0
    cdef int timeout
    fp_block_signals()
    # Against swap_group's store of the generation then load of in_loop:
    # either it waits for this worker or this worker sees its group.
    fp_atomic_set(&w.in_loop, 1)
    fp_fence()
    worker_check_group(w)
    listener_on(w)
    fp_atomic_set(&w.accepting, 1)
    while True:
        worker_check_group(w)
        worker_check_stop(w, now)
        worker_check_close_all(w)
        if w.stopping and (w.nbridges == 0 or now >= w.drain_deadline_ns):
            break
        if w.accept_resume_ns != 0 and now >= w.accept_resume_ns:
            w.accept_resume_ns = 0
            listener_on(w)
        timeout = worker_timeout_ms(w, now)
        if w.sh.busy_poll_ns and now - w.last_event_ns < w.sh.busy_poll_ns:
            # Busy polling (an option): a running thread is woken by its
            # peers without an inter-processor interrupt, which on a VM
            # costs the sending CPU a VM exit. Only while traffic flows.
            timeout = 0
        if w.epfd >= 0:
            r = worker_wait_epoll(w, timeout, &now)
        else:
            r = worker_wait_poll(w, timeout, &now)
        if r > 0:
            w.last_event_ns = now
            r = 0
        elif r == 0 and timeout == 0 and w.sh.busy_poll_ns:
            # Nothing yet: let another thread on this CPU (a worker with
            # events, a hook thread) run before polling again.
            sched_yield()
        if r == -ENOMEM:
            # Short of memory for a moment: the bridges we have keep their
            # state; look again soon rather than end the worker.
            usleep(10000)
            now = fp_now_ns()
            r = 0
        elif r < 0:
            break
        timers_run(w, now)
        if w.sh.hooks:
            hook_nudge(w.sh, now)
        grave_free(w)
    listener_off(w)
    fp_atomic_set(&w.accepting, 0)
    worker_close_all(w, SHUTDOWN)
    grave_free(w)
    fp_atomic_set(&w.in_loop, 0)
    return r
