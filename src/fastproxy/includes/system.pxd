# System calls and platform helpers used by the data plane, all callable
# without the GIL. The fp_* wrappers live in compat.h: they retry EINTR and
# return -errno, so nothing on the hot path reads errno.

from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from "compat.h" nogil:
    int FP_HAVE_EPOLL
    int FP_PORTABLE
    int FP_HAVE_NOTSENT_LOWAT

    ctypedef int socklen_t
    ctypedef int nfds_t

    struct sockaddr:
        unsigned short sa_family
    struct sockaddr_storage:
        unsigned short ss_family
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    # macOS puts sun_len first and has a shorter sun_path: only the named
    # fields are used, and sizeof(sun_path) gives each platform's limit.
    struct sockaddr_un:
        unsigned short sun_family
        char sun_path[108]

    int AF_INET, AF_INET6, AF_UNIX
    int SHUT_WR
    int EAGAIN, EINTR, EINPROGRESS, EMFILE, ENFILE, ENOBUFS, ENOMEM
    int ECONNRESET, EPIPE, ENOSYS, EINVAL, ECONNREFUSED, ETIMEDOUT, EMSGSIZE, EPROTO, EPERM

    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    uint32_t EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLLET
    uint32_t EPOLLEXCLUSIVE
    int EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLL_CLOEXEC

    struct pollfd:
        int fd
        short events
        short revents
    short POLLIN, POLLOUT, POLLERR, POLLHUP, POLLNVAL, POLLRDHUP

    int close(int fd)
    int usleep(unsigned int usec)
    ssize_t read(int fd, void *buf, size_t n)
    ssize_t write(int fd, const void *buf, size_t n)
    int shutdown(int fd, int how)
    int inet_pton(int af, const char *src, void *dst)
    unsigned short htons(unsigned short v)
    unsigned short ntohs(unsigned short v)

    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

    int fp_accept(int lfd, sockaddr *sa, socklen_t *length)
    int fp_socket(int family)
    int fp_pipe(int fds[2])
    int fp_connect(int fd, const sockaddr *sa, socklen_t length)
    ssize_t fp_splice(int fd_in, int fd_out, size_t length)
    ssize_t fp_recv(int fd, char *buf, size_t length)
    ssize_t fp_recv_peek(int fd, char *buf, size_t length)
    int fp_pending(int fd)
    int fp_set_rcvlowat(int fd, int n)
    int getsockname(int fd, sockaddr *sa, socklen_t *length)
    ssize_t fp_send(int fd, const char *buf, size_t length)
    int fp_epoll_create()
    int fp_epoll_wait(int ep, epoll_event *ev, int n, int ms)
    int fp_epoll_ctl(int ep, int op, int fd, uint32_t events, uint64_t tag)
    int fp_poll(pollfd *fds, nfds_t n, int ms)
    int fp_sock_error(int fd)
    int FP_NODELAY_INHERITED
    void fp_set_nodelay(int fd)
    void fp_set_reset_on_close(int fd)
    int fp_set_notsent_lowat(int fd, int nbytes)
    int fp_set_buffers(int fd, int nbytes)
    int fp_is_loopback(const sockaddr *sa)
    int FP_HAVE_TCP_CONGESTION
    int fp_set_congestion(int fd, const char *name)
    int FP_HAVE_KEEPALIVE_TIMERS
    int fp_set_keepalive(int fd, int idle, int interval, int count)
    int FP_HAVE_TCP_USER_TIMEOUT
    int fp_set_user_timeout(int fd, unsigned int ms)
    int fp_pipe_size(int wfd, int want)
    int64_t fp_now_ns()
    void fp_block_signals()

    uint64_t fp_load(const uint64_t *p)
    void fp_bump(uint64_t *p, uint64_t v)
    int64_t fp_atomic_add(int64_t *p, int64_t v)
    int64_t fp_atomic_get(const int64_t *p)
    void fp_atomic_set(int64_t *p, int64_t v)
    void fp_atomic_max(int64_t *p, int64_t v)
    bint fp_atomic_cas(int64_t *p, int64_t *expected, int64_t v)
    int64_t fp_ref_add(int64_t *p, int64_t v)
    void *fp_ptr_get(void **p)
    void fp_ptr_set(void **p, void *v)
    void fp_fence()

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_signal(pthread_cond_t *c)
    int pthread_cond_broadcast(pthread_cond_t *c)

cdef extern from "compat.h" nogil:
    int fp_cond_wait_ms(pthread_cond_t *c, pthread_mutex_t *m, int ms)
    ctypedef struct fp_sem_t:
        pass
    int fp_sem_init(fp_sem_t *s)
    void fp_sem_destroy(fp_sem_t *s)
    void fp_sem_post(fp_sem_t *s)
    int fp_sem_wait_ms(fp_sem_t *s, int ms)

cdef extern from "compat.h" nogil:
    # The FASTPROXY_FAULTS build's allocation failures (compat.h).
    int FP_FAULTS
    int fp_fault_arm(int64_t count, int64_t every, int64_t size)
    int64_t fp_fault_count()

cdef extern from "<sched.h>" nogil:
    int sched_yield()
