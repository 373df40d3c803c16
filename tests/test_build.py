"""The extension is the build it claims to be: a portable build
(FASTPROXY_FORCE_PORTABLE=1) has only what any POSIX platform has, and
refuses what it lacks as a platform without it would; a normal build on
Linux has the epoll engine."""
import sys

import pytest

from fastproxy import ConfigError, Proxy, _core


@pytest.mark.skipif(not _core.PORTABLE, reason="not a portable build")
def test_portable_build_has_only_the_poll_engine():
    assert _core.ENGINES == ("poll",)
    assert not _core.HAVE_NOTSENT_LOWAT
    assert not _core.HAVE_KEEPALIVE_TIMERS   # tcp_keepalive = on only
    assert not _core.HAVE_TCP_USER_TIMEOUT


@pytest.mark.skipif(not _core.PORTABLE, reason="not a portable build")
@pytest.mark.parametrize("value", ["64k", 1])
def test_portable_build_refuses_notsent_lowat(value):
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", notsent_lowat=value)
    assert "notsent_lowat" in str(info.value) and "TCP_NOTSENT_LOWAT" in str(info.value)


@pytest.mark.skipif(not _core.PORTABLE, reason="not a portable build")
def test_portable_build_refuses_tcp_user_timeout():
    with pytest.raises(ConfigError) as info:
        Proxy("127.0.0.1:0", "127.0.0.1:9", tcp_user_timeout="30s")
    assert str(info.value).startswith("tcp_user_timeout: '30s': ") and "TCP_USER_TIMEOUT" in str(info.value)
    Proxy("127.0.0.1:0", "127.0.0.1:9", tcp_user_timeout="off")


@pytest.mark.skipif(not _core.PORTABLE, reason="not a portable build")
def test_portable_build_refuses_the_epoll_engine():
    p = Proxy("127.0.0.1:0", "127.0.0.1:9", engine="epoll")
    with pytest.raises(ConfigError, match="engine.*not available here"):
        p.engine   # what start() resolves first


@pytest.mark.skipif(_core.PORTABLE or not sys.platform.startswith("linux"),
                    reason="a normal build on Linux only")
def test_linux_build_has_epoll_and_notsent_lowat():
    assert _core.ENGINES == ("epoll", "kernel", "poll")
    assert _core.HAVE_NOTSENT_LOWAT
    assert _core.HAVE_KEEPALIVE_TIMERS
    assert Proxy("127.0.0.1:0", "127.0.0.1:9", notsent_lowat="64k").config.listener.notsent_lowat == 65536


def test_disabling_notsent_lowat_is_accepted_by_every_build():
    assert Proxy("127.0.0.1:0", "127.0.0.1:9", notsent_lowat=0).config.listener.notsent_lowat == 0
