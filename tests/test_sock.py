"""Proxy(sock=...): serving on a listening socket the application bound."""
import os
import socket

import pytest

from fastproxy import ConfigError, Proxy
from support.procfs import proc_fd_count
from support.sockets import echo_roundtrip
from support.waits import stop_bounded


def _listening(family=socket.AF_INET, host="127.0.0.1"):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(16)
    return s


def test_serves_on_the_applications_socket_and_leaves_it_open(engine, echo_server):
    with _listening() as app:
        p = Proxy(sock=app, upstream=echo_server.addr, engine=engine)
        p.start()
        try:
            assert p.address == app.getsockname()
            assert p.config.listener.listen == app.getsockname()
            assert echo_roundtrip(app.getsockname(), b"adopted") == b"adopted"
        finally:
            stop_bounded(p, timeout=1)
        assert p.stats()["accepted"] == 1
        # The proxy closed its duplicate only: the socket is still the
        # application's, bound and listening.
        assert app.fileno() >= 0
        assert app.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert app.getsockname()[1] == p.address[1]


@pytest.mark.linux_only
def test_the_duplicate_is_made_at_start_and_closed_at_stop(any_engine, echo_server):
    """Constructing (or failing to construct) holds no descriptor; start()
    takes one, stop() gives it back."""
    with _listening() as app:
        before = proc_fd_count(os.getpid())
        with pytest.raises(ConfigError):
            Proxy(sock=app, upstream=echo_server.addr, engine=any_engine, health_check=5)
        p = Proxy(sock=app, upstream=echo_server.addr, engine=any_engine, workers=1)
        assert proc_fd_count(os.getpid()) == before
        p.start()
        assert proc_fd_count(os.getpid()) > before
        stop_bounded(p, timeout=1)
        assert proc_fd_count(os.getpid()) == before
        assert app.fileno() >= 0


@pytest.mark.parametrize("make,problem", [
    (lambda: "127.0.0.1:0", "expected a socket.socket"),
    (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "must be a stream socket"),
    (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), "must be bound and listening"),
])
def test_bad_sockets_are_config_errors(any_engine, make, problem):
    bad = make()
    try:
        with pytest.raises(ConfigError) as exc:
            Proxy(sock=bad, upstream="127.0.0.1:9", engine=any_engine)
        assert exc.value.field == "sock" and problem in str(exc.value)
    finally:
        if isinstance(bad, socket.socket):
            bad.close()


def test_listen_and_sock_together_is_a_config_error(any_engine):
    with _listening() as app:
        with pytest.raises(ConfigError, match="either listen or sock"):
            Proxy("127.0.0.1:0", "127.0.0.1:9", sock=app, engine=any_engine)


def test_without_listen_or_sock_listen_is_required(any_engine):
    with pytest.raises(ConfigError) as exc:
        Proxy(upstream="127.0.0.1:9", engine=any_engine)
    assert exc.value.field == "listen"
