"""Balancing end to end: real proxies, real loopback upstreams that say who they
are (support.servers.TagServer), both engines. Distribution, smooth order,
leastconn, consistent source hashing, backup and weight 0, and the CLI flags."""
from collections import Counter

import pytest

from support.balance import ask_many, ustats
from support.cli import run_cli
from support.servers import Servers, open_tagged, which
from support.sockets import how_closed, ipv6_available
from support.waits import wait_for, wait_idle

# ---------------------------------------------------------------- distribution


def test_roundrobin_weights_1_2_3_exact(make_proxy):
    with Servers(3) as srv:
        p = make_proxy(upstreams=[srv["A"].addr + "@1", srv["B"].addr + "@2", srv["C"].addr + "@3"],
                       workers=1)
        got = Counter(ask_many(p.address, 600))
        assert got == {"A": 100, "B": 200, "C": 300}
        wait_idle(p)
        assert {n: ustats(p, srv[n])["accepted"] for n in "ABC"} == {"A": 100, "B": 200, "C": 300}


def test_random_weights_1_2_3_within_tolerance(make_proxy):
    # Tolerance: each share within 48 of weight/6 of 600 (4 standard
    # deviations of the widest share, C's); equal shares (200 each) fail.
    # Each client comes once the bridge before it closed: of two draws the
    # lighter is taken, and a bridge still open would skew the shares.
    with Servers(3) as srv:
        p = make_proxy(upstreams=[srv["A"].addr + "@1", srv["B"].addr + "@2", srv["C"].addr + "@3"],
                       balance="random")
        got = Counter(ask_many(p.address, 600, settle=p))
        assert sum(got.values()) == 600
        for name, expected in zip("ABC", (100, 200, 300)):
            assert abs(got[name] - expected) <= 48, got


def test_smooth_roundrobin_5_1_1_interleaves(make_proxy):
    with Servers(3) as srv:
        p = make_proxy(upstreams=[srv["A"].addr + "@5", srv["B"].addr, srv["C"].addr], workers=1)
        order = "".join(ask_many(p.address, 14))
        # nginx's smooth order: never five A in a row, B and C spread out.
        assert order == "AABACAA" * 2, order


# ---------------------------------------------------------------- leastconn


def test_leastconn_sends_new_clients_to_the_least_loaded(make_proxy):
    with Servers(3) as srv:
        p = make_proxy(upstreams=[s.addr for s in srv], balance="leastconn", workers=2)
        held = {n: [] for n in "ABC"}
        for _ in range(9):
            s, name = open_tagged(p.address)
            held[name].append(s)
        assert [len(held[n]) for n in "ABC"] == [3, 3, 3]
        # Unequal loads: A 3, B 0, C 1.
        for s in held["B"] + held["C"][:2]:
            s.close()
        del held["B"][:], held["C"][:2]
        assert wait_for(lambda: [ustats(p, srv[n])["active"] for n in "ABC"] == [3, 0, 1], 5), \
            p.stats()
        chosen = []
        for _ in range(5):
            before = {n: ustats(p, srv[n])["active"] for n in "ABC"}
            s, name = open_tagged(p.address)
            held[name].append(s)
            chosen.append(name)
            assert before[name] == min(before.values()), (chosen, before)
        assert chosen[0] == "B", chosen
        assert "A" not in chosen, chosen  # A stayed the most loaded throughout
        assert [len(held[n]) for n in "ABC"] == [3, 3, 3]
        for lst in held.values():
            for s in lst:
                s.close()


# ---------------------------------------------------------------- source hashing

SOURCES = ["127.%d.%d.%d" % (1 + k % 7, (k * 37) % 256, 1 + (k * 11) % 250) for k in range(120)]


def mapping(proxies, sources=SOURCES):
    """{source address: upstream name}; each address asked twice, it must stick."""
    v4, v6 = proxies
    out = {}
    for src in sources:
        first = which(v4.address, src)
        assert which(v4.address, src) == first, src
        out[src] = first
    if v6 is not None:
        names = {which(v6.address, "::1") for _ in range(3)}
        assert len(names) == 1, names
        out["::1"] = names.pop()
    return out


def source_proxies(make_proxy, upstreams, **kw):
    v4 = make_proxy(upstreams=upstreams, balance="source", **kw)
    v6 = make_proxy(upstreams=upstreams, balance="source", listen="[::1]:0", **kw) \
        if ipv6_available() else None
    return v4, v6


def test_source_hashing_sticks_and_removing_one_moves_only_its_clients(make_proxy):
    with Servers(5) as srv:
        addrs = [s.addr for s in srv]
        full = mapping(source_proxies(make_proxy, addrs))
        spread = Counter(full.values())
        assert set(spread) == set("ABCDE") and min(spread.values()) >= 8, spread
        gone = "C"
        # A group built without C: exactly C's clients move.
        without = mapping(source_proxies(make_proxy, [a for a in addrs if a != srv[gone].addr]))
        moved = {a for a in full if full[a] != without[a]}
        assert moved == {a for a in full if full[a] == gone}, (moved, full, without)
        # The full group with C refusing: its clients fail over to the same
        # upstreams as above (next owner on the ring), no other client moves.
        srv[gone].stop_listening()
        down = mapping(source_proxies(make_proxy, addrs, fail_timeout=30))
        assert down == without


# ---------------------------------------------------------------- backup, weight 0


def test_backup_only_when_no_regular_upstream_is_available(make_proxy):
    with Servers(3) as srv:
        p = make_proxy(upstreams=[srv["A"].addr, srv["B"].addr, srv["C"].addr + ",backup"],
                       fail_timeout=0.3, workers=1)
        assert set(ask_many(p.address, 20)) == {"A", "B"}
        srv["A"].stop_listening()
        srv["B"].stop_listening()
        assert ask_many(p.address, 20) == ["C"] * 20  # no client saw a failure
        st = p.stats()
        assert st["connect_failures"] == 0
        assert [st["upstreams"][srv[n].addr]["state"] for n in "AB"] == ["down", "down"]
        srv["A"].listen_again()
        # After fail_timeout A is probed by a client, and the regulars take over again.
        assert wait_for(lambda: which(p.address) == "A", 3)
        assert ask_many(p.address, 5) == ["A"] * 5  # B is still down: no C either
        assert ustats(p, srv["A"])["state"] == "up"


def test_weight_zero_is_drained_and_backup_covers_it(make_proxy):
    with Servers(3) as srv:
        p = make_proxy(upstreams=[srv["A"].addr + "@0", srv["B"].addr, srv["C"].addr], workers=1)
        assert Counter(ask_many(p.address, 20)) == {"B": 10, "C": 10}
        assert ustats(p, srv["A"])["state"] == "drained"
        assert ustats(p, srv["A"])["accepted"] == 0 and srv["A"].accepted == 0
        q = make_proxy(upstreams=[srv["A"].addr + "@0", srv["B"].addr + ",backup"])
        assert ask_many(q.address, 5) == ["B"] * 5


def test_nothing_available_closes_clients_at_once(make_proxy):
    with Servers(1) as srv:
        p = make_proxy(upstreams=[srv["A"].addr + "@0"])
        for _ in range(3):
            assert how_closed(p.address, timeout=2.0) == "reset"
        assert srv["A"].accepted == 0
        wait_idle(p)
        assert p.stats()["queued"] == 0


# ---------------------------------------------------------------- CLI


def test_cli_group_flags_parse_and_balance(cli_proxy):
    with Servers(3) as srv:
        cp = cli_proxy("--listen", "127.0.0.1:0", "--workers", "1",
                       "--upstream", srv["A"].addr + "@2,max-connections=10",
                       "--upstream", srv["B"].addr, "--upstream", srv["C"].addr + ",backup",
                       "--balance", "roundrobin", "--retries", "1", "--max-fails", "2",
                       "--fail-timeout", "500ms", "--health-interval", "1s",
                       "--health-timeout", "200ms", "--health-rise", "1", "--health-fall", "2",
                       "--max-connections", "50", "--max-connections-per-ip", "20",
                       "--on-limit", "reject", "--queue-size", "8", "--queue-timeout", "2s")
        assert Counter(ask_many(cp.connect_addr(), 30)) == {"A": 20, "B": 10}


@pytest.mark.parametrize("args, needle", [
    (["--upstream", "h:1@999"], "--upstream"),
    (["--upstream", "h:1,foo"], "--upstream"),
    (["--upstream", "h:1,max-connections=0"], "--upstream"),
    (["--upstream", "127.0.0.1:1", "--balance", "fastest"], "--balance"),
    (["--upstream", "127.0.0.1:1", "--on-limit", "drop"], "--on-limit"),
    (["--upstream", "127.0.0.1:1", "--max-connections", "-1"], "--max-connections"),
])
def test_cli_bad_group_flags_exit_2_with_one_line(any_engine, args, needle):
    rc, out, err = run_cli(["--listen", "127.0.0.1:0", "--engine", any_engine] + args, timeout=20)
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
