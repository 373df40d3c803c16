# Hashing for the balancer's source ring and the per-IP and rate-limit
# tables, which all need neighbouring addresses spread apart.

cdef uint64_t FNV_OFFSET = 0xcbf29ce484222325
cdef uint64_t FNV_PRIME = 0x100000001b3
cdef uint64_t MIX_1 = 0xff51afd7ed558ccd
cdef uint64_t MIX_2 = 0xc4ceb9fe1a85ec53


cdef inline uint64_t fnv1a(uint64_t h, const uint8_t *p, size_t n) noexcept nogil:
    cdef size_t k
    for k in range(n):
        h = (h ^ p[k]) * FNV_PRIME
    return h


cdef inline uint64_t mix64(uint64_t h) noexcept nogil:
    # murmur3's finaliser: FNV alone leaves neighbouring keys (127.0.0.1,
    # 127.0.0.2) close together on the ring.
    h ^= h >> 33
    h *= MIX_1
    h ^= h >> 33
    h *= MIX_2
    h ^= h >> 33
    return h


cdef inline uint32_t hash_bytes(uint64_t h, const uint8_t *p, size_t n) noexcept nogil:
    return <uint32_t>(mix64(fnv1a(h, p, n)) >> 32)
