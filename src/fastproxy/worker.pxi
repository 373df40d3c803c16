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
    TAG_WAKE = 2               # epoll tags: a bridge's is its address (16-byte
    TAG_LISTENER = 2           # aligned), plus 1 for its upstream side; a
                               # listener's its address plus 2

cdef int64_t ACCEPT_BACKOFF_NS = 100 * 1000 * 1000
cdef int64_t MAX_SLEEP_NS = 3600 * 1000000000LL
# Edge-triggered: a bridge's sockets are registered once and never modified;
# readiness is remembered in the bridge until a call meets EAGAIN.
cdef uint32_t EV_BRIDGE = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET


# ---- the listeners a worker serves (Shared.listeners, synced by worker_sync)

cdef inline ListenerSlot *lslot(Worker *w, ListenerC *ls) noexcept nogil:
    return &ls.slots[w.id]


cdef inline ListenerC *worker_listener(Worker *w, int i) noexcept nogil:
    # NULL: a free id. A pointer read here stays valid until this worker
    # next syncs: the control plane frees a listener only after that.
    return <ListenerC *>fp_ptr_get(<void **>&w.sh.listeners[i])


cdef inline int worker_nlisteners(Worker *w) noexcept nogil:
    return <int>fp_atomic_get(&w.sh.nlisteners)


# ---- timers that came due (the lists are timers.pxi's)

cdef void timers_run(Worker *w, int64_t now) noexcept nogil:
    cdef int i
    cdef Bridge *b
    cdef ListenerC *ls
    cdef ListenerSlot *s
    for i in range(worker_nlisteners(w)):
        ls = worker_listener(w, i)
        if ls == NULL:
            continue
        s = lslot(w, ls)
        while timer_due(s, T_CONNECT, now):
            bridge_retry(w, s.thead[T_CONNECT], -ETIMEDOUT, now)
        while timer_due(s, T_HALF_CLOSE, now):
            b = s.thead[T_HALF_CLOSE]
            silence_expire(w, b, T_HALF_CLOSE, b.ls.half_close_timeout_ns, now)
        while timer_due(s, T_LIFETIME, now):
            bridge_close(w, s.thead[T_LIFETIME], TIMEOUT, 0, 0)
        while timer_due(s, T_IDLE, now):
            b = s.thead[T_IDLE]
            silence_expire(w, b, T_IDLE, b.ls.idle_timeout_ns, now)
        while timer_due(s, T_QUEUE, now):
            bridge_queue_timeout(w, s.thead[T_QUEUE])
        while timer_due(s, T_HEADER, now):
            fp_bump(&s.ctr.proxy_header_errors, 1)
            bridge_close(w, s.thead[T_HEADER], TIMEOUT, 0, 0)
        while timer_due(s, T_HOOK, now):
            hook_expire(w, s.thead[T_HOOK], now)
        while timer_due(s, T_HELLO, now):
            fp_bump(&s.ctr.route_timeouts, 1)
            bridge_close(w, s.thead[T_HELLO], TIMEOUT, 0, 0)
    if w.ntheap > 0:
        toxics_run(w, now)


cdef void silence_expire(Worker *w, Bridge *b, int t, int64_t silence_ns, int64_t now) noexcept nogil:
    # T_IDLE (idle_timeout) and T_HALF_CLOSE (half_close_timeout, armed at
    # the first EOF: HAProxy's client-fin / server-fin, so a half-closed
    # bridge whose other side still answers goes on) end a bridge after
    # that long without a byte either way. Activity only stamps
    # last_active_ns (no list work per transfer); the timer checks it when
    # due and re-arms for what is left.
    cdef int64_t due
    if b.kern and kern_active(w, b):
        b.last_active_ns = now
    due = b.last_active_ns + silence_ns
    if due <= now:
        bridge_close(w, b, TIMEOUT, 0, 0)
    else:
        timer_add(w, b, t, due)


cdef int worker_timeout_ms(Worker *w, int64_t now) noexcept nogil:
    # Returns: how long the loop may sleep, -1 for "until an event".
    cdef int64_t d = -1
    cdef int t, i
    cdef int64_t due
    cdef ListenerC *ls
    cdef ListenerSlot *s
    for i in range(worker_nlisteners(w)):
        ls = worker_listener(w, i)
        if ls == NULL:
            continue
        s = lslot(w, ls)
        for t in range(1, T_LISTS):
            if s.thead[t] != NULL:
                due = tlink(s.thead[t], SLOT_OF[t]).deadline_ns
                if d < 0 or due < d:
                    d = due
    if w.ntheap > 0:
        due = w.theap[0].tx.due_ns
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
    if w.epfd < 0:
        poll_mark(w, b)   # its client entry is made after this wake's events
    return 0


cdef inline void bridges_remove(Worker *w, Bridge *b) noexcept nogil:
    cdef Bridge *last = w.bridges[w.nbridges - 1]
    w.bridges[b.slot] = last
    last.slot = b.slot
    w.nbridges -= 1
    if w.epfd < 0:
        poll_remove(w, b, 0)
        poll_remove(w, b, 1)


# ---- the poll engine's array, kept between waits
#
# A bridge's entries change only after its own events (synced at the end
# of that wake, from the poll_dirty list) or when it is closed (removed at
# once); anything else that can change a bridge (timers, hook answers and
# retries through the wake pipe, control-plane generations) sets
# poll_refresh, which syncs every bridge before the next wait. Bridges are
# only marked inside worker_wait_poll, before grave_free can free them.

cdef inline Bridge *poll_owner(Worker *w, int i, int *side) noexcept nogil:
    cdef uintptr_t t = <uintptr_t>w.pbridges[i]
    side[0] = <int>(t & 1)
    return <Bridge *>(t & ~(<uintptr_t>1))


cdef inline void poll_mark(Worker *w, Bridge *b) noexcept nogil:
    if not b.poll_dirty:
        b.poll_dirty = 1
        b.poll_next = w.poll_dirty
        w.poll_dirty = b


cdef int poll_reserve(Worker *w, int head, int n) noexcept nogil:
    # Room for `head` head entries (wake pipe, listeners) and n bridge
    # entries; a larger head moves the bridge part up (their indexes are
    # relative to it). Returns: 0, or -ENOMEM with nothing changed.
    cdef int need = head + n
    cdef int cap
    cdef void *grown
    if need > w.cap_pfds:
        cap = need * 2 if need >= 32 else 64
        grown = realloc(w.pfds, cap * sizeof(pollfd))
        if grown == NULL:
            return -ENOMEM
        w.pfds = <pollfd *>grown
        grown = realloc(w.pbridges, cap * sizeof(Bridge *))
        if grown == NULL:
            return -ENOMEM
        w.pbridges = <Bridge **>grown
        grown = realloc(w.plisteners, cap * sizeof(ListenerC *))
        if grown == NULL:
            return -ENOMEM
        w.plisteners = <ListenerC **>grown
        w.cap_pfds = cap
    if head > w.poll_head:
        memmove(w.pfds + head, w.pfds + w.poll_head, <size_t>w.npfds * sizeof(pollfd))
        w.poll_head = head
    return 0


cdef void poll_remove(Worker *w, Bridge *b, int side) noexcept nogil:
    # Swap-remove: the last entry takes the hole. worker_wait_poll scans
    # downwards and clears what it handled, so a moved entry is neither
    # skipped nor handled twice.
    cdef int i = b.poll_at[side] - 1
    cdef int last = w.npfds - 1
    cdef int s
    if i < 0:
        return
    b.poll_at[side] = 0
    if i != last:
        w.pfds[w.poll_head + i] = w.pfds[w.poll_head + last]
        w.pbridges[i] = w.pbridges[last]
        poll_owner(w, i, &s).poll_at[s] = i + 1
    w.npfds = last


cdef int poll_set(Worker *w, Bridge *b, int side, int fd, short events) noexcept nogil:
    # Returns: 0, or -ENOMEM adding an entry.
    cdef int i = b.poll_at[side] - 1
    cdef pollfd *p
    if fd < 0:
        poll_remove(w, b, side)
        return 0
    if i < 0:
        if poll_reserve(w, w.poll_head, w.npfds + 1) < 0:
            return -ENOMEM
        i = w.npfds
        w.npfds += 1
        w.pbridges[i] = <Bridge *>(<uintptr_t>b | <uintptr_t>side)
        b.poll_at[side] = i + 1
        w.pfds[w.poll_head + i].revents = 0
    p = &w.pfds[w.poll_head + i]
    p.fd = fd
    p.events = events
    return 0


cdef int poll_sync(Worker *w, Bridge *b) noexcept nogil:
    # Returns: 0, or -ENOMEM (the bridge is not fully in the array).
    # Only open fds get an entry: poll() refuses (EINVAL) more entries than
    # RLIMIT_NOFILE, and a bridge not yet connected has no upstream fd.
    if poll_set(w, b, 0, b.cfd, poll_client_interest(b)) < 0:
        return -ENOMEM
    return poll_set(w, b, 1, b.ufd, poll_upstream_interest(b) if b.ufd >= 0 else 0)


cdef int poll_sync_all(Worker *w) noexcept nogil:
    # Returns: 0, or -ENOMEM.
    cdef int i
    for i in range(w.nbridges):
        if poll_sync(w, w.bridges[i]) < 0:
            return -ENOMEM
    return 0


cdef bint timers_due(Worker *w, int64_t now) noexcept nogil:
    cdef int t, i
    cdef ListenerC *ls
    cdef ListenerSlot *s
    for i in range(worker_nlisteners(w)):
        ls = worker_listener(w, i)
        if ls == NULL:
            continue
        s = lslot(w, ls)
        for t in range(1, T_LISTS):
            if s.thead[t] != NULL and tlink(s.thead[t], SLOT_OF[t]).deadline_ns <= now:
                return 1
    return 0


cdef void bridge_free(Bridge *b) noexcept nogil:
    fp_atomic_add(&b.ls.refs, -1)
    free(b.hdr)
    free(b.hello)
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

cdef void listener_on(Worker *w, ListenerC *ls) noexcept nogil:
    cdef ListenerSlot *s = lslot(w, ls)
    if s.listening:
        return
    # EPOLLEXCLUSIVE wakes one worker per client instead of all of them;
    # it refuses EPOLL_CTL_MOD, so pausing is DEL and resuming is ADD.
    if w.epfd >= 0 and fp_epoll_ctl(w.epfd, EPOLL_CTL_ADD, ls.listen_fd, EPOLLIN | EPOLLEXCLUSIVE,
                                    <uint64_t>ls | TAG_LISTENER) < 0:
        return
    s.listening = 1


cdef void listener_off(Worker *w, ListenerC *ls) noexcept nogil:
    cdef ListenerSlot *s = lslot(w, ls)
    if not s.listening:
        return
    if w.epfd >= 0:
        fp_epoll_ctl(w.epfd, EPOLL_CTL_DEL, ls.listen_fd, 0, 0)
    s.listening = 0


cdef inline bint worker_wants(Worker *w, ListenerC *ls) noexcept nogil:
    # Accept on ls: not stopping, not out of fds, and ls not removed.
    return not w.stopping and w.accept_resume_ns == 0 and not fp_atomic_get(&ls.closing)


cdef void worker_listen(Worker *w) noexcept nogil:
    # Each listener in or out of this worker's set, as worker_wants says.
    # Out first: a listener that replaces another has the same fd, which
    # epoll takes once.
    cdef int i, n = worker_nlisteners(w)
    cdef ListenerC *ls
    for i in range(n):
        ls = worker_listener(w, i)
        if ls != NULL and not worker_wants(w, ls):
            listener_off(w, ls)
    for i in range(n):
        ls = worker_listener(w, i)
        if ls != NULL and worker_wants(w, ls):
            listener_on(w, ls)


cdef void worker_pause_accept(Worker *w, int64_t now) noexcept nogil:
    # Out of fds: leave clients in the kernel's backlogs rather than spin on
    # accept; retry after a back-off, or sooner when a bridge frees fds.
    if w.stopping:
        return
    w.accept_resume_ns = now + ACCEPT_BACKOFF_NS
    worker_listen(w)


cdef void worker_accept(Worker *w, ListenerC *ls, int64_t now) noexcept nogil:
    cdef int i, fd
    cdef sockaddr_storage peer
    cdef socklen_t peer_len
    for i in range(ACCEPT_BATCH):
        peer_len = sizeof(peer)
        fp_bump(&w.loop.accept_calls, 1)
        fd = fp_accept(ls.listen_fd, <sockaddr *>&peer, &peer_len)
        if fd >= 0:
            bridge_open(w, ls, fd, &peer, now)
        elif fd == -EAGAIN:
            return
        elif fd == -EMFILE or fd == -ENFILE or fd == -ENOBUFS or fd == -ENOMEM:
            worker_pause_accept(w, now)
            return
        # else: that client was gone before we took it (ECONNABORTED)
        if not lslot(w, ls).listening:
            return   # a bridge_open ran out of fds and paused accepting


# ---- what the control plane changed (Shared.gen)

cdef bint listener_sync_group(Worker *w, ListenerC *ls) noexcept nogil:
    # swap_group installs a group, then moves group_gen: a worker that sees
    # a new generation rebuilds its cursor for the group current now; after
    # every worker synced, swap_group lets the old group's current
    # reference go (this worker no longer reads it but through bridges,
    # which hold their own). Generations, not pointers, are compared: a
    # freed group's block may be reused for a new one at the same address.
    # Returns: 0 short of memory (old group and cursor kept; the sync is
    # tried again on the next round).
    cdef ListenerSlot *s = lslot(w, ls)
    cdef int64_t gen = fp_atomic_get(&ls.group_gen)
    cdef GroupC *g
    cdef BalanceCursor c
    cdef int i
    if gen == s.group_gen:
        return 1
    # Every route's too: one generation covers them all (a cursor rebuilt
    # for an unchanged group only restarts its rotation).
    for i in range(ls.nroutes):
        g = <GroupC *>fp_ptr_get(<void **>&ls.route_groups[i])
        if balance_cursor_init(g, &c) < 0:
            return 0
        balance_cursor_free(&s.rcursor[i])
        s.rcursor[i] = c
        s.rgroup[i] = g
    g = <GroupC *>fp_ptr_get(<void **>&ls.group)
    if g != NULL:
        if balance_cursor_init(g, &c) < 0:
            return 0
        balance_cursor_free(&s.cursor)
        s.cursor = c
    s.group = g
    s.group_gen = gen
    return 1


cdef void worker_snapshot(Worker *w) noexcept nogil:
    # Copies what DataPlane.bridges() shows of each live bridge into the
    # control plane's buffer (at most snap_cap: memory stays bounded), with
    # a reference on each group named, so its names outlive the bridge.
    cdef int i, n = 0
    cdef Bridge *b
    cdef BridgeInfo *e
    for i in range(w.nbridges):
        b = w.bridges[i]
        if b.state == B_CLOSED:
            continue
        if n == w.snap_cap:
            break
        e = &w.snap[n]
        memset(e, 0, sizeof(BridgeInfo))
        e.id = b.id
        e.listener = b.ls.id
        e.state = b.state
        e.half_closed = b.up.eof or b.down.eof
        e.client_v4 = b.client_v4
        e.client_port = b.client_port
        memcpy(e.client_ip, b.client_ip, 16)
        e.upstream = b.upstream
        if b.group != NULL and b.upstream >= 0:
            e.group = b.group
            group_ref(e.group)
        if b.route != NULL and b.addr < b.nroute:
            e.route = b.route[b.addr]
        e.bytes_upstream = b.up.bytes
        e.bytes_downstream = b.down.bytes
        if b.kern:   # what the kernel forwarded joins b.up/b.down.bytes at close
            e.bytes_upstream += kern_forwarded(w, b, 0)
            e.bytes_downstream += kern_forwarded(w, b, 1)
        e.accepted_ns = b.accepted_ns
        if b.tx != NULL:
            toxic_snapshot(b.tx, e)
        n += 1
    w.snap_len = n
    w.snap_total = w.nbridges


cdef int worker_kill(Worker *w, uint64_t id, int action, int stream) noexcept nogil:
    # Carries out command `action` (BA_*: close with FIN both ways, reset,
    # half-close, pause, resume) on bridge `id` if it is this worker's.
    # Returns: 1 if found and done, else 0.
    cdef int i
    for i in range(w.nbridges):
        if w.bridges[i].id == id and w.bridges[i].state != B_CLOSED:
            return bridge_command(w, w.bridges[i], action, stream, w.now_ns)
    return 0


cdef void worker_commands(Worker *w) noexcept nogil:
    # The control plane's one-off commands (Shared.cmd_*), each done once.
    cdef int64_t g = fp_atomic_get(&w.sh.cmd_snap)
    if g != w.seen_snap:
        w.seen_snap = g
        worker_snapshot(w)
    g = fp_atomic_get(&w.sh.cmd_kill)
    if g != w.seen_kill:
        w.seen_kill = g
        w.kill_found = worker_kill(w, w.sh.kill_id, w.sh.kill_action, w.sh.kill_stream)


cdef void worker_sync(Worker *w) noexcept nogil:
    # The control plane added or removed a listener, swapped a group, or
    # asked to close a listener's bridges: act on every listener, then say
    # so (the control plane waits for it).
    cdef int64_t gen = fp_atomic_get(&w.sh.gen)
    cdef int64_t close_gen
    cdef bint done = 1
    cdef int i
    cdef ListenerC *ls
    cdef ListenerSlot *s
    if gen == fp_atomic_get(&w.gen_seen):
        return
    for i in range(worker_nlisteners(w)):
        ls = worker_listener(w, i)
        if ls == NULL:
            continue
        s = lslot(w, ls)
        if not listener_sync_group(w, ls):
            done = 0
        if fp_atomic_get(&ls.toxic_gen) != s.toxic_gen:
            s.toxic_gen = fp_atomic_get(&ls.toxic_gen)
            worker_sync_toxics(w, ls, s, w.now_ns)
        close_gen = fp_atomic_get(&ls.cmd_close)
        if close_gen != s.seen_close:
            s.seen_close = close_gen
            worker_close_listener(w, ls, <int>fp_atomic_get(&ls.close_reason))
    worker_listen(w)
    worker_commands(w)
    w.poll_refresh = 1   # the poll engine: whatever that changed, before its next wait
    # Out of an event batch: what closed here is freed now, not after the
    # next wake-up (a drained listener waits for its last bridge's free).
    grave_free(w)
    if done:
        fp_atomic_set(&w.gen_seen, gen)


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
    worker_listen(w)
    fp_atomic_set(&w.accepting, 0)


cdef void worker_close_listener(Worker *w, ListenerC *ls, int reason) noexcept nogil:
    # Every bridge of ls, newest first: a close moves the last bridge into
    # the freed place, which this walk has passed already.
    cdef int i = w.nbridges - 1
    while i >= 0:
        if i < w.nbridges and w.bridges[i].ls == ls:
            bridge_close(w, w.bridges[i], reason, 0, 0)
        i -= 1


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
    cdef ListenerC *ls
    if n < 0:
        return n
    now[0] = w.now_ns = fp_now_ns()
    for i in range(n):
        tag = w.events[i].data.u64
        if tag == TAG_WAKE:
            fp_bump(&w.loop.wakeups, 1)
            drain_wake(w)
            worker_take_results(w, now[0])
        elif tag & TAG_LISTENER:
            ls = <ListenerC *>(tag & ~(<uint64_t>TAG_LISTENER))
            # Taken out of the set earlier in this batch (paused, removed):
            # the event is stale.
            if lslot(w, ls).listening:
                worker_accept(w, ls, now[0])
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
    if b.state == B_HELLO:
        # SO_RCVLOWAT keeps a partial ClientHello from waking it.
        return POLLIN | POLLRDHUP
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
    # array: the bridges keep their state and the array is synced again).
    # poll() itself is O(fds) in the kernel: what is left to save is the
    # user-space side, so the array is kept between waits (see poll_mark).
    cdef int nls = worker_nlisteners(w)
    cdef int i, k, r, left, side
    cdef short ev
    cdef Bridge *b
    cdef ListenerC *ls
    cdef pollfd *p
    if w.poll_head < 1 + nls and poll_reserve(w, 1 + nls, w.npfds) < 0:
        return -ENOMEM
    if w.poll_refresh:
        if poll_sync_all(w) < 0:
            return -ENOMEM
        w.poll_refresh = 0
    w.pfds[0].fd = w.wake_r
    w.pfds[0].events = POLLIN
    k = 1
    for i in range(nls):
        ls = worker_listener(w, i)
        if ls != NULL and lslot(w, ls).listening:
            w.plisteners[k] = ls
            w.pfds[k].fd = ls.listen_fd
            w.pfds[k].events = POLLIN
            k += 1
    for i in range(k, w.poll_head):
        w.pfds[i].fd = -1   # poll() skips it
        w.pfds[i].events = 0
    r = fp_poll(w.pfds, <nfds_t>(w.poll_head + w.npfds), timeout)
    if r < 0:
        return r
    now[0] = w.now_ns = fp_now_ns()
    left = r
    if w.pfds[0].revents:
        left -= 1
        fp_bump(&w.loop.wakeups, 1)
        drain_wake(w)
        worker_take_results(w, now[0])
        # Hook answers and retries changed bridges outside their events.
        w.poll_refresh = 1
    for i in range(1, k):
        if w.pfds[i].revents:
            left -= 1
            ls = w.plisteners[i]
            if lslot(w, ls).listening:
                worker_accept(w, ls, now[0])
    # Downwards, each entry cleared before it is handled: a close
    # swap-removes entries (poll_remove), moving only ones already handled
    # or still below. Done once every ready entry was seen.
    i = w.npfds - 1
    while left > 0:
        if i >= w.npfds:
            i = w.npfds - 1
        if i < 0:
            break
        p = &w.pfds[w.poll_head + i]
        ev = p.revents
        if ev:
            p.revents = 0
            left -= 1
            b = poll_owner(w, i, &side)
            # Closed, or (a retried connect) no longer this fd: skip; the
            # bridge's state already moved on.
            if b.state != B_CLOSED and p.fd == (b.ufd if side else b.cfd):
                bridge_event(w, b, side, translate_poll(ev), now[0])
            if b.state != B_CLOSED:
                poll_mark(w, b)
        i -= 1
    while w.poll_dirty != NULL:
        b = w.poll_dirty
        w.poll_dirty = b.poll_next
        b.poll_next = NULL
        b.poll_dirty = 0
        if b.state != B_CLOSED and poll_sync(w, b) < 0:
            w.poll_refresh = 1   # the next wait tries again, or says -ENOMEM
    return r


cdef int worker_run(Worker *w) noexcept nogil:
    # The worker's whole life. Returns: 0 after a stop, or -errno when the
    # event loop itself failed (its bridges are closed first).
    cdef int64_t now = fp_now_ns()
    cdef int r = 0
    cdef int timeout
    w.now_ns = now
    fp_block_signals()
    # Against _publish's store of the generation then load of in_loop:
    # either it waits for this worker or this worker sees its change.
    fp_atomic_set(&w.in_loop, 1)
    fp_fence()
    fp_atomic_set(&w.gen_seen, -1)
    worker_sync(w)
    fp_atomic_set(&w.accepting, 1)
    while True:
        worker_sync(w)
        worker_check_stop(w, now)
        if w.stopping and (w.nbridges == 0 or now >= w.drain_deadline_ns):
            break
        if w.accept_resume_ns != 0 and now >= w.accept_resume_ns:
            w.accept_resume_ns = 0
            worker_listen(w)
        timeout = worker_timeout_ms(w, now)
        if w.kwait != NULL and (timeout < 0 or timeout > 1):
            timeout = 1
        elif w.nkern and (timeout < 0 or timeout > KFOLD_MS):
            timeout = KFOLD_MS
        if w.sh.busy_poll_ns and now - w.last_event_ns < w.sh.busy_poll_ns:
            # Busy polling (an option): a running thread is woken by its
            # peers without an inter-processor interrupt, which on a VM
            # costs the sending CPU a VM exit. Only while traffic flows.
            timeout = 0
        if w.epfd >= 0:
            r = worker_wait_epoll(w, timeout, &now)
        else:
            r = worker_wait_poll(w, timeout, &now)
        fp_bump(&w.loop.iterations, 1)
        if r > 0:
            fp_bump(&w.loop.events, <uint64_t>r)
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
            now = w.now_ns = fp_now_ns()
            r = 0
        elif r < 0:
            break
        if w.epfd < 0 and timers_due(w, now):
            w.poll_refresh = 1   # a timer may change any bridge
        timers_run(w, now)
        if w.kwait != NULL:
            kwait_run(w, now)
        if w.nkern and now >= w.kfold_ns:
            kern_fold_all(w, now)
        if w.sh.hooks:
            hook_nudge(w.sh, now)
        grave_free(w)
    w.stopping = 1
    worker_listen(w)
    fp_atomic_set(&w.accepting, 0)
    worker_close_all(w, SHUTDOWN)
    grave_free(w)
    # Synced for good: a worker out of its loop reads no listener.
    fp_atomic_set(&w.in_loop, 0)
    return r
