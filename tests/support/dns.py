"""A DNS server on loopback whose answers a test changes while the proxy
runs: dnspython's message API over UDP (and TCP, for answers too long for a
datagram), answering from a table of records.

    with DnsServer() as dns:
        dns.set("svc.test", "A", ["127.0.0.2"], ttl=1)
        dns.set("_x._tcp.svc.test", "SRV", ["10 1 9000 a.svc.test."], ttl=1)
        ... resolver=dns.addr ...
        dns.silent = True      # a dead resolver: queries go unanswered

A name with no records of the asked type but others gets NOERROR with no
answer; an unknown name NXDOMAIN. SRV answers carry their targets' A and
AAAA records in the additional section unless `additional` is False.
"""
import socket
import struct
import threading
from collections import Counter

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, host="127.0.0.1"):
        self._lock = threading.Lock()
        self._records = {}            # (name, rdtype) -> (ttl, [text])
        self.silent = False
        self.additional = True
        self.queries = Counter()      # (name, type text) -> count
        self.udp, self.tcp = _bind_pair(host)
        self.port = self.udp.getsockname()[1]
        # Timeouts let the threads see _stop: closing a socket does not
        # wake a thread blocked on it.
        self.udp.settimeout(0.1)
        self.tcp.settimeout(0.1)
        self.host = host
        self._stop = False
        self._threads = [threading.Thread(target=self._serve_udp, name="dns-udp", daemon=True),
                         threading.Thread(target=self._serve_tcp, name="dns-tcp", daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def addr(self):
        return "%s:%d" % (self.host, self.port)

    def set(self, name, rdtype, values, ttl=1):
        """Records of `name` and type `rdtype` ("A", "AAAA", "SRV"): each
        value in presentation form ("127.0.0.2", "10 5 9000 a.test.")."""
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        with self._lock:
            if values:
                self._records[key] = (ttl, list(values))
            else:
                self._records.pop(key, None)

    def asked(self, name, rdtype):
        return self.queries[(dns.name.from_text(name).to_text(), rdtype)]

    def _rrset(self, name, rdtype):
        ttl, values = self._records[(name, rdtype)]
        return dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, rdtype, values)

    def answer(self, wire):
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for q in query.question:
            self.queries[(q.name.to_text(), dns.rdatatype.to_text(q.rdtype))] += 1
            with self._lock:
                if (q.name, q.rdtype) in self._records:
                    rrset = self._rrset(q.name, q.rdtype)
                    response.answer.append(rrset)
                    if q.rdtype == dns.rdatatype.SRV and self.additional:
                        for rd in rrset:
                            for t in (dns.rdatatype.A, dns.rdatatype.AAAA):
                                if (rd.target, t) in self._records:
                                    response.additional.append(self._rrset(rd.target, t))
                elif not any(name == q.name for name, _ in self._records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def _serve_udp(self):
        while not self._stop:
            try:
                wire, peer = self.udp.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if self.silent:
                continue
            try:
                self.udp.sendto(self.answer(wire), peer)
            except Exception:
                pass   # a malformed query gets nothing, as from a real server

    def _serve_tcp(self):
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    size = struct.unpack("!H", _read(conn, 2))[0]
                    wire = _read(conn, size)
                    if not self.silent:
                        out = self.answer(wire)
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except (OSError, ValueError, struct.error):
                    pass

    def close(self):
        self._stop = True
        for t in self._threads:
            t.join(5)
        self.udp.close()
        self.tcp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _bind_pair(host):
    # UDP and TCP on one port: the UDP port the kernel picks may be taken
    # for TCP, so try again with another.
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((host, 0))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(16)
            return udp, tcp
        except OSError:
            udp.close()
            tcp.close()
    raise OSError("no port free for both UDP and TCP on %s" % host)


def _read(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("short read")
        data += chunk
    return data
