/* The kernel engine's BPF side: a sk_skb verdict program built here from
 * instruction macros (no clang, no libbpf), its maps, and the bpf() calls
 * that load, attach and fill them.
 *
 * Maps (shared by every worker):
 *   slots  HASH     socket cookie -> u32 slot (written once, before insertion)
 *   state  ARRAY    slot -> struct fp_sm_state, BPF_F_MMAPABLE: user space
 *                   reads and writes it through a shared mapping, with no
 *                   syscall, and the program adds to it atomically
 *   socks  SOCKMAP  slot -> socket: the redirect target
 *
 * The verdict, per received skb of a socket in socks:
 *   empty skb (a bare FIN)                  -> SK_DROP (else the peer gets EPIPE)
 *   no slot/state                           -> SK_PASS (own queue: user space)
 *   passed != drained                       -> SK_PASS, passed += len
 *     (user space still owes the peer bytes passed earlier: redirecting now
 *      would overtake them)
 *   forwarded + adj - peer bytes_acked >= budget
 *                                           -> SK_PASS, passed += len
 *     (the peer holds a budget's worth not yet acked by its receiver, in its
 *      psock backlog and send queue: stop feeding it; passed skbs stay
 *      charged to this socket's receive memory, which closes the TCP window
 *      towards the sender: that is the backpressure)
 *   else redirect to the peer's egress      -> forwarded += len
 *
 * adj is set by user space to (bytes the peer had taken before it joined +
 * bytes user space sent it since), so that forwarded + adj - bytes_acked is
 * what the peer holds and its receiver has not acked.
 *
 * Before any of that, old bytes are cut from the skb's head. A retransmitted
 * segment that starts before rcv_nxt and ends after it is queued whole
 * (tcp_data_queue, "partial packet"): recv skips its head by copied_seq, but
 * the verdict is handed the whole skb (tcp_read_skb), and would forward the
 * head a second time. The skb's sequence number is read through the
 * kernel's sk_buff (bpf_cast_to_kern_ctx, 6.2+) against `next`, and the
 * overlap cut with bpf_skb_adjust_room (4095 bytes a call). The first skb
 * after joining takes `next` from the socket's copied_seq.
 *
 * Functions return 0 (or a value >= 0) or -errno, like compat.h's wrappers.
 */
#ifndef FASTPROXY_SOCKMAP_H
#define FASTPROXY_SOCKMAP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <errno.h>

struct fp_sm_state {
    uint32_t peer;          /* the peer's slot (redirect target) */
    uint32_t flags;         /* program: FP_SM_SEQ, FP_SM_BROKEN */
    uint64_t forwarded;     /* program: bytes redirected to the peer */
    uint64_t passed;        /* program: bytes passed to this socket's own queue */
    uint64_t drained;       /* user space: bytes of passed it has sent to the peer */
    uint64_t budget;        /* user space: bytes the peer may hold unacked */
    uint64_t adj;           /* user space: see above */
    uint64_t trimmed;       /* program: old bytes cut from the head of skbs */
    uint32_t next;          /* program: sequence number of the next new byte */
    uint32_t pad;
};

#define FP_SM_SEQ 1u       /* next is known (set at the first skb after joining) */
#define FP_SM_BROKEN 2u    /* an skb could not be trimmed and was dropped: reset the bridge */

/* Up to 256 x 4095 bytes (1 MiB) of overlap: a retransmission that fills
 * a hole moves coalesced out-of-order skbs, which may start far before
 * rcv_nxt, into the receive queue. More than that resets the bridge.
 * The program is built with sm->trim_calls of them (out of 0..256: 256);
 * only tests ask for fewer, to make a cut fail on purpose. */
#define FP_SM_TRIM_CALLS 256   /* (every platform: _core's private setter names it) */

struct fp_sm {
    int slots;
    int state;
    int socks;
    int prog;
    uint32_t nslots;
    int acked_off;           /* struct tcp_sock's bytes_acked, from BTF */
    int copied_off;          /* struct tcp_sock's copied_seq */
    int cb_off;              /* struct sk_buff's cb (tcp_skb_cb: seq first) */
    int kctx_id;             /* the kfunc bpf_cast_to_kern_ctx's BTF id */
    int trim_calls;          /* set before fp_sm_open: see FP_SM_TRIM_CALLS */
    struct fp_sm_state *st;  /* the state array, mapped */
    size_t st_len;
};

#define FP_SM_BUDGET_ACKED 0   /* budget counts what the peer's receiver has not acked */
#define FP_SM_BUDGET_NONE 1    /* no budget: always redirect (the unbounded prototype) */

/* A counter the program adds to, read; a user-space field, published
 * (release: what user space wrote before it is seen first). */
static inline uint64_t fp_sm_get(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void fp_sm_put(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

#if defined(__linux__) && !defined(FASTPROXY_FORCE_PORTABLE)
#include <linux/bpf.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <linux/sockios.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef BPF_F_MMAPABLE
#define BPF_F_MMAPABLE (1U << 10)
#endif
#ifndef BPF_ATOMIC
#define BPF_ATOMIC 0xc0
#endif
#ifndef BPF_JMP32
#define BPF_JMP32 0x06
#endif
#ifndef BPF_PSEUDO_KFUNC_CALL
#define BPF_PSEUDO_KFUNC_CALL 2
#endif
/* Older headers lack BPF_SK_SKB_VERDICT (5.13): its value is stable. */
#define FP_SK_SKB_VERDICT 38

/* Our own small instruction set: what the verdict program needs. */
#define FP_I(c, d, s, o, i) ((struct bpf_insn){ .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) })
#define FP_MOV64_REG(d, s)      FP_I(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)
#define FP_MOV64_IMM(d, i)      FP_I(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)
#define FP_ADD64_REG(d, s)      FP_I(BPF_ALU64 | BPF_ADD | BPF_X, d, s, 0, 0)
#define FP_SUB64_REG(d, s)      FP_I(BPF_ALU64 | BPF_SUB | BPF_X, d, s, 0, 0)
#define FP_ADD64_IMM(d, i)      FP_I(BPF_ALU64 | BPF_ADD | BPF_K, d, 0, 0, i)
#define FP_OR64_IMM(d, i)       FP_I(BPF_ALU64 | BPF_OR | BPF_K, d, 0, 0, i)
#define FP_AND64_IMM(d, i)      FP_I(BPF_ALU64 | BPF_AND | BPF_K, d, 0, 0, i)
#define FP_ADD32_REG(d, s)      FP_I(BPF_ALU | BPF_ADD | BPF_X, d, s, 0, 0)
#define FP_SUB32_REG(d, s)      FP_I(BPF_ALU | BPF_SUB | BPF_X, d, s, 0, 0)
#define FP_LDX(sz, d, s, o)     FP_I(BPF_LDX | BPF_MEM | (sz), d, s, o, 0)
#define FP_STX(sz, d, s, o)     FP_I(BPF_STX | BPF_MEM | (sz), d, s, o, 0)
#define FP_ST(sz, d, o, i)      FP_I(BPF_ST | BPF_MEM | (sz), d, 0, o, i)
#define FP_XADD64(d, s, o)      FP_I(BPF_STX | BPF_ATOMIC | BPF_DW, d, s, o, BPF_ADD)
#define FP_JEQ_IMM(d, i, o)     FP_I(BPF_JMP | BPF_JEQ | BPF_K, d, 0, o, i)
#define FP_JNE_IMM(d, i, o)     FP_I(BPF_JMP | BPF_JNE | BPF_K, d, 0, o, i)
#define FP_JNE_REG(d, s, o)     FP_I(BPF_JMP | BPF_JNE | BPF_X, d, s, o, 0)
#define FP_JGE_REG(d, s, o)     FP_I(BPF_JMP | BPF_JGE | BPF_X, d, s, o, 0)
#define FP_JLE_IMM(d, i, o)     FP_I(BPF_JMP | BPF_JLE | BPF_K, d, 0, o, i)
#define FP_JSLE32_IMM(d, i, o)  FP_I(BPF_JMP32 | BPF_JSLE | BPF_K, d, 0, o, i)
#define FP_JGE32_REG(d, s, o)   FP_I(BPF_JMP32 | BPF_JGE | BPF_X, d, s, o, 0)
#define FP_JA(o)                FP_I(BPF_JMP | BPF_JA, 0, 0, o, 0)
#define FP_CALL(f)              FP_I(BPF_JMP | BPF_CALL, 0, 0, 0, f)
#define FP_KFUNC(id)            FP_I(BPF_JMP | BPF_CALL, 0, BPF_PSEUDO_KFUNC_CALL, 0, id)
#define FP_EXIT()               FP_I(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
/* A map fd is a two-slot load the kernel turns into the map's address. */
static inline int fp_ld_map_fd(struct bpf_insn *p, int n, int reg, int fd)
{
    p[n] = FP_I(BPF_LD | BPF_DW | BPF_IMM, reg, BPF_PSEUDO_MAP_FD, 0, fd);
    p[n + 1] = FP_I(0, 0, 0, 0, 0);
    return n + 2;
}
/* r0 = bpf_map_lookup_elem(map fd, key at r10 + key_off): the key is on
 * the program's stack already. */
static inline int fp_lookup(struct bpf_insn *p, int n, int fd, int key_off)
{
    n = fp_ld_map_fd(p, n, BPF_REG_1, fd);
    p[n++] = FP_MOV64_REG(BPF_REG_2, BPF_REG_10);
    p[n++] = FP_ADD64_IMM(BPF_REG_2, key_off);
    p[n++] = FP_CALL(BPF_FUNC_map_lookup_elem);
    return n;
}


/* The running kernel's BTF (/sys/kernel/btf/vmlinux), read once at open:
 * the verifier checks reads through BTF pointers, and kfunc calls, against
 * the same table, so offsets and ids come from it, not from headers. */
struct fp_btf {
    char *buf;
    const char *types, *strs;
    uint32_t types_len, strs_len;
};

enum { FP_BTF_INT = 1, FP_BTF_ARRAY = 3, FP_BTF_STRUCT = 4, FP_BTF_UNION = 5, FP_BTF_ENUM = 6,
       FP_BTF_FUNC = 12, FP_BTF_FUNC_PROTO = 13, FP_BTF_VAR = 14, FP_BTF_DATASEC = 15,
       FP_BTF_DECL_TAG = 17, FP_BTF_ENUM64 = 19 };

static inline void fp_btf_close(struct fp_btf *b)
{
    free(b->buf);
    b->buf = NULL;
}

/* Returns 0, -ENOENT (no BTF, or not a BTF blob) or -errno. */
static inline int fp_btf_open(struct fp_btf *b)
{
    uint32_t hdr[6];
    size_t len = 0, cap = 0;
    ssize_t r;
    int fd = open("/sys/kernel/btf/vmlinux", O_RDONLY | O_CLOEXEC);
    b->buf = NULL;
    if (fd < 0)
        return errno == ENOENT ? -ENOENT : -errno;
    for (;;) {
        if (len == cap) {
            char *grown = (char *)realloc(b->buf, cap = cap ? cap * 2 : (8u << 20));
            if (grown == NULL) { close(fd); fp_btf_close(b); return -ENOMEM; }
            b->buf = grown;
        }
        r = read(fd, b->buf + len, cap - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { r = -errno; close(fd); fp_btf_close(b); return (int)r; }
        if (r == 0) break;
        len += (size_t)r;
    }
    close(fd);
    if (len < sizeof(hdr)) { fp_btf_close(b); return -ENOENT; }
    memcpy(hdr, b->buf, sizeof(hdr));
    /* magic 0xeB9F; hdr_len; type_off, type_len, str_off, str_len after it */
    if ((hdr[0] & 0xffff) != 0xeB9F || hdr[1] + (size_t)hdr[4] + hdr[5] > len
            || hdr[1] + (size_t)hdr[2] + hdr[3] > len) {
        fp_btf_close(b);
        return -ENOENT;
    }
    b->types = b->buf + hdr[1] + hdr[2];
    b->types_len = hdr[3];
    b->strs = b->buf + hdr[1] + hdr[4];
    b->strs_len = hdr[5];
    return 0;
}

/* With field: the byte offset of member `field` of struct `name`.
 * Without: the type id of function `name` (what a kfunc call names).
 * Returns it, or -ENOENT (no such struct, member or function; or a
 * bit-field). */
static inline int fp_btf_find(const struct fp_btf *b, const char *name, const char *field)
{
    const uint32_t *t = (const uint32_t *)b->types;
    uint32_t id = 1, i;
    while ((const char *)t + 12 <= b->types + b->types_len) {
        uint32_t kind = (t[1] >> 24) & 0x1f, vlen = t[1] & 0xffff;
        const uint32_t *extra = t + 3;
        int named = t[0] < b->strs_len && strcmp(b->strs + t[0], name) == 0;
        if (named && field != NULL && kind == FP_BTF_STRUCT) {
            for (i = 0; i < vlen; i++) {
                const uint32_t *m = extra + 3 * i;
                if (m[0] < b->strs_len && strcmp(b->strs + m[0], field) == 0) {
                    uint32_t bits = (t[1] >> 31) ? (m[2] & 0xffffff) : m[2];
                    return (bits % 8) ? -ENOENT : (int)(bits / 8);
                }
            }
        }
        if (named && field == NULL && kind == FP_BTF_FUNC)
            return (int)id;
        switch (kind) {
        case FP_BTF_INT: case FP_BTF_VAR: case FP_BTF_DECL_TAG: t = extra + 1; break;
        case FP_BTF_ARRAY: t = extra + 3; break;
        case FP_BTF_STRUCT: case FP_BTF_UNION: case FP_BTF_DATASEC: case FP_BTF_ENUM64: t = extra + 3 * vlen; break;
        case FP_BTF_ENUM: case FP_BTF_FUNC_PROTO: t = extra + 2 * vlen; break;
        default: t = extra; break;
        }
        id++;
    }
    return -ENOENT;
}

static inline long fp_bpf(int cmd, union bpf_attr *attr)
{
    long r;
    do {
        r = syscall(__NR_bpf, cmd, attr, sizeof(*attr));
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : r;
}

static inline int fp_sm_map(uint32_t type, uint32_t key, uint32_t value,
                            uint32_t entries, uint32_t flags)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.map_type = type;
    a.key_size = key;
    a.value_size = value;
    a.max_entries = entries;
    a.map_flags = flags;
    return (int)fp_bpf(BPF_MAP_CREATE, &a);
}

/* Offsets in struct fp_sm_state, as the program reads them. */
#define FP_SM_PEER 0
#define FP_SM_FWD 8
#define FP_SM_PASSED 16
#define FP_SM_DRAINED 24
#define FP_SM_BUDGET 32
#define FP_SM_ADJ 40
#define FP_SM_TRIMMED 48
#define FP_SM_NEXT 56
#define FP_SM_FLAGS 4
_Static_assert(offsetof(struct fp_sm_state, flags) == FP_SM_FLAGS
               && offsetof(struct fp_sm_state, adj) == FP_SM_ADJ
               && offsetof(struct fp_sm_state, trimmed) == FP_SM_TRIMMED
               && offsetof(struct fp_sm_state, next) == FP_SM_NEXT, "the program's offsets");

/* Emits the cut of old bytes (see the top of this file), with r6 skb,
 * r7 len, r9 state; leaves r7 the new length. Jumps that must reach the
 * program's "broken" exit go in jb[*nb]. Stack: -28 seq, -32 bytes left
 * to cut. Returns the new n. */
static inline int fp_sm_trim(struct bpf_insn *p, int n, const struct fp_sm *sm, int *jb, int *nb)
{
    int j_known, j_mark[2], j_fresh, j_done[FP_SM_TRIM_CALLS], j_cont, i;
    int calls = sm->trim_calls >= 0 && sm->trim_calls <= FP_SM_TRIM_CALLS ? sm->trim_calls : FP_SM_TRIM_CALLS;
    /* Once one skb was dropped, nothing after it may reach the peer. */
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_9, FP_SM_FLAGS);
    p[n++] = FP_AND64_IMM(BPF_REG_1, FP_SM_BROKEN);
    jb[(*nb)++] = n; p[n++] = FP_JNE_IMM(BPF_REG_1, 0, 0);
    p[n++] = FP_MOV64_REG(BPF_REG_1, BPF_REG_6);
    p[n++] = FP_KFUNC(sm->kctx_id);                          /* r0 = struct sk_buff * */
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_0, sm->cb_off); /* TCP_SKB_CB(skb)->seq */
    p[n++] = FP_STX(BPF_W, BPF_REG_10, BPF_REG_1, -28);
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_9, FP_SM_FLAGS);
    p[n++] = FP_AND64_IMM(BPF_REG_1, FP_SM_SEQ);
    j_known = n; p[n++] = FP_JNE_IMM(BPF_REG_1, 0, 0);
    /* First skb since joining: the next new byte is what recv would read
     * next (this skb's own seq if the socket cannot be read). */
    p[n++] = FP_LDX(BPF_W, BPF_REG_2, BPF_REG_10, -28);
    p[n++] = FP_STX(BPF_W, BPF_REG_9, BPF_REG_2, FP_SM_NEXT);
    p[n++] = FP_LDX(BPF_DW, BPF_REG_1, BPF_REG_6, offsetof(struct __sk_buff, sk));
    j_mark[0] = n; p[n++] = FP_JEQ_IMM(BPF_REG_1, 0, 0);
    p[n++] = FP_CALL(BPF_FUNC_skc_to_tcp_sock);
    j_mark[1] = n; p[n++] = FP_JEQ_IMM(BPF_REG_0, 0, 0);
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_0, sm->copied_off);
    p[n++] = FP_STX(BPF_W, BPF_REG_9, BPF_REG_1, FP_SM_NEXT);
    for (i = 0; i < 2; i++)
        p[j_mark[i]].off = (int16_t)(n - j_mark[i] - 1);
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_9, FP_SM_FLAGS);
    p[n++] = FP_OR64_IMM(BPF_REG_1, FP_SM_SEQ);
    p[n++] = FP_STX(BPF_W, BPF_REG_9, BPF_REG_1, FP_SM_FLAGS);
    p[j_known].off = (int16_t)(n - j_known - 1);
    /* overlap = next - seq; next = seq + len (the skb's end) */
    p[n++] = FP_LDX(BPF_W, BPF_REG_2, BPF_REG_10, -28);
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_9, FP_SM_NEXT);
    p[n++] = FP_SUB32_REG(BPF_REG_1, BPF_REG_2);
    p[n++] = FP_MOV64_REG(BPF_REG_3, BPF_REG_2);
    p[n++] = FP_ADD32_REG(BPF_REG_3, BPF_REG_7);
    p[n++] = FP_STX(BPF_W, BPF_REG_9, BPF_REG_3, FP_SM_NEXT);
    j_fresh = n; p[n++] = FP_JSLE32_IMM(BPF_REG_1, 0, 0);
    /* All old: TCP drops such segments before queueing them, so this is
     * not the stream we know. */
    jb[(*nb)++] = n; p[n++] = FP_JGE32_REG(BPF_REG_1, BPF_REG_7, 0);
    p[n++] = FP_STX(BPF_W, BPF_REG_10, BPF_REG_1, -32);
    p[n++] = FP_XADD64(BPF_REG_9, BPF_REG_1, FP_SM_TRIMMED);
    for (i = 0; i < calls; i++) {
        p[n++] = FP_LDX(BPF_W, BPF_REG_3, BPF_REG_10, -32);
        j_done[i] = n; p[n++] = FP_JEQ_IMM(BPF_REG_3, 0, 0);
        p[n++] = FP_JLE_IMM(BPF_REG_3, 4095, 1);
        p[n++] = FP_MOV64_IMM(BPF_REG_3, 4095);
        p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_10, -32);
        p[n++] = FP_SUB64_REG(BPF_REG_1, BPF_REG_3);
        p[n++] = FP_STX(BPF_W, BPF_REG_10, BPF_REG_1, -32);
        p[n++] = FP_MOV64_IMM(BPF_REG_2, 0);
        p[n++] = FP_SUB64_REG(BPF_REG_2, BPF_REG_3);          /* shrink at the head */
        p[n++] = FP_MOV64_REG(BPF_REG_1, BPF_REG_6);
        p[n++] = FP_MOV64_IMM(BPF_REG_3, 0);
        p[n++] = FP_MOV64_IMM(BPF_REG_4, 0);
        p[n++] = FP_CALL(BPF_FUNC_skb_adjust_room);
        jb[(*nb)++] = n; p[n++] = FP_JNE_IMM(BPF_REG_0, 0, 0);
    }
    p[n++] = FP_LDX(BPF_W, BPF_REG_3, BPF_REG_10, -32);
    jb[(*nb)++] = n; p[n++] = FP_JNE_IMM(BPF_REG_3, 0, 0);
    for (i = 0; i < calls; i++)
        p[j_done[i]].off = (int16_t)(n - j_done[i] - 1);
    p[n++] = FP_LDX(BPF_W, BPF_REG_7, BPF_REG_6, offsetof(struct __sk_buff, len));
    j_cont = n; p[n++] = FP_JA(0);
    p[j_fresh].off = (int16_t)(n - j_fresh - 1);
    p[j_cont].off = (int16_t)(n - j_cont - 1);
    return n;
}

#define FP_SM_INSNS (FP_SM_TRIM_CALLS * 14 + 160)

/* Builds the verdict program into insns (room for FP_SM_INSNS); returns
 * its length. Registers: r6 skb, r7 len, r8 peer socket, r9 state.
 * Stack: -8 cookie, -12 slot, -16 peer slot, -24 the peer's bytes_acked,
 * and fp_sm_trim's. */
static inline int fp_sm_program(struct bpf_insn *p, const struct fp_sm *sm, int mode)
{
    int n = 0;
    int j_pass_plain[3], j_pass[6], j_drop, jb[FP_SM_TRIM_CALLS + 3], nj = 0, np = 0, nb = 0, i;
    p[n++] = FP_MOV64_REG(BPF_REG_6, BPF_REG_1);
    p[n++] = FP_LDX(BPF_W, BPF_REG_7, BPF_REG_6, offsetof(struct __sk_buff, len));
    j_drop = n; p[n++] = FP_JEQ_IMM(BPF_REG_7, 0, 0);
    p[n++] = FP_CALL(BPF_FUNC_get_socket_cookie);           /* r1 = skb still */
    p[n++] = FP_STX(BPF_DW, BPF_REG_10, BPF_REG_0, -8);
    n = fp_lookup(p, n, sm->slots, -8);
    j_pass_plain[nj++] = n; p[n++] = FP_JEQ_IMM(BPF_REG_0, 0, 0);
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_0, 0);
    p[n++] = FP_STX(BPF_W, BPF_REG_10, BPF_REG_1, -12);
    n = fp_lookup(p, n, sm->state, -12);
    j_pass_plain[nj++] = n; p[n++] = FP_JEQ_IMM(BPF_REG_0, 0, 0);
    p[n++] = FP_MOV64_REG(BPF_REG_9, BPF_REG_0);
    n = fp_sm_trim(p, n, sm, jb, &nb);
    /* Bytes user space owes the peer go first. */
    p[n++] = FP_LDX(BPF_DW, BPF_REG_1, BPF_REG_9, FP_SM_PASSED);
    p[n++] = FP_LDX(BPF_DW, BPF_REG_2, BPF_REG_9, FP_SM_DRAINED);
    j_pass[np++] = n; p[n++] = FP_JNE_REG(BPF_REG_1, BPF_REG_2, 0);
    if (mode == FP_SM_BUDGET_ACKED) {
        p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_9, FP_SM_PEER);
        p[n++] = FP_STX(BPF_W, BPF_REG_10, BPF_REG_1, -16);
        n = fp_lookup(p, n, sm->socks, -16);            /* takes a reference */
        j_pass[np++] = n; p[n++] = FP_JEQ_IMM(BPF_REG_0, 0, 0);
        p[n++] = FP_MOV64_REG(BPF_REG_8, BPF_REG_0);
        p[n++] = FP_ST(BPF_DW, BPF_REG_10, -24, 0);
        p[n++] = FP_MOV64_REG(BPF_REG_1, BPF_REG_8);
        p[n++] = FP_CALL(BPF_FUNC_skc_to_tcp_sock);
        p[n++] = FP_JEQ_IMM(BPF_REG_0, 0, 2);
        p[n++] = FP_LDX(BPF_DW, BPF_REG_1, BPF_REG_0, sm->acked_off);
        p[n++] = FP_STX(BPF_DW, BPF_REG_10, BPF_REG_1, -24);
        p[n++] = FP_MOV64_REG(BPF_REG_1, BPF_REG_8);
        p[n++] = FP_CALL(BPF_FUNC_sk_release);
        /* held = forwarded + adj - acked; held >= budget: pass */
        p[n++] = FP_LDX(BPF_DW, BPF_REG_1, BPF_REG_9, FP_SM_FWD);
        p[n++] = FP_LDX(BPF_DW, BPF_REG_2, BPF_REG_9, FP_SM_ADJ);
        p[n++] = FP_ADD64_REG(BPF_REG_1, BPF_REG_2);
        p[n++] = FP_LDX(BPF_DW, BPF_REG_2, BPF_REG_10, -24);
        p[n++] = FP_SUB64_REG(BPF_REG_1, BPF_REG_2);
        p[n++] = FP_LDX(BPF_DW, BPF_REG_2, BPF_REG_9, FP_SM_BUDGET);
        j_pass[np++] = n; p[n++] = FP_JGE_REG(BPF_REG_1, BPF_REG_2, 0);
    }
    p[n++] = FP_MOV64_REG(BPF_REG_1, BPF_REG_6);
    n = fp_ld_map_fd(p, n, BPF_REG_2, sm->socks);
    p[n++] = FP_LDX(BPF_W, BPF_REG_3, BPF_REG_9, FP_SM_PEER);
    p[n++] = FP_MOV64_IMM(BPF_REG_4, 0);
    p[n++] = FP_CALL(BPF_FUNC_sk_redirect_map);
    j_pass[np++] = n; p[n++] = FP_JNE_IMM(BPF_REG_0, SK_PASS, 0);
    p[n++] = FP_XADD64(BPF_REG_9, BPF_REG_7, FP_SM_FWD);
    p[n++] = FP_MOV64_IMM(BPF_REG_0, SK_PASS);
    p[n++] = FP_EXIT();
    /* pass: counted, to this socket's own queue */
    for (i = 0; i < np; i++)
        p[j_pass[i]].off = (int16_t)(n - j_pass[i] - 1);
    p[n++] = FP_XADD64(BPF_REG_9, BPF_REG_7, FP_SM_PASSED);
    for (i = 0; i < nj; i++)
        p[j_pass_plain[i]].off = (int16_t)(n - j_pass_plain[i] - 1);
    p[n++] = FP_MOV64_IMM(BPF_REG_0, SK_PASS);
    p[n++] = FP_EXIT();
    p[j_drop].off = (int16_t)(n - j_drop - 1);
    p[n++] = FP_MOV64_IMM(BPF_REG_0, SK_DROP);
    p[n++] = FP_EXIT();
    /* broken: dropped, and user space resets the bridge (bytes are lost) */
    for (i = 0; i < nb; i++)
        p[jb[i]].off = (int16_t)(n - jb[i] - 1);
    p[n++] = FP_LDX(BPF_W, BPF_REG_1, BPF_REG_9, FP_SM_FLAGS);
    p[n++] = FP_OR64_IMM(BPF_REG_1, FP_SM_BROKEN);
    p[n++] = FP_STX(BPF_W, BPF_REG_9, BPF_REG_1, FP_SM_FLAGS);
    p[n++] = FP_MOV64_IMM(BPF_REG_0, SK_DROP);
    p[n++] = FP_EXIT();
    return n;
}

static inline void fp_sm_close(struct fp_sm *sm)
{
    if (sm->st != NULL && sm->st != MAP_FAILED)
        munmap(sm->st, sm->st_len);
    sm->st = NULL;
    if (sm->prog >= 0) close(sm->prog);
    if (sm->socks >= 0) close(sm->socks);
    if (sm->state >= 0) close(sm->state);
    if (sm->slots >= 0) close(sm->slots);
    sm->prog = sm->socks = sm->state = sm->slots = -1;
}

/* Creates the maps, loads the program (the verifier's text goes to log)
 * and attaches it to socks. Returns 0, or -errno: -EPERM without
 * CAP_BPF/CAP_NET_ADMIN, -EINVAL/-EACCES when the verifier refuses (log
 * says why), -ENOSYS/-EOPNOTSUPP where the kernel lacks a feature. */
static inline int fp_sm_open(struct fp_sm *sm, uint32_t nslots, int mode,
                             char *log, uint32_t log_size)
{
    struct bpf_insn *insns = NULL;
    struct fp_btf btf;
    union bpf_attr a;
    long r;
    int n;
    sm->slots = sm->state = sm->socks = sm->prog = -1;
    sm->st = NULL;
    sm->nslots = nslots;
    sm->st_len = ((size_t)nslots * sizeof(struct fp_sm_state) + 4095) & ~(size_t)4095;
    if (log_size)
        log[0] = 0;
    r = fp_btf_open(&btf);
    if (r < 0) {
        if (log_size)
            snprintf(log, log_size, "no kernel BTF (/sys/kernel/btf/vmlinux)");
        goto fail;
    }
    if ((r = sm->acked_off = fp_btf_find(&btf, "tcp_sock", "bytes_acked")) < 0
            || (r = sm->copied_off = fp_btf_find(&btf, "tcp_sock", "copied_seq")) < 0
            || (r = sm->cb_off = fp_btf_find(&btf, "sk_buff", "cb")) < 0
            || (r = sm->kctx_id = fp_btf_find(&btf, "bpf_cast_to_kern_ctx", NULL)) < 0) {
        if (log_size)
            snprintf(log, log_size, "the kernel's BTF lacks what the verdict reads (Linux 6.2 or later has it)");
        fp_btf_close(&btf);
        goto fail;
    }
    fp_btf_close(&btf);
    r = sm->slots = fp_sm_map(BPF_MAP_TYPE_HASH, 8, 4, nslots, 0);
    if (r < 0) goto fail;
    r = sm->state = fp_sm_map(BPF_MAP_TYPE_ARRAY, 4, sizeof(struct fp_sm_state), nslots, BPF_F_MMAPABLE);
    if (r < 0) goto fail;
    r = sm->socks = fp_sm_map(BPF_MAP_TYPE_SOCKMAP, 4, 4, nslots, 0);
    if (r < 0) goto fail;
    sm->st = (struct fp_sm_state *)mmap(NULL, sm->st_len, PROT_READ | PROT_WRITE, MAP_SHARED, sm->state, 0);
    if (sm->st == MAP_FAILED) {
        r = -errno;
        goto fail;
    }
    insns = (struct bpf_insn *)calloc(FP_SM_INSNS, sizeof(*insns));
    if (insns == NULL) {
        r = -ENOMEM;
        goto fail;
    }
    n = fp_sm_program(insns, sm, mode);
    memset(&a, 0, sizeof(a));
    a.prog_type = BPF_PROG_TYPE_SK_SKB;
    a.insns = (uint64_t)(uintptr_t)insns;
    a.insn_cnt = (uint32_t)n;
    a.license = (uint64_t)(uintptr_t)"GPL";
    a.log_buf = (uint64_t)(uintptr_t)log;
    a.log_size = log_size;
    a.log_level = log_size ? 1 : 0;
    r = sm->prog = (int)fp_bpf(BPF_PROG_LOAD, &a);
    if (r < 0 && r == -ENOSPC && log_size) {
        /* The log did not fit: the load failed for that alone. Retry quiet. */
        a.log_buf = 0; a.log_size = 0; a.log_level = 0;
        r = sm->prog = (int)fp_bpf(BPF_PROG_LOAD, &a);
    }
    if (r < 0) goto fail;
    memset(&a, 0, sizeof(a));
    a.target_fd = (uint32_t)sm->socks;
    a.attach_bpf_fd = (uint32_t)sm->prog;
    a.attach_type = FP_SK_SKB_VERDICT;
    r = fp_bpf(BPF_PROG_ATTACH, &a);
    if (r < 0) goto fail;
    free(insns);
    return 0;
fail:
    free(insns);
    fp_sm_close(sm);
    sm->slots = sm->state = sm->socks = sm->prog = -1;
    return (int)r;
}

static inline int fp_sm_update(int map, const void *key, const void *value, uint64_t flags)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)map;
    a.key = (uint64_t)(uintptr_t)key;
    a.value = (uint64_t)(uintptr_t)value;
    a.flags = flags;
    return (int)fp_bpf(BPF_MAP_UPDATE_ELEM, &a);
}

static inline int fp_sm_delete(int map, const void *key)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)map;
    a.key = (uint64_t)(uintptr_t)key;
    return (int)fp_bpf(BPF_MAP_DELETE_ELEM, &a);
}

static inline uint64_t fp_sm_cookie(int fd)
{
    uint64_t c = 0;
    socklen_t l = sizeof(c);
#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif
    if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l) < 0)
        return 0;
    return c;
}

/* TCP_NODELAY: an skb the kernel forwards goes out at once (it doubled
 * throughput in the prototype). Returns 0 or -errno. */
static inline int fp_sm_nodelay(int fd)
{
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 ? -errno : 0;
}

/* Fixes the receive buffer at `bytes` (the kernel doubles what it is
 * given). Its autotuning would otherwise grow it up to tcp_rmem's maximum
 * as the verdict consumes (32 MiB here): that is where passed bytes wait,
 * so it is part of the bound. Returns 0 or -errno. */
static inline int fp_sm_rcvbuf(int fd, int bytes)
{
    int half = bytes / 2;
    return setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &half, sizeof(half)) < 0 ? -errno : 0;
}

/* Bytes socket fd has taken into its send queue, ever: bytes_acked read
 * before SIOCOUTQ, so an ACK between the two reads makes it smaller, never
 * larger. Returns 0 or -errno. */
static inline long fp_sm_taken(int fd, uint64_t *out)
{
    uint8_t info[232];
    socklen_t l = sizeof(info);
    uint64_t acked;
    int outq = 0;
    memset(info, 0, sizeof(info));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &l) < 0)
        return -errno;
    if (l < 128)
        return -EOPNOTSUPP;
    memcpy(&acked, info + 120, 8);   /* tcpi_bytes_acked */
    if (ioctl(fd, SIOCOUTQ, &outq) < 0)
        return -errno;
    *out = acked + (uint64_t)outq;
    return 0;
}

/* Describes socket fd as slot (its peer: peer_slot) before it joins.
 * owed: bytes user space already holds for the peer (read before the join):
 * counted as passed, so the verdict redirects nothing until they are sent.
 * Returns 0 or -errno. */
static inline int fp_sm_prepare(struct fp_sm *sm, int fd, uint32_t slot, uint32_t peer_slot,
                                uint64_t budget, uint64_t adj, uint64_t owed)
{
    struct fp_sm_state *s = &sm->st[slot];
    uint64_t cookie = fp_sm_cookie(fd);
    if (cookie == 0)
        return -EINVAL;
    s->peer = peer_slot;
    s->flags = 0;
    s->next = 0;
    __atomic_store_n(&s->trimmed, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->forwarded, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->passed, owed, __ATOMIC_RELAXED);
    __atomic_store_n(&s->drained, 0, __ATOMIC_RELAXED);
    s->budget = budget;
    __atomic_store_n(&s->adj, adj, __ATOMIC_RELEASE);
    return fp_sm_update(sm->slots, &cookie, &slot, BPF_ANY);
}

/* Socket fd joins (its verdict runs from now on). Returns 0 or -errno
 * (-EOPNOTSUPP: it already received a FIN, or is not established). */
static inline int fp_sm_join(struct fp_sm *sm, int fd, uint32_t slot)
{
    uint32_t v = (uint32_t)fd;
    return fp_sm_update(sm->socks, &slot, &v, BPF_ANY);
}

/* Socket fd leaves (close does this too). Returns 0 or -errno. */
static inline int fp_sm_leave(struct fp_sm *sm, int fd, uint32_t slot)
{
    uint64_t cookie = fp_sm_cookie(fd);
    int r = fp_sm_delete(sm->socks, &slot);
    if (cookie)
        fp_sm_delete(sm->slots, &cookie);
    return r;
}

#else  /* not Linux: the engine is not offered */

static inline int fp_sm_open(struct fp_sm *sm, uint32_t nslots, int mode, char *log, uint32_t log_size)
{ (void)nslots; (void)mode; if (log_size) log[0] = 0; sm->slots = sm->state = sm->socks = sm->prog = -1; sm->st = NULL; return -ENOSYS; }
static inline void fp_sm_close(struct fp_sm *sm) { (void)sm; }
static inline uint64_t fp_sm_cookie(int fd) { (void)fd; return 0; }
static inline int fp_sm_prepare(struct fp_sm *sm, int fd, uint32_t slot, uint32_t peer_slot, uint64_t budget, uint64_t adj, uint64_t owed)
{ (void)sm; (void)fd; (void)slot; (void)peer_slot; (void)budget; (void)adj; (void)owed; return -ENOSYS; }
static inline int fp_sm_join(struct fp_sm *sm, int fd, uint32_t slot) { (void)sm; (void)fd; (void)slot; return -ENOSYS; }
static inline int fp_sm_leave(struct fp_sm *sm, int fd, uint32_t slot) { (void)sm; (void)fd; (void)slot; return -ENOSYS; }
static inline long fp_sm_taken(int fd, uint64_t *out) { (void)fd; *out = 0; return -ENOSYS; }
static inline int fp_sm_nodelay(int fd) { (void)fd; return -ENOSYS; }
static inline int fp_sm_rcvbuf(int fd, int bytes) { (void)fd; (void)bytes; return -ENOSYS; }

#endif
#endif
