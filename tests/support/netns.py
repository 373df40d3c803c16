"""A network namespace joined to this one by a veth pair, for a peer that
is not loopback without leaving the machine: NS_SIDE in the namespace,
HOST_SIDE here. Needs root and iproute2 (the caller skips otherwise)."""
import contextlib
import os
import shutil
import subprocess
import uuid

# A private range no host route uses: it exists only on the veth pair.
HOST_SIDE, NS_SIDE = "10.211.0.1", "10.211.0.2"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def unavailable():
    """None where veth_namespace() can run, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("ip") is None:
        return "a network namespace needs root and iproute2"
    return None


@contextlib.contextmanager
def veth_namespace():
    """Yields the namespace's name; raises RuntimeError (with ip's words)
    where one cannot be made."""
    name = "fp" + uuid.uuid4().hex[:8]
    host_if, ns_if = name + "a", name + "b"
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"cannot make a network namespace here: {exc.stderr.strip()}") from None
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", HOST_SIDE + "/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", name, "ip", "addr", "add", NS_SIDE + "/30", "dev", ns_if)
        ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
        yield name
    finally:
        ip("link", "del", host_if, check=False)
        ip("netns", "del", name, check=False)
