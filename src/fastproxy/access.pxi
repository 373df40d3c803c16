# Access control, part 1: the addresses and constants that acl.pxi,
# ratelimit.pxi and proxyproto.pxi share. Their C functions run on worker
# threads without the GIL; their classes own the tables' memory and give
# Python (tests, benchmarks) a way in. Addresses are 16 bytes, IPv4 mapped
# into IPv6 (includes/access.pxd).

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
