"""TLS on loopback for the SNI routing tests: a self-signed certificate
(made with `cryptography`), TLS servers that say who they are after the
handshake, clients, and ClientHello bytes captured from Python's ssl.

Every server runs on a daemon thread and stops within a bounded time.
"""
import datetime
import os
import socket
import ssl
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Every name the tests connect with; one certificate covers them all.
NAMES = ("a.example", "b.example", "x.b.example", "deep.x.b.example", "c.example", "other.example")


class Certificate:
    """A self-signed certificate for `names`, as files (ssl loads files)."""

    def __init__(self, names=NAMES):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self.dir = tempfile.mkdtemp(prefix="fastproxy-tls-")
        self.cert_file = os.path.join(self.dir, "cert.pem")
        self.key_file = os.path.join(self.dir, "key.pem")
        with open(self.cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(self.key_file, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    def server_context(self, alpn=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def client_context(self, alpn=None):
        """Verifies the upstream's certificate: TLS went through untouched."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.cert_file)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


class TlsServer:
    """Accepts TLS on loopback; after each handshake sends `tag` and the
    server name the client asked for, one line, then echoes lines."""

    def __init__(self, cert, tag, alpn=None):
        self.tag = tag
        self.ctx = cert.server_context(alpn)
        self.names = []
        self.ctx.sni_callback = self._sni
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.handshakes = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"tls-{tag}", daemon=True)
        self._thread.start()

    def _sni(self, conn, name, ctx):
        self.names.append(name)
        conn.sni_name = name

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                name = getattr(tls, "sni_name", None)
                tls.sendall(f"{self.tag} {name}\n".encode())
                buf = b""
                while True:
                    data = tls.recv(65536)
                    if not data:
                        break
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        tls.sendall(line + b"\n")
        except (OSError, ssl.SSLError):
            pass

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tls_connect(cert, address, server_name, alpn=None, timeout=5.0):
    """A TLS client through `address` ((host, port)) asking for
    `server_name`; returns (the socket, the first line it got)."""
    sock = socket.create_connection(address, timeout=timeout)
    tls = cert.client_context(alpn).wrap_socket(sock, server_hostname=server_name)
    line = b""
    while not line.endswith(b"\n"):
        data = tls.recv(1)
        if not data:
            break
        line += data
    return tls, line.decode().strip()


def who(cert, address, server_name, alpn=None):
    """Which upstream a client asking for `server_name` reaches."""
    tls, line = tls_connect(cert, address, server_name, alpn)
    with tls:
        tls.sendall(b"ping\n")
        assert tls.recv(5) == b"ping\n"
    return line.split()[0]


def client_hello(server_name, alpn=None):
    """The first bytes Python's ssl sends for `server_name` (None: no SNI)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def records(message, sizes):
    """A handshake message cut into TLS records of these payload sizes
    (the last takes the rest)."""
    out = b""
    at = 0
    for size in list(sizes) + [len(message)]:
        piece = message[at:at + size]
        if not piece:
            break
        out += bytes([22, 3, 1]) + len(piece).to_bytes(2, "big") + piece
        at += len(piece)
    return out
