# Socket addresses between Python and C: resolved upstreams into sockaddrs,
# and client and upstream addresses back into Python values. They need the
# GIL; the workers only ever see the sockaddrs.

# A client of a Unix listener has no IP: Bridge.client_v4 (and the copies
# in hook events and close records) says so with this third value, so that
# no structure grows a field for it. Its client_ip stays all zeros.
cdef enum:
    CLIENT_UNIX = 2

# The most bytes a socket path may have: sun_path less the NUL a path
# needs (an abstract name has its leading NUL instead).
cdef sockaddr_un _sun_for_size
UNIX_PATH_MAX = sizeof(_sun_for_size.sun_path) - 1


cdef int fill_unix(UpstreamAddr *a, object path) except -1:
    # path: str or bytes as Python's socket module has it, an abstract name
    # starting with NUL. The length must be exact for an abstract name (its
    # bytes after the name are part of it); a path gets its NUL counted.
    cdef bytes raw = path if isinstance(path, bytes) else _os.fsencode(path)
    cdef sockaddr_un *su = <sockaddr_un *>&a.sa
    cdef size_t off = <size_t>(<char *>&su.sun_path[0] - <char *>su)
    cdef size_t n = len(raw)
    if n == 0 or n > <size_t>UNIX_PATH_MAX or (raw[0] != 0 and b"\0" in raw):
        raise ValueError(f"not a usable Unix socket path: {path!r}")
    su.sun_family = AF_UNIX
    memcpy(su.sun_path, <char *>raw, n)
    a.salen = <socklen_t>(off + n + (0 if raw[0] == 0 else 1))
    return 0


cdef int fill_sockaddr(UpstreamAddr *a, int family, tuple sa) except -1:
    cdef bytes host
    cdef int port
    cdef sockaddr_in *s4
    cdef sockaddr_in6 *s6
    memset(a, 0, sizeof(UpstreamAddr))
    a.family = family
    if family == AF_UNIX:
        return fill_unix(a, sa[0])
    host = str(sa[0]).split("%", 1)[0].encode()
    port = sa[1]
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
    if v4 == CLIENT_UNIX:
        return ("unix", 0)
    if v4:
        inet_ntop(AF_INET, &ip[12], text, sizeof(text))
    else:
        inet_ntop(AF_INET6, ip, text, sizeof(text))
    return (text.decode(), port)


cdef object format_addr(UpstreamAddr *a):
    cdef char text[64]
    cdef sockaddr_in *s4
    cdef sockaddr_in6 *s6
    cdef sockaddr_un *su
    cdef size_t off
    if a.family == AF_UNIX:
        su = <sockaddr_un *>&a.sa
        off = <size_t>(<char *>&su.sun_path[0] - <char *>su)
        if su.sun_path[0] == 0:   # abstract: @ stands for the NUL, as ss and socat show it
            return "unix:@" + _os.fsdecode((<char *>su.sun_path)[1:a.salen - off])
        return "unix:" + _os.fsdecode((<char *>su.sun_path)[:a.salen - off - 1])
    if a.family == AF_INET:
        s4 = <sockaddr_in *>&a.sa
        inet_ntop(AF_INET, &s4.sin_addr, text, sizeof(text))
        return f"{text.decode()}:{ntohs(s4.sin_port)}"
    s6 = <sockaddr_in6 *>&a.sa
    inet_ntop(AF_INET6, &s6.sin6_addr, text, sizeof(text))
    return f"[{text.decode()}]:{ntohs(s6.sin6_port)}"
