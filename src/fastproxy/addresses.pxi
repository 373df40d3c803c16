# Socket addresses between Python and C: resolved upstreams into sockaddrs,
# and client and upstream addresses back into Python values. They need the
# GIL; the workers only ever see the sockaddrs.

cdef int fill_sockaddr(UpstreamAddr *a, int family, tuple sa) except -1:
    cdef bytes host = str(sa[0]).split("%", 1)[0].encode()
    cdef int port = sa[1]
    cdef sockaddr_in *s4
    cdef sockaddr_in6 *s6
    memset(a, 0, sizeof(UpstreamAddr))
    a.family = family
    if family == AF_INET:
        s4 = <sockaddr_in *>&a.sa
        s4.sin_family = AF_INET
        s4.sin_port = htons(port)
        ok = inet_pton(AF_INET, host, &s4.sin_addr)
        a.salen = sizeof(sockaddr_in)
    elif family == AF_INET6:
        s6 = <sockaddr_in6 *>&a.sa
        s6.sin6_family = AF_INET6
        s6.sin6_port = htons(port)
        s6.sin6_flowinfo = sa[2]
        s6.sin6_scope_id = sa[3]
        ok = inet_pton(AF_INET6, host, &s6.sin6_addr)
        a.salen = sizeof(sockaddr_in6)
    else:
        raise ValueError(f"unsupported address family {family}")
    if ok != 1:
        raise ValueError(f"not a numeric address: {sa[0]!r}")
    return 0


cdef tuple format_client(const uint8_t *ip, int port, int v4):
    cdef char text[64]
    if v4:
        inet_ntop(AF_INET, &ip[12], text, sizeof(text))
    else:
        inet_ntop(AF_INET6, ip, text, sizeof(text))
    return (text.decode(), port)


cdef object format_addr(UpstreamAddr *a):
    cdef char text[64]
    cdef sockaddr_in *s4
    cdef sockaddr_in6 *s6
    if a.family == AF_INET:
        s4 = <sockaddr_in *>&a.sa
        inet_ntop(AF_INET, &s4.sin_addr, text, sizeof(text))
        return f"{text.decode()}:{ntohs(s4.sin_port)}"
    s6 = <sockaddr_in6 *>&a.sa
    inet_ntop(AF_INET6, &s6.sin6_addr, text, sizeof(text))
    return f"[{text.decode()}]:{ntohs(s6.sin6_port)}"
