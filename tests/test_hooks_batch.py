"""on_data when one read holds several chunks: a hooked flow reads up to
256 KiB at once and sends the answers in one go, but on_data still sees each
chunk (at most 64 KiB, plus what WAIT held) in order; WAIT, CLOSE and raising
in the middle of a read keep their meaning for the chunks around them.

Each test stalls its first on_data call so that data piles up in the proxy's
socket: the next read then takes several chunks at once."""
import os
import threading
import time

import pytest

from fastproxy import CLOSE, WAIT, CloseReason, Direction
from support.hooks import Recorder
from support.servers import Listener
from support.sockets import MiB, connect, read_all, recv_exact

CHUNK = 64 * 1024
STALL_S = 0.3


class Calls:
    """Records on_data's calls in one direction; the first one stalls."""

    def __init__(self, answer):
        self.answer = answer
        self.seen = []
        self.lock = threading.Lock()

    def __call__(self, conn, direction, data):
        if direction != Direction.UPSTREAM:
            return None
        with self.lock:
            first = not self.seen
            self.seen.append(bytes(data))
        if first:
            time.sleep(STALL_S)
        return self.answer(data)


def _sink(srv, n_expected=None, timeout=10.0):
    """Accepts one bridge and reads what reaches the upstream until EOF."""
    with srv.accept() as s:
        if n_expected is not None:
            return recv_exact(s, n_expected)
        data, how = read_all(s, timeout=timeout)
        assert how is not None, "the upstream side was not closed"
        return data


def test_chunks_stay_64k_in_order_when_reads_are_bigger(make_proxy):
    calls = Calls(lambda data: None)
    payload = os.urandom(2 * MiB)
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=calls)
        with connect(p.address) as c:
            c.sendall(payload)
            assert _sink(srv, len(payload)) == payload
    sizes = [len(d) for d in calls.seen]
    assert max(sizes) <= CHUNK, sizes
    assert b"".join(calls.seen) == payload


def test_rewrites_of_one_read_are_sent_in_order(make_proxy):
    # Every other call rewrites its chunk (longer), the rest pass: the
    # answers of one read mix both.
    rewrite = {}

    def answer(data):
        rewrite[len(rewrite)] = on = len(rewrite) % 2 == 1
        return b"<" + data.upper() + b">" if on else None

    calls = Calls(answer)
    payload = bytes(range(97, 123)) * (MiB // 26)
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=calls)
        with connect(p.address) as c:
            c.sendall(payload)
            c.shutdown(1)
            got = _sink(srv)
    assert b"".join(calls.seen) == payload
    assert len(calls.seen) >= 4
    expected = b"".join(b"<" + d.upper() + b">" if rewrite[i] else d for i, d in enumerate(calls.seen))
    assert got == expected


def test_wait_joins_chunks_across_and_within_reads(make_proxy):
    """on_data holds until it has 150 KiB (or the final b"!"), then rewrites
    it all. Holds end inside a read (the answered chunks go out, the rest
    waits for the next read) and span reads."""
    size = 150 * 1024

    def answer(data):
        return data.upper() if len(data) >= size or data.endswith(b"!") else WAIT

    calls = Calls(answer)
    payload = b"m" * (2 * MiB) + b"!"
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=calls, max_hold=MiB)
        with connect(p.address) as c:
            c.sendall(payload)
            assert _sink(srv, len(payload)) == payload.upper()
    sizes = [len(d) for d in calls.seen]
    assert any(n > CHUNK for n in sizes), "no call saw held data joined to the next chunk"
    assert max(sizes) < size + CHUNK


@pytest.mark.parametrize("how", ["close", "raise"])
def test_close_in_a_read_sends_what_was_answered_before(make_proxy, how):
    marker = b"!"

    def answer(data):
        if marker not in data:
            return None
        if how == "close":
            return CLOSE
        raise RuntimeError("marker seen")

    calls = Calls(answer)
    rec = Recorder()
    # The marker sits well past the first read, after chunks of the same
    # read that on_data forwards.
    payload = b"a" * (600 * 1024) + marker + b"b" * (300 * 1024)
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=calls, on_close=rec)
        with connect(p.address) as c:
            c.sendall(payload)
            got = _sink(srv)
    closing = next(i for i, d in enumerate(calls.seen) if marker in d)
    assert closing == len(calls.seen) - 1, "on_data was called past CLOSE"
    assert got == b"".join(calls.seen[:closing])
    assert len(got) > len(calls.seen[0]), "the closing chunk shared no read with answered ones"
    r = rec.one()
    assert r.reason == (CloseReason.HOOK_CLOSED if how == "close" else CloseReason.HOOK_ERROR)
    assert r.bytes_upstream == len(got)


def test_held_data_past_max_hold_within_one_read_closes(make_proxy):
    hold = 100 * 1024
    calls = Calls(lambda data: WAIT)
    rec = Recorder()
    with Listener() as srv:
        p = make_proxy(srv.addr, on_data=calls, on_close=rec, max_hold=hold)
        with connect(p.address) as c:
            c.sendall(b"x" * (512 * 1024))
            assert _sink(srv) == b""
    assert rec.one().reason == CloseReason.HOOK_CLOSED
    assert max(len(d) for d in calls.seen) < hold + CHUNK
