/*
 * loadgen - loopback load generator for the fastproxy benchmarks.
 *
 *   loadgen echo-server PORT
 *   loadgen connrate HOST PORT SECONDS CONCURRENCY [PAYLOAD_FILE]
 *   loadgen pingpong HOST PORT COUNT
 *   loadgen mpingpong HOST PORT CONNS SECONDS
 *   loadgen hold HOST PORT COUNT SECONDS [BATCH]
 *
 * Clients print one JSON object on stdout (hold prints two, see cmd_hold).
 * Every command first raises its soft RLIMIT_NOFILE to the hard limit. Only 127.0.0.1 and ::1 are ever
 * contacted (the echo server binds 127.0.0.1), and every loop is bounded both
 * by count and by alarm(), so a wedged proxy cannot leave this running.
 *
 * Build: cc -O2 -Wall -o loadgen loadgen.c   (benchmarks/run.py does this)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG_SIZE 64
#define MAX_PAYLOAD 16384   /* connrate PAYLOAD_FILE: bytes at most (one read's worth) */
#define ECHO_BUF (16 * 1024)
#define ECHO_LIFETIME_S (2 * 3600)   /* hard cap for a forgotten server */
#define CONN_TIMEOUT_NS (5LL * 1000000000LL)
#define MAX_CONCURRENCY 4096
#define MAX_SAMPLES (16u * 1024u * 1024u)
#define MAX_PINGS 10000000L
#define MPING_MAX_CONNS 1024
#define MPING_TIMEOUT_NS (5LL * 1000000000LL)  /* one round trip, at most */
#define HOLD_MAX 100000
#define HOLD_MAX_BATCH 64
#define HOLD_STEP_TIMEOUT_NS (3LL * 1000000000LL)  /* per batch / check window */
#define HOLD_MAX_FAILED_BATCHES 3   /* in a row: the proxy takes no more */
#define HOLD_CHECK_WINDOW 256

static volatile sig_atomic_t stop_requested;

static void on_stop(int sig) { (void)sig; stop_requested = 1; }

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long parse_long(const char *s, long lo, long hi, const char *name)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi) {
        fprintf(stderr, "loadgen: bad %s '%s' (want %ld..%ld)\n", name, s, lo, hi);
        exit(2);
    }
    return v;
}

/* The benchmark must never generate load against anything but this host. */
static socklen_t loopback_addr(const char *host, const char *port_s,
                               struct sockaddr_storage *ss)
{
    int port = (int)parse_long(port_s, 1, 65535, "port");
    struct in_addr a4;
    struct in6_addr a6;

    memset(ss, 0, sizeof(*ss));
    if (inet_pton(AF_INET, host, &a4) == 1 && a4.s_addr == htonl(INADDR_LOOPBACK)) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(port);
        sin->sin_addr = a4;
        return sizeof(*sin);
    }
    if (inet_pton(AF_INET6, host, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6)) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(port);
        sin6->sin6_addr = a6;
        return sizeof(*sin6);
    }
    fprintf(stderr, "loadgen: refusing target '%s': only 127.0.0.1 or ::1\n", host);
    exit(2);
}

static void install_stop_handlers(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array. */
static uint32_t pct(const uint32_t *v, size_t n, double p)
{
    if (n == 0)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)n);
    return v[i >= n ? n - 1 : i];
}

/* ------------------------------------------------------------ echo-server */

struct echo_conn {
    char *buf;
    size_t len, off;     /* bytes read but not yet echoed: buf[off..len) */
    int peer_done;       /* peer half-closed: finish echoing, then close */
    uint32_t events;     /* current epoll interest */
};

static struct echo_conn *conns;
static int max_fd;

static void echo_close(int ep, int fd)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(conns[fd].buf);
    memset(&conns[fd], 0, sizeof(conns[fd]));
}

static void echo_want(int ep, int fd, uint32_t events)
{
    if (conns[fd].events == events)
        return;
    struct epoll_event ev = { .events = events, .data.fd = fd };
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    conns[fd].events = events;
}

static void echo_accept(int ep, int lfd)
{
    for (int i = 0; i < 256; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;  /* EAGAIN, or EMFILE: retried on the next wake-up */
        char *buf = malloc(ECHO_BUF);
        struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
        if (fd >= max_fd || !buf || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            free(buf);
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        conns[fd] = (struct echo_conn){ .buf = buf, .events = EPOLLIN };
    }
}

/* Level-triggered, so stopping after a few rounds keeps one busy peer from
 * starving the others; epoll reports it again on the next wait. */
static void echo_serve(int ep, int fd)
{
    struct echo_conn *c = &conns[fd];
    for (int round = 0; round < 16; round++) {
        if (c->off < c->len) {
            ssize_t n = send(fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                echo_want(ep, fd, EPOLLOUT);
                return;
            }
            if (n < 0) {
                echo_close(ep, fd);
                return;
            }
            c->off += (size_t)n;
            continue;
        }
        if (c->peer_done) {
            shutdown(fd, SHUT_WR);
            echo_close(ep, fd);
            return;
        }
        ssize_t n = recv(fd, c->buf, ECHO_BUF, 0);
        if (n > 0) {
            c->len = (size_t)n;
            c->off = 0;
        } else if (n == 0) {
            c->peer_done = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            echo_want(ep, fd, EPOLLIN);
            return;
        } else {
            echo_close(ep, fd);
            return;
        }
    }
}

static int cmd_echo_server(char **argv)
{
    struct sockaddr_storage ss;
    socklen_t sl = loopback_addr("127.0.0.1", argv[0], &ss);
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        die("getrlimit");
    max_fd = rl.rlim_cur > 1000000 ? 1000000 : (int)rl.rlim_cur;
    conns = calloc((size_t)max_fd, sizeof(*conns));
    if (!conns)
        die("calloc");

    int lfd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (lfd < 0)
        die("socket");
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *)&ss, sl) < 0)
        die("bind");
    if (listen(lfd, 4096) < 0)
        die("listen");

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd };
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
        die("epoll");

    install_stop_handlers();
    alarm(ECHO_LIFETIME_S);
    fprintf(stderr, "loadgen echo-server listening on 127.0.0.1:%s\n", argv[0]);

    struct epoll_event evs[256];
    while (!stop_requested) {
        int n = epoll_wait(ep, evs, 256, 500);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (evs[i].data.fd == lfd)
                echo_accept(ep, lfd);
            else
                echo_serve(ep, evs[i].data.fd);
        }
    }
    return 0;
}

/* --------------------------------------------------------------- connrate */

enum { IDLE, CONNECTING, AWAIT_ECHO };

struct slot {
    int fd, state, got;
    int64_t t0;
};

struct connrate {
    int ep;
    const char *msg;     /* what each connection sends and waits to get back */
    int msglen;
    struct sockaddr_storage ss;
    socklen_t sl;
    long completed, err_connect, err_io, err_eof, err_timeout;
    uint32_t *lat_us;
    size_t nlat, caplat;
};

static void slot_reset(struct connrate *cr, struct slot *s)
{
    if (s->fd >= 0) {
        epoll_ctl(cr->ep, EPOLL_CTL_DEL, s->fd, NULL);
        close(s->fd);
    }
    s->fd = -1;
    s->state = IDLE;
    s->got = 0;
}

static void record_latency(struct connrate *cr, int64_t ns)
{
    if (cr->nlat == cr->caplat) {
        if (cr->caplat >= MAX_SAMPLES)
            return;  /* enough samples for percentiles; keep counting only */
        size_t cap = cr->caplat ? cr->caplat * 2 : 65536;
        uint32_t *p = realloc(cr->lat_us, cap * sizeof(*p));
        if (!p)
            return;
        cr->lat_us = p;
        cr->caplat = cap;
    }
    cr->lat_us[cr->nlat++] = (uint32_t)(ns / 1000);
}

static void slot_start(struct connrate *cr, struct slot *s, uint32_t idx)
{
    s->t0 = now_ns();
    s->fd = socket(cr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        cr->err_connect++;
        return;
    }
    if (connect(s->fd, (struct sockaddr *)&cr->ss, cr->sl) < 0 && errno != EINPROGRESS) {
        cr->err_connect++;
        slot_reset(cr, s);
        return;
    }
    /* Writable means the handshake finished (or failed: see SO_ERROR). */
    struct epoll_event ev = { .events = EPOLLOUT, .data.u32 = idx };
    epoll_ctl(cr->ep, EPOLL_CTL_ADD, s->fd, &ev);
    s->state = CONNECTING;
}

static void slot_on_writable(struct connrate *cr, struct slot *s, uint32_t idx)
{
    int err = 0;
    socklen_t el = sizeof(err);
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) {
        cr->err_connect++;
        slot_reset(cr, s);
        return;
    }
    if (send(s->fd, cr->msg, (size_t)cr->msglen, MSG_NOSIGNAL) != cr->msglen) {
        cr->err_io++;
        slot_reset(cr, s);
        return;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = idx };
    epoll_ctl(cr->ep, EPOLL_CTL_MOD, s->fd, &ev);
    s->state = AWAIT_ECHO;
}

static void slot_on_readable(struct connrate *cr, struct slot *s)
{
    char buf[MAX_PAYLOAD];
    ssize_t n = recv(s->fd, buf, sizeof(buf), 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (n <= 0) {
        if (n == 0)
            cr->err_eof++;
        else
            cr->err_io++;
        slot_reset(cr, s);
        return;
    }
    s->got += (int)n;
    if (s->got < cr->msglen)
        return;
    slot_reset(cr, s);  /* the close is part of the measured lifetime */
    record_latency(cr, now_ns() - s->t0);
    cr->completed++;
}

static void expire_slots(struct connrate *cr, struct slot *slots, int n, int64_t now)
{
    for (int i = 0; i < n; i++) {
        if (slots[i].state != IDLE && now - slots[i].t0 > CONN_TIMEOUT_NS) {
            cr->err_timeout++;
            slot_reset(cr, &slots[i]);
        }
    }
}

static int cmd_connrate(char **argv, int argc)
{
    static char payload[MAX_PAYLOAD] = "loadgen connrate 64-byte probe";
    struct connrate cr = { 0 };
    cr.sl = loopback_addr(argv[0], argv[1], &cr.ss);
    long seconds = parse_long(argv[2], 1, 3600, "seconds");
    int conc = (int)parse_long(argv[3], 1, MAX_CONCURRENCY, "concurrency");
    cr.msg = payload;
    cr.msglen = MSG_SIZE;
    if (argc > 4) {
        /* A payload of one's own, e.g. a canned TLS ClientHello (sniconn). */
        FILE *f = fopen(argv[4], "rb");
        if (!f)
            die("payload file");
        cr.msglen = (int)fread(payload, 1, sizeof(payload), f);
        fclose(f);
        if (cr.msglen <= 0 || cr.msglen == MAX_PAYLOAD)
            die("payload file: empty, or not under MAX_PAYLOAD bytes");
    }

    install_stop_handlers();
    alarm((unsigned)seconds + 60);
    cr.ep = epoll_create1(EPOLL_CLOEXEC);
    if (cr.ep < 0)
        die("epoll_create1");

    struct slot slots[MAX_CONCURRENCY];
    for (int i = 0; i < conc; i++) {
        slots[i].fd = -1;
        slots[i].state = IDLE;
    }

    int64_t start = now_ns(), deadline = start + seconds * 1000000000LL;
    int64_t next_expiry = start + 100000000LL;
    struct epoll_event evs[MAX_CONCURRENCY];
    int64_t now = start;

    while (!stop_requested && (now = now_ns()) < deadline) {
        for (int i = 0; i < conc; i++)
            if (slots[i].state == IDLE)
                slot_start(&cr, &slots[i], (uint32_t)i);
        if (now >= next_expiry) {
            expire_slots(&cr, slots, conc, now);
            next_expiry = now + 100000000LL;
        }
        int n = epoll_wait(cr.ep, evs, conc, 50);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct slot *s = &slots[evs[i].data.u32];
            if (s->state == CONNECTING)
                slot_on_writable(&cr, s, evs[i].data.u32);
            else if (s->state == AWAIT_ECHO)
                slot_on_readable(&cr, s);
        }
    }
    double elapsed = (double)(now - start) / 1e9;
    for (int i = 0; i < conc; i++)  /* in flight at the deadline: not counted */
        slot_reset(&cr, &slots[i]);

    qsort(cr.lat_us, cr.nlat, sizeof(*cr.lat_us), cmp_u32);
    printf("{\"test\": \"connrate\", \"seconds\": %.3f, \"concurrency\": %d, "
           "\"completed\": %ld, \"conn_per_s\": %.1f, \"errors\": %ld, "
           "\"errors_connect\": %ld, \"errors_io\": %ld, \"errors_eof\": %ld, "
           "\"errors_timeout\": %ld, \"p50_us\": %u, \"p99_us\": %u}\n",
           elapsed, conc, cr.completed, cr.completed / elapsed,
           cr.err_connect + cr.err_io + cr.err_eof + cr.err_timeout,
           cr.err_connect, cr.err_io, cr.err_eof, cr.err_timeout,
           pct(cr.lat_us, cr.nlat, 50), pct(cr.lat_us, cr.nlat, 99));
    free(cr.lat_us);
    return 0;
}

/* --------------------------------------------------------------- pingpong */

static void round_trip(int fd, const char *msg)
{
    char buf[MSG_SIZE];
    if (send(fd, msg, MSG_SIZE, MSG_NOSIGNAL) != MSG_SIZE)
        die("pingpong send");
    for (int got = 0; got < MSG_SIZE;) {
        ssize_t n = recv(fd, buf, sizeof(buf) - got, 0);
        if (n <= 0) {
            fprintf(stderr, "loadgen: pingpong: %s\n", n == 0 ? "EOF" : strerror(errno));
            exit(1);
        }
        got += (int)n;
    }
}

static int cmd_pingpong(char **argv)
{
    struct sockaddr_storage ss;
    socklen_t sl = loopback_addr(argv[0], argv[1], &ss);
    long count = parse_long(argv[2], 1, MAX_PINGS, "count");
    long warmup = count / 10;
    static const char msg[MSG_SIZE] = "loadgen pingpong 64-byte message";

    install_stop_handlers();
    alarm(600);
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    struct timeval tv = { .tv_sec = 5 };  /* a stalled proxy fails, not hangs */
    if (fd < 0)
        die("socket");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&ss, sl) < 0)
        die("pingpong connect");

    for (long i = 0; i < warmup && !stop_requested; i++)
        round_trip(fd, msg);

    uint32_t *ns = malloc((size_t)count * sizeof(*ns));
    if (!ns)
        die("malloc");
    double sum = 0;
    long done = 0;
    for (; done < count && !stop_requested; done++) {
        int64_t t0 = now_ns();
        round_trip(fd, msg);
        int64_t d = now_ns() - t0;
        ns[done] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
        sum += (double)d;
    }
    close(fd);
    if (done == 0) {
        fprintf(stderr, "loadgen: pingpong interrupted\n");
        return 1;
    }
    qsort(ns, (size_t)done, sizeof(*ns), cmp_u32);
    printf("{\"test\": \"pingpong\", \"count\": %ld, \"warmup\": %ld, "
           "\"round_trips\": %ld, \"p50_us\": %.2f, \"p99_us\": %.2f, "
           "\"mean_us\": %.2f, \"min_us\": %.2f, \"max_us\": %.2f}\n",
           done, warmup, done + warmup, pct(ns, done, 50) / 1e3,
           pct(ns, done, 99) / 1e3, sum / done / 1e3, ns[0] / 1e3,
           ns[done - 1] / 1e3);
    free(ns);
    return 0;
}

/* -------------------------------------------------------------- mpingpong */

/*
 * Request/response traffic over many connections: CONNS TCP_NODELAY
 * connections, each with one 64-byte request outstanding at a time (send it,
 * read the 64-byte echo, check it, send the next), all driven by one epoll
 * thread for SECONDS. The proxy sees CONNS independent clients, as a server
 * behind it would from a connection pool; the rate is bound by whichever of
 * client, proxy and server runs out of CPU first.
 *
 * Every round trip is timed; the samples stop growing at MAX_SAMPLES. A
 * connection whose echo is wrong, ends early, fails or takes longer than
 * 5 s is closed, counted as an error and not replaced. Round trips still in
 * flight at the deadline are not counted.
 */
struct mping_conn {
    int fd, got;
    uint64_t seq;
    int64_t t0;
    char msg[MSG_SIZE], buf[MSG_SIZE];
};

struct mping {
    int ep, live;
    long done, err_connect, err_io, err_eof, err_mismatch, err_timeout;
    uint32_t *lat_us;
    size_t nlat, caplat;
};

static void mping_close(struct mping *mp, struct mping_conn *c)
{
    epoll_ctl(mp->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    mp->live--;
}

/* Each request names its connection and sequence number, so an echo that
 * went to the wrong client or came back stale does not match. */
static int mping_send(struct mping *mp, struct mping_conn *c, int idx)
{
    memset(c->msg, '.', MSG_SIZE);
    int n = snprintf(c->msg, MSG_SIZE, "loadgen mping %d %llu ", idx,
                     (unsigned long long)c->seq++);
    if (n > 0 && n < MSG_SIZE)
        c->msg[n] = '.';
    c->got = 0;
    c->t0 = now_ns();
    if (send(c->fd, c->msg, MSG_SIZE, MSG_NOSIGNAL) != MSG_SIZE) {
        mp->err_io++;  /* 64 B into an empty send buffer: all or an error */
        mping_close(mp, c);
        return -1;
    }
    return 0;
}

static void mping_record(struct mping *mp, int64_t ns)
{
    if (mp->nlat == mp->caplat) {
        if (mp->caplat >= MAX_SAMPLES)
            return;
        size_t cap = mp->caplat ? mp->caplat * 2 : 65536;
        uint32_t *p = realloc(mp->lat_us, cap * sizeof(*p));
        if (!p)
            return;
        mp->lat_us = p;
        mp->caplat = cap;
    }
    mp->lat_us[mp->nlat++] = (uint32_t)(ns / 1000);
}

static void mping_readable(struct mping *mp, struct mping_conn *c, int idx)
{
    ssize_t n = recv(c->fd, c->buf + c->got, (size_t)(MSG_SIZE - c->got), 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        if (n == 0)
            mp->err_eof++;
        else
            mp->err_io++;
        mping_close(mp, c);
        return;
    }
    c->got += (int)n;
    if (c->got < MSG_SIZE)
        return;
    if (memcmp(c->buf, c->msg, MSG_SIZE)) {
        mp->err_mismatch++;
        mping_close(mp, c);
        return;
    }
    mping_record(mp, now_ns() - c->t0);
    mp->done++;
    mping_send(mp, c, idx);
}

static int cmd_mpingpong(char **argv)
{
    struct sockaddr_storage ss;
    socklen_t sl = loopback_addr(argv[0], argv[1], &ss);
    int nconns = (int)parse_long(argv[2], 1, MPING_MAX_CONNS, "conns");
    long seconds = parse_long(argv[3], 1, 3600, "seconds");
    static struct mping_conn slots[MPING_MAX_CONNS];
    struct mping mp = { 0 };

    install_stop_handlers();
    alarm((unsigned)seconds + 60);
    mp.ep = epoll_create1(EPOLL_CLOEXEC);
    if (mp.ep < 0)
        die("epoll_create1");

    /* Connect them all first (blocking, bounded by alarm()), so the
     * measured seconds are request/response traffic only. */
    for (int i = 0; i < nconns; i++) {
        struct mping_conn *c = &slots[i];
        int one = 1;
        c->fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&ss, sl) < 0) {
            mp.err_connect++;
            if (c->fd >= 0)
                close(c->fd);
            c->fd = -1;
            continue;
        }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0)
            die("fcntl");
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
        if (epoll_ctl(mp.ep, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            die("epoll_ctl");
        mp.live++;
    }

    int64_t start = now_ns(), deadline = start + seconds * 1000000000LL;
    int64_t now = start, next_expiry = start + 100000000LL;
    for (int i = 0; i < nconns; i++)
        if (slots[i].fd >= 0)
            mping_send(&mp, &slots[i], i);

    struct epoll_event evs[MPING_MAX_CONNS];
    while (!stop_requested && mp.live > 0 && (now = now_ns()) < deadline) {
        if (now >= next_expiry) {
            for (int i = 0; i < nconns; i++) {
                if (slots[i].fd >= 0 && now - slots[i].t0 > MPING_TIMEOUT_NS) {
                    mp.err_timeout++;
                    mping_close(&mp, &slots[i]);
                }
            }
            next_expiry = now + 100000000LL;
        }
        int n = epoll_wait(mp.ep, evs, nconns, 50);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int idx = (int)evs[i].data.u32;
            if (slots[idx].fd >= 0)
                mping_readable(&mp, &slots[idx], idx);
        }
    }
    double elapsed = (double)(now - start) / 1e9;
    int alive = mp.live;
    for (int i = 0; i < nconns; i++)
        if (slots[i].fd >= 0)
            mping_close(&mp, &slots[i]);

    qsort(mp.lat_us, mp.nlat, sizeof(*mp.lat_us), cmp_u32);
    printf("{\"test\": \"mpingpong\", \"seconds\": %.3f, \"conns\": %d, "
           "\"alive\": %d, \"round_trips\": %ld, \"req_per_s\": %.1f, "
           "\"errors\": %ld, \"errors_connect\": %ld, \"errors_io\": %ld, "
           "\"errors_eof\": %ld, \"errors_mismatch\": %ld, \"errors_timeout\": %ld, "
           "\"samples\": %zu, \"p50_us\": %u, \"p99_us\": %u}\n",
           elapsed, nconns, alive, mp.done, elapsed > 0 ? mp.done / elapsed : 0.0,
           mp.err_connect + mp.err_io + mp.err_eof + mp.err_mismatch + mp.err_timeout,
           mp.err_connect, mp.err_io, mp.err_eof, mp.err_mismatch, mp.err_timeout,
           mp.nlat, pct(mp.lat_us, mp.nlat, 50), pct(mp.lat_us, mp.nlat, 99));
    free(mp.lat_us);
    return 0;
}

/* ------------------------------------------------------------------- hold */

/*
 * Hold COUNT idle, verified connections, for the RSS-per-idle-bridge test.
 *
 * 1. Open them in batches of BATCH (default 1: one at a time); each new
 *    connection sends one 64-byte message naming it and must get exactly that
 *    back within 3 s, or it is closed and counted as failed. After 3 batches
 *    in a row without a success (a proxy at its connection limit leaves new
 *    connections in its listen backlog) no more are opened.
 * 2. Print {"phase": "held", ...} and wait for a line on stdin (the runner
 *    reads the proxy's memory meanwhile). EOF or a signal: close all, exit.
 * 3. Ping every held connection again (windows of 256, 3 s each) and print
 *    {"phase": "checked", "alive": ...}; then close everything and exit.
 *
 * SECONDS bounds the whole command (alarm()); the default SIGALRM action
 * ends the process, which closes every connection.
 */
enum { H_CONNECTING, H_AWAIT, H_OK, H_FAIL };

struct hold_slot {
    int fd, state, got;
    char msg[MSG_SIZE], buf[MSG_SIZE];
};

static void hold_message(char *msg, const char *what, long i)
{
    memset(msg, '.', MSG_SIZE);
    int n = snprintf(msg, MSG_SIZE, "loadgen %s %ld ", what, i);
    if (n > 0 && n < MSG_SIZE)
        msg[n] = '.';  /* overwrite the NUL: the whole 64 B are compared */
}

static void hold_send(struct hold_slot *s)
{
    if (send(s->fd, s->msg, MSG_SIZE, MSG_NOSIGNAL) == MSG_SIZE) {
        s->state = H_AWAIT;
        s->got = 0;
    } else {
        s->state = H_FAIL;
    }
}

/* Drive the slots to H_OK or H_FAIL: connecting ones send their message once
 * connected, then every slot must read its 64 bytes back. Pending at the
 * deadline: failed. */
static void hold_exchange(struct hold_slot *slots, int n, int64_t deadline)
{
    struct pollfd pfd[HOLD_CHECK_WINDOW];
    int idx[HOLD_CHECK_WINDOW];

    for (;;) {
        int np = 0;
        for (int i = 0; i < n; i++) {
            if (slots[i].state != H_CONNECTING && slots[i].state != H_AWAIT)
                continue;
            pfd[np].fd = slots[i].fd;
            pfd[np].events = slots[i].state == H_CONNECTING ? POLLOUT : POLLIN;
            pfd[np].revents = 0;
            idx[np++] = i;
        }
        int64_t left = deadline - now_ns();
        if (np == 0 || left <= 0 || stop_requested)
            break;
        int r = poll(pfd, (nfds_t)np, (int)(left / 1000000 + 1));
        if (r < 0 && errno != EINTR)
            die("poll");
        for (int k = 0; r > 0 && k < np; k++) {
            struct hold_slot *s = &slots[idx[k]];
            if (!pfd[k].revents)
                continue;
            if (s->state == H_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof(err);
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err)
                    s->state = H_FAIL;
                else
                    hold_send(s);
                continue;
            }
            ssize_t got = recv(s->fd, s->buf + s->got, (size_t)(MSG_SIZE - s->got), 0);
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                continue;
            if (got <= 0) {
                s->state = H_FAIL;
                continue;
            }
            s->got += (int)got;
            if (s->got == MSG_SIZE)
                s->state = memcmp(s->buf, s->msg, MSG_SIZE) ? H_FAIL : H_OK;
        }
    }
    for (int i = 0; i < n; i++)
        if (slots[i].state == H_CONNECTING || slots[i].state == H_AWAIT)
            slots[i].state = H_FAIL;
}

static int wait_for_go(void)
{
    char c;
    for (;;) {  /* one line; EOF, an error or a signal mean stop */
        ssize_t n = read(0, &c, 1);
        if (n == 1 && c == '\n')
            return 1;
        if (n <= 0 || stop_requested)
            return 0;
    }
}

static int cmd_hold(char **argv, int argc)
{
    struct sockaddr_storage ss;
    socklen_t sl = loopback_addr(argv[0], argv[1], &ss);
    long count = parse_long(argv[2], 1, HOLD_MAX, "count");
    long seconds = parse_long(argv[3], 1, 3600, "seconds");
    int batch = argc > 4 ? (int)parse_long(argv[4], 1, HOLD_MAX_BATCH, "batch") : 1;
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        die("getrlimit");
    if ((rlim_t)count + 32 > rl.rlim_cur) {
        fprintf(stderr, "loadgen: hold %ld needs %ld fds, the limit is %lu\n",
                count, count + 32, (unsigned long)rl.rlim_cur);
        return 2;
    }
    install_stop_handlers();
    alarm((unsigned)seconds);

    int *held = malloc((size_t)count * sizeof(*held));
    struct hold_slot *slots = calloc(HOLD_CHECK_WINDOW, sizeof(*slots));
    if (!held || !slots)
        die("malloc");
    long nheld = 0, failed = 0, opened = 0;
    int failed_batches = 0;
    int64_t t0 = now_ns();

    while (opened < count && failed_batches < HOLD_MAX_FAILED_BATCHES && !stop_requested) {
        int n = (int)(count - opened < batch ? count - opened : batch);
        for (int i = 0; i < n; i++) {
            struct hold_slot *s = &slots[i];
            hold_message(s->msg, "hold", opened + i);
            s->fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            s->state = H_FAIL;
            if (s->fd < 0)
                continue;
            int one = 1;
            setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            if (connect(s->fd, (struct sockaddr *)&ss, sl) == 0)
                hold_send(s);
            else if (errno == EINPROGRESS)
                s->state = H_CONNECTING;
        }
        hold_exchange(slots, n, now_ns() + HOLD_STEP_TIMEOUT_NS);
        int ok = 0;
        for (int i = 0; i < n; i++) {
            if (slots[i].state == H_OK) {
                held[nheld++] = slots[i].fd;
                ok++;
            } else {
                failed++;
                if (slots[i].fd >= 0)
                    close(slots[i].fd);
            }
        }
        failed_batches = ok ? 0 : failed_batches + 1;
        opened += n;
    }
    double open_s = (double)(now_ns() - t0) / 1e9;
    printf("{\"phase\": \"held\", \"requested\": %ld, \"held\": %ld, \"failed\": %ld, "
           "\"stopped_early\": %s, \"open_s\": %.3f}\n", count, nheld, failed,
           opened < count ? "true" : "false", open_s);
    fflush(stdout);

    if (!wait_for_go())
        return 0;  /* exit closes every connection */

    long alive = 0;
    t0 = now_ns();
    for (long base = 0; base < nheld && !stop_requested; base += HOLD_CHECK_WINDOW) {
        int n = (int)(nheld - base < HOLD_CHECK_WINDOW ? nheld - base : HOLD_CHECK_WINDOW);
        for (int i = 0; i < n; i++) {
            slots[i].fd = held[base + i];
            hold_message(slots[i].msg, "check", base + i);
            hold_send(&slots[i]);
        }
        hold_exchange(slots, n, now_ns() + HOLD_STEP_TIMEOUT_NS);
        for (int i = 0; i < n; i++)
            alive += slots[i].state == H_OK;
    }
    printf("{\"phase\": \"checked\", \"requested\": %ld, \"held\": %ld, \"alive\": %ld, "
           "\"check_s\": %.3f}\n", count, nheld, alive, (double)(now_ns() - t0) / 1e9);
    fflush(stdout);
    for (long i = 0; i < nheld; i++)
        close(held[i]);
    free(held);
    free(slots);
    return 0;
}

/* ------------------------------------------------------------------- main */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen echo-server PORT\n"
            "       loadgen connrate HOST PORT SECONDS CONCURRENCY [PAYLOAD_FILE]\n"
            "       loadgen pingpong HOST PORT COUNT\n"
            "       loadgen mpingpong HOST PORT CONNS SECONDS\n"
            "       loadgen hold HOST PORT COUNT SECONDS [BATCH]\n"
            "HOST must be 127.0.0.1 or ::1\n");
    exit(2);
}

/* The echo server and the hold client each need one fd per held
 * connection: take the whole hard limit (raising it needs privileges). */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    raise_nofile();
    const char *cmd = argv[1];
    if (!strcmp(cmd, "echo-server") && argc == 3)
        return cmd_echo_server(argv + 2);
    if (!strcmp(cmd, "connrate") && (argc == 6 || argc == 7))
        return cmd_connrate(argv + 2, argc - 2);
    if (!strcmp(cmd, "pingpong") && argc == 5)
        return cmd_pingpong(argv + 2);
    if (!strcmp(cmd, "mpingpong") && argc == 6)
        return cmd_mpingpong(argv + 2);
    if (!strcmp(cmd, "hold") && (argc == 6 || argc == 7))
        return cmd_hold(argv + 2, argc - 2);
    usage();
    return 2;
}
