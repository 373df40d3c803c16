# From accept to a connected upstream: the client's address, admission
# (limits, the wait queue, on_connect), the group's choice, the connect
# itself, and retries on the next address or the next upstream.


cdef void client_address(sockaddr_storage *peer, Bridge *b) noexcept nogil:
    # Kept as IPv6 (IPv4 mapped) so that rules and tables use one key shape.
    cdef int family = addr16_from_sockaddr(peer, b.client_ip, &b.client_port)
    b.client_v4 = family == AF_INET
    if peer.ss_family == AF_UNIX:
        b.client_v4 = CLIENT_UNIX


cdef inline void set_socket_buffer(ListenerC *ls, int fd, sockaddr *peer) noexcept nogil:
    # socket_buffer for one of a bridge's sockets: a size; or, negative
    # ("auto"), that size where the peer is a loopback address.
    if ls.socket_buffer > 0:
        fp_set_buffers(fd, ls.socket_buffer)
    elif ls.socket_buffer < 0 and fp_is_loopback(peer):
        fp_set_buffers(fd, -ls.socket_buffer)


cdef inline void set_congestion(ListenerC *ls, int fd, sockaddr *peer) noexcept nogil:
    # congestion_control for one of a bridge's TCP sockets: on every one;
    # or ("auto") where the peer is a loopback address.
    if ls.congestion[0] and (not ls.congestion_loopback or fp_is_loopback(peer)):
        fp_set_congestion(fd, ls.congestion)


cdef void bridge_open(Worker *w, ListenerC *ls, int fd, sockaddr_storage *peer,
                      int64_t now) noexcept nogil:
    cdef Bridge *b = <Bridge *>calloc(1, sizeof(Bridge))
    if b == NULL or bridges_add(w, b) < 0:
        free(b)
        close(fd)
        fp_bump(&lslot(w, ls).ctr.no_memory, 1)
        return
    b.ls = ls
    fp_atomic_add(&ls.refs, 1)   # dropped by bridge_free
    b.id = <uint64_t>fp_atomic_add(&w.sh.next_id, 1)
    b.worker = w.id
    b.cfd = fd
    b.ufd = -1
    b.upstream = -1
    b.up.pipe_r = b.up.pipe_w = b.down.pipe_r = b.down.pipe_w = -1
    b.up.hook = (ls.hooks & HOOK_DATA_UP) != 0
    b.down.hook = (ls.hooks & HOOK_DATA_DOWN) != 0
    b.state = B_CONNECTING
    b.copy = w.sh.engine == ENGINE_POLL
    b.accepted_ns = now
    b.last_active_ns = now
    client_address(peer, b)
    if not b.ls.nodelay_inherited:
        fp_set_nodelay(fd)
        if b.ls.notsent_lowat:
            fp_set_notsent_lowat(fd, b.ls.notsent_lowat)
    # Per client, not on the listening socket: a reload that turns it off
    # could not undo a size the shared socket passes on.
    set_socket_buffer(b.ls, fd, <sockaddr *>peer)
    if b.client_v4 != CLIENT_UNIX:
        set_congestion(b.ls, fd, <sockaddr *>peer)   # per client too, for the same reason
    if b.ls.keepalive_clients:
        # Per client too: Linux would pass it on from the listening socket,
        # but then a reload could not turn it off for new clients.
        fp_set_keepalive(fd, b.ls.keepalive_idle, b.ls.keepalive_interval, b.ls.keepalive_count)
    if b.ls.user_timeout_ms and b.client_v4 != CLIENT_UNIX:
        fp_set_user_timeout(fd, b.ls.user_timeout_ms)   # per client, as keepalive
    fp_bump(&lslot(w, b.ls).ctr.accepted, 1)
    if w.epfd >= 0 and fp_epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, EV_BRIDGE,
                                    <uint64_t>b) < 0:
        bridge_close(w, b, REFUSED, 0, 0)
        return
    if b.ls.accept_proxy:
        # Only trusted peers may speak for a client: no one can forge an
        # address past the IP rules.
        if b.ls.accept_proxy_from != NULL and not acl_admits(b.ls.accept_proxy_from, b.client_ip):
            bridge_refuse(w, b, &lslot(w, b.ls).ctr.denied)
            return
        b.state = B_HEADER
        timer_add(w, b, T_HEADER, now + b.ls.proxy_header_timeout_ns)
        return   # the header's bytes come with a readable event
    bridge_admit(w, b, now)


cdef void bridge_read_header(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # Takes exactly the PROXY header off the socket: the bytes behind it
    # belong to the client's stream. A header that comes in pieces is
    # collected in b.hdr: every byte of a valid prefix is header, so each
    # piece is consumed at once (nothing lingers to wake a poll loop, and a
    # FIN behind a truncated header is seen).
    cdef ProxyInfo info
    cdef size_t cap = 16 + <size_t>b.ls.proxy_header_max
    cdef uint8_t *buf = b.hdr if b.hdr != NULL else lslot(w, b.ls).scratch
    cdef size_t have = b.hdr_len
    cdef ssize_t n = fp_recv_peek(b.cfd, <char *>buf + have, cap - have)
    cdef int r
    if n == -EAGAIN:
        b.c_rd = 0
        return
    if n <= 0:
        bridge_header_failed(w, b, CLIENT_CLOSED if n == 0 else CLIENT_RESET)
        return
    r = proxy_parse(buf, have + <size_t>n, cap - 16, &info)
    if r == 0:
        if b.hdr == NULL:
            b.hdr = <uint8_t *>malloc(cap)
            if b.hdr == NULL:
                fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
                bridge_header_failed(w, b, REFUSED)
                return
            memcpy(b.hdr, lslot(w, b.ls).scratch, <size_t>n)
        if fp_recv(b.cfd, <char *>b.hdr + have, <size_t>n) != n:
            bridge_header_failed(w, b, REFUSED)
            return
        b.hdr_len = <uint16_t>(have + <size_t>n)
        # Look again: a FIN that came with these bytes raises no new edge.
        bridge_read_header(w, b, now)
        return
    if r < 0 or fp_recv(b.cfd, <char *>buf + have, <size_t>r - have) != <ssize_t>(<size_t>r - have):
        bridge_header_failed(w, b, REFUSED)
        return
    free(b.hdr)
    b.hdr = NULL
    b.hdr_len = 0
    b.up.cut = 1   # the header and the stream's first bytes may share an skb
    if not info.is_local:
        memcpy(b.client_ip, info.src, 16)
        b.client_port = info.src_port
        b.client_v4 = info.family == AF_INET
        memcpy(b.dst_ip, info.dst, 16)
        b.dst_port = info.dst_port
        b.has_dst = 1
    timer_del(w, b, SLOT_PHASE)
    b.c_rd = 1   # client bytes may sit behind the header
    bridge_admit(w, b, now)


cdef void bridge_header_failed(Worker *w, Bridge *b, int reason) noexcept nogil:
    fp_bump(&lslot(w, b.ls).ctr.proxy_header_errors, 1)
    bridge_close(w, b, reason, 0, 0)


cdef void bridge_refuse(Worker *w, Bridge *b, uint64_t *counter) noexcept nogil:
    # A rule refused the client: closed at once, nothing read; RST with
    # reject_with reset.
    fp_bump(counter, 1)
    bridge_close(w, b, REFUSED, b.ls.reject_with == REJECT_RESET, 0)


cdef void bridge_reject(Worker *w, Bridge *b) noexcept nogil:
    # Past a limit: closed at once, nothing read.
    bridge_refuse(w, b, &lslot(w, b.ls).ctr.rejected)


cdef void bridge_admit(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # The built-in rules run first (no Python, nanoseconds each), then the
    # limits, waiting in line behind earlier clients if there are any.
    if b.ls.acl != NULL and not acl_admits(b.ls.acl, b.client_ip):
        bridge_refuse(w, b, &lslot(w, b.ls).ctr.denied)
        return
    if not fp_atomic_get(&b.ls.admit_open):
        bridge_refuse(w, b, &lslot(w, b.ls).ctr.outside_window)
        return
    if b.ls.rate != NULL and not rate_take(b.ls.rate, b.client_ip, now):
        bridge_refuse(w, b, &lslot(w, b.ls).ctr.rate_limited)
        return
    if b.ls.max_connections_per_ip and not b.ip_counted:
        if not ip_take(&b.ls.ips, b.client_ip, b.ls.max_connections_per_ip):
            bridge_reject(w, b)
            return
        b.ip_counted = 1
    if queue_busy(b.ls) or not limit_take(b.ls):
        if not queue_wait(w, b, 0, now):
            bridge_reject(w, b)
        return
    bridge_admitted(w, b, now)


cdef void bridge_admitted(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    b.admitted = 1
    timer_del(w, b, SLOT_PHASE)
    b.state = B_CONNECTING
    if b.ls.max_lifetime_ns:
        timer_add(w, b, T_LIFETIME, b.accepted_ns + b.ls.max_lifetime_ns)
    if b.ls.idle_timeout_ns:
        timer_add(w, b, T_IDLE, now + b.ls.idle_timeout_ns)
    if b.ls.sni:
        bridge_hello_start(w, b, now)   # it chooses the route, then goes on as below
        return
    if b.ls.hooks & HOOK_CONNECT:
        bridge_ask_connect(w, b)
    else:
        bridge_start_upstream(w, b, -1, now)


cdef void bridge_queue_retry(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # A slot was freed for this waiter: the step it waited at, again.
    if not queue_retry_arrived(w, b):
        b.hook_pending -= 1
        limbo_release(w, b)
        return
    if not b.admitted:
        if not limit_take(b.ls):
            queue_wait(w, b, 1, now)
            return
        timing_left_queue(b, now)
        bridge_admitted(w, b, now)
    else:
        # (Should the upstream be full again, the next retry stamps again.)
        timing_left_queue(b, now)
        bridge_start_upstream(w, b, -1, now)


cdef void bridge_queue_timeout(Worker *w, Bridge *b) noexcept nogil:
    fp_bump(&lslot(w, b.ls).ctr.queue_timeouts, 1)
    bridge_close(w, b, TIMEOUT, 0, 0)


cdef int balance_take(GroupC *g, BalanceCursor *c, int i, int64_t now) noexcept nogil:
    # on_connect named upstream i: its health, limits, admin state and
    # run-time weight (0: out) apply as if the algorithm had chosen it.
    # Returns: i, BALANCE_FULL or BALANCE_NONE.
    cdef int w = 0
    memset(c.skip, 0, balance_tried_bytes(g.n))
    c.full = 0
    if usable(g, c, i, g.spec[i].backup, now, &w) >= 0 and reserve(g, c, i, now):
        return i
    return BALANCE_FULL if c.full else BALANCE_NONE


cdef void bridge_set_group(Bridge *b, GroupC *g) noexcept nogil:
    # The bridge picks from g from now on: it holds a reference to g, and
    # gives back the one on the group it picked from before (holding no
    # slot there), whose indexes its `tried` bitmap no longer means.
    if b.group == g:
        return
    bridge_drop_group(b)
    free(b.tried)
    b.tried = NULL
    b.upstream = -1
    b.uc = NULL
    if g != NULL:
        group_ref(g)
        fp_atomic_add(&g.bridges, 1)
    b.group = g


cdef void bridge_drop_group(Bridge *b) noexcept nogil:
    # Of a closing bridge, or one moving to a newer group; the last bridge
    # of a retired group frees it here.
    cdef GroupC *g = b.group
    if g == NULL:
        return
    b.group = NULL
    fp_atomic_add(&g.bridges, -1)
    group_unref(g)


cdef inline GroupC *route_group(Worker *w, Bridge *b, BalanceCursor **cursor) noexcept nogil:
    # The current group of the bridge's route (the default group for route
    # 0, NULL when there is none) and this worker's cursor for it.
    cdef ListenerSlot *s = lslot(w, b.ls)
    if b.route_id == 0:
        cursor[0] = &s.cursor
        return s.group
    cursor[0] = &s.rcursor[b.route_id - 1]
    return s.rgroup[b.route_id - 1]


cdef inline int route_retries(Bridge *b) noexcept nogil:
    # Retries stay within the bridge's route's group. Configured < 0: every
    # other upstream of the group (its size moves with DNS answers).
    cdef int r = b.ls.retries if b.route_id == 0 else b.ls.route_retries[b.route_id - 1]
    return r if r >= 0 else b.group.n - 1


cdef void bridge_start_upstream(Worker *w, Bridge *b, int chosen, int64_t now) noexcept nogil:
    # Takes an upstream of the current group of its route (the one
    # on_connect chose, or the algorithm's choice), or none when on_connect
    # gave an address of its own, and connects.
    cdef int i, r
    cdef bint retry = b.state == B_QUEUED   # a waiter's retry keeps its place
    cdef BalanceCursor *cursor
    cdef GroupC *g = route_group(w, b, &cursor)
    if b.route == NULL:
        if g == NULL:
            bridge_refuse(w, b, &lslot(w, b.ls).ctr.route_refused)
            return
        bridge_set_group(b, g)
        if chosen >= 0:
            i = balance_take(g, cursor, chosen, now)
        else:
            i = balance_acquire(g, cursor, b.client_ip, b.tried, now)
        if i == BALANCE_FULL:
            if not queue_wait(w, b, retry, now):
                bridge_reject(w, b)
            return
        if i < 0:
            # Every upstream is down (or was tried): close at once.
            bridge_connect_failed(w, b)
            return
        b.upstream = i
        b.up_slot = 1
        b.uc = &g.ctr[w.id * g.n + i]
        b.addr = 0
        b.state = B_CONNECTING
        timer_del(w, b, SLOT_PHASE)
    elif not b.routed:
        b.uc = &lslot(w, b.ls).routed
        b.routed = 1
        fp_atomic_add(&b.ls.routed.accepted, 1)
        fp_atomic_max(&b.ls.routed.peak_active, fp_atomic_add(&b.ls.routed.active, 1))
    r = bridge_connect(w, b, -ECONNREFUSED, now)
    if r < 0:
        bridge_upstream_failed(w, b, r, now)


cdef inline UpstreamAddr *bridge_addrs(Worker *w, Bridge *b, int *n) noexcept nogil:
    if b.route != NULL:
        n[0] = b.nroute
        return b.route
    n[0] = b.group.addrs[b.upstream].naddrs
    return b.group.addrs[b.upstream].addrs


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
        if a.family != AF_UNIX:   # TCP options: two failing syscalls on a Unix socket
            fp_set_nodelay(fd)
            if b.ls.notsent_lowat:
                fp_set_notsent_lowat(fd, b.ls.notsent_lowat)
            if b.ls.keepalive:
                fp_set_keepalive(fd, b.ls.keepalive_idle, b.ls.keepalive_interval, b.ls.keepalive_count)
            if b.ls.user_timeout_ms:
                # Before connect(): it bounds the handshake's retries too,
                # though connect_timeout is what ends a slow connect.
                fp_set_user_timeout(fd, b.ls.user_timeout_ms)
            # Before connect(): the handshake already runs it.
            set_congestion(b.ls, fd, <sockaddr *>&a.sa)
        # Before connect(): the window scale is chosen from it.
        set_socket_buffer(b.ls, fd, <sockaddr *>&a.sa)
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
            b.connect_start_ns = now
            timer_add(w, b, T_CONNECT, now + b.ls.connect_timeout_ns)
            return 0
        close(fd)
        err = r
        b.addr += 1
    return err


cdef bint bridge_connected(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # Returns: 0 when the bridge had to close (the PROXY header failed, or
    # no memory for its toxics).
    cdef ToxicSet *toxics = lslot(w, b.ls).toxics
    timer_del(w, b, SLOT_PHASE)
    b.state = B_ACTIVE
    timing_connected(w, b, now)
    if b.up_slot:
        balance_connect_result(b.group, b.upstream, 1, now)
    if b.ls.send_proxy and not bridge_send_header(w, b):
        bridge_close(w, b, UPSTREAM_RESET, 1, 1)
        return 0
    if toxics != NULL or b.tx != NULL:
        # The listener's toxics apply from here (toxiproxy's: from the
        # upstream connection). Short of memory for them, the bridge ends
        # rather than flow without its faults (no sync may come to retry).
        if toxic_move(w, b, toxics, now) < 0 or (b.tx != NULL and toxic_rearm(w, b) < 0):
            bridge_no_memory(w, b)
            return 0
    return 1


cdef bint bridge_send_header(Worker *w, Bridge *b) noexcept nogil:
    # The PROXY header goes first, before any client byte. The socket has
    # just connected, so its empty send buffer takes the whole header.
    cdef uint8_t hdr[232]
    cdef sockaddr_storage local
    cdef socklen_t len = sizeof(local)
    cdef uint16_t port
    cdef int n
    if b.client_v4 == CLIENT_UNIX:
        # A Unix client has no address to announce: the spec's UNKNOWN
        # (v1) or UNSPEC (v2), so the upstream uses its own connection's.
        n = proxy_build_unknown(b.ls.send_proxy, hdr, sizeof(hdr))
        return n > 0 and fp_send(b.ufd, <char *>hdr, <size_t>n) == n
    if not b.has_dst:
        if getsockname(b.cfd, <sockaddr *>&local, &len) < 0 or \
                addr16_from_sockaddr(&local, b.dst_ip, &port) < 0:
            return 0
        b.dst_port = port
    n = proxy_build(b.ls.send_proxy, b.client_ip, b.client_port, b.dst_ip,
                    b.dst_port, hdr, sizeof(hdr))
    return n > 0 and fp_send(b.ufd, <char *>hdr, <size_t>n) == n


cdef void bridge_retry(Worker *w, Bridge *b, int err, int64_t now) noexcept nogil:
    # The address being tried failed: go on with the next, or the next
    # upstream.
    timer_del(w, b, SLOT_PHASE)
    close(b.ufd)
    b.ufd = -1
    b.addr += 1
    err = bridge_connect(w, b, err, now)
    if err < 0:
        bridge_upstream_failed(w, b, err, now)


cdef void bridge_upstream_failed(Worker *w, Bridge *b, int err, int64_t now) noexcept nogil:
    # No address of the upstream answered. It is counted (passive health),
    # then another upstream is tried while retries are left: a client sees
    # a failure only when no healthy upstream could take it.
    if err == -EMFILE or err == -ENFILE:
        # Our fd shortage says nothing of the upstream's health.
        fp_bump(&lslot(w, b.ls).ctr.fd_exhausted, 1)
        bridge_close(w, b, REFUSED, 0, 0)
        worker_pause_accept(w, fp_now_ns())
        return
    if b.uc != NULL:
        fp_bump(&b.uc.connect_failures, 1)
    if b.up_slot and b.route == NULL:
        balance_connect_result(b.group, b.upstream, 0, now)
        if upstream_release(w, b):
            queue_kick(b.ls)
        if b.tries < route_retries(b) and bridge_mark_tried(w, b) == 0:
            b.tries += 1
            bridge_start_upstream(w, b, -1, now)
            return
    bridge_connect_failed(w, b)


cdef void bridge_connect_failed(Worker *w, Bridge *b) noexcept nogil:
    # No upstream took the client. Counted before the close, so a stats()
    # read once the client saw it counts it. The client gets RST on either
    # engine: a close with unread client bytes is an RST anyway (the kernel
    # sends one), so only RST can be the same every time; and it is what the
    # client would have seen connecting to the refusing upstream itself, not
    # an EOF that could pass for an empty answer.
    fp_bump(&lslot(w, b.ls).ctr.connect_failures, 1)
    bridge_close(w, b, CONNECT_FAILED, 1, 0)


cdef int bridge_mark_tried(Worker *w, Bridge *b) noexcept nogil:
    # Returns: 0, or -ENOMEM (no retry then).
    if b.tried == NULL:
        b.tried = <uint8_t *>calloc(1, balance_tried_bytes(b.group.n))
        if b.tried == NULL:
            return -ENOMEM
    bits_set(b.tried, b.upstream)
    return 0


cdef void bridge_ask_connect(Worker *w, Bridge *b) noexcept nogil:
    cdef HookEvent ev
    ev.kind = EVT_CONNECT
    ev.buf = NULL
    ev.len = 0
    ev.held = 0
    if hook_call(w, b, CALL_CONNECT, &ev) < 0:
        fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
        bridge_close(w, b, HOOK_ERROR, 0, 0)
        return
    b.state = B_HOOK


cdef int route_to_current(Worker *w, Bridge *b, HookResult *res) noexcept nogil:
    # on_connect named an upstream of res.group; the bridge picks from the
    # group current now. Returns: its index there (the same upstream by
    # name after a swap); -1 with b.route set to its addresses when the
    # current group no longer has it (it is then a route, counted as one);
    # -ENOMEM.
    cdef BalanceCursor *cursor
    cdef GroupC *g = route_group(w, b, &cursor)
    cdef GroupC *named = res.group
    cdef int i
    if named == NULL or res.upstream < 0:
        return -1
    if named == g:
        return res.upstream
    i = group_find(g, named.names[res.upstream]) if g != NULL else -1
    if i >= 0:
        return i
    i = named.addrs[res.upstream].naddrs
    b.route = <UpstreamAddr *>malloc(i * sizeof(UpstreamAddr))
    if b.route == NULL:
        return -ENOMEM
    memcpy(b.route, named.addrs[res.upstream].addrs, i * sizeof(UpstreamAddr))
    b.nroute = i
    return -1


cdef void bridge_connect_answer(Worker *w, Bridge *b, HookResult *res,
                                int64_t now) noexcept nogil:
    cdef int i
    if res.verdict == V_PROCEED:
        bridge_start_upstream(w, b, -1, now)
    elif res.verdict == V_ROUTE:
        if res.route != NULL:
            b.route = res.route
            b.nroute = res.nroute
            res.route = NULL
            bridge_start_upstream(w, b, -1, now)
        else:
            i = route_to_current(w, b, res)
            if i == -ENOMEM:
                fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
                bridge_close(w, b, HOOK_ERROR, 0, 0)
            else:
                bridge_start_upstream(w, b, i, now)
    else:
        if res.verdict == V_REFUSE:
            fp_bump(&lslot(w, b.ls).ctr.hook_refused, 1)
        bridge_close(w, b, HOOK_ERROR if res.verdict == V_ERROR else REFUSED, 0, 0)
    hook_result_free(res)
