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


async def test_a_counter_named_twice_is_held_as_the_one_row_the_window_has():
    # Its row did not exist: the first creation must not be replaced by the second, or the
    # rows held for the tuple (and the first reservation) keep a row the window no longer has.
    store = MemoryStore(clock=Clock())
    cs = counters(int((NOW + 60) * 1000))
    twice = (*cs, cs[0])
    for rid in ("a", "b"):                                 # the second goes through the held rows
        assert (await store.reserve(rid, twice, 10, 0, int((NOW + 5) * 1000), False)).status.name == "ADMITTED"
    (row,) = await store.snapshot(cs[:1])
    assert (await store.windows(["{bp}:w:m1"]))[0]["org:acme"] == row
    assert store._hot[id(twice)][2][0] is store._windows["{bp}:w:m1"].rows["org:acme"]
    assert row.tokens_reserved == 2 * 2 * 10                # named twice: charged twice, every time
    for rid in ("a", "b"):
        assert await store.commit(rid, twice, 10, 0)
    assert await store.snapshot(cs) == [Totals(40, 0, 0, 0), Totals(20, 0, 0, 0)]


async def test_settled_reservations_leave_nothing_for_the_collector_to_walk():
    # A settled id is kept two minutes (a repeated settle is a no-op, a retried reserve a
    # duplicate) and its log entry until 100,000 newer ones push it out: at thousands of
    # requests a second, tracked objects for each (a record; a NamedTuple Note and the counters
    # in the entry) made every full collection walk hundreds of thousands of them.
    import gc
    store = MemoryStore(clock=Clock())
    cs = tuple(c._replace(token_limit=10 ** 9) for c in counters(int((NOW + 600) * 1000)))
    n = 3000

    async def settle_all(prefix: str) -> None:
        for i in range(n):
            rid = f"{prefix}{i}"
            assert (await store.reserve(rid, cs, 1, 0, int((NOW + 5) * 1000), False)).status.name == "ADMITTED"
            assert await store.commit(rid, cs, 1, 0)

    def tracked() -> int:
        for _ in range(3):                    # nested tuples are untracked over a few passes
            gc.collect()
        return len(gc.get_objects())

    await settle_all("warm")                  # the log ring, heaps and dicts exist and have grown
    before = tracked()
    await settle_all("r")
    grown = tracked() - before
    assert grown < n // 10, f"{grown} more objects tracked after {n} settlements"
    assert not await store.commit("r7", cs, 1, 0)                          # still remembered
    (entry,) = await store.settlements(None, None, 1)
    assert (entry.id, entry.outcome, entry.tokens, entry.windows) == \
        (f"r{n - 1}", "ok", 1, (("{bp}:w:m1", ("org:acme", "user:acme/u")),))
    assert (await store.reserve("r7", cs, 1, 0, int((NOW + 5) * 1000), False)).status.name == "DUPLICATE"
