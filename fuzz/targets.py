"""The fuzz targets: bytes in, and an exception only when a contract is
broken (atheris reports it as a crash; the replay reports it as a failure).

The contracts are tests/test_fuzz_parsers.py's:
  - a parser of configuration gives a result or a ConfigError (a ValueError
    subclass) naming its field on one line, never another exception;
  - the PROXY protocol parser (and the TLS ClientHello parser once it is
    built) gives a result, None for more bytes, or a ValueError; a result
    depends only on the bytes it consumed, and nothing past the input is
    read: the input is also parsed where it ends on the last byte before a
    page mapped PROT_NONE, so an over-read is a SIGSEGV.
"""
import ctypes
import mmap
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
if os.path.isdir(os.path.join(SRC, "fastproxy")) and SRC not in sys.path:
    # A checkout: its in-place build (FASTPROXY_FUZZ_INSTALLED=1 for the
    # installed package instead).
    if not os.environ.get("FASTPROXY_FUZZ_INSTALLED"):
        sys.path.insert(0, SRC)


def _imports():
    # Imported by the harness inside atheris.instrument_imports(), so that
    # the Python parsers' branches are coverage for the fuzzer.
    from fastproxy import _core, acl, configfile, options, ratelimit, timewindows, upstreams, values
    return _core, acl, configfile, options, ratelimit, timewindows, upstreams, values


_core = acl = configfile = options = ratelimit = timewindows = upstreams = values = None


def load():
    global _core, acl, configfile, options, ratelimit, timewindows, upstreams, values
    _core, acl, configfile, options, ratelimit, timewindows, upstreams, values = _imports()


class Guarded:
    """A page followed by one the process may not read."""

    PAGE = mmap.PAGESIZE

    def __init__(self):
        self.map = mmap.mmap(-1, 2 * self.PAGE)
        self._array = (ctypes.c_char * (2 * self.PAGE)).from_buffer(self.map)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.mprotect(ctypes.addressof(self._array) + self.PAGE, self.PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")

    def call(self, parse, data):
        data = data[: self.PAGE]
        start = self.PAGE - len(data)
        self.map[start:self.PAGE] = data
        view = memoryview(self.map)[start:self.PAGE]
        try:
            return parse(view)
        finally:
            view.release()


_guarded = None


def guarded():
    global _guarded
    if _guarded is None:
        _guarded = Guarded()
    return _guarded


def _bounded(parse, data):
    """parse(data) -> result, None or "error" (a ValueError), checked for
    reading nothing past the input."""
    def answer(buf):
        try:
            return parse(buf)
        except ValueError:
            return "error"
    got = answer(data)
    again = guarded().call(answer, data)
    if again != got:
        raise AssertionError("%r at a page's end gave %r, elsewhere %r" % (data, again, got))
    if isinstance(got, tuple) and isinstance(got[0], int):
        length = got[0]
        if not 0 < length <= len(data):
            raise AssertionError("%r: consumed %d bytes of %d" % (data, length, len(data)))
        if answer(data[:length]) != got:
            raise AssertionError("%r: the result depends on bytes past the %d it consumed" % (data, length))
    return got


def proxy_header(data):
    # The first byte picks max_v2 (the v2 block's bound) among a few.
    max_v2 = (0, 12, 36, 1024, 65535)[data[0] % 5] if data else 1024
    _bounded(lambda b: _core.parse_proxy_header(b, max_v2), bytes(data[1:]))


def client_hello(data):
    parse = getattr(_core, "parse_client_hello", None)
    if parse is None:
        return  # the SNI routing branch is not merged yet
    _bounded(parse, bytes(data))


def _config_error(exc):
    message = str(exc)
    if not exc.field or exc.field not in message or "\n" in message:
        raise AssertionError("a ConfigError that does not name its field on one line: %r" % message)


def _spec_parsers():
    return (
        lambda t: values.parse_address(t, "listen", listen=True),
        lambda t: values.parse_address(t, "upstream"),
        lambda t: upstreams.parse_upstream(t),
        lambda t: acl.parse_cidrs(t.split(" ") if " " in t else t, "allow"),
        lambda t: ratelimit.parse_rate(t, "rate_limit_per_ip"),
        lambda t: timewindows.parse_time_windows(t.split(";") if ";" in t else t, "allow_time"),
        lambda t: values.parse_duration(t, "connect_timeout"),
        lambda t: values.parse_size(t, "notsent_lowat"),
        lambda t: options.parse_resolve_interval(t, "resolve_interval"),
        lambda t: values.parse_count(t, "workers"),
    )


def specs(data):
    # The first byte picks the parser; the rest is its text (UTF-8, with
    # what does not decode replaced, so every input is some text).
    if not data:
        return
    parsers = _spec_parsers()
    parse = parsers[data[0] % len(parsers)]
    text = bytes(data[1:]).decode("utf-8", "replace")
    try:
        got = parse(text)
    except values.ConfigError as exc:
        _config_error(exc)
        return
    if data[0] % len(parsers) in (0, 1) and not got[0].startswith("unix:"):
        # A port is ASCII digits: str.isdigit() also takes "８０" and "²".
        port_text = text.strip().rsplit(":", 1)[1]
        if not (port_text.isascii() and port_text.isdigit()):
            raise AssertionError("%r: port %r accepted" % (text, port_text))


_config_path = None


def config(data):
    """A config file's bytes -> load_config: a ProxyConfig or a
    ConfigFileError naming the file (and the key, where there is one)."""
    global _config_path
    if _config_path is None:
        fd, _config_path = tempfile.mkstemp(prefix="fastproxy-fuzz-", suffix=".toml")
        os.close(fd)
    # Options that open or import what they name are not for random text.
    for key in (b"hooks", b"allow_file", b"deny_file", b"access_log", b"takeover", b"stats_token"):
        if key in data:
            return
    with open(_config_path, "wb") as f:
        f.write(data)
    try:
        configfile.load_config(_config_path)
    except values.ConfigError as exc:
        message = str(exc)
        if not message.startswith(_config_path) or "\n" in message:
            raise AssertionError("a config error that does not name the file on one line: %r" % message)


TARGETS = {"proxy_header": proxy_header, "client_hello": client_hello, "specs": specs, "config": config}
