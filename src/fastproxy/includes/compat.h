/* Platform guards and tiny syscall wrappers for the fastproxy data plane.
 *
 * Every fp_* wrapper retries EINTR itself and returns the result (>= 0) or
 * -errno, so Cython code running without the GIL never reads errno, which a
 * later libc call could clobber. Elsewhere than Linux the epoll and splice
 * entry points exist but return -ENOSYS: one _core source compiles on every
 * POSIX platform, and the engine picks the poll loop there.
 */
#ifndef FASTPROXY_COMPAT_H
#define FASTPROXY_COMPAT_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>

/* Every Linux-only path keys on FP_LINUX, never on __linux__ itself:
 * -DFASTPROXY_FORCE_PORTABLE (setup.py, env FASTPROXY_FORCE_PORTABLE=1)
 * turns them all off, so a Linux machine builds and tests the code that
 * macOS runs (poll, copy, accept + fcntl, per-socket options). */
#if defined(__linux__) && !defined(FASTPROXY_FORCE_PORTABLE)
#define FP_LINUX 1
#else
#define FP_LINUX 0
#endif
#ifdef FASTPROXY_FORCE_PORTABLE
#define FP_PORTABLE 1
#else
#define FP_PORTABLE 0
#endif

#if FP_LINUX
#include <sys/epoll.h>
#define FP_HAVE_EPOLL 1
#else
#define FP_HAVE_EPOLL 0
/* Same layout and values as Linux, so the Cython declarations compile. */
typedef union epoll_data { void *ptr; int fd; uint32_t u32; uint64_t u64; } epoll_data_t;
struct epoll_event { uint32_t events; epoll_data_t data; };
#define EPOLLIN 0x001u
#define EPOLLOUT 0x004u
#define EPOLLERR 0x008u
#define EPOLLHUP 0x010u
#define EPOLLRDHUP 0x2000u
#define EPOLLET (1u << 31)
#define EPOLL_CTL_ADD 1
#define EPOLL_CTL_DEL 2
#define EPOLL_CTL_MOD 3
#define EPOLL_CLOEXEC 0
static inline int epoll_create1(int f) { (void)f; errno = ENOSYS; return -1; }
static inline int epoll_ctl(int e, int o, int fd, struct epoll_event *ev)
{ (void)e; (void)o; (void)fd; (void)ev; errno = ENOSYS; return -1; }
static inline int epoll_wait(int e, struct epoll_event *ev, int n, int t)
{ (void)e; (void)ev; (void)n; (void)t; errno = ENOSYS; return -1; }
#endif

#ifndef EPOLLEXCLUSIVE
#define EPOLLEXCLUSIVE (1u << 28)
#endif
/* A portable build on Linux must not see glibc's POLLRDHUP either: macOS
 * has none, and the poll engine then learns of a peer's FIN by reading 0. */
#if !FP_LINUX && defined(POLLRDHUP)
#undef POLLRDHUP
#endif
#ifndef POLLRDHUP
#define POLLRDHUP 0
#endif
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0   /* Python ignores SIGPIPE; macOS has SO_NOSIGPIPE */
#endif
#ifndef SPLICE_F_MOVE
#define SPLICE_F_MOVE 1
#define SPLICE_F_NONBLOCK 2
#endif
#ifndef F_SETPIPE_SZ
#define F_SETPIPE_SZ 1031
#define F_GETPIPE_SZ 1032
#endif

#define FP_RETRY(expr) do { r = (expr); } while (r < 0 && errno == EINTR); \
                        return r < 0 ? -errno : r

static inline int fp_set_nonblock_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
        fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -errno;
    return 0;
}

/* Returns: fd >= 0; -EAGAIN when the backlog is empty; -EMFILE/-ENFILE
 * when out of fds; other -errno for an aborted client. */
static inline int fp_accept(int lfd, struct sockaddr *sa, socklen_t *len)
{
    int r;
#if FP_LINUX
    FP_RETRY(accept4(lfd, sa, len, SOCK_NONBLOCK | SOCK_CLOEXEC));
#else
    do { r = accept(lfd, sa, len); } while (r < 0 && errno == EINTR);
    if (r < 0) return -errno;
    if (fp_set_nonblock_cloexec(r) < 0) { int e = -errno; close(r); return e; }
    return r;
#endif
}

/* Returns: a non-blocking stream socket fd, or -errno (-EMFILE, -ENFILE). */
static inline int fp_socket(int family)
{
    int r;
#if FP_LINUX
    FP_RETRY(socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
#else
    r = socket(family, SOCK_STREAM, 0);
    if (r < 0) return -errno;
    if (fp_set_nonblock_cloexec(r) < 0) { int e = -errno; close(r); return e; }
#ifdef SO_NOSIGPIPE
    { int one = 1; setsockopt(r, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one); }
#endif
    return r;
#endif
}

/* Returns: 0 with fds[0] (read end), fds[1] set, both non-blocking; or -errno. */
static inline int fp_pipe(int fds[2])
{
    int r;
#if FP_LINUX
    FP_RETRY(pipe2(fds, O_NONBLOCK | O_CLOEXEC));
#else
    if (pipe(fds) < 0) return -errno;
    if ((r = fp_set_nonblock_cloexec(fds[0])) < 0 ||
        (r = fp_set_nonblock_cloexec(fds[1])) < 0) {
        close(fds[0]); close(fds[1]); return r;
    }
    return 0;
#endif
}

/* Returns: 0 connected, -EINPROGRESS pending, other -errno failed. */
static inline int fp_connect(int fd, const struct sockaddr *sa, socklen_t len)
{
    int r = connect(fd, sa, len);
    if (r == 0) return 0;
    if (errno == EINTR) return -EINPROGRESS;   /* it goes on in the background */
    return -errno;
}

/* Returns: bytes moved (0 = EOF when reading a socket), or -errno
 * (-EAGAIN, -ECONNRESET, -EPIPE, -ENOSYS where splice does not exist). */
static inline ssize_t fp_splice(int in, int out, size_t len)
{
#if FP_LINUX
    ssize_t r;
    FP_RETRY(splice(in, NULL, out, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK));
#else
    (void)in; (void)out; (void)len;
    return -ENOSYS;
#endif
}

/* Returns: bytes read (0 = EOF) or -errno. */
static inline ssize_t fp_recv(int fd, char *buf, size_t len)
{
    ssize_t r;
    FP_RETRY(recv(fd, buf, len, 0));
}

/* Looks without consuming. Returns: bytes available (0 = EOF) or -errno. */
static inline ssize_t fp_recv_peek(int fd, char *buf, size_t len)
{
    ssize_t r;
    FP_RETRY(recv(fd, buf, len, MSG_PEEK));
}

/* Bytes waiting in a socket's receive queue (FIONREAD), so a phase that
 * peeks (the ClientHello) copies only once all it needs has arrived.
 * Returns: the count (0: nothing, or EOF) or -errno. */
static inline int fp_pending(int fd)
{
    int n = 0;
    if (ioctl(fd, FIONREAD, &n) < 0) return -errno;
    return n;
}

/* SO_RCVLOWAT: the socket reports readable only once n bytes wait (or at
 * EOF), so a level-triggered poll does not spin on a partial ClientHello
 * left in the socket. Returns: 0 or -errno. */
static inline int fp_set_rcvlowat(int fd, int n)
{
    if (setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &n, sizeof n) < 0) return -errno;
    return 0;
}

/* Returns: bytes written or -errno (-EAGAIN, -EPIPE, -ECONNRESET). */
static inline ssize_t fp_send(int fd, const char *buf, size_t len)
{
    ssize_t r;
    FP_RETRY(send(fd, buf, len, MSG_NOSIGNAL));
}

/* Returns: an epoll fd, or -errno (-EMFILE, -ENOSYS off Linux). */
static inline int fp_epoll_create(void)
{
    int r = epoll_create1(EPOLL_CLOEXEC);
    return r < 0 ? -errno : r;
}

/* Returns: ready events or -errno. */
static inline int fp_epoll_wait(int ep, struct epoll_event *ev, int n, int ms)
{
    int r = epoll_wait(ep, ev, n, ms);
    if (r < 0) return errno == EINTR ? 0 : -errno;
    return r;
}

/* Returns: 0 or -errno. */
static inline int fp_epoll_ctl(int ep, int op, int fd, uint32_t events, uint64_t tag)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = tag;
    return epoll_ctl(ep, op, fd, &ev) < 0 ? -errno : 0;
}

/* Returns: ready fds or -errno. */
static inline int fp_poll(struct pollfd *fds, nfds_t n, int ms)
{
    int r = poll(fds, n, ms);
    if (r < 0) return errno == EINTR ? 0 : -errno;
    return r;
}

/* Returns: 0 (no pending error), or the pending socket error as -errno. */
static inline int fp_sock_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return -errno;
    return -err;
}

/* Linux copies TCP_NODELAY from a listening socket to the sockets it
 * accepts: set on the listener once, it saves a setsockopt per client. */
#if FP_LINUX
#define FP_NODELAY_INHERITED 1
#else
#define FP_NODELAY_INHERITED 0
#endif

static inline void fp_set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* TCP_NOTSENT_LOWAT: a socket with more unsent bytes than this is not
 * writable, so data waits in the proxy's pipe instead of the socket, and is
 * sent when the proxy writes it, on the proxy's CPU, rather than by the ACK
 * that opens the window, on whichever CPU took that ACK. Linux copies it from
 * a listening socket to the sockets it accepts, like TCP_NODELAY.
 * Returns: 0, or -errno (-ENOPROTOOPT where the platform has no such option). */
#if defined(TCP_NOTSENT_LOWAT) && !FP_PORTABLE
#define FP_HAVE_NOTSENT_LOWAT 1
#else
/* The portable build stands for the least POSIX platform: without it. */
#define FP_HAVE_NOTSENT_LOWAT 0
#endif
static inline int fp_set_notsent_lowat(int fd, int nbytes)
{
#if FP_HAVE_NOTSENT_LOWAT
    if (setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &nbytes, sizeof nbytes) < 0) return -errno;
    return 0;
#else
    (void)fd; (void)nbytes;
    return -ENOPROTOOPT;
#endif
}

/* TCP_CONGESTION: the congestion control of one socket instead of the
 * host's (net.ipv4.tcp_congestion_control). It governs what that socket
 * sends, so on a bridge it decides the proxy's own sending legs only.
 * Returns: 0, or -errno (-ENOENT: not available; -EPERM: not in
 * tcp_allowed_congestion_control for an unprivileged process;
 * -ENOPROTOOPT where the platform has no such option). */
#if defined(TCP_CONGESTION) && FP_LINUX && !FP_PORTABLE
#define FP_HAVE_TCP_CONGESTION 1
#else
#define FP_HAVE_TCP_CONGESTION 0
#endif
static inline int fp_set_congestion(int fd, const char *name)
{
#if FP_HAVE_TCP_CONGESTION
    if (setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name, (socklen_t)strlen(name)) < 0) return -errno;
    return 0;
#else
    (void)fd; (void)name;
    return -ENOPROTOOPT;
#endif
}

/* SO_SNDBUF and SO_RCVBUF: a bound on what the kernel holds for one socket
 * each way (it doubles the value for its bookkeeping, and caps it at
 * net.core.wmem_max / rmem_max), and an end to its autotuning of them.
 * Returns: 0, or the -errno of the first that failed. */
static inline int fp_set_buffers(int fd, int nbytes)
{
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &nbytes, sizeof nbytes) < 0) return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &nbytes, sizeof nbytes) < 0) return -errno;
    return 0;
}

/* Whether sa is a loopback address (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104):
 * socket_buffer "auto" bounds such a socket's buffers, since a loopback
 * path's round trip is tens of microseconds. Returns 1 or 0. */
static inline int fp_is_loopback(const struct sockaddr *sa)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    const uint8_t *a6;
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->sa_family != AF_INET6)
        return 0;
    a6 = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
    if (memcmp(a6, mapped, 12) == 0)
        return a6[12] == 127;
    return memcmp(a6, &in6addr_loopback, 16) == 0;
}

/* SO_KEEPALIVE, and its timers where given (0: the kernel's, the
 * net.ipv4.tcp_keepalive_* sysctls): a peer that vanished without a FIN or
 * RST (power loss, a NAT or firewall that forgot the flow) is found by the
 * probes it does not answer, and the socket then fails with ETIMEDOUT. The
 * portable build stands for a platform with SO_KEEPALIVE alone.
 * Returns: 0, or the -errno of the first that failed (-ENOPROTOOPT for a
 * timer the platform lacks). */
#if defined(TCP_KEEPIDLE) && defined(TCP_KEEPINTVL) && defined(TCP_KEEPCNT) && !FP_PORTABLE
#define FP_HAVE_KEEPALIVE_TIMERS 1
#else
#define FP_HAVE_KEEPALIVE_TIMERS 0
#endif
static inline int fp_set_keepalive(int fd, int idle, int interval, int count)
{
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) < 0) return -errno;
#if FP_HAVE_KEEPALIVE_TIMERS
    if (idle > 0 && setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) < 0) return -errno;
    if (interval > 0 && setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval) < 0) return -errno;
    if (count > 0 && setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count) < 0) return -errno;
    return 0;
#else
    return (idle > 0 || interval > 0 || count > 0) ? -ENOPROTOOPT : 0;
#endif
}

/* TCP_USER_TIMEOUT (RFC 5482), in milliseconds: how long sent bytes may
 * stay unacknowledged before the kernel fails the socket with ETIMEDOUT.
 * Keepalive probes only a socket with nothing in flight; a peer that
 * vanished with bytes on their way to it is otherwise retransmitted to for
 * net.ipv4.tcp_retries2 (about 15 minutes). With keepalive on, it also
 * bounds how long unanswered probes may go on.
 * Returns: 0, or -errno (-ENOPROTOOPT where the platform lacks it). */
#if defined(TCP_USER_TIMEOUT) && !FP_PORTABLE
#define FP_HAVE_TCP_USER_TIMEOUT 1
#else
#define FP_HAVE_TCP_USER_TIMEOUT 0
#endif
static inline int fp_set_user_timeout(int fd, unsigned int ms)
{
#if FP_HAVE_TCP_USER_TIMEOUT
    if (setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms) < 0) return -errno;
    return 0;
#else
    (void)fd;
    (void)ms;
    return -ENOPROTOOPT;
#endif
}

/* A close with linger 0 sends RST instead of FIN: how a reset is passed on. */
static inline void fp_set_reset_on_close(int fd)
{
    struct linger lg;
    lg.l_onoff = 1;
    lg.l_linger = 0;
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
}

/* Returns: the pipe's capacity in bytes after asking for `want` (the kernel
 * may refuse: pipe-user-pages-soft), or -errno. */
static inline int fp_pipe_size(int wfd, int want)
{
#if FP_LINUX
    if (want > 0) fcntl(wfd, F_SETPIPE_SZ, want);
    int r = fcntl(wfd, F_GETPIPE_SZ);
    return r < 0 ? -errno : r;
#else
    (void)wfd; (void)want;
    return -ENOSYS;
#endif
}

/* Workers block asynchronous signals: SIGINT/SIGTERM then reach the main
 * thread (where Python runs its handlers) instead of interrupting a worker,
 * and a SIGPIPE raised by splice() to a closed peer stays pending on the
 * worker instead of killing a program that restored its default action. */
static inline void fp_block_signals(void)
{
    sigset_t set;
    sigfillset(&set);
    sigdelset(&set, SIGSEGV);
    sigdelset(&set, SIGBUS);
    sigdelset(&set, SIGFPE);
    sigdelset(&set, SIGILL);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
}

static inline int64_t fp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The CLOCK_REALTIME time `ms` from now, as the timed waits want it. */
static inline void fp_deadline_ms(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) { ts->tv_sec += 1; ts->tv_nsec -= 1000000000L; }
}

/* Waits on `c` for at most `ms` milliseconds (spurious wake-ups included).
 * Returns: 0, or -ETIMEDOUT. */
static inline int fp_cond_wait_ms(pthread_cond_t *c, pthread_mutex_t *m, int ms)
{
    struct timespec ts;
    fp_deadline_ms(&ts, ms);
    return -pthread_cond_timedwait(c, m, &ts);
}

/* A counting semaphore that wakes hook threads. A condition variable would
 * do, but glibc re-takes its mutex after a wait as "contended", so each
 * wake-up costs a second futex call at the unlock that follows; a post
 * costs one call, and only when a thread sleeps. macOS has no unnamed
 * POSIX semaphores: there it is a mutex, a condition and a count. */
#if FP_LINUX
#include <semaphore.h>
typedef sem_t fp_sem_t;
/* Returns: 0, or -errno. */
static inline int fp_sem_init(fp_sem_t *s) { return sem_init(s, 0, 0) == 0 ? 0 : -errno; }
static inline void fp_sem_destroy(fp_sem_t *s) { sem_destroy(s); }
static inline void fp_sem_post(fp_sem_t *s) { sem_post(s); }
/* Returns: 0 with one post taken, or -ETIMEDOUT. */
static inline int fp_sem_wait_ms(fp_sem_t *s, int ms)
{
    struct timespec ts;
    fp_deadline_ms(&ts, ms);
    while (sem_timedwait(s, &ts) != 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}
#else
typedef struct { pthread_mutex_t mu; pthread_cond_t cv; unsigned count; } fp_sem_t;
static inline int fp_sem_init(fp_sem_t *s)
{
    s->count = 0;
    pthread_mutex_init(&s->mu, NULL);
    return -pthread_cond_init(&s->cv, NULL);
}
static inline void fp_sem_destroy(fp_sem_t *s) { pthread_cond_destroy(&s->cv); pthread_mutex_destroy(&s->mu); }
static inline void fp_sem_post(fp_sem_t *s)
{
    pthread_mutex_lock(&s->mu);
    s->count++;
    pthread_mutex_unlock(&s->mu);
    pthread_cond_signal(&s->cv);
}
static inline int fp_sem_wait_ms(fp_sem_t *s, int ms)
{
    struct timespec ts;
    int r = 0;
    fp_deadline_ms(&ts, ms);
    pthread_mutex_lock(&s->mu);
    while (s->count == 0 && r == 0)
        r = pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    if (s->count > 0) { s->count--; r = 0; }
    pthread_mutex_unlock(&s->mu);
    return r ? -ETIMEDOUT : 0;
}
#endif

/* Counters: one writer per per-worker counter (plain add, published with a
 * relaxed store so readers never see a torn value); shared counters use
 * atomic read-modify-write. */
static inline uint64_t fp_load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void fp_bump(uint64_t *p, uint64_t v) { __atomic_store_n(p, *p + v, __ATOMIC_RELAXED); }
static inline int64_t fp_atomic_add(int64_t *p, int64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline int64_t fp_atomic_get(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void fp_atomic_set(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void fp_atomic_max(int64_t *p, int64_t v)
{
    int64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > cur && !__atomic_compare_exchange_n(p, &cur, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}


/* Reference counts: the drop that reaches 0 must see every write made by
 * the other holders before their drops (acq_rel), since it frees. */
static inline int64_t fp_ref_add(int64_t *p, int64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
/* A pointer swapped while other threads read it. */
static inline void *fp_ptr_get(void *const *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void fp_ptr_set(void **p, void *v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* Store-then-load handshakes between two threads (each stores, then loads
 * what the other stored) need a full fence between the two. */
static inline void fp_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }


/* Returns: 1 when *p held *expected and now holds v; else 0, with *expected
 * updated to what *p holds (ready for the next try of a CAS loop). */
static inline int fp_atomic_cas(int64_t *p, int64_t *expected, int64_t v)
{
    return __atomic_compare_exchange_n(p, expected, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Allocation failures on demand (setup.py: FASTPROXY_FAULTS=1, a test
 * build only). Every malloc/calloc/realloc compiled after this header goes
 * through fp_fault_alloc_fails(), which fails those made without the GIL
 * (the worker path; the control plane keeps its memory) as armed from
 * Python by _core._fail_allocs(count, every, size):
 *   count  allocations to fail, then none (0 disarms);
 *   every  fail only each Nth of those that match (0 or 1: each);
 *   size   match only allocations of exactly this many bytes (0: any).
 * fp_fault_failed counts the failures made. Other builds compile none of
 * it: FP_FAULTS is 0 and the arming entry points return -ENOSYS. */
#include <stdlib.h>
#ifdef FASTPROXY_FAULTS
#define FP_FAULTS 1
static int64_t fp_fault_left, fp_fault_every, fp_fault_size, fp_fault_seen, fp_fault_failed;

static inline int fp_fault_arm(int64_t count, int64_t every, int64_t size)
{
    __atomic_store_n(&fp_fault_every, every > 1 ? every : 1, __ATOMIC_RELAXED);
    __atomic_store_n(&fp_fault_size, size, __ATOMIC_RELAXED);
    __atomic_store_n(&fp_fault_seen, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&fp_fault_left, count, __ATOMIC_RELEASE);
    return 0;
}
static inline int64_t fp_fault_count(void) { return __atomic_load_n(&fp_fault_failed, __ATOMIC_RELAXED); }

static inline int fp_fault_alloc_fails(size_t n)
{
    if (__atomic_load_n(&fp_fault_left, __ATOMIC_ACQUIRE) <= 0 || PyGILState_Check())
        return 0;
    if (fp_fault_size && (int64_t)n != fp_fault_size)
        return 0;
    if (__atomic_add_fetch(&fp_fault_seen, 1, __ATOMIC_RELAXED) % fp_fault_every != 0)
        return 0;
    if (__atomic_sub_fetch(&fp_fault_left, 1, __ATOMIC_ACQ_REL) < 0)
        return 0;   /* another thread took the last one */
    __atomic_add_fetch(&fp_fault_failed, 1, __ATOMIC_RELAXED);
    return 1;
}
static inline void *fp_fault_malloc(size_t n) { return fp_fault_alloc_fails(n) ? NULL : malloc(n); }
static inline void *fp_fault_calloc(size_t k, size_t n) { return fp_fault_alloc_fails(k * n) ? NULL : calloc(k, n); }
static inline void *fp_fault_realloc(void *p, size_t n) { return fp_fault_alloc_fails(n) ? NULL : realloc(p, n); }
#define malloc(n) fp_fault_malloc(n)
#define calloc(k, n) fp_fault_calloc(k, n)
#define realloc(p, n) fp_fault_realloc(p, n)
#else
#define FP_FAULTS 0
static inline int fp_fault_arm(int64_t count, int64_t every, int64_t size) { return -ENOSYS; }
static inline int64_t fp_fault_count(void) { return 0; }
#endif

#endif
