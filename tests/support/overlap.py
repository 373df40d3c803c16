"""A TCP segment that partially overlaps what the receiver already has.

A receiver that has acked up to X can still be sent a segment starting before
X and ending after it: a retransmission whose first copy arrived after all,
or one resent by a sender that knows less than the receiver. Linux queues
such a segment whole ("partial packet" in tcp_data_queue) and skips the old
head on read; anything that takes the skb whole must skip it too.

The segment is made with TCP_REPAIR (what CRIU does to move a connection):
the sending socket is closed in repair mode, which sends nothing, and a new
socket takes over the same connection with its send sequence moved back by
the overlap; its first send is then the overlapping segment, a real one from
the sender's TCP stack (paged, with timestamps, in the window). The new
socket is an ordinary connected socket afterwards.

For the few microseconds between the close and the new connect, no socket
owns the connection here: a segment from the peer then would draw a reset.
The peer must be quiet: everything it sent read and acked, nothing more on
the way (the callers here send nothing from the peer meanwhile).

Linux only; TCP_REPAIR needs CAP_NET_ADMIN.
"""
import errno
import fcntl
import socket
import struct
import sys
import time

from .sockets import connect, family_of

# linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF_NO_WP = 1, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411
MAX_USER_MSS = 32767   # TCP_MAXSEG's ceiling (MAX_TCP_WINDOW)
# struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
REPAIR_WINDOW = struct.Struct("5I")

_WHY = []


def repair_unavailable():
    """None where TCP_REPAIR works here, else why not (a skip reason).
    Asked once per run."""
    if not _WHY:
        _WHY.append(_probe_repair())
    return _WHY[0]


def _probe_repair():
    if not sys.platform.startswith("linux"):
        return "TCP_REPAIR is Linux only, not %s" % sys.platform
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        except OSError as e:
            if e.errno == errno.EPERM:
                return "TCP_REPAIR needs CAP_NET_ADMIN"
            return "TCP_REPAIR not available: %s" % e
    return None


def _ioctl_int(sock, req):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), req, b"\0" * 4))[0]


def wait_acked(sock, timeout=10.0):
    """Until the peer has acked everything sock sent."""
    deadline = time.monotonic() + timeout
    while _ioctl_int(sock, SIOCOUTQ):
        if time.monotonic() >= deadline:
            raise AssertionError("%d bytes still unacked after %.0fs" % (_ioctl_int(sock, SIOCOUTQ), timeout))
        time.sleep(0.005)


def _getint(sock, opt):
    return sock.getsockopt(socket.IPPROTO_TCP, opt)


def _setint(sock, opt, val):
    sock.setsockopt(socket.IPPROTO_TCP, opt, val)


class _Connection:
    """What a socket in repair mode says of its connection: enough for
    another socket to carry it on."""

    def __init__(self, sock):
        self.local, self.remote = sock.getsockname(), sock.getpeername()
        _setint(sock, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        self.write_seq = _getint(sock, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        _setint(sock, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        self.rcv_nxt = _getint(sock, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        _setint(sock, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        self.window = sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.size)
        self.tsval = _getint(sock, TCP_TIMESTAMP) & 0xFFFFFFFF
        self.mss = _getint(sock, socket.TCP_MAXSEG)    # in repair mode: the mss clamp
        self.nodelay = _getint(sock, socket.TCP_NODELAY)
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        self.options, wscales = info[5], info[6]
        self.snd_wscale, self.rcv_wscale = wscales & 0x0F, wscales >> 4
        # The new socket's segments: its mss, less the timestamp option.
        self.segment = min(self.mss, MAX_USER_MSS) - (12 if self.options & TCPI_OPT_TIMESTAMPS else 0)

    def too_big(self, old, new):
        """Why old + new bytes would not go out as one segment, or None.
        Sent in parts, the first could end before what the peer acked: its
        ack would then be for bytes not sent yet, which the sender ignores,
        and the connection would stall."""
        if old + new > self.segment:
            return "%d bytes do not fit one segment (%d)" % (old + new, self.segment)
        snd_wnd = REPAIR_WINDOW.unpack(self.window)[1]
        if new > snd_wnd:
            return "%d new bytes do not fit the peer's window (%d)" % (new, snd_wnd)
        return None

    def window_from(self, back):
        """TCP_REPAIR_WINDOW's argument for a socket whose send sequence is
        `back` bytes behind: the peer's window ends where it did."""
        snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = REPAIR_WINDOW.unpack(self.window)
        snd_wnd += back
        return REPAIR_WINDOW.pack(snd_wl1, snd_wnd, max(max_window, snd_wnd), rcv_wnd, rcv_wup)

    def repair_options(self):
        """TCP_REPAIR_OPTIONS' argument: what the handshake agreed."""
        opts = [(TCPOPT_MSS, self.mss)]
        if self.options & TCPI_OPT_WSCALE:
            opts.append((TCPOPT_WINDOW, self.snd_wscale | self.rcv_wscale << 16))
        if self.options & TCPI_OPT_SACK:
            opts.append((TCPOPT_SACK_PERM, 0))
        if self.options & TCPI_OPT_TIMESTAMPS:
            opts.append((TCPOPT_TIMESTAMP, 0))
        return b"".join(struct.pack("II", code, val) for code, val in opts)


def resend_overlapping(sock, old, new):
    """Close `sock` without a word to its peer and return a new socket on the
    same connection whose first segment carries `old + new`, starting
    len(old) bytes before what the peer has acked: the peer gets `old` a
    second time and `new` for the first. `old` should be the last bytes sock
    sent (the peer keeps what it had and drops the copy, whatever it holds).

    sock must have everything it sent acked (see wait_acked) and nothing
    unread; the peer must send nothing until this returns. old + new must
    fit one segment (about 32 KiB on lo; a ValueError says if not)."""
    if not old:
        raise ValueError("overlap: old must not be empty (nothing would overlap)")
    if _ioctl_int(sock, SIOCOUTQ):
        raise ValueError("overlap: the socket has unacked bytes; wait_acked() first")
    if _ioctl_int(sock, SIOCINQ):
        raise ValueError("overlap: the socket has unread bytes; they would be lost")
    _setint(sock, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        conn = _Connection(sock)
        why = conn.too_big(len(old), len(new))
        if why:
            raise ValueError("overlap: " + why)
        fresh = _take_over(sock, conn, len(old))
    except BaseException:
        if sock.fileno() >= 0:
            _setint(sock, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        raise
    try:
        fresh.sendall(old + new)
    except BaseException:
        fresh.close()
        raise
    return fresh


def _take_over(sock, conn, back):
    """A socket on sock's connection, its send sequence `back` bytes behind;
    sock closed without a segment sent."""
    fresh = socket.socket(sock.family, socket.SOCK_STREAM)
    try:
        # Repair mode first: it lets the bind share the port with sock (and
        # with a listener, for an accepted socket) and makes connect() take
        # the sequence numbers given instead of a handshake.
        _setint(fresh, TCP_REPAIR, TCP_REPAIR_ON)
        fresh.bind(conn.local)
        _setint(fresh, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        _setint(fresh, TCP_QUEUE_SEQ, _signed((conn.write_seq - back) & 0xFFFFFFFF))
        _setint(fresh, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        _setint(fresh, TCP_QUEUE_SEQ, _signed(conn.rcv_nxt))
        _setint(fresh, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        # connect() sizes the segments from the mss clamp, which without a
        # SYN-ACK stays at 536; TCP_REPAIR_OPTIONS' mss comes too late for
        # that. (With 536, a large overlap goes out in pieces that end
        # before what the peer has: see too_big.)
        _setint(fresh, socket.TCP_MAXSEG, min(conn.mss, MAX_USER_MSS))
        _setint(fresh, socket.TCP_NODELAY, conn.nodelay)
        fresh.settimeout(sock.gettimeout())
        # In repair mode, close sends neither FIN nor RST; the connection
        # is unowned here until the connect below.
        sock.close()
        fresh.connect(conn.remote)
        fresh.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, conn.repair_options())
        fresh.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, conn.window_from(back))
        # Timestamps go on from sock's: the peer's PAWS check drops a
        # segment whose timestamp is older than the last it saw.
        _setint(fresh, TCP_TIMESTAMP, _signed(conn.tsval))
        mss = struct.unpack_from("I", fresh.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 20), 16)[0]
        if mss < conn.segment:
            raise AssertionError("overlap: the new socket's mss is %d, not the %d expected" % (mss, conn.segment))
        # Without the window probe a plain TCP_REPAIR_OFF sends: its ack
        # would come back for bytes this socket has yet to send.
        _setint(fresh, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    except BaseException:
        fresh.close()
        raise
    return fresh


def _signed(u32):
    return u32 - (1 << 32) if u32 >= 1 << 31 else u32


def overlapping_send(addr, first, overlap, rest, timeout=10.0):
    """Connect to addr (loopback), send `first`, wait until it is acked, then
    make the peer receive one segment carrying first[-overlap:] + rest that
    starts `overlap` bytes before the end of `first`. Returns the connected
    socket, which carries on as usual (recv, send, shutdown, close)."""
    if not 0 < overlap <= len(first):
        raise ValueError("overlap: %r is not within 1..len(first)=%d" % (overlap, len(first)))
    host = addr[0]
    if family_of(host) == socket.AF_INET and not host.startswith("127."):
        raise ValueError("overlap: %r is not a loopback address" % (host,))
    if family_of(host) == socket.AF_INET6 and host != "::1":
        raise ValueError("overlap: %r is not a loopback address" % (host,))
    s = connect(addr, timeout)
    try:
        s.sendall(first)
        wait_acked(s, timeout)
    except BaseException:
        s.close()
        raise
    return resend_overlapping(s, first[-overlap:], rest)
