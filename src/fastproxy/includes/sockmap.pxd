# The kernel engine's BPF loader and maps (sockmap.h: what each returns).
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "sockmap.h" nogil:
    struct fp_sm_state:
        uint32_t peer
        uint32_t flags
        uint64_t forwarded
        uint64_t passed
        uint64_t drained
        uint64_t budget
        uint64_t adj
        uint64_t trimmed
        uint32_t next
        uint32_t pad

    struct fp_sm:
        int prog
        uint32_t nslots
        int trim_calls
        fp_sm_state *st

    enum:
        FP_SM_BUDGET_ACKED
        FP_SM_BROKEN
        FP_SM_TRIM_CALLS

    int fp_sm_open(fp_sm *sm, uint32_t nslots, int mode, char *log, uint32_t log_size)
    void fp_sm_close(fp_sm *sm)
    int fp_sm_prepare(fp_sm *sm, int fd, uint32_t slot, uint32_t peer_slot, uint64_t budget, uint64_t adj,
                      uint64_t owed)
    int fp_sm_join(fp_sm *sm, int fd, uint32_t slot)
    int fp_sm_leave(fp_sm *sm, int fd, uint32_t slot)
    long fp_sm_taken(int fd, uint64_t *out)
    int fp_sm_nodelay(int fd)
    int fp_sm_rcvbuf(int fd, int bytes)
    uint64_t fp_sm_get(const uint64_t *p)
    void fp_sm_put(uint64_t *p, uint64_t v)
