# Access control building blocks: IP rules, per-client rate limits and the
# PROXY protocol. The C functions run on worker threads without the GIL;
# the classes own the tables' memory and give Python (tests, benchmarks)
# a way in. Addresses are 16 bytes, IPv4 mapped into IPv6 (access.pxd).

from libc.stdint cimport uint16_t
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcmp, memcpy

import ipaddress as _ipaddress
import os as _os

cdef uint32_t RATE_NIL = 0xffffffffu
# GCRA timestamps stay far from overflow with any period below this.
cdef int64_t RATE_MAX_PERIOD_NS = 1LL << 61
cdef size_t PROXY_V1_MAX = 107
cdef size_t PROXY_V2_FIXED = 16
cdef const char *PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
cdef const char *V4_MAPPED_PREFIX = b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xff\xff"


# ---- addresses

cdef inline uint64_t load_be64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


cdef inline uint16_t load_be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline void store_be16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline Addr128 addr_load(const uint8_t *a16) noexcept nogil:
    cdef Addr128 a
    a.hi = load_be64(a16)
    a.lo = load_be64(a16 + 8)
    return a


cdef inline bint addr_le(Addr128 a, Addr128 b) noexcept nogil:
    return a.hi < b.hi or (a.hi == b.hi and a.lo <= b.lo)


cdef inline bint addr_is_mapped(const uint8_t *a16) noexcept nogil:
    return memcmp(a16, V4_MAPPED_PREFIX, 12) == 0


cdef inline void addr_map4(const uint8_t *a4, uint8_t *out16) noexcept nogil:
    memcpy(out16, V4_MAPPED_PREFIX, 12)
    memcpy(out16 + 12, a4, 4)


cdef int addr16_pton(int family, const char *text, uint8_t *out16) noexcept nogil:
    # Returns: 1 with out16 set (IPv4 mapped); 0 when text is not an
    # address of that family.
    cdef uint8_t a4[4]
    if family == AF_INET:
        if inet_pton(AF_INET, text, a4) != 1:
            return 0
        addr_map4(a4, out16)
        return 1
    return 1 if inet_pton(AF_INET6, text, out16) == 1 else 0


cdef inline int addr16_from_sockaddr(const sockaddr_storage *ss, uint8_t *out16,
                                     uint16_t *port) noexcept nogil:
    # Returns: AF_INET or AF_INET6 with out16 and *port (host order) set;
    # -1 for any other family (a UNIX socket has no address to check).
    cdef const sockaddr_in *s4
    cdef const sockaddr_in6 *s6
    if ss.ss_family == AF_INET:
        s4 = <const sockaddr_in *>ss
        addr_map4(<const uint8_t *>&s4.sin_addr, out16)
        port[0] = load_be16(<const uint8_t *>&s4.sin_port)
        return AF_INET
    if ss.ss_family == AF_INET6:
        s6 = <const sockaddr_in6 *>ss
        memcpy(out16, s6.sin6_addr.s6_addr, 16)
        port[0] = load_be16(<const uint8_t *>&s6.sin6_port)
        return AF_INET6
    return -1


cdef int addr16_from_py(object ip, uint8_t *out16) except -1:
    # Text as Python has it (IPv6 scope ids dropped); a NUL would cut it short.
    cdef bytes text = str(ip).split("%", 1)[0].encode("ascii", "replace")
    if b"\0" in text:
        raise ValueError(f"not an IP address: {ip!r}")
    if addr16_pton(AF_INET, text, out16) or addr16_pton(AF_INET6, text, out16):
        return 0
    raise ValueError(f"not an IP address: {ip!r}")


cdef str addr16_to_py(const uint8_t *a16, int family):
    # TCP4 addresses print as IPv4; everything else as IPv6 text.
    cdef char text[48]
    if family == AF_INET:
        inet_ntop(AF_INET, a16 + 12, text, sizeof(text))
    else:
        inet_ntop(AF_INET6, a16, text, sizeof(text))
    return text.decode("ascii")


# ---- IP rules

cdef bint acl_set_has(const AclSet *s, Addr128 a) noexcept nogil:
    # Binary search for the last range starting at or before a.
    cdef size_t lo = 0, hi = s.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if addr_le(s.ranges[mid].first, a):
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and addr_le(a, s.ranges[lo - 1].last)


cdef int acl_admits(const AclTable *t, const uint8_t *addr16) noexcept nogil:
    # Returns: 1 admit, 0 deny. Deny wins over allow; once any allow rule
    # exists only the clients it covers are admitted. NULL: no rules.
    cdef Addr128 a
    if t == NULL:
        return 1
    a = addr_load(addr16)
    if acl_set_has(&t.deny, a):
        return 0
    if t.allow.n > 0 and not acl_set_has(&t.allow, a):
        return 0
    return 1


cdef object _as_network(object rule):
    if isinstance(rule, (_ipaddress.IPv4Network, _ipaddress.IPv6Network)):
        return rule
    return _ipaddress.ip_network(rule)


cdef tuple _mapped_range(object net):
    # IPv4 rules live at ::ffff:0:0/96, where mapped clients are.
    cdef object base = (0xffff << 32) if net.version == 4 else 0
    return (base | int(net.network_address), base | int(net.broadcast_address))


cdef list _merged_ranges(list nets):
    # Overlapping and adjacent ranges merge: the search then needs no
    # tie-breaking, and 10,000 /32s in a row cost one range.
    cdef list out = []
    cdef list cur = None
    for first, last in sorted(_mapped_range(n) for n in nets):
        if cur is not None and first <= cur[1] + 1:
            if last > cur[1]:
                cur[1] = last
        else:
            cur = [first, last]
            out.append(cur)
    return out


cdef int acl_set_fill(AclSet *s, list nets) except -1:
    cdef list ranges = _merged_ranges(nets)
    cdef size_t i
    cdef object mask = (1 << 64) - 1
    free(s.ranges)      # a second __init__ replaces the rules
    s.ranges = NULL
    s.n = 0
    if not ranges:
        return 0
    s.ranges = <AclRange *>malloc(len(ranges) * sizeof(AclRange))
    if s.ranges == NULL:
        raise MemoryError()
    for i, (first, last) in enumerate(ranges):
        s.ranges[i].first.hi = first >> 64
        s.ranges[i].first.lo = first & mask
        s.ranges[i].last.hi = last >> 64
        s.ranges[i].last.lo = last & mask
    s.n = len(ranges)
    return 0


cdef class AccessList:
    """IP rules in C: allow and deny lists of CIDRs (strings or ipaddress
    networks, already validated). Deny wins; any allow rule makes the
    allow list exclusive. The engine reads `&acl.table` without the GIL;
    the table is immutable, so it needs no lock, and it lives as long as
    this object."""

    cdef AclTable table
    cdef readonly tuple allow
    cdef readonly tuple deny

    def __cinit__(self):
        memset(&self.table, 0, sizeof(AclTable))

    def __init__(self, allow=(), deny=()):
        self.allow = tuple(_as_network(r) for r in allow)
        self.deny = tuple(_as_network(r) for r in deny)
        acl_set_fill(&self.table.allow, list(self.allow))
        acl_set_fill(&self.table.deny, list(self.deny))

    def __len__(self):
        return len(self.allow) + len(self.deny)

    @property
    def ranges(self):
        """(allow, deny) counts of merged ranges the search walks."""
        return (self.table.allow.n, self.table.deny.n)

    def admits(self, ip):
        """Whether a client at `ip` (IPv4 or IPv6 text) is admitted."""
        cdef uint8_t a[16]
        addr16_from_py(ip, a)
        return acl_admits(&self.table, a) == 1

    def __dealloc__(self):
        free(self.table.allow.ranges)
        free(self.table.deny.ranges)


def _bench_admits(AccessList acl, ip, long n):
    """Benchmark helper: n lookups of one address in C; returns admits."""
    cdef uint8_t a[16]
    cdef long i, admitted = 0
    addr16_from_py(ip, a)
    with nogil:
        for i in range(n):
            admitted += acl_admits(&acl.table, a)
    return admitted


# ---- rate limits

# mix64 (murmur3's finaliser) is balancer.pxi's: both spread similar keys apart.


cdef inline uint32_t rate_chain(const RateTable *t, const uint8_t *key) noexcept nogil:
    cdef Addr128 a = addr_load(key)
    return <uint32_t>(mix64(mix64(a.hi ^ t.seed0) ^ a.lo ^ t.seed1) & t.mask)


cdef uint32_t rate_find(RateTable *t, uint32_t c, const uint8_t *key) noexcept nogil:
    # Returns: the entry holding key, or RATE_NIL.
    cdef uint32_t i = t.chains[c]
    while i != RATE_NIL and memcmp(t.entries[i].key, key, 16) != 0:
        i = t.entries[i].hnext
    return i


cdef void rate_unlink(RateTable *t, uint32_t i) noexcept nogil:
    # Takes entry i off the recency list.
    cdef RateEntry *e = &t.entries[i]
    if e.newer != RATE_NIL:
        t.entries[e.newer].older = e.older
    else:
        t.newest = e.older
    if e.older != RATE_NIL:
        t.entries[e.older].newer = e.newer
    else:
        t.oldest = e.newer


cdef void rate_push_newest(RateTable *t, uint32_t i) noexcept nogil:
    cdef RateEntry *e = &t.entries[i]
    e.newer = RATE_NIL
    e.older = t.newest
    if t.newest != RATE_NIL:
        t.entries[t.newest].newer = i
    else:
        t.oldest = i
    t.newest = i


cdef void rate_unhash(RateTable *t, uint32_t i) noexcept nogil:
    # Takes entry i out of its hash chain (chains are about one long).
    cdef uint32_t *p = &t.chains[rate_chain(t, t.entries[i].key)]
    while p[0] != i:
        p = &t.entries[p[0]].hnext
    p[0] = t.entries[i].hnext


cdef uint32_t rate_claim(RateTable *t, uint32_t c, const uint8_t *key) noexcept nogil:
    # Returns: an entry for a new key, linked in: a never used one while
    # any is left, else the least recently seen one, forgotten.
    cdef uint32_t i
    if t.used < t.capacity:
        i = t.used
        t.used += 1
    else:
        i = t.oldest
        rate_unlink(t, i)
        rate_unhash(t, i)
    memcpy(t.entries[i].key, key, 16)
    t.entries[i].hnext = t.chains[c]
    t.chains[c] = i
    rate_push_newest(t, i)
    return i


cdef int rate_take(RateTable *t, const uint8_t *addr16, int64_t now_ns) noexcept nogil:
    # Returns: 1 allowed (a token taken), 0 limited. A bucket is a GCRA
    # timestamp: a new client starts full (tat = now), each token moves
    # tat one interval on, and tat may run at most burst_ns ahead of now.
    cdef uint32_t c, i
    cdef int64_t tat
    cdef int ok = 0
    pthread_mutex_lock(&t.lock)
    c = rate_chain(t, addr16)
    i = rate_find(t, c, addr16)
    if i == RATE_NIL:
        i = rate_claim(t, c, addr16)
        t.entries[i].tat = now_ns
    else:
        rate_unlink(t, i)
        rate_push_newest(t, i)
    tat = t.entries[i].tat
    if tat < now_ns:
        tat = now_ns
    if tat - now_ns <= t.burst_ns:
        t.entries[i].tat = tat + t.interval_ns
        ok = 1
    pthread_mutex_unlock(&t.lock)
    return ok


cdef uint32_t pow2_at_least(uint32_t n) noexcept nogil:
    cdef uint32_t p = 1
    while p < n:
        p <<= 1
    return p


cdef class RateLimiter:
    """Per-client token buckets: `count` tokens, refilled `count` per
    `period_seconds`, for at most `table_size` clients (the least recently
    seen is forgotten: it comes back with a full bucket). The engine calls
    rate_take(&limiter.table, ...) from any worker; the table locks itself."""

    cdef RateTable table
    cdef bint ready
    cdef readonly long count
    cdef readonly double period

    def __cinit__(self):
        memset(&self.table, 0, sizeof(RateTable))
        self.ready = False

    def __init__(self, long count, double period_seconds, long table_size=65536):
        cdef int64_t period_ns
        cdef uint32_t nchains, i
        if self.ready:
            raise RuntimeError("a RateLimiter is initialised once")
        if count < 1 or table_size < 1 or table_size > (1 << 30):
            raise ValueError("count >= 1 and 1 <= table_size <= 2**30 required")
        if not 1e-9 <= period_seconds < RATE_MAX_PERIOD_NS / 1e9:
            raise ValueError(f"period {period_seconds!r}s is out of range")
        period_ns = <int64_t>(period_seconds * 1e9)
        self.count = count
        self.period = period_seconds
        self.table.interval_ns = max(1, period_ns // count)
        self.table.burst_ns = (count - 1) * self.table.interval_ns
        seeds = _os.urandom(16)
        self.table.seed0 = int.from_bytes(seeds[:8], "little")
        self.table.seed1 = int.from_bytes(seeds[8:], "little")
        nchains = pow2_at_least(<uint32_t>table_size)
        self.table.entries = <RateEntry *>calloc(table_size, sizeof(RateEntry))
        self.table.chains = <uint32_t *>malloc(nchains * sizeof(uint32_t))
        if self.table.entries == NULL or self.table.chains == NULL:
            raise MemoryError()
        for i in range(nchains):
            self.table.chains[i] = RATE_NIL
        self.table.mask = nchains - 1
        self.table.capacity = <uint32_t>table_size
        self.table.newest = RATE_NIL
        self.table.oldest = RATE_NIL
        if pthread_mutex_init(&self.table.lock, NULL) != 0:
            raise MemoryError()
        self.ready = True

    def take(self, ip, int64_t now_ns):
        """Take a token for `ip` at monotonic time now_ns: True if allowed."""
        cdef uint8_t a[16]
        cdef int r
        if not self.ready:
            raise RuntimeError("RateLimiter not initialised")
        addr16_from_py(ip, a)
        with nogil:
            r = rate_take(&self.table, a, now_ns)
        return r == 1

    def entries(self):
        """How many clients the table remembers (at most table_size)."""
        cdef uint32_t n
        if not self.ready:
            return 0
        with nogil:
            pthread_mutex_lock(&self.table.lock)
            n = self.table.used
            pthread_mutex_unlock(&self.table.lock)
        return n

    @property
    def table_size(self):
        return self.table.capacity

    def __dealloc__(self):
        if self.ready:
            pthread_mutex_destroy(&self.table.lock)
        free(self.table.entries)
        free(self.table.chains)


# ---- PROXY protocol (haproxy.org/download/2.9/doc/proxy-protocol.txt)

cdef int v1_literal(const uint8_t *buf, size_t n, size_t *pos,
                    const char *lit, size_t k) noexcept nogil:
    # Returns: 1 matched, pos moved past it; 0 the input ends inside a
    # match; -1 mismatch.
    cdef size_t avail = n - pos[0]
    cdef size_t m = k if avail > k else avail
    if memcmp(buf + pos[0], lit, m) != 0:
        return -1
    if m < k:
        return 0
    pos[0] += k
    return 1


cdef inline bint v1_token_char(uint8_t c) noexcept nogil:
    # Addresses and ports: digits, hex, ':' and '.'; inet_pton checks more.
    return (c'0' <= c <= c'9' or c'a' <= c <= c'f' or c'A' <= c <= c'F'
            or c == c':' or c == c'.')


cdef int v1_token(const uint8_t *buf, size_t n, size_t *pos, uint8_t end,
                  size_t maxlen, char *tok) noexcept nogil:
    # Copies the token before `end` into tok (maxlen + 1 bytes, NUL-ended;
    # the part so far when the input ends first).
    # Returns: 1 with pos past `end`; 0 the input ends first; -1 empty,
    # too long or a character no address or port has.
    cdef size_t i = 0
    cdef uint8_t c
    while pos[0] + i < n:
        c = buf[pos[0] + i]
        if c == end:
            if i == 0:
                return -1
            tok[i] = 0
            pos[0] += i + 1
            return 1
        if i == maxlen or not v1_token_char(c):
            return -1
        tok[i] = <char>c
        i += 1
    tok[i] = 0
    return 0


cdef int v1_port(const char *tok, uint16_t *port) noexcept nogil:
    # Also right for the start of a port: what fails here fails whatever
    # follows. Returns: 1 with *port set; -1 not decimal, a heading zero,
    # > 65535.
    cdef int v = 0
    cdef size_t i = 0
    if tok[0] == c'0' and tok[1] != 0:
        return -1
    while tok[i] != 0:
        if not c'0' <= tok[i] <= c'9':
            return -1
        v = v * 10 + (tok[i] - c'0')
        i += 1
    if v > 65535:
        return -1
    port[0] = <uint16_t>v
    return 1


cdef int v1_port_token(const uint8_t *buf, size_t n, size_t *pos, uint8_t end,
                       uint16_t *port) noexcept nogil:
    # Returns: 1 with *port set; 0 for more bytes; -1 malformed, as soon
    # as the digits so far cannot start a port.
    cdef char tok[8]
    cdef int r = v1_token(buf, n, pos, end, 5, tok)
    if r < 0 or v1_port(tok, port) < 0:
        return -1
    return r


cdef int v1_addr_token(const uint8_t *buf, size_t n, size_t *pos, int family,
                       uint8_t *out16) noexcept nogil:
    # Returns: 1 with out16 set; 0 for more bytes; -1 malformed or not an
    # address of the header's family.
    cdef char tok[48]
    cdef int r = v1_token(buf, n, pos, c' ', 15 if family == AF_INET else 45, tok)
    if r == 1 and not addr16_pton(family, tok, out16):
        return -1
    return r


cdef int v1_unknown(const uint8_t *buf, size_t n, size_t pos, ProxyInfo *out) noexcept nogil:
    # After "PROXY UNKNOWN" anything may come before CRLF, and is ignored.
    # Returns: the header length, 0 for more bytes, -1 malformed.
    cdef const uint8_t *lf
    if pos == n:
        return 0
    if buf[pos] != c' ' and buf[pos] != c'\r':
        return -1
    lf = <const uint8_t *>memchr(buf + pos, c'\n', n - pos)
    if lf == NULL:
        return 0
    if lf == buf + pos or (lf - 1)[0] != c'\r':
        return -1
    out.is_local = 1
    return <int>(lf - buf) + 1


cdef int v1_protocol(const uint8_t *buf, size_t n, size_t *pos) noexcept nogil:
    # Returns: AF_INET for TCP4, AF_INET6 for TCP6, 0 for UNKNOWN, with pos
    # past it; -2 for more bytes; -1 none of them.
    cdef int r4 = v1_literal(buf, n, pos, b"TCP4 ", 5)
    cdef int r6 = v1_literal(buf, n, pos, b"TCP6 ", 5) if r4 != 1 else -1
    cdef int ru = v1_literal(buf, n, pos, b"UNKNOWN", 7) if r4 != 1 and r6 != 1 else -1
    if r4 == 1:
        return AF_INET
    if r6 == 1:
        return AF_INET6
    if ru == 1:
        return 0
    return -2 if (r4 == 0 or r6 == 0 or ru == 0) else -1


cdef int v1_addresses(const uint8_t *buf, size_t n, size_t *pos, int family,
                      ProxyInfo *out) noexcept nogil:
    # "SRC DST SPORT DPORT\r\n", each checked as soon as it is complete.
    # Returns: 1 done; 0 for more bytes; -1 malformed.
    cdef int r = v1_addr_token(buf, n, pos, family, out.src)
    if r == 1:
        r = v1_addr_token(buf, n, pos, family, out.dst)
    if r == 1:
        r = v1_port_token(buf, n, pos, c' ', &out.src_port)
    if r == 1:
        r = v1_port_token(buf, n, pos, c'\r', &out.dst_port)
    if r == 1:
        r = v1_literal(buf, n, pos, b"\n", 1)
    return r


cdef int proxy_parse_v1(const uint8_t *buf, size_t length, ProxyInfo *out) noexcept nogil:
    # Returns: as proxy_parse. Only the first 107 bytes are looked at: a
    # header not complete by then is too long.
    cdef size_t n = length if length < PROXY_V1_MAX else PROXY_V1_MAX
    cdef size_t pos = 0
    cdef int r = v1_literal(buf, n, &pos, b"PROXY ", 6)
    cdef int family
    out.version = 1
    if r == 1:
        family = v1_protocol(buf, n, &pos)
        if family == 0:
            r = v1_unknown(buf, n, pos, out)
        elif family > 0:
            out.family = family
            r = v1_addresses(buf, n, &pos, family, out)
            if r == 1:
                r = <int>pos
        else:
            r = 0 if family == -2 else -1
    if r == 0 and length >= PROXY_V1_MAX:
        return -1
    return r


cdef int v2_addresses(const uint8_t *body, size_t blen, uint8_t fam, ProxyInfo *out) noexcept nogil:
    # TCP over IPv4 or IPv6 carries addresses; any other protocol under
    # PROXY (UNSPEC, UDP, UNIX) is accepted with the peer's address, as
    # the spec allows and haproxy does. Returns: 1, or -1 when the block
    # is shorter than the family's addresses.
    if fam == 0x11:
        if blen < 12:
            return -1
        addr_map4(body, out.src)
        addr_map4(body + 4, out.dst)
        out.src_port = load_be16(body + 8)
        out.dst_port = load_be16(body + 10)
        out.family = AF_INET
    elif fam == 0x21:
        if blen < 36:
            return -1
        memcpy(out.src, body, 16)
        memcpy(out.dst, body + 16, 16)
        out.src_port = load_be16(body + 32)
        out.dst_port = load_be16(body + 34)
        out.family = AF_INET6
    else:
        out.is_local = 1
    return 1


cdef int proxy_parse_v2(const uint8_t *buf, size_t length, size_t max_v2_len,
                        ProxyInfo *out) noexcept nogil:
    # Returns: as proxy_parse. Each fixed byte is checked as soon as it is
    # there; TLVs after the addresses are skipped unread.
    cdef size_t m = length if length < 12 else 12
    cdef uint8_t cmd
    cdef size_t blen
    out.version = 2
    if memcmp(buf, PROXY_V2_SIG, m) != 0:
        return -1
    if length < 13:
        return 0
    if buf[12] >> 4 != 2 or (buf[12] & 0x0f) > 1:
        return -1
    cmd = buf[12] & 0x0f
    # LOCAL ignores the family byte, as the spec says; PROXY needs a
    # defined family (0-3) and transport (0-2).
    if length < 14:
        return 0
    if cmd == 1 and (buf[13] >> 4 > 3 or (buf[13] & 0x0f) > 2):
        return -1
    if length < PROXY_V2_FIXED:
        return 0
    blen = load_be16(buf + 14)
    if blen > max_v2_len:
        return -1
    if length < PROXY_V2_FIXED + blen:
        return 0
    if cmd == 0:
        out.is_local = 1
    elif v2_addresses(buf + PROXY_V2_FIXED, blen, buf[13], out) < 0:
        return -1
    return <int>(PROXY_V2_FIXED + blen)


cdef int proxy_parse(const uint8_t *buf, size_t length, size_t max_v2_len,
                     ProxyInfo *out) noexcept nogil:
    # Returns: the header's length (> 0) once complete, with *out filled;
    # 0 while the bytes so far are a valid prefix (read more); -1 when
    # malformed, or longer than 107 bytes (v1) or 16 + max_v2_len (v2).
    # The first byte tells the versions apart, so garbage fails at once.
    memset(out, 0, sizeof(ProxyInfo))
    if length == 0:
        return 0
    if buf[0] == c'P':
        return proxy_parse_v1(buf, length, out)
    if buf[0] == c'\r':
        return proxy_parse_v2(buf, length, max_v2_len, out)
    return -1


cdef int proxy_build_v1(bint v4, const uint8_t *src16, int src_port, const uint8_t *dst16,
                        int dst_port, uint8_t *out, size_t cap) noexcept nogil:
    # Returns: bytes written, or -1 when cap is too small.
    cdef char s[48]
    cdef char d[48]
    cdef int af = AF_INET if v4 else AF_INET6
    cdef int off = 12 if v4 else 0
    cdef int n
    inet_ntop(af, src16 + off, s, sizeof(s))
    inet_ntop(af, dst16 + off, d, sizeof(d))
    n = snprintf(<char *>out, cap, "PROXY %s %s %s %d %d\r\n",
                 <const char *>("TCP4" if v4 else "TCP6"), s, d, src_port, dst_port)
    return n if 0 < n < <int>cap else -1


cdef int proxy_build_v2(bint v4, const uint8_t *src16, int src_port, const uint8_t *dst16,
                        int dst_port, uint8_t *out, size_t cap) noexcept nogil:
    # Returns: bytes written, or -1 when cap is too small.
    cdef size_t alen = 4 if v4 else 16
    cdef size_t off = 12 if v4 else 0
    cdef size_t blen = 2 * alen + 4
    if cap < PROXY_V2_FIXED + blen:
        return -1
    memcpy(out, PROXY_V2_SIG, 12)
    out[12] = 0x21                      # version 2, PROXY
    out[13] = 0x11 if v4 else 0x21      # TCP over IPv4 / IPv6
    store_be16(out + 14, <uint16_t>blen)
    memcpy(out + 16, src16 + off, alen)
    memcpy(out + 16 + alen, dst16 + off, alen)
    store_be16(out + 16 + 2 * alen, <uint16_t>src_port)
    store_be16(out + 18 + 2 * alen, <uint16_t>dst_port)
    return <int>(PROXY_V2_FIXED + blen)


cdef int proxy_build(int version, const uint8_t *src16, int src_port,
                     const uint8_t *dst16, int dst_port, uint8_t *out,
                     size_t cap) noexcept nogil:
    # Returns: the header's length written to out; -1 for a version other
    # than 1 or 2, a port out of range, or cap too small (108 bytes always
    # suffice). TCP4 when both ends are IPv4(-mapped), else TCP6.
    cdef bint v4 = addr_is_mapped(src16) and addr_is_mapped(dst16)
    if not (0 <= src_port <= 65535 and 0 <= dst_port <= 65535):
        return -1
    if version == 1:
        return proxy_build_v1(v4, src16, src_port, dst16, dst_port, out, cap)
    if version == 2:
        return proxy_build_v2(v4, src16, src_port, dst16, dst_port, out, cap)
    return -1


def parse_proxy_header(data, size_t max_v2=1024):
    """Parse a PROXY header at the start of `data` (bytes-like).

    Returns None while incomplete, else (length, is_local, (src_host,
    src_port), (dst_host, dst_port)); both addresses are None when is_local
    (the peer's own address counts). Raises ValueError when malformed or
    too long."""
    cdef const uint8_t[::1] view = data
    cdef ProxyInfo info
    cdef int r = proxy_parse(&view[0] if view.shape[0] else NULL,
                             view.shape[0], max_v2, &info)
    if r == 0:
        return None
    if r < 0:
        raise ValueError("malformed or too long PROXY protocol header")
    if info.is_local:
        return (r, True, None, None)
    return (r, False,
            (addr16_to_py(info.src, info.family), info.src_port),
            (addr16_to_py(info.dst, info.family), info.dst_port))


def build_proxy_header(int version, tuple src, tuple dst):
    """The PROXY header (version 1 or 2) announcing a TCP connection from
    src (host, port) to dst (host, port)."""
    cdef uint8_t s[16]
    cdef uint8_t d[16]
    cdef uint8_t out[128]
    addr16_from_py(src[0], s)
    addr16_from_py(dst[0], d)
    cdef int n = proxy_build(version, s, src[1], d, dst[1], out, sizeof(out))
    if n < 0:
        raise ValueError(f"cannot build a v{version} PROXY header for {src} -> {dst}")
    return (<char *>out)[:n]


def _bench_proxy_parse(data, long n):
    """Benchmark helper: parse `data` n times in C; returns the last result."""
    cdef const uint8_t[::1] view = data
    cdef ProxyInfo info
    cdef long i
    cdef int r = 0
    if view.shape[0] == 0:
        return 0
    with nogil:
        for i in range(n):
            r = proxy_parse(&view[0], view.shape[0], 1024, &info)
    return r
