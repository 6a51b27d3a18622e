"""What the batch tests share (tests/stores/test_batch.py, test_cluster_batch.py,
test_round_trip.py): counters, a mixed sequence of calls of every kind, and running calls as one
batch or one by one."""

from __future__ import annotations

import asyncio
import itertools
import time

from proxy.stores import Counter, Status
from proxy.stores.base import Note

from ..redis_server import dump_keys

NOW_MS = int(time.time() * 1000) + 86_400_000          # keys must not expire during the test
EXPIRE = NOW_MS + 3_600_000
DUE = NOW_MS - 5_000                                   # a lease deadline that has passed at NOW_MS
LIMITED = [Counter("{bp}:w:day", "org:a", 100, -1, EXPIRE), Counter("{bp}:w:day", "user:u", -1, 1000, EXPIRE),
           Counter("{bp}:w:month", "org:a", 150, -1, EXPIRE + 1)]
OTHER = [Counter("{bp}:w:day", "user:v", 40, -1, EXPIRE)]
FREE = [Counter("{bp}:w:day", "user:w", -1, -1, EXPIRE)]
GONE_AT = int(time.time() * 1000) - 60_000            # an expiry already past: PEXPIREAT deletes
PAST = [Counter("{bp}:w:old", "org:a", -1, -1, GONE_AT)]
OLD_RESERVE = [Counter("{bp}:w:old", "org:a", 1000, -1, GONE_AT)]
BAD = [Counter("{bp}:w:bad", "org:a", 100, -1, EXPIRE)]                               # a string key
_fillers = itertools.count()
FILLER_DEADLINE = NOW_MS + 12_345


async def in_one_batch(store, calls):
    """Run the coroutine functions `calls` as one batch: a first, unrelated call takes the only
    in-flight slot, so the others queue (in order) and go out together when it answers. Each
    result is the call's return value or the exception it raised."""
    store._calls.MAX_IN_FLIGHT = 1
    before = store._calls.batched
    filler = store.reserve(f"filler{next(_fillers)}", [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)], 0, 0,
                           FILLER_DEADLINE, False)
    out = await asyncio.gather(filler, *(c() for c in calls), return_exceptions=True)
    assert store._calls.batched - before == len(calls), "the calls did not run as one batch"
    return out[1:]


async def one_by_one(store, calls, order=None):
    """Run `calls` one at a time, in `order` (positions; default: as given); each result in its
    call's position."""
    out = [None] * len(calls)
    for i in range(len(calls)) if order is None else order:
        try:
            out[i] = await calls[i]()
        except Exception as exc:                # noqa: BLE001 - compared with the batch's
            out[i] = exc
    return out


class Describe:
    """A stand-in store for the call lists here: a call returns (kind, id) instead of running."""

    def reserve(self, rid, *args, **kwargs):
        return ("r", rid)

    def commit(self, rid, *args, **kwargs):
        return ("s", rid)

    release = expire = commit


def batch_order(calls_of, size: int | None = None) -> list[int]:
    """The positions of the calls `calls_of(store)` makes, in the order batches of `size` of
    them (None: one batch) run them: in each batch settles first, then reserves, each in their
    order, but a settle of an id reserved earlier in the same batch stays after it, in its place
    among the reserves (the coalescer's `settles_first`, stated again here)."""
    described = [c() for c in calls_of(Describe())]
    size = size or len(described)
    order = []
    for start in range(0, len(described), size):
        settles, rest, reserving = [], [], set()
        for i in range(start, min(start + size, len(described))):
            kind, rid = described[i]
            if kind == "r":
                reserving.add(rid)
                rest.append(i)
            elif rid in reserving:
                rest.append(i)
            else:
                settles.append(i)
        order += settles + rest
    return order


async def setup(store):
    """State the mixed sequence starts from: open reservations, one due for expiry, one the
    sweeper already charged (a late commit corrects it), a window key of the wrong type."""
    assert (await store.reserve("open-a", LIMITED, 30, 100, NOW_MS, False)).status is Status.ADMITTED
    assert (await store.reserve("open-b", LIMITED, 20, 100, NOW_MS, False)).status is Status.ADMITTED
    assert (await store.reserve("due", LIMITED, 10, 50, DUE, False)).status is Status.ADMITTED
    assert (await store.reserve("swept", LIMITED, 5, 10, DUE, False)).status is Status.ADMITTED
    assert await store.expire("swept", LIMITED, True, NOW_MS)
    await store._r.set("{bp}:w:bad", "not a hash")


def mixed(store):
    """Reserves and settles of every kind, in an order where later calls depend on earlier ones.
    In one batch the settles run first (but u1's release, after u1's reserve: batch_order): org
    a's settles leave 50 of its 100 day tokens used and none reserved when r1 runs."""
    s = store
    return [
        lambda: s.reserve("r1", LIMITED, 20, 100, NOW_MS, False),            # admitted
        lambda: s.reserve("r2", LIMITED, 30, 100, NOW_MS, False),            # takes the last of org:a's day
        lambda: s.reserve("r3", LIMITED, 1, 1, NOW_MS, False),               # refused: nothing left
        lambda: s.reserve("r1", LIMITED, 20, 100, NOW_MS, False),            # duplicate id, same batch
        lambda: s.reserve("bad", [*BAD, *LIMITED], 1, 1, NOW_MS, False),     # raises: wrong type
        lambda: s.commit("open-a", LIMITED, 25, 90, Note("ok", "1 2 3 4", "12")),   # frees 5 tokens
        lambda: s.reserve("r4", LIMITED, 5, 10, NOW_MS, False),              # one by one: fits again;
        #                                                                      a batch: refused (see above)
        lambda: s.reserve("r5", LIMITED, 50, 10, NOW_MS, True),              # over, forced
        lambda: s.release("open-b", LIMITED, Note("upstream_error")),
        lambda: s.commit("never-seen", LIMITED, 7, 70),                      # lost record: charged
        lambda: s.expire("due", LIMITED, True, NOW_MS),                        # the sweeper
        lambda: s.commit("swept", LIMITED, 8, 12),                           # late: corrected
        lambda: s.commit("open-a", LIMITED, 25, 90),                         # already settled
        lambda: s.commit("bad-settle", BAD, 1, 1),                           # raises after its SET
        lambda: s.reserve("v1", OTHER, 40, 0, NOW_MS, False),                # a new field, same hash
        lambda: s.reserve("v2", OTHER, 1, 0, NOW_MS, False),                 # refused by v1
        lambda: s.commit("old-lost", PAST, 3, 3),                            # writes, PEXPIREAT past: gone
        lambda: s.reserve("old", OLD_RESERVE, 1, 1, NOW_MS, False),          # sees the hash gone
        lambda: s.commit("old-lost-2", PAST, 4, 4),                          # and again
        lambda: s.reserve("u1", FREE, 3, 3, NOW_MS, False),                  # its undo, same batch:
        lambda: s.release("u1", FREE),                                       # stays after it
    ]


def dump(client) -> dict:
    return dump_keys(client)


def outcome(x):
    return type(x).__name__ if isinstance(x, BaseException) else x
