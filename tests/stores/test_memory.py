"""The embedded store beyond the shared contract: the rows it holds for a counters tuple it has
seen (`MemoryStore._hot`) must never outlive the window they belong to."""

from __future__ import annotations

from proxy.stores import Counter, Totals
from proxy.stores.memory import MemoryStore

NOW = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def counters(expire_at_ms: int) -> tuple[Counter, ...]:
    return (Counter("{bp}:w:m1", "org:acme", 100, -1, expire_at_ms),
            Counter("{bp}:w:m1", "user:acme/u", -1, -1, expire_at_ms))


async def test_a_counters_tuple_reused_after_its_window_expired_writes_the_new_window():
    clock = Clock()
    store = MemoryStore(clock=clock)
    cs = counters(int((NOW + 60) * 1000))
    for rid in ("a", "b"):                                 # the second goes through the held rows
        assert (await store.reserve(rid, cs, 30, 0, int((NOW + 5) * 1000), False)).status.name == "ADMITTED"
        assert await store.commit(rid, cs, 30, 0)
    assert await store.snapshot(cs) == [Totals(60, 0, 0, 0), Totals(60, 0, 0, 0)]
    clock.now = NOW + 120                                  # the window is dropped at the next purge
    out = await store.reserve("c", cs, 90, 0, int((clock.now + 5) * 1000), False)
    assert out.status.name == "ADMITTED"                   # 60 of the old window no longer count
    assert await store.snapshot(cs) == [Totals(0, 90, 0, 0), Totals(0, 90, 0, 0)]
    assert await store.windows(["{bp}:w:m1"]) == [{"org:acme": Totals(0, 90, 0, 0),
                                                   "user:acme/u": Totals(0, 90, 0, 0)}]
    assert await store.commit("c", cs, 80, 0)
    assert await store.snapshot(cs) == [Totals(80, 0, 0, 0), Totals(80, 0, 0, 0)]
    # The limit is checked on the live rows: 80 used + 30 > 100.
    assert (await store.reserve("d", cs, 30, 0, int((clock.now + 5) * 1000), False)).status.name == "REFUSED"


async def test_a_refusal_on_rows_never_seen_creates_none():
    store = MemoryStore(clock=Clock())
    cs = counters(int((NOW + 60) * 1000))
    assert (await store.reserve("big", cs, 500, 0, int((NOW + 5) * 1000), False)).status.name == "REFUSED"
    assert await store.windows(["{bp}:w:m1"]) == [{}]
