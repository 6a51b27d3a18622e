"""The tests' own redis-server (tests/redis_server.py) starts even when its free port is taken
before it binds: the suite's connections draw source ports from the same range."""

from __future__ import annotations

import socket

from .redis_server import RedisServer


def test_a_server_whose_port_is_taken_before_it_binds_starts_on_another_and_restarts_on_that():
    server = RedisServer()
    taken = server.port
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        server.start()
        try:
            assert server.port != taken
            assert server.command("PING").startswith(b"+PONG")
            server.stop()
            server.start()                          # a restart keeps the port it ran on
            assert server.command("PING").startswith(b"+PONG")
        finally:
            server.stop()
