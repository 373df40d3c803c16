# Routing by TLS server name: the ClientHello parser, the table of server
# names a listener routes by, and a bridge's ClientHello phase (after
# admission, before on_connect and the group's choice). Nothing is consumed:
# the client's bytes reach the upstream untouched.

cdef enum:
    HELLO_MAX = 16384      # bytes of TLS records a ClientHello may take (headers included)
    HELLO_NAME_MAX = 255   # a DNS name is at most 253 characters (255 with dots)
    HELLO_ALPN_MAX = 127   # bytes of ALPN protocol names kept (wire form, whole entries)
    HELLO_RECORD_MAX = 16384   # a plaintext TLS record's payload (RFC 8446 5.1)


# What hello_parse found.
cdef struct HelloInfo:
    size_t need            # -EAGAIN: the input must be this long to go on
    int name_len           # 0: no usable host_name (none, or not printable ASCII)
    char name[256]         # HELLO_NAME_MAX + 1, NUL-ended
    int alpn_len           # bytes of `alpn`: (length, name) entries as on the wire
    uint8_t alpn[127]      # HELLO_ALPN_MAX


cdef inline uint32_t load_be24(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]


cdef int hello_sni(const uint8_t *p, size_t n, HelloInfo *out) noexcept nogil:
    # The server_name extension's body (RFC 6066 3): the first host_name
    # entry. Returns: 0, or -1 when a length points past the body.
    cdef size_t off = 2, end, k
    cdef size_t nl
    if n < 2:
        return -1
    end = 2 + <size_t>load_be16(p)
    if end > n:
        return -1
    while off + 3 <= end:
        nl = load_be16(p + off + 1)
        if off + 3 + nl > end:
            return -1
        if p[off] == 0 and out.name_len == 0 and 0 < nl <= HELLO_NAME_MAX:
            for k in range(nl):
                if not 0x21 <= p[off + 3 + k] <= 0x7e:
                    break
            else:
                memcpy(out.name, p + off + 3, nl)
                out.name[nl] = 0
                out.name_len = <int>nl
        off += 3 + nl
    return 0 if off == end else -1


cdef int hello_alpn(const uint8_t *p, size_t n, HelloInfo *out) noexcept nogil:
    # The ALPN extension's body (RFC 7301 3.1): the protocols that fit in
    # HELLO_ALPN_MAX bytes, whole. Returns: 0, or -1 when a length points
    # past the body or a name is empty.
    cdef size_t off = 2, end, pl
    if n < 2:
        return -1
    end = 2 + <size_t>load_be16(p)
    if end > n:
        return -1
    while off < end:
        pl = p[off]
        if pl == 0 or off + 1 + pl > end:
            return -1
        if <size_t>out.alpn_len == off - 2 and <size_t>out.alpn_len + 1 + pl <= HELLO_ALPN_MAX:
            memcpy(out.alpn + out.alpn_len, p + off, 1 + pl)
            out.alpn_len += <int>(1 + pl)
        off += 1 + pl
    return 0


cdef int hello_body(const uint8_t *p, size_t n, HelloInfo *out) noexcept nogil:
    # A ClientHello's body (RFC 8446 4.1.2, and TLS 1.0-1.2's): every
    # length is checked against what is left before it is used.
    # Returns: 0, or -EPROTO when malformed.
    cdef size_t off = 34     # legacy_version, random
    cdef size_t end, l
    cdef int r
    if n < off + 1:
        return -EPROTO
    if p[off] > 32:           # legacy_session_id
        return -EPROTO
    off += 1 + p[off]
    if off + 2 > n:
        return -EPROTO
    l = load_be16(p + off)    # cipher_suites
    if l < 2 or l & 1:
        return -EPROTO
    off += 2 + l
    if off + 1 > n:
        return -EPROTO
    off += 1 + p[off]         # legacy_compression_methods
    if off > n:
        return -EPROTO
    if off == n:
        return 0              # no extensions (SSL 3.0 style): no name
    if off + 2 > n:
        return -EPROTO
    end = off + 2 + load_be16(p + off)
    if end > n:
        return -EPROTO
    off += 2
    while off + 4 <= end:
        l = load_be16(p + off + 2)
        if off + 4 + l > end:
            return -EPROTO
        r = 0
        if load_be16(p + off) == 0:
            r = hello_sni(p + off + 4, l, out)
        elif load_be16(p + off) == 16:
            r = hello_alpn(p + off + 4, l, out)
        if r < 0:
            return -EPROTO
        off += 4 + l
    return 0 if off == end else -EPROTO


cdef int hello_parse(const uint8_t *buf, size_t n, size_t limit, uint8_t *msg,
                     HelloInfo *out) noexcept nogil:
    # The ClientHello at the start of buf[0:n]: TLS handshake records
    # (content type 22), whose payloads make one handshake message that may
    # span several of them. limit: most bytes of records looked at; msg:
    # limit bytes of scratch where a message spanning records is joined
    # (one record's is read in place). Each byte is checked as soon as it
    # is there, so what is not TLS fails on its first bytes.
    # Returns:
    #   0          a ClientHello; out.name / out.alpn as it has them
    #   -EAGAIN    a valid prefix: wait until the input is out.need bytes long
    #   -EPROTO    not TLS, or not a well-formed ClientHello
    #   -EMSGSIZE  a ClientHello needing more than `limit` bytes of records
    cdef size_t pos = 0, got = 0, total = 0, rlen, end, take
    memset(out, 0, sizeof(HelloInfo))
    while True:
        if pos < n and buf[pos] != 22:
            return -EPROTO
        if pos + 1 < n and buf[pos + 1] != 3:
            return -EPROTO
        if pos + 2 < n and buf[pos + 2] > 4:
            return -EPROTO
        if pos + 5 > n:
            out.need = pos + 5
            return -EAGAIN if out.need <= limit else -EMSGSIZE
        rlen = load_be16(buf + pos + 3)
        if rlen == 0 or rlen > HELLO_RECORD_MAX:
            return -EPROTO
        end = pos + 5 + rlen
        if got == 0 and pos + 5 < n and buf[pos + 5] != 1:
            return -EPROTO    # a handshake, but not a ClientHello
        if end > limit:
            return -EMSGSIZE
        if end > n:
            out.need = end
            return -EAGAIN
        if got == 0 and rlen >= 4:
            total = 4 + <size_t>load_be24(buf + pos + 6)
            if total <= rlen:
                return hello_body(buf + pos + 9, total - 4, out)
        take = rlen if total == 0 or total - got > rlen else total - got
        memcpy(msg + got, buf + pos + 5, take)
        got += take
        if total == 0 and got >= 4:
            if msg[0] != 1:
                return -EPROTO
            total = 4 + <size_t>load_be24(msg + 1)
        if total > limit:
            return -EMSGSIZE
        if total != 0 and got >= total:
            return hello_body(msg + 4, total - 4, out)
        pos = end


cdef size_t hello_normalize(const char *name, size_t n, char *out) noexcept nogil:
    # Server names compare case-insensitively, without a trailing dot.
    # Returns: the length written to out (n + 1 bytes, NUL-ended).
    cdef size_t k
    cdef char c
    if n > 0 and name[n - 1] == c'.':
        n -= 1
    for k in range(n):
        c = name[k]
        out[k] = c + 32 if c'A' <= c <= c'Z' else c
    out[n] = 0
    return n


# ---- the route table: exact names, then wildcard suffixes

cdef int route_find(RouteTable *t, RouteEntry *slots, const char *name, size_t n) noexcept nogil:
    # Returns: the route of `name` in slots, or 0.
    cdef uint64_t h = mix64(fnv1a(FNV_OFFSET, <const uint8_t *>name, n))
    cdef uint32_t i = <uint32_t>h & t.mask
    cdef RouteEntry *e
    while True:
        e = &slots[i]
        if e.route == 0:
            return 0
        if e.hash == h and e.len == n and memcmp(t.pool + e.off, name, n) == 0:
            return e.route
        i = (i + 1) & t.mask


cdef int route_lookup(RouteTable *t, const char *name, size_t n) noexcept nogil:
    # name: normalized (hello_normalize). An exact name wins; then the
    # longest wildcard suffix: a.b.example tries b.example, then example.
    # Returns: the route (1..), or 0 for none.
    cdef int r
    cdef size_t k
    if t == NULL or n == 0:
        return 0
    r = route_find(t, t.exact, name, n)
    if r or not t.nwild:
        return r
    for k in range(n - 1):
        if name[k] == c'.':
            r = route_find(t, t.wild, name + k + 1, n - k - 1)
            if r:
                return r
    return 0


cdef void route_table_free(RouteTable *t) noexcept nogil:
    if t != NULL:
        free(t.exact)
        free(t.wild)
        free(t.pool)
        free(t)


cdef RouteTable *route_table_build(list routes) except NULL:
    # routes: per route (1..), its server names, normalized and checked by
    # the control plane ("*.x" a wildcard); no name twice.
    cdef RouteTable *t = <RouteTable *>calloc(1, sizeof(RouteTable))
    cdef uint32_t slots = 16
    cdef RouteEntry *table
    cdef RouteEntry *e
    cdef uint64_t h
    cdef uint32_t i, start, off = 0
    cdef bytes key
    if t == NULL:
        raise MemoryError()
    names = [(n, r + 1) for r, route_names in enumerate(routes) for n in route_names]
    while slots < 2 * len(names) + 2:
        slots *= 2
    pool = b"".join(n.encode("ascii") for n, _ in names)
    t.mask = slots - 1
    t.exact = <RouteEntry *>calloc(slots, sizeof(RouteEntry))
    t.wild = <RouteEntry *>calloc(slots, sizeof(RouteEntry))
    t.pool = <char *>malloc(len(pool) + 1)
    if t.exact == NULL or t.wild == NULL or t.pool == NULL:
        route_table_free(t)
        raise MemoryError()
    memcpy(t.pool, <char *>pool, len(pool))
    for name, route in names:
        key = name.encode("ascii")
        table = t.exact
        start = off
        off += <uint32_t>len(key)
        if key.startswith(b"*."):
            key = key[2:]
            start += 2
            table = t.wild
            t.nwild += 1
        h = mix64(fnv1a(FNV_OFFSET, <const uint8_t *><char *>key, len(key)))
        i = <uint32_t>h & t.mask
        while table[i].route != 0:
            i = (i + 1) & t.mask
        e = &table[i]
        e.hash = h
        e.off = start
        e.len = <uint32_t>len(key)
        e.route = route
    return t


# ---- a bridge's ClientHello phase

cdef void bridge_hello_start(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    # After admission: the bridge holds its limit slot while the client
    # sends its ClientHello, so slow clients are bounded by max_connections.
    b.state = B_HELLO
    b.hello_need = 5
    timer_add(w, b, T_HELLO, now + b.ls.route_timeout_ns)
    # Bytes that came before now raised an event already (epoll reports a
    # socket readable when it is added): without one, nothing to look at,
    # and two syscalls saved on the usual client, whose ClientHello follows
    # its connect.
    if b.c_rd:
        bridge_read_hello(w, b, now)


cdef void bridge_hello_wait(Worker *w, Bridge *b, size_t need) noexcept nogil:
    # Sleep until `need` bytes wait in the socket (or EOF): with a level-
    # triggered poll a partial ClientHello would otherwise wake the loop
    # until the rest comes.
    b.c_rd = 0
    if need > b.hello_need or not b.hello_lowat:
        if fp_set_rcvlowat(b.cfd, <int>need) == 0:
            b.hello_lowat = 1
    b.hello_need = <uint16_t>need


cdef void bridge_read_hello(Worker *w, Bridge *b, int64_t now) noexcept nogil:
    cdef HelloInfo info
    cdef char byte
    cdef char name[256]
    cdef int pending = fp_pending(b.cfd)
    cdef ssize_t got
    cdef size_t n
    cdef int r, route
    if pending == 0:
        # Nothing waits: a FIN (the client cannot complete any more), or a
        # wake-up with nothing new.
        got = fp_recv_peek(b.cfd, &byte, 1)
        if got == -EAGAIN:
            b.c_rd = 0
            return
        if got <= 0:
            bridge_hello_failed(w, b, CLIENT_CLOSED if got == 0 else CLIENT_RESET)
            return
        pending = 1
    if pending < 0:
        bridge_hello_failed(w, b, CLIENT_RESET)
        return
    if <size_t>pending < b.hello_need:
        # Readable below the SO_RCVLOWAT we set means EOF (or an error):
        # where no event says "FIN" (POLLRDHUP is Linux's), this is how a
        # level-triggered poll learns it, rather than spinning.
        if b.up.src_hup or b.hello_lowat:
            bridge_hello_failed(w, b, CLIENT_CLOSED)
            return
        bridge_hello_wait(w, b, b.hello_need)
        return
    n = <size_t>pending if pending < HELLO_MAX else HELLO_MAX
    got = fp_recv_peek(b.cfd, <char *>w.hello_buf, n)
    if got == -EAGAIN:
        b.c_rd = 0
        return
    if got <= 0:
        bridge_hello_failed(w, b, CLIENT_CLOSED if got == 0 else CLIENT_RESET)
        return
    r = hello_parse(w.hello_buf, <size_t>got, HELLO_MAX, w.hello_buf + HELLO_MAX, &info)
    if r == -EAGAIN:
        if b.up.src_hup:
            bridge_hello_failed(w, b, CLIENT_CLOSED)
            return
        bridge_hello_wait(w, b, info.need)
        return
    if b.hello_lowat:
        fp_set_rcvlowat(b.cfd, 1)
        b.hello_lowat = 0
    timer_del(w, b, SLOT_PHASE)
    b.c_rd = 1    # the ClientHello is still there, for the upstream
    route = 0
    if r == 0 and info.name_len:
        n = hello_normalize(info.name, <size_t>info.name_len, name)
        route = route_lookup(b.ls.routes, name, n)
        if bridge_keep_hello(b, name, n, &info) < 0:
            fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
            bridge_close(w, b, REFUSED, 0, 0)
            return
    elif r == 0 and info.alpn_len:
        if bridge_keep_hello(b, NULL, 0, &info) < 0:
            fp_bump(&lslot(w, b.ls).ctr.no_memory, 1)
            bridge_close(w, b, REFUSED, 0, 0)
            return
    if route == 0:
        # No route: a name the table lacks goes to the default group; so
        # do no name and no TLS, unless route_non_tls says reject.
        if b.ls.group == NULL or (b.ls.reject_non_tls and (r != 0 or info.name_len == 0)):
            bridge_refuse(w, b, &lslot(w, b.ls).ctr.route_refused)
            return
    b.route_id = route
    b.state = B_CONNECTING
    if b.ls.hooks & HOOK_CONNECT:
        bridge_ask_connect(w, b)
    else:
        bridge_start_upstream(w, b, -1, now)


cdef int bridge_keep_hello(Bridge *b, const char *name, size_t n, HelloInfo *info) noexcept nogil:
    # What hooks and close records show of the ClientHello, in one block:
    # the name's length and bytes, then ALPN's, as on the wire.
    # Returns: 0, or -ENOMEM.
    b.hello = <uint8_t *>malloc(2 + n + <size_t>info.alpn_len)
    if b.hello == NULL:
        return -ENOMEM
    b.hello[0] = <uint8_t>n
    if n:
        memcpy(b.hello + 1, name, n)
    b.hello[1 + n] = <uint8_t>info.alpn_len
    if info.alpn_len:
        memcpy(b.hello + 2 + n, info.alpn, <size_t>info.alpn_len)
    return 0


cdef uint8_t *hello_copy(const uint8_t *hello) noexcept nogil:
    # Returns: a copy of a Bridge.hello block, or NULL short of memory.
    cdef size_t n = 2 + <size_t>hello[0] + hello[1 + hello[0]]
    cdef uint8_t *out = <uint8_t *>malloc(n)
    if out != NULL:
        memcpy(out, hello, n)
    return out


cdef void bridge_hello_failed(Worker *w, Bridge *b, int reason) noexcept nogil:
    # The client ended before its ClientHello was whole.
    fp_bump(&lslot(w, b.ls).ctr.route_aborted, 1)
    bridge_close(w, b, reason, 0, 0)


# ---- Python: tests, fuzzing, benchmarks

cdef tuple hello_names(const uint8_t *hello):
    # A bridge's kept block -> (server name or None, ALPN protocols).
    cdef int n
    if hello == NULL:
        return (None, ())
    n = hello[0]
    name = (<const char *>hello + 1)[:n].decode("ascii") if n else None
    return (name, alpn_tuple(hello + 2 + n, hello[1 + n]))


cdef tuple alpn_tuple(const uint8_t *p, int n):
    out = []
    cdef int off = 0
    while off < n:
        out.append((<const char *>p + off + 1)[:p[off]].decode("latin-1"))
        off += 1 + p[off]
    return tuple(out)


HELLO_STATUS = {0: "ok", -EAGAIN: "need", -EPROTO: "not_tls", -EMSGSIZE: "too_big"}


def parse_client_hello(data, size_t limit=HELLO_MAX):
    """Parse the TLS ClientHello at the start of `data` (bytes-like) as the
    data plane does, reading nothing past its end.

    Returns (status, need, server_name, alpn): status "ok" (server_name the
    first host_name as sent, None without one; alpn the protocols offered,
    as many as fit in 127 bytes), "need" (a valid prefix: `need` is the
    length the input must reach), "not_tls" (not TLS, or malformed) or
    "too_big" (its records pass `limit` bytes, at most 16384)."""
    cdef const uint8_t[::1] view = data
    cdef HelloInfo info
    cdef uint8_t *msg
    cdef int r
    cdef size_t n = view.shape[0]
    cdef const uint8_t *p = &view[0] if n else NULL
    if limit > HELLO_MAX:
        raise ValueError(f"limit {limit} is above {HELLO_MAX}")
    msg = <uint8_t *>malloc(limit if limit else 1)
    if msg == NULL:
        raise MemoryError()
    with nogil:
        r = hello_parse(p, n, limit, msg, &info)
    free(msg)
    status = HELLO_STATUS[r]
    if r != 0:
        return (status, <Py_ssize_t>info.need if r == -EAGAIN else 0, None, ())
    name = info.name[:info.name_len].decode("ascii") if info.name_len else None
    return (status, 0, name, alpn_tuple(info.alpn, info.alpn_len))


def route_for(list routes, str server_name):
    """The route (1..len(routes)) a server name takes in a table built from
    `routes` (per route, its normalized server names) as a listener's is;
    0 for none. For tests and the benchmark."""
    cdef RouteTable *t = route_table_build(routes)
    cdef char out[256]
    cdef bytes key = server_name.encode("ascii")
    cdef size_t n
    if len(key) > HELLO_NAME_MAX:
        route_table_free(t)
        return 0
    n = hello_normalize(key, len(key), out)
    r = route_lookup(t, out, n)
    route_table_free(t)
    return r


def _bench_sni(list routes, str server_name, bytes hello, long n):
    """Benchmark helper: n times, in C without the GIL, parse `hello` and
    look its name up in a table built from `routes` (as route_for), as the
    ClientHello phase does per client. Returns (ns per parse, ns per
    lookup of `server_name`)."""
    cdef RouteTable *t = route_table_build(routes)
    cdef HelloInfo info
    cdef uint8_t *msg = <uint8_t *>malloc(HELLO_MAX)
    cdef bytes key = server_name.encode("ascii")
    cdef const char *name = key
    cdef size_t klen = len(key)
    cdef const uint8_t *data = hello
    cdef size_t dlen = len(hello)
    cdef long i
    cdef int64_t t0, t1, t2
    cdef int sink = 0
    if msg == NULL:
        route_table_free(t)
        raise MemoryError()
    with nogil:
        t0 = fp_now_ns()
        for i in range(n):
            sink += hello_parse(data, dlen, HELLO_MAX, msg, &info)
        t1 = fp_now_ns()
        for i in range(n):
            sink += route_lookup(t, name, klen)
        t2 = fp_now_ns()
    free(msg)
    route_table_free(t)
    return ((t1 - t0) / n, (t2 - t1) / n)
