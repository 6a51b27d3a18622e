"""Redis encodings whose cost per field does not grow with the set (proxy/keys.py).

The lease index's anchor (LEASE_ANCHOR): every reserve, alone or in a batch, keeps the index a
skiplist, and the anchor is never due: the sweeper never sees it, and an index whose leases are
all settled still holds it. A window hash's marker value (WINDOW_MARKER): every write keeps the
hash a hashtable. (The cluster store's keys: tests/stores/test_cluster.py.)"""

from __future__ import annotations

import asyncio
import math

import redis as redis_sync

from proxy.keys import LEASE_ANCHOR, WINDOW_MARKER, leases_key
from proxy.stores import Status, open_store

from .batches import DUE, FREE, LIMITED, NOW_MS, in_one_batch

LEASES = leases_key("bp")


def _index(client) -> tuple[bytes, list]:
    return client.object("encoding", LEASES), client.zrange(LEASES, 0, -1, withscores=True)


async def test_a_single_reserve_makes_the_lease_index_a_skiplist_with_its_anchor_never_due(redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    store = open_store(redis_url)
    try:
        assert (await store.reserve("one", LIMITED, 5, 5, DUE, False)).status == Status.ADMITTED
        encoding, members = _index(client)
        assert encoding == b"skiplist"
        assert members == [(b"one", float(DUE)), (LEASE_ANCHOR.encode(), math.inf)]
        # The sweeper, however late it looks, is given the reservation and never the anchor.
        assert [e.id for e in await store.expired(2 ** 62, 100)] == ["one"]
        assert await store.expire("one", LIMITED, True, NOW_MS)
        assert await store.expired(2 ** 62, 100) == []
        # Every lease settled: the index stays, as a skiplist, holding only its anchor.
        assert _index(client) == (b"skiplist", [(LEASE_ANCHOR.encode(), math.inf)])
    finally:
        await store.close()


async def test_a_batch_of_reserves_makes_the_lease_index_a_skiplist(redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    store = open_store(redis_url)
    try:
        ids = [f"b{i}" for i in range(6)]
        # The batch is the index's first writer: the call holding the one in-flight slot while
        # the reserves queue is a commit (of an id never reserved), which only removes a lease.
        store._calls.MAX_IN_FLIGHT = 1
        first = store.commit("never-reserved", FREE, 0, 0)
        out = await asyncio.gather(first, *(store.reserve(rid, LIMITED, 1, 1, NOW_MS, False) for rid in ids))
        assert store._calls.batched == len(ids)
        assert [x.status for x in out[1:]] == [Status.ADMITTED] * len(ids)
        encoding, members = _index(client)
        assert encoding == b"skiplist"
        assert set(ids) <= {m.decode() for m, _ in members}
        assert members[-1] == (LEASE_ANCHOR.encode(), math.inf)
        # Their commits, as one batch too, take every lease out and leave the anchor.
        done = await in_one_batch(store, [lambda rid=rid: store.commit(rid, LIMITED, 1, 1) for rid in ids])
        assert done == [True] * len(ids)
        assert [m for m, _ in _index(client)[1] if not m.startswith(b"filler")] == [LEASE_ANCHOR.encode()]
        assert client.object("encoding", LEASES) == b"skiplist"
    finally:
        await store.close()


async def test_an_index_left_as_a_listpack_becomes_a_skiplist_at_the_next_reserve(redis_url):
    # An index written before the anchor existed (or by an operator): small ids, a listpack.
    client = redis_sync.Redis.from_url(redis_url)
    client.zadd(LEASES, {"old": NOW_MS})
    assert client.object("encoding", LEASES) == b"listpack"
    store = open_store(redis_url)
    try:
        assert (await store.reserve("new", LIMITED, 1, 1, NOW_MS + 1, False)).status == Status.ADMITTED
        assert _index(client) == (b"skiplist", [(b"old", float(NOW_MS)), (b"new", float(NOW_MS + 1)),
                                                (LEASE_ANCHOR.encode(), math.inf)])
    finally:
        await store.close()


def test_the_anchor_is_longer_than_a_listpack_member_may_be():
    # Redis's default zset-max-listpack-value; a member longer than it makes ZADD create (or
    # convert to) a skiplist. An id the gateway makes is hexadecimal: never the anchor.
    assert len(LEASE_ANCHOR.encode()) > 64 and " " in LEASE_ANCHOR


def _windows(client) -> dict[bytes, bytes]:
    return {k: client.object("encoding", k) for k in client.keys("{bp}:w:*")}


async def test_single_calls_and_batches_keep_every_window_hash_a_hashtable(redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    store = open_store(redis_url)
    try:
        assert (await store.reserve("one", LIMITED, 5, 5, NOW_MS, False)).status == Status.ADMITTED
        assert _windows(client) == {b"{bp}:w:day": b"hashtable", b"{bp}:w:month": b"hashtable"}
        assert client.hget("{bp}:w:day", "_") == WINDOW_MARKER.encode()
        assert await store.commit("one", LIMITED, 5, 5)
        # A batch is the first writer of the hashes it makes (its first call only settles).
        client.delete("{bp}:w:day", "{bp}:w:month")
        store._calls.MAX_IN_FLIGHT = 1
        first = store.commit("never-reserved", FREE, 0, 0)
        out = await asyncio.gather(first, *(store.reserve(f"b{i}", LIMITED, 1, 1, NOW_MS, False) for i in range(4)))
        assert store._calls.batched == 4 and [x.status for x in out[1:]] == [Status.ADMITTED] * 4
        windows = _windows(client)
        assert windows == {b"{bp}:w:day": b"hashtable", b"{bp}:w:month": b"hashtable"}
    finally:
        await store.close()


async def test_a_window_hash_left_as_a_listpack_becomes_a_hashtable_at_its_next_write(redis_url):
    # A hash written before the marker's long value (its marker "1"): a listpack.
    client = redis_sync.Redis.from_url(redis_url)
    client.hset("{bp}:w:day", mapping={"_": "1", "user:old": b"\0" * 32})
    client.pexpireat("{bp}:w:day", NOW_MS + 60_000)
    assert client.object("encoding", "{bp}:w:day") == b"listpack"
    store = open_store(redis_url)
    try:
        assert (await store.reserve("new", LIMITED, 1, 1, NOW_MS + 1, False)).status == Status.ADMITTED
        assert client.object("encoding", "{bp}:w:day") == b"hashtable"
        assert client.hget("{bp}:w:day", "user:old") == b"\0" * 32          # kept, and not new: the
        assert client.pexpiretime("{bp}:w:day") == NOW_MS + 60_000         # expiry was not set again
    finally:
        await store.close()


def test_the_marker_is_longer_than_a_listpack_value_may_be():
    assert len(WINDOW_MARKER.encode()) > 64                 # Redis's default hash-max-listpack-value


async def test_an_extension_that_makes_the_lease_index_again_makes_it_a_skiplist(redis_url):
    # The index lost (an operator's DEL, eviction) while a long stream runs: its lease renewal
    # is the index's first writer.
    client = redis_sync.Redis.from_url(redis_url)
    store = open_store(redis_url)
    try:
        assert (await store.reserve("long", LIMITED, 1, 1, NOW_MS, False)).status == Status.ADMITTED
        client.delete(LEASES)
        assert await store.extend("long", NOW_MS + 60_000)
        assert _index(client) == (b"skiplist", [(b"long", float(NOW_MS + 60_000)), (LEASE_ANCHOR.encode(), math.inf)])
    finally:
        await store.close()
