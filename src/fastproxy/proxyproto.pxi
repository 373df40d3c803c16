# The PROXY protocol, v1 and v2: parsing what a balancer in front sends,
# building what an upstream expects.

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


cdef int proxy_build_unknown(int version, uint8_t *out, size_t cap) noexcept nogil:
    # For a connection whose source the proxy cannot name (a Unix client):
    # v1 "PROXY UNKNOWN", v2 the PROXY command with family UNSPEC and no
    # address block. Either tells the receiver to use the real endpoints.
    # Returns: bytes written; -1 for another version or cap too small.
    if version == 1:
        if cap < 15:
            return -1
        memcpy(out, b"PROXY UNKNOWN\r\n", 15)
        return 15
    if version == 2:
        if cap < PROXY_V2_FIXED:
            return -1
        memcpy(out, PROXY_V2_SIG, 12)
        out[12] = 0x21                  # version 2, PROXY
        out[13] = 0x00                  # UNSPEC
        store_be16(out + 14, 0)
        return <int>PROXY_V2_FIXED
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
