"""Writes the seed corpora (fuzz/corpus/TARGET/): valid and nearly valid
inputs for each target, so a run starts past the parsers' first checks.

    python fuzz/seeds.py
"""
import hashlib
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SIG_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_1024 = b"\x03"  # targets.proxy_header: a first byte of 3 means max_v2 = 1024


def v2(cmd, fam, body):
    return SIG_V2 + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


def proxy_header():
    v4 = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 40000, 443)
    v6 = bytes(15) + b"\x01" + bytes.fromhex("20010db8" + "00" * 11 + "01") + struct.pack("!HH", 1, 2)
    tlv = b"\x04\x00\x04abcd"  # PP2_TYPE_NOOP
    headers = [
        b"PROXY TCP4 192.0.2.1 198.51.100.7 40000 443\r\n",
        b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\nGET / HTTP/1.1\r\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.7 40000",
        v2(1, 0x11, v4), v2(1, 0x21, v6), v2(1, 0x11, v4 + tlv), v2(0, 0x00, b""), v2(1, 0x00, b""),
        v2(1, 0x31, bytes(216)), v2(1, 0x12, v4), SIG_V2 + b"\x21\x11\x04\x01",
    ]
    return [MAX_1024 + h for h in headers]


def specs():
    cases = [
        (0, ":8080"), (0, "127.0.0.1:0"), (0, "[::1]:443"), (0, "unix:/run/fastproxy.sock"), (0, "unix:@name"),
        (1, "db.internal:5432"), (1, "[2001:db8::1]:80"),
        (2, "10.0.0.1:80@3,max-connections=100"), (2, "10.0.0.2:80,backup"), (2, "srv:_pg._tcp.example.com"),
        (2, "srv:_pg._tcp.example.com,max-connections=5,backup"), (2, "unix:/run/a@b.sock@2"),
        (3, "10.0.0.0/8 2001:db8::/32 192.0.2.7 ::1"), (4, "20/1s"), (4, "600/1m"), (4, "5/s"),
        (5, "Mon-Fri 08:00-18:00;Sat,Sun 10:00-14:00"), (5, "22:00-06:00"),
        (6, "500ms"), (6, "2m"), (6, "1.5h"), (7, "256k"), (7, "1MiB"), (7, "65536"),
        (8, "1s-5m"), (8, "30s"), (9, "4"), (9, "+12"),
    ]
    return [bytes([i]) + text.encode() for i, text in cases]


def config():
    return [
        b'[[listeners]]\nlisten = "127.0.0.1:0"\nupstreams = ["127.0.0.1:9"]\n',
        b'workers = 2\nengine = "poll"\ndrain_timeout = "5s"\n[defaults]\nconnect_timeout = "2s"\n'
        b'[[listeners]]\nname = "a"\nlisten = ":0"\nupstreams = ["127.0.0.1:9@2", "127.0.0.2:9,backup"]\n'
        b'balance = "leastconn"\nallow = ["127.0.0.0/8"]\nrate_limit_per_ip = "20/1s"\n'
        b'[[listeners]]\nname = "b"\nlisten = "unix:@fuzz"\nupstreams = ["srv:_pg._tcp.example.com"]\n',
        b'[[listeners]]\nlisten = ":0"\n[[listeners.upstreams]]\naddress = "127.0.0.1:9"\nweight = 3\n'
        b'max_connections = 10\n',
        b'resolve_interval = "1s-5m"\nstats = "127.0.0.1:0"\n[[listeners]]\nlisten = ":0"\n'
        b'upstreams = ["h:1"]\nallow_time = ["Mon-Fri 08:00-18:00"]\ntime_zone = "UTC"\n',
        b'[[listeners]]\nlisten = ":0"\nupstreams = ["h:1"]\nsend_proxy = "v2"\naccept_proxy_from = ["10.0.0.1"]\n',
    ]


def client_hello():
    name = b"example.com"
    sni = struct.pack("!HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + struct.pack("!H", len(sni)) + sni)
    hello = b"\x01" + struct.pack("!I", len(body))[1:] + body
    record = b"\x16\x03\x01" + struct.pack("!H", len(hello)) + hello
    return [record, record[:20], record[:5] + b"\x01\x00\x00\x00", b"\x16\x03\x01\x00\x00"]


def main():
    for target, inputs in (("proxy_header", proxy_header()), ("specs", specs()), ("config", config()),
                           ("client_hello", client_hello())):
        directory = os.path.join(HERE, "corpus", target)
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        for data in inputs:
            with open(os.path.join(directory, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
                f.write(data)
        print("%s: %d seeds" % (target, len(inputs)))


if __name__ == "__main__":
    main()
