"""Fixtures of the cluster store tests: a cluster of a test's own, every write on the wire."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from ..redis_cluster import RedisCluster


@pytest.fixture
def writes(monkeypatch):
    """Every write on a redis-py asyncio connection: (port, bytes)."""
    seen: list[tuple[int, bytes]] = []
    send = Connection.send_packed_command

    async def spy(self, command, check_health=True):
        data = command.encode() if isinstance(command, str) else command if isinstance(command, bytes) else b"".join(command)
        seen.append((self.port, data))
        return await send(self, command, check_health)
    monkeypatch.setattr(Connection, "send_packed_command", spy)
    return seen


@pytest.fixture
def own_cluster():
    """A cluster of the test's own, for the tests that move a slot or kill a node."""
    cluster = RedisCluster()
    cluster.start()
    yield cluster
    cluster.stop()
