/* LD_PRELOAD shim for tests/test_socket_options.py: setsockopt(TCP_CONGESTION,
 * "cubic") fails with EPERM, as it does for a process without CAP_NET_ADMIN
 * where cubic is not in tcp_allowed_congestion_control. That sysctl is
 * host-wide (not per network namespace), so a test must not change it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*setsockopt_fn)(int, int, int, const void *, socklen_t);

int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
{
    static setsockopt_fn real;
    if (!real)
        real = (setsockopt_fn)dlsym(RTLD_NEXT, "setsockopt");
    if (level == IPPROTO_TCP && name == TCP_CONGESTION && len >= 5 && memcmp(value, "cubic", 5) == 0) {
        errno = EPERM;
        return -1;
    }
    return real(fd, level, name, value, len);
}
