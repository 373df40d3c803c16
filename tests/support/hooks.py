"""A collector for on_close records: every wait on it is bounded."""
import threading
import time

# on_close records arrive in batches shortly after a bridge ends.
RECORD_WAIT_S = 3.0


class Recorder:
    """An on_close hook that keeps every (conn, record) it is given."""

    def __init__(self):
        self._cond = threading.Condition()
        self.calls = []  # (conn, record)

    def __call__(self, conn, record):
        with self._cond:
            self.calls.append((conn, record))
            self._cond.notify_all()

    @property
    def records(self):
        with self._cond:
            return [r for _, r in self.calls]

    def wait(self, n=1, timeout=RECORD_WAIT_S):
        """Wait until at least n records came; return all records (fails if fewer)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.calls) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%d on_close record(s) after %.1f s, want %d: %r"
                                         % (len(self.calls), timeout, n, self.calls))
                self._cond.wait(left)
            return [r for _, r in self.calls]

    def one(self, timeout=RECORD_WAIT_S):
        """Wait for the first record and return it; fail if a second one follows soon."""
        recs = self.wait(1, timeout)
        time.sleep(0.05)
        recs = self.records
        assert len(recs) == 1, "want one on_close record, got %r" % (recs,)
        return recs[0]
