"""IP rules: CIDRs and rule files -> networks, checked in the data plane
(fastproxy._core.AccessList: sorted merged ranges, one binary search per
new client). Mistakes are ConfigErrors naming the field and the value."""

from __future__ import annotations

import ipaddress
import os
import stat
from typing import Iterable, List, Tuple, Union

from .values import ConfigError, quote, refuse_nul

__all__ = ["Network", "parse_cidr", "parse_cidrs", "parse_rule_files", "read_rule_file"]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

CIDR_HINT = "use 10.0.0.0/8, 192.0.2.7, 2001:db8::/32 or ::1"


def parse_cidr(value: object, field: str) -> Network:
    """'10.0.0.0/8', '2001:db8::/32', or a bare address (/32, /128) -> a
    network. ipaddress networks and addresses pass through."""
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_network(value)
    if not isinstance(value, str):
        raise ConfigError(field, value, f"expected an address or network ({CIDR_HINT})")
    text = value.strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(field, value, f"is not an IP address or network ({CIDR_HINT})") from None
    # 10.1.2.3/8 is more likely a typo than a wish for 10.0.0.0/8: say so.
    raise ConfigError(field, value, f"has bits set after the /{loose.prefixlen} prefix; did you mean {loose}?")


# A rule file holds a million rules at most, each on a line with room for
# a comment: more is not a rule file (/dev/zero, a log given by mistake),
# and is refused before it is read into memory.
MAX_RULE_FILE = 32 << 20
MAX_RULE_LINE = 1024


def read_rule_file(path: Union[str, os.PathLike], field: str) -> List[Network]:
    """One rule per line; '#' starts a comment; blank lines are skipped.
    A bad line is reported as FILE:LINE. Only a regular file of at most
    MAX_RULE_FILE bytes, lines of at most MAX_RULE_LINE: a device or a FIFO
    could be endless, or block the start (or a reload) until written to."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise ConfigError(field, path, "expected a file path")
    shown = os.fspath(path)
    refuse_nul(shown, field)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once, so
        # fstat can refuse it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(field, shown, f"cannot be read: {e.strerror}") from None
    # Closed here whatever happens: open() of a directory's fd raises
    # without closing it, and a refused file must not cost an fd.
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(field, shown, "is a directory, not a rule file")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(field, shown, "is not a regular file (a rule file must be one)")
        if st.st_size > MAX_RULE_FILE:
            raise ConfigError(field, shown, f"is {st.st_size} bytes: a rule file has at most {MAX_RULE_FILE}")
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read(MAX_RULE_FILE + 1)   # a file that grew meanwhile stops here
        except OSError as e:
            raise ConfigError(field, shown, f"cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_RULE_FILE:
        raise ConfigError(field, shown, f"is larger than {MAX_RULE_FILE} bytes: a rule file has at most that")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(field, shown, "is not a UTF-8 text file") from None
    rules = []
    for number, line in enumerate(lines, 1):
        where = f"{shown}:{number}"
        if len(line) > MAX_RULE_LINE:
            raise ConfigError(field, where, f"the line is {len(line)} characters long: at most {MAX_RULE_LINE}")
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if len(text.split()) > 1:
            raise ConfigError(field, where, f"{quote(text)}: one rule per line")
        try:
            rules.append(parse_cidr(text, field))
        except ConfigError as e:
            raise ConfigError(field, where, f"{quote(text)} {e.problem}") from None
    return rules


def parse_cidrs(values: object, field: str) -> Tuple[Network, ...]:
    """A list of CIDRs (one string is a list of one)."""
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    return tuple(parse_cidr(v, field) for v in values)


def parse_rule_files(paths: object, field: str) -> Tuple[Network, ...]:
    """Rule files (one path is a list of one) -> the rules they hold."""
    if paths is None:
        return ()
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Iterable):
        raise ConfigError(field, paths, "expected a file path or a list of them")
    rules: List[Network] = []
    for path in paths:
        rules.extend(read_rule_file(path, field))
    return tuple(rules)
