"""The ledger's contract, run against every store (memory and a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import pytest

from proxy.errors import StoreUnavailable
from proxy.ledger import Amounts, Refusal, Reservation, Scope
from proxy.stores import open_store

from .ledgers import SCOPES, Clock, ledger_for, tomorrow_at


def row(balances, scope_type, window, unit):
    for b in balances:
        if b.scope.type == scope_type and b.window == window and b.unit == unit:
            return b
    raise AssertionError(f"no balance for {scope_type}/{window}/{unit}")


async def test_reserve_then_commit_moves_reserved_to_used(store):
    ledger = ledger_for(store, defaults={"org": {"day": {"usd": 1}}})
    res = await ledger.reserve("r1", Amounts(100, 5000), SCOPES)
    assert isinstance(res, Reservation)
    snap = await ledger.snapshot(SCOPES)
    assert (row(snap, "org", "day", "usd").reserved, row(snap, "org", "day", "usd").remaining) == (5000, 995000)
    assert row(snap, "model", "day", "tokens").reserved == 100
    assert not any(b.window == "minute" for b in snap)      # unlimited minutes are not kept
    assert await ledger.commit(res, Amounts(40, 2000))
    for b in await ledger.snapshot(SCOPES):
        assert b.reserved == 0
        assert b.used == (40 if b.unit == "tokens" else 2000)


async def test_refusal_names_the_first_scope_over_and_when_it_resets(store):
    clock = Clock(tomorrow_at(12, 30))
    ledger = ledger_for(store, clock, defaults={"user": {"hour": {"tokens": 150}}})
    first = await ledger.reserve("r1", Amounts(100, 1), SCOPES)
    assert isinstance(first, Reservation)
    refusal = await ledger.reserve("r2", Amounts(60, 1), SCOPES)
    assert refusal == Refusal(Scope("user", "alice"), "hour", "tokens", 150, 0, 100, 60, 1800.0)


async def test_refused_reservation_changes_no_scope(store):
    # Only the last scope (model) is over: a partial write would show on the four before it.
    ledger = ledger_for(store, defaults={"model": {"month": {"usd": 0.001}}})
    refusal = await ledger.reserve("r1", Amounts(10, 5000), SCOPES)
    assert isinstance(refusal, Refusal) and refusal.scope == Scope("model", "gpt-4o")
    assert (refusal.window, refusal.unit, refusal.limit) == ("month", "usd", 1000)
    assert all(b.reserved == 0 and b.used == 0 for b in await ledger.snapshot(SCOPES))


async def test_concurrent_reservations_admit_exactly_what_fits(store):
    ledger = ledger_for(store, defaults={"org": {"day": {"tokens": 1000}}})
    results = await asyncio.gather(*(ledger.reserve(f"r{i}", Amounts(7, 1), SCOPES) for i in range(400)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    assert len(admitted) == 1000 // 7
    assert row(await ledger.snapshot(SCOPES), "org", "day", "tokens").reserved == 7 * (1000 // 7)
    await asyncio.gather(*(ledger.release(r) for r in admitted))
    assert all(b.reserved == 0 for b in await ledger.snapshot(SCOPES))


async def test_commit_after_midnight_charges_the_day_it_started(store):
    clock = Clock(tomorrow_at(23, 59, 59.5))
    ledger = ledger_for(store, clock, defaults={"org": {"day": {"usd": 10}}})
    res = await ledger.reserve("late", Amounts(100, 3_000_000), SCOPES)
    before = await ledger.snapshot(SCOPES)
    clock.t += 2                                       # now 00:00:01.5 the next day
    assert await ledger.commit(res, Amounts(90, 2_000_000))
    clock.t -= 2
    day_started = row(await ledger.snapshot(SCOPES), "org", "day", "usd")
    assert row(before, "org", "day", "usd").reserved == 3_000_000
    assert (day_started.used, day_started.reserved) == (2_000_000, 0)
    clock.t += 2
    next_day = row(await ledger.snapshot(SCOPES), "org", "day", "usd")
    assert (next_day.used, next_day.reserved, next_day.remaining) == (0, 0, 10_000_000)


async def test_retried_reserve_and_double_commit_count_once(store):
    ledger = ledger_for(store)
    a = await ledger.reserve("same", Amounts(50, 500), SCOPES)
    b = await ledger.reserve("same", Amounts(50, 500), SCOPES)
    assert isinstance(a, Reservation) and isinstance(b, Reservation)
    assert row(await ledger.snapshot(SCOPES), "global", "day", "tokens").reserved == 50
    assert await ledger.commit(a, Amounts(30, 300)) is True
    assert await ledger.commit(a, Amounts(30, 300)) is False
    assert await ledger.release(a) is False
    g = row(await ledger.snapshot(SCOPES), "global", "day", "tokens")
    assert (g.used, g.reserved) == (30, 0)


@pytest.mark.parametrize("on_expiry, used", [("commit", 80), ("release", 0)])
async def test_expired_lease_is_settled_and_its_budget_freed(store, on_expiry, used):
    clock = Clock(tomorrow_at(12))
    ledger = ledger_for(store, clock, defaults={"user": {"day": {"tokens": 100}}},
                        reservation={"lease_seconds": 30, "on_expiry": on_expiry})
    dead = await ledger.reserve("dead-process", Amounts(80, 8), SCOPES)
    assert isinstance(dead, Reservation)
    assert isinstance(await ledger.reserve("blocked", Amounts(80, 8), SCOPES), Refusal)
    clock.t += 29
    assert await ledger.sweep() == 0                   # lease not yet over
    clock.t += 2
    assert await ledger.sweep() == 1
    assert await ledger.sweep() == 0
    u = row(await ledger.snapshot(SCOPES), "user", "day", "tokens")
    assert (u.used, u.reserved) == (used, 0)
    if on_expiry == "release":
        assert isinstance(await ledger.reserve("now-fits", Amounts(80, 8), SCOPES), Reservation)
        used += 80


async def test_a_late_commit_after_expiry_corrects_the_charge_once(store):
    # The process was alive after all (a stalled stream): its commit replaces the sweeper's
    # charge by the real usage, even minutes later, and only once.
    clock = Clock(tomorrow_at(12))
    ledger = ledger_for(store, clock, reservation={"lease_seconds": 30, "on_expiry": "commit"})
    slow = await ledger.reserve("slow", Amounts(1000, 100), SCOPES)
    clock.t += 31
    assert await ledger.sweep() == 1
    clock.t += 600
    assert await ledger.commit(slow, Amounts(1200, 130)) is True
    assert await ledger.commit(slow, Amounts(1200, 130)) is False
    g = row(await ledger.snapshot(SCOPES), "global", "day", "tokens")
    assert (g.used, g.reserved) == (1200, 0)


async def test_amounts_out_of_range_are_refused_before_the_store(store):
    ledger = ledger_for(store)
    with pytest.raises(ValueError):
        await ledger.reserve("huge", Amounts(2 ** 60, 0), SCOPES)
    assert all(b.reserved == 0 for b in await ledger.snapshot(SCOPES))


async def test_extended_lease_is_not_swept(store):
    clock = Clock(tomorrow_at(12))
    ledger = ledger_for(store, clock, reservation={"lease_seconds": 30})
    res = await ledger.reserve("long-stream", Amounts(10, 1), SCOPES)
    clock.t += 20
    res = await ledger.extend(res)
    clock.t += 20
    assert await ledger.sweep() == 0
    assert await ledger.commit(res, Amounts(10, 1))


async def test_shadow_mode_admits_and_reports_what_it_would_refuse(store):
    ledger = ledger_for(store, shadow=True, defaults={"org": {"day": {"tokens": 10}}})
    res = await ledger.reserve("r1", Amounts(50, 1), SCOPES)
    assert isinstance(res, Reservation)
    assert res.would_refuse is not None and res.would_refuse.scope == Scope("org", "acme")
    assert row(await ledger.snapshot(SCOPES), "org", "day", "tokens").reserved == 50


async def test_scope_ids_cannot_collide_or_break_the_hash_tag(store):
    ledger = ledger_for(store, defaults={"user": {"day": {"tokens": 10}}})
    odd = (Scope("user", "a:b}{ c"),)
    plain = (Scope("user", "a"),)
    assert isinstance(await ledger.reserve("r1", Amounts(10, 0), odd), Reservation)
    assert isinstance(await ledger.reserve("r2", Amounts(10, 0), plain), Reservation)


# --- Redis only: the server itself misbehaving -------------------------------------------------

async def test_script_flush_between_calls_changes_nothing(redis_server, redis_url):
    store = open_store(redis_url)
    ledger = ledger_for(store, defaults={"org": {"day": {"tokens": 100}}})
    res = await ledger.reserve("r1", Amounts(60, 1), SCOPES)
    redis_server.command("SCRIPT", "FLUSH")
    assert isinstance(await ledger.reserve("r2", Amounts(60, 1), SCOPES), Refusal)
    redis_server.command("SCRIPT", "FLUSH")
    assert await ledger.commit(res, Amounts(50, 1))
    redis_server.command("SCRIPT", "FLUSH")
    o = row(await ledger.snapshot(SCOPES), "org", "day", "tokens")
    assert (o.used, o.reserved) == (50, 0)
    await store.close()


async def test_redis_down_raises_store_error_and_recovers(redis_server, redis_url):
    store = open_store(redis_url)
    ledger = ledger_for(store)
    res = await ledger.reserve("before", Amounts(5, 5), SCOPES)
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            await ledger.reserve("during", Amounts(5, 5), SCOPES)
        with pytest.raises(StoreUnavailable):
            await ledger.commit(res, Amounts(5, 5))
        with pytest.raises(StoreUnavailable):
            await ledger.snapshot(SCOPES)
    finally:
        redis_server.start()
    # The restarted server kept nothing (no persistence); the ledger works again at once.
    again = await ledger.reserve("after", Amounts(5, 5), SCOPES)
    assert isinstance(again, Reservation)
    assert await ledger.commit(again, Amounts(5, 5))
    await store.close()


async def test_day_and_month_reset_at_the_policy_time_zone_midnight(store):
    # 04:30 UTC is 23:30 the day before in New York (EST, UTC-5, in winter).
    day = datetime(2027, 1, 15, tzinfo=timezone.utc)
    if day.timestamp() < time.time():
        pytest.skip("the fixed date has passed")
    clock = Clock(day.timestamp() + 4.5 * 3600)
    ledger = ledger_for(store, clock, timezone="America/New_York", defaults={"org": {"day": {"tokens": 10}}})
    refusal = await ledger.reserve("r1", Amounts(11, 0), SCOPES)
    assert isinstance(refusal, Refusal) and refusal.window == "day"
    assert refusal.reset_in == 30 * 60                              # NY midnight is 05:00 UTC
    org_day = row(await ledger.snapshot(SCOPES), "org", "day", "tokens")
    assert org_day.resets_at == day.timestamp() + 5 * 3600


async def test_overrun_is_logged_warning_and_critical_above_five_times(store, caplog):
    ledger = ledger_for(store)
    a = await ledger.reserve("a", Amounts(100, 100), SCOPES)
    await ledger.commit(a, Amounts(150, 100))
    b = await ledger.reserve("b", Amounts(100, 100), SCOPES)
    await ledger.commit(b, Amounts(100, 501))
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "proxy.ledger"]
    assert levels == [("WARNING", "reservation a used 150 tokens, more than the 100 reserved"),
                      ("CRITICAL", "reservation b used 501 micro-USD, more than the 100 reserved")]


async def test_every_redis_key_expires(redis_server, redis_url):
    import redis as redis_sync
    store = open_store(redis_url)
    ledger = ledger_for(store, defaults={"user": {"minute": {"tokens": 1000}}})
    res = await ledger.reserve("r1", Amounts(10, 10), SCOPES)
    await ledger.commit(res, Amounts(10, 10))
    await store.close()
    r = redis_sync.Redis.from_url(redis_url)
    # The lease index and the settlement log are one key each (the log capped by length).
    keys = [k for k in r.keys("*") if not k.endswith((b":leases", b":log"))]
    assert len(keys) == 4 and all(r.pttl(k) > 0 for k in keys)       # 3 window hashes + the record
    sizes = sorted(r.hlen(k) - 1 for k in keys if b":w:" in k)     # less the hash's "_" marker
    assert sizes == [1, 5, 5]        # minute: the limited user only; day and month: every scope
    assert r.pttl(b"{bp}:r:r1") <= 120_000
    r.close()


class _LostReply:
    """The real store, but the reserve's reply is lost on the way back (a network blip)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def reserve(self, *args, **kwargs):
        await self.inner.reserve(*args, **kwargs)
        raise StoreUnavailable("reply lost")

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_a_reserve_whose_reply_was_lost_is_released_by_id(store):
    ledger = ledger_for(_LostReply(store), defaults={"org": {"day": {"tokens": 100}}})
    with pytest.raises(StoreUnavailable):
        await ledger.reserve("lost", Amounts(60, 1), SCOPES)
    await asyncio.gather(*ledger.tasks.pending())
    assert all(b.reserved == 0 for b in await ledger.snapshot(SCOPES))


def _commands(redis_server) -> dict[str, int]:
    out = {}
    for line in redis_server.command("INFO", "commandstats").decode().split("\r\n"):
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            out[name.removeprefix("cmdstat_")] = int(rest.split("calls=")[1].split(",")[0])
    return out


async def test_a_request_costs_nineteen_redis_commands_whoever_sends_it(redis_server, redis_url):
    # Issue 10's budget is 25 per reserve + commit. Three windows here (a limited minute, day,
    # month): one HMGET and one HSET per window and call, the record, the lease, the log entry;
    # a new scope (a new user every request) adds no PEXPIREAT: each window hash expires once.
    store = open_store(redis_url)
    ledger = ledger_for(store, defaults={"user": {"minute": {"tokens": 10 ** 9}}, "org": {"day": {"usd": 10}}})
    warm = await ledger.reserve("warm", Amounts(1, 1), SCOPES)
    await ledger.commit(warm, Amounts(1, 1))
    before = _commands(redis_server)
    for i in range(20):
        res = await ledger.reserve(f"r{i}", Amounts(10, 10), (*SCOPES[:2], Scope("user", f"u{i}"), *SCOPES[3:]))
        await ledger.commit(res, Amounts(5, 5))
    after = _commands(redis_server)
    spent = {k: (v - before.get(k, 0)) / 20 for k, v in after.items() if v != before.get(k, 0) and k != "info"}
    assert spent == {"evalsha": 2, "hmget": 6, "hset": 6, "set": 2, "zadd": 1, "zrem": 1, "xadd": 1}
    await store.close()
