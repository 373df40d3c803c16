# IP rules: sorted, merged address ranges, one binary search per lookup.

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
