"""The TCP segments of one port on the loopback interface, as sent: a packet
socket on lo (Linux, CAP_NET_RAW), filtered in the kernel to that port so
that other traffic on the machine (a benchmark's gigabytes) neither floods
nor drops what the test looks for."""
import ctypes
import socket
import struct
import threading

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4   # lo shows each packet twice: as sent and as received


class Segment:
    __slots__ = ("src", "dst", "sport", "dport", "seq", "ack", "flags", "payload")

    def __init__(self, src, dst, sport, dport, seq, ack, flags, payload):
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.seq, self.ack, self.flags, self.payload = seq, ack, flags, payload

    def __repr__(self):
        return "Segment(%d->%d seq=%d ack=%d flags=%#x len=%d)" % (
            self.sport, self.dport, self.seq, self.ack, self.flags, len(self.payload))


def _port_filter(port):
    # Classic BPF over an Ethernet frame (lo has a 14-byte zero header):
    # IPv4 or IPv6 (no extension headers), TCP, source or destination port.
    ld_h, ld_b, ldx_msh, ld_h_ind = 0x28, 0x30, 0xB1, 0x48
    jeq, ret = 0x15, 0x06
    prog = [
        (ld_h, 0, 0, 12),             # 0: ethertype
        (jeq, 0, 7, 0x0800),          # 1: IPv4? else 9
        (ld_b, 0, 0, 23),             # 2: protocol
        (jeq, 0, 13, 6),              # 3: TCP? else drop (17)
        (ldx_msh, 0, 0, 14),          # 4: x = IPv4 header length
        (ld_h_ind, 0, 0, 14),         # 5: source port
        (jeq, 9, 0, port),            # 6: -> accept (16)
        (ld_h_ind, 0, 0, 16),         # 7: destination port
        (jeq, 7, 8, port),            # 8: accept (16) / drop (17)
        (jeq, 0, 7, 0x86DD),          # 9: IPv6? else drop (17)
        (ld_b, 0, 0, 20),             # 10: next header
        (jeq, 0, 5, 6),               # 11: TCP? else drop (17)
        (ld_h, 0, 0, 54),             # 12: source port
        (jeq, 2, 0, port),            # 13: -> accept (16)
        (ld_h, 0, 0, 56),             # 14: destination port
        (jeq, 0, 1, port),            # 15: accept (16) / drop (17)
        (ret, 0, 0, 0x40000),         # 16: accept
        (ret, 0, 0, 0),               # 17: drop
    ]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog), len(prog)


def _parse(frame):
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    if ethertype == 0x0800:
        ihl = (ip[0] & 0x0F) * 4
        end = struct.unpack_from("!H", ip, 2)[0]
        family, src, dst, tcp = socket.AF_INET, ip[12:16], ip[16:20], ip[ihl:end]
    elif ethertype == 0x86DD:
        end = 40 + struct.unpack_from("!H", ip, 4)[0]
        family, src, dst, tcp = socket.AF_INET6, ip[8:24], ip[24:40], ip[40:end]
    else:
        return None
    sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", tcp)
    return Segment(socket.inet_ntop(family, src), socket.inet_ntop(family, dst), sport, dport, seq, ack, flags,
                   bytes(tcp[(off >> 4) * 4:]))


class LoCapture:
    """Records the segments to or from `port` on lo while open (a context
    manager); `segments` in the order sent."""

    def __init__(self, port):
        self.segments = []
        # Protocol 0 receives nothing until the bind below: no unfiltered
        # packet gets into the queue before the filter is in place.
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            code, n = _port_filter(port)
            self._code = ctypes.create_string_buffer(code, len(code))
            fprog = struct.pack("HL", n, ctypes.addressof(self._code))
            self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            self._sock.bind(("lo", ETH_P_ALL))
            self._sock.settimeout(0.05)
        except BaseException:
            self._sock.close()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lo-capture", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(1 << 18)
            except socket.timeout:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING:
                seg = _parse(frame)
                if seg is not None:
                    self.segments.append(seg)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
