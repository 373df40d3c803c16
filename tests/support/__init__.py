"""Helpers for the fastproxy tests, one module per job:

sockets  client sockets: addresses, connecting, bounded reads
servers  Listener, EchoServer, TagServer (an upstream that names itself)
procfs   /proc readers (CPU time, fds, limits, TCP sockets): Linux only, so
         the tests that call them are marked linux_only
cli      the CLI in a subprocess, and its one-line errors
waits    bounded waits (conditions, proxy stats, Proxy.stop())
hooks    Recorder, an on_close collector
balance  which upstream clients reach, health checks, per-upstream stats
traffic  verified load: VerifyingServer, StreamLoad (bridges streaming seeded
         data both ways, every byte checked), ConnectLoop (short connections,
         counted by outcome)
overlap  a segment that partially overlaps what the peer already acked
         (TCP_REPAIR; Linux, CAP_NET_ADMIN)
capture  the segments of one port on lo, as sent (a packet socket)
"""
