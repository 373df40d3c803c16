"""Bounded waits: for a condition, for proxy stats, for Proxy.stop()."""
import threading
import time


def wait_for(pred, timeout, interval=0.02):
    """Poll pred() until it returns a truthy value or timeout passes; return last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_stat(proxy, key, value, timeout=3.0):
    """Wait until proxy.stats()[key] == value; return the last stats dict."""
    deadline = time.monotonic() + timeout
    while True:
        st = proxy.stats()
        if st.get(key) == value or time.monotonic() >= deadline:
            return st
        time.sleep(0.02)


def wait_idle(proxy, timeout=5.0):
    """Until the proxy holds no bridge."""
    assert wait_for(lambda: proxy.stats()["active"] == 0, timeout), proxy.stats()


def stop_bounded(proxy, timeout=None, limit=30.0):
    """proxy.stop(timeout) on a thread; fail if it does not return within limit seconds.
    Returns the seconds stop() took."""
    result = {}

    def run():
        t0 = time.monotonic()
        try:
            proxy.stop(timeout) if timeout is not None else proxy.stop()
        except BaseException as e:  # noqa: B902 - reported to the caller
            result["error"] = e
        result["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        raise AssertionError("Proxy.stop() did not return within %.0fs" % limit)
    if "error" in result:
        raise result["error"]
    return result["took"]
