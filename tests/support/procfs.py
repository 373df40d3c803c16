"""Readers of /proc: a process's CPU time, fds, context switches and limits,
and the host's TCP sockets."""
import os
import re

CLK_TCK = os.sysconf("SC_CLK_TCK")
TCP_CLOSE_WAIT = 0x08


def proc_cpu_seconds(pid):
    """utime + stime of a whole process (all threads), in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_fds(pid):
    """{fd: link target} of a process."""
    out = {}
    base = "/proc/%d/fd" % pid
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(os.path.join(base, name))
        except OSError:
            pass
    return out


def proc_context_switches(pid):
    """Voluntary context switches of all of a process's threads."""
    total = 0
    base = "/proc/%d/task" % pid
    for tid in os.listdir(base):
        try:
            with open(os.path.join(base, tid, "status")) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        total += int(line.split()[1])
        except OSError:
            pass   # a thread that ended meanwhile
    return total


def proc_nofile_limits(pid):
    """(soft, hard) RLIMIT_NOFILE of a running process."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                parts = line.split()
                return int(parts[3]), int(parts[4])
    raise AssertionError("no 'Max open files' in /proc/%d/limits" % pid)


def proc_fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def proc_socket_inodes(pid):
    inodes = set()
    for target in proc_fds(pid).values():
        m = re.match(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(int(m.group(1)))
    return inodes


def tcp_sockets():
    """All TCP sockets of the host (network namespace): list of dicts with
    local_port, remote_port, state, inode."""
    rows = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            rows.append({
                "local_port": int(parts[1].rsplit(":", 1)[1], 16),
                "remote_port": int(parts[2].rsplit(":", 1)[1], 16),
                "state": int(parts[3], 16),
                "inode": int(parts[9]),
            })
    return rows
