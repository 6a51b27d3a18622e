"""The Redis store packs commands with hiredis's C packer (redis-py's asyncio connection packs in
Python, ~40 % of the client's CPU under load): the bytes on the wire must be exactly redis-py's,
and what the C packer cannot take must behave exactly as redis-py does."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError

from proxy.stores import open_store
from proxy.stores.redis import _CPacked

# The kinds of argument the store sends: the command name, a sha, keys, ints (negative, large),
# strings with non-ASCII text, bytes, floats (zrangebyscore bounds), a two-word command.
COMMANDS = [
    ("EVALSHA", "a" * 40, 3, "{bp}:r:abc", "{bp}:leases", "{bp}:w:day", "abc", 1200, -1, 2**53 + 1,
     "0", '{"user":"ümlaut ✓"}', b"\x00\xff raw", "r", 5, -2),
    ("ZRANGEBYSCORE", "{bp}:leases", "-inf", 1_700_000_000_123, "LIMIT", 0, 100),
    ("ZADD", "k", 0.1, "m", 1e20, "n", 1 / 3, "o"),
    ("XINFO STREAM", "{bp}:log"),
    ("SET", "k", "x" * 10_000),                          # over redis-py's chunking cutoff
]


@pytest.fixture
async def conn(redis_url):
    store = open_store(redis_url)
    yield store._r.connection_pool.make_connection()
    await store.close()


def test_the_store_s_connections_pack_in_c(conn):
    assert isinstance(conn, _CPacked)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_the_packed_bytes_are_redis_py_s(conn, command):
    python = aioredis.Connection(encoder_class=type(conn.encoder)).pack_command(*command)
    assert b"".join(conn.pack_command(*command)) == b"".join(python)


def test_arguments_the_c_packer_refuses_behave_as_in_redis_py(conn):
    assert b"".join(conn.pack_command("SET", "k", bytearray(b"v"))) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    with pytest.raises(DataError):
        conn.pack_command("SET", "k", True)
    with pytest.raises(DataError):
        conn.pack_command("SET", "k", None)


async def test_non_ascii_arguments_round_trip_through_the_server(redis_url):
    store = open_store(redis_url)
    try:
        await store._r.set("{bp}:packing", "ümlaut ✓ 日本")
        assert (await store._r.get("{bp}:packing")).decode() == "ümlaut ✓ 日本"
    finally:
        await store._r.delete("{bp}:packing")
        await store.close()
