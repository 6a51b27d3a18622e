"""The settlement log, the usage read, claims and the audit, on every store."""

from __future__ import annotations

import csv
import io
import json
import struct

import pytest

from proxy.ledger import Amounts, Pair, RequestInfo, Reservation, Scope, TokenCounts
from proxy.settlement_log import EXPORT_FIELDS, write_csv, write_jsonl
from proxy.stores import open_store

from .ledgers import INFO, MIXED_POLICY, SCOPES, Clock, ledger_for, mixed_workload, tomorrow_at



async def test_each_settlement_appends_one_record_with_the_pinned_fields(store):
    clock = Clock(tomorrow_at(12))
    ledger = ledger_for(store, clock, reservation={"lease_seconds": 30, "on_expiry": "commit"})
    ok = await ledger.reserve("ok", Amounts(100, 1000), SCOPES, INFO)
    assert await ledger.commit(ok, Amounts(60, 700), TokenCounts(50, 20, 10, 4), "ok", latency_ms=321)
    assert not await ledger.commit(ok, Amounts(60, 700), TokenCounts(50, 20, 10, 4))      # no second record
    gone = await ledger.reserve("gone", Amounts(100, 1000), SCOPES, INFO._replace(stream=False))
    assert await ledger.release(gone, "client_gone")
    slow = await ledger.reserve("slow", Amounts(100, 1000), SCOPES, INFO._replace(end_user=None))
    clock.t += 31
    assert await ledger.sweep() == 1
    assert await ledger.commit(slow, Amounts(130, 1200), TokenCounts(100, 0, 30, 0), "cut", latency_ms=40_000)

    recs = await ledger.settlements()
    assert [(r.id, r.outcome, r.usd_micro, r.charged_tokens) for r in recs] == [
        ("slow", "corrected", 200, 30), ("slow", "expired", 1000, 100), ("gone", "client_gone", 0, 0),
        ("ok", "ok", 700, 60)]
    first = recs[-1].export()
    assert list(first) == list(EXPORT_FIELDS)
    assert first["time"].endswith("Z") and "T" in first["time"]
    del first["time"]
    assert first == {"id": "ok", "org": "acme", "user": "alice", "end_user": "end:user 1", "endpoint": "chat",
                     "model_requested": "smart", "model": "gpt-4o-mini", "provider": "openai", "stream": True,
                     "prompt_tokens": 50, "cached_tokens": 20, "completion_tokens": 10, "reasoning_tokens": 4,
                     "usd_micro": 700, "outcome": "ok", "downgraded_from": "gpt-4o", "latency_ms": 321}
    assert recs[0].export()["latency_ms"] == 40_000 and recs[0].end_user is None
    assert recs[1].prompt_tokens is None and recs[1].org == "acme"        # the sweeper knew the request
    assert recs[2].stream is False


async def test_a_commit_of_a_lost_record_is_logged_with_what_is_known(store):
    ledger = ledger_for(store)
    res = Reservation("lost", Amounts(10, 10), ledger.counters(SCOPES), 0)
    assert await ledger.commit(res, Amounts(7, 70), TokenCounts(5, 0, 2, 0))
    (r,) = await ledger.settlements()
    assert (r.id, r.org, r.prompt_tokens, r.usd_micro, r.outcome) == ("lost", None, 5, 70, "ok")


async def test_settlements_filter_by_org_user_time_and_limit(store):
    ledger = ledger_for(store)
    for i, (org, user) in enumerate([("acme", "a"), ("globex", "b"), ("acme", "b"), ("acme", "a")]):
        res = await ledger.reserve(f"r{i}", Amounts(1, 1), SCOPES, INFO._replace(org=org, user=user))
        await ledger.commit(res, Amounts(1, 1))
    assert [r.id for r in await ledger.settlements(org="acme")] == ["r3", "r2", "r0"]
    assert [r.id for r in await ledger.settlements(org="acme", user="a", limit=1)] == ["r3"]
    assert [r.id for r in await ledger.settlements(user="b")] == ["r2", "r1"]
    assert await ledger.settlements(since_ms=2 ** 50) == []
    assert await ledger.settlements(until_ms=1) == []


async def test_settlements_page_through_a_long_log(store):
    ledger = ledger_for(store)
    for i in range(2403):
        res = await ledger.reserve(f"r{i}", Amounts(1, 1), SCOPES[:1], INFO._replace(org="acme" if i % 2 else "x"))
        await ledger.release(res)
    found = await ledger.settlements(org="acme", limit=10_000)
    assert len(found) == 1201 and found[0].id == "r2401" and found[-1].id == "r1"


async def test_an_unknown_outcome_is_refused(store):
    ledger = ledger_for(store)
    res = await ledger.reserve("r", Amounts(1, 1), SCOPES)
    with pytest.raises(ValueError):
        await ledger.commit(res, Amounts(1, 1), outcome="fine")
    assert await ledger.commit(res, Amounts(1, 1))


async def test_usage_lists_every_scope_seen_in_each_window_with_limits_and_remaining(store):
    ledger = ledger_for(store, defaults={"user": {"minute": {"tokens": 1000}, "day": {"usd": 2}}})
    res = await ledger.reserve("r1", Amounts(300, 500_000), SCOPES, INFO)
    await ledger.commit(res, Amounts(200, 400_000))
    await ledger.reserve("r2", Amounts(50, 100_000), SCOPES, INFO)        # still open
    rows = await ledger.usage()
    assert sorted({(u.window, u.scope.type) for u in rows}) == sorted(
        [("minute", "user")] + [(w, s.type) for w in ("day", "month") for s in SCOPES])
    user_day = next(u for u in rows if u.window == "day" and u.scope == Scope("user", "alice"))
    assert (user_day.used, user_day.reserved) == (Pair(200, 400_000), Pair(50, 100_000))
    assert (user_day.limit, user_day.remaining) == (Pair(None, 2_000_000), Pair(None, 1_500_000))
    assert user_day.end - user_day.start == 86_400
    only = await ledger.usage(window="minute", type="user", id="alice")
    assert [(u.scope, u.used.tokens, u.limit.tokens, u.remaining.tokens) for u in only] == [
        (Scope("user", "alice"), 200, 1000, 750)]
    assert await ledger.usage(type="org", id="nobody") == []
    with pytest.raises(ValueError):
        await ledger.usage(window="week")


async def test_a_claim_is_granted_once_until_it_expires(store):
    clock = Clock(tomorrow_at(12))
    ledger = ledger_for(store, clock)
    until = int((clock.t + 60) * 1000)
    assert await ledger.claim("alert:org:acme:day:usd:0.8", until)
    assert not await ledger.claim("alert:org:acme:day:usd:0.8", until)
    assert await ledger.claim("alert:org:acme:day:usd:0.95", until)


async def test_a_claim_is_once_across_processes(redis_url):
    a, b = open_store(redis_url), open_store(redis_url)
    wins = [await s.claim("alert", 2 ** 45) for s in (a, b, a)]
    assert wins == [True, False, False]
    await a.close()
    await b.close()


async def test_audit_is_clean_after_amixed_workload(store):
    clock = Clock(tomorrow_at(12))
    ledger = ledger_for(store, clock, **MIXED_POLICY)
    await mixed_workload(ledger, clock)
    for window in ("minute", "day", "month"):
        clock.t -= 61 if window == "minute" else 0      # the minute the workload ran in
        drift = await ledger.audit(window)
        clock.t += 61 if window == "minute" else 0
        assert drift and all(d.tokens == 0 and d.usd == 0 for d in drift), drift
    day = {(d.scope_type, d.scope_id): d for d in await ledger.audit("day")}
    assert day["global", "*"].counter.tokens_used > 0 and len(day) == 7


async def test_audit_reports_a_corrupted_counter(redis_server, redis_url):
    import redis as redis_sync
    clock = Clock(tomorrow_at(12))
    store = open_store(redis_url)
    ledger = ledger_for(store, clock, **MIXED_POLICY)
    await mixed_workload(ledger, clock)
    r = redis_sync.Redis.from_url(redis_url)
    (key,) = [k for k in r.keys("{bp}:w:d*")]
    t, tr, d, dr = struct.unpack("<dddd", r.hget(key, "org:acme"))
    r.hset(key, "org:acme", struct.pack("<dddd", t + 5, tr, d, dr))       # five tokens from nowhere
    r.close()
    drift = [d for d in await ledger.audit("day") if d.tokens or d.usd]
    assert [(d.scope_type, d.scope_id, d.tokens, d.usd) for d in drift] == [("org", "acme", 5, 0)]
    await store.close()


def test_request_info_survives_packing_whatever_the_strings():
    odd = RequestInfo("o\nrg", 'u"s\\er', None, "messages", "m", "m", "p", False, None)
    assert RequestInfo.unpack(odd.pack()) == odd and "\n" not in odd.pack()


@pytest.mark.parametrize("info", [
    INFO,
    RequestInfo("o\nrg", 'u"s\\er', None, "messages", "m", "m", "p", False, None),
    RequestInfo("ü€😀\x00\x1f", "\u2028", "", "chat", "m", "m", "p", True, "dé"),
    RequestInfo("acme", "alice", 7, "chat", "m", "m", "p", False, None),     # not a string: the slow path
])
def test_request_info_packs_exactly_as_the_json_array_it_always_was(info):
    """Stored records (Redis hashes, open reservations) are read back by older and newer code
    alike: the hand-built fast path must write json.dumps's bytes."""
    expected = json.dumps([*info[:7], int(info.stream), info.downgraded_from], separators=(",", ":"))
    assert info.pack() == expected


def test_export_writes_json_lines_and_csv_with_the_pinned_columns():
    from proxy.settlement_log import record
    from proxy.stores.base import LogEntry
    entry = LogEntry("1-0", 1_800_000_000_123, "r1", "ok", 60, 700, "50 20 10 4", "321", INFO.pack(), ())
    rec = record(entry)
    out = io.StringIO()
    write_jsonl([rec], out)
    assert json.loads(out.getvalue()) == rec.export()
    assert rec.time == "2027-01-15T08:00:00.123Z"
    out = io.StringIO()
    write_csv([rec], out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == list(EXPORT_FIELDS)
    assert rows[1] == ["r1", "2027-01-15T08:00:00.123Z", "acme", "alice", "end:user 1", "chat", "smart",
                       "gpt-4o-mini", "openai", "true", "50", "20", "10", "4", "700", "ok", "gpt-4o", "321"]


async def test_the_log_keeps_the_configured_number_of_records(store_url):
    from proxy.stores import open_store
    from .ledgers import ledger_for
    store = open_store(store_url, log_length=1000)
    try:
        ledger = ledger_for(store)
        for i in range(1300):
            res = await ledger.reserve(f"k{i}", Amounts(1, 1), SCOPES, INFO)
            await ledger.release(res)
        kept = await ledger.settlements(limit=5000)
        # memory: exactly the newest 1000; Redis trims a stream approximately (MAXLEN ~), never below
        assert 1000 <= len(kept) < 1300 and kept[0].id == "k1299"
    finally:
        await store.close()
