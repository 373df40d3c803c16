"""IP rules: CIDRs and rule files -> networks, checked in the data plane
(fastproxy._core.AccessList: sorted merged ranges, one binary search per
new client). Mistakes are ConfigErrors naming the field and the value."""

from __future__ import annotations

import ipaddress
import os
from typing import Iterable, List, Tuple, Union

from .values import ConfigError

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


def read_rule_file(path: Union[str, os.PathLike], field: str) -> List[Network]:
    """One rule per line; '#' starts a comment; blank lines are skipped.
    A bad line is reported as FILE:LINE."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(field, os.fspath(path), f"cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(field, os.fspath(path), "is not a UTF-8 text file") from None
    rules = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{os.fspath(path)}:{number}"
        if len(text.split()) > 1:
            raise ConfigError(field, where, f"{text!r}: one rule per line")
        try:
            rules.append(parse_cidr(text, field))
        except ConfigError as e:
            raise ConfigError(field, where, f"{text!r} {e.problem}") from None
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
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Iterable):
        raise ConfigError(field, paths, "expected a file path or a list of them")
    rules: List[Network] = []
    for path in paths:
        rules.extend(read_rule_file(path, field))
    return tuple(rules)
