"""The host's TCP congestion control: which one is active, and switching
it system-wide for a run with the old one put back whatever happens.

On loopback the congestion control changes the ranking of the proxies
(docs/benchmarks.md, Congestion control), so every result records it."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, List

# Tests point this at a directory of their own, to check the switching and
# restoring without touching the host's setting.
SYSCTL = Path(os.environ.get("FASTPROXY_BENCH_SYSCTL", "/proc/sys/net/ipv4"))
ACTIVE = SYSCTL / "tcp_congestion_control"
AVAILABLE = SYSCTL / "tcp_available_congestion_control"


class CongestionError(Exception):
    """The switch cannot be made here; the message is one line for the user."""


def active() -> str:
    """The active algorithm, or "" where /proc does not say (not Linux)."""
    try:
        return ACTIVE.read_text().strip()
    except OSError:
        return ""


def available() -> List[str]:
    try:
        return AVAILABLE.read_text().split()
    except OSError:
        return []


def parse_list(text: str) -> List[str]:
    """--congestion-control's value: names, comma-separated, each once, all
    loaded in this kernel, and a process that may set them."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CongestionError(f"--congestion-control: no algorithm named in {text!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CongestionError(f"--congestion-control: {', '.join(dup)} named twice in {text!r}")
    have = available()
    missing = [n for n in names if n not in have]
    if missing:
        # Modules load on first use by name only for root with autoload on,
        # so say how to load one rather than guess.
        raise CongestionError(
            f"--congestion-control: {', '.join(missing)} not available here "
            f"(tcp_available_congestion_control: {' '.join(have) or 'unreadable'}); "
            f"try modprobe tcp_{missing[0]}")
    if not os.access(ACTIVE, os.W_OK):
        raise CongestionError(f"--congestion-control {text}: switching "
                              f"net.ipv4.tcp_congestion_control needs root")
    return names


def set_active(name: str) -> None:
    try:
        ACTIVE.write_text(name + "\n")
    except OSError as e:
        raise CongestionError(f"--congestion-control: cannot set "
                              f"net.ipv4.tcp_congestion_control to {name}: {e.strerror}") from None


@contextlib.contextmanager
def switched(name: str) -> Iterator[str]:
    """The block runs with `name` active system-wide; the old value is put
    back on the way out, exceptions (KeyboardInterrupt, which run.py makes
    of SIGTERM and SIGHUP too) included."""
    old = active()
    if name == old:
        yield name
        return
    set_active(name)
    try:
        yield name
    finally:
        set_active(old)
