"""Flight: one admitted request settled exactly once, over a real ledger (memory store), no HTTP."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from proxy.config import Model
from proxy.endpoints import ENDPOINTS
from proxy.ledger import Amounts, Ledger, Scope
from proxy.policy import parse
from proxy.settlement import Flight
from proxy.stores.memory import MemoryStore
from proxy.tasks import Tasks

MODEL = Model("gpt-4o", "openai", "gpt-4o", 2.5, 10.0, ())
SCOPES = (Scope("global", "*"), Scope("org", "acme"))
PROMPT = 100


@pytest.fixture
async def ledger():
    policy = parse({"version": 1, "defaults": {"org": {"day": {"tokens": 10_000}}},
                    "reservation": {"lease_seconds": 60}}, "test-policy")
    yield Ledger(MemoryStore(), policy)


async def admitted(ledger: Ledger, tasks: Tasks, reserve: int = 1000, endpoint: str = "chat") -> Flight:
    res = await ledger.reserve("r1", Amounts(reserve, MODEL.cost(reserve, 0)), SCOPES)
    return Flight(ledger, tasks, res, MODEL, ENDPOINTS[endpoint], PROMPT, lambda text: len(text.split()))


async def org_day(ledger: Ledger, tasks: Tasks) -> tuple[int, int]:
    await asyncio.wait(tasks.pending(), timeout=5) if len(tasks) else None
    b = next(b for b in await ledger.snapshot(SCOPES)
             if b.scope.type == "org" and b.window == "day" and b.unit == "tokens")
    return b.used, b.reserved


async def test_a_flight_settles_once_whatever_is_asked_after(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.commit_soon(100, 20)
    f.commit_soon(100, 500)          # a second path: ignored
    f.release_soon()
    f.ensure_settled()
    assert await org_day(ledger, tasks) == (120, 0)


async def test_last_resort_charges_the_prompt_once_sent_and_releases_before(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.ensure_settled()                           # never sent: nothing to pay
    assert await org_day(ledger, tasks) == (0, 0)
    res = await ledger.reserve("r2", Amounts(1000, 1), SCOPES)
    g = Flight(ledger, tasks, res, MODEL, ENDPOINTS["chat"], PROMPT, len)
    g.sent = True
    g.ensure_settled()
    assert await org_day(ledger, tasks) == (PROMPT, 0)


async def test_a_stream_without_usage_is_charged_its_prompt_and_an_output_estimate(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.settle_stream(SimpleNamespace(usage=None, error=None, output_chunks=3, output_chars=40))
    assert await org_day(ledger, tasks) == (PROMPT + 10, 0)        # max(3 chunks, ceil(40 / 4))


async def test_an_upstream_error_before_any_output_releases(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.settle_stream(SimpleNamespace(usage=None, error={"message": "boom"}, output_chunks=0, output_chars=0))
    assert await org_day(ledger, tasks) == (0, 0)


async def test_a_body_is_charged_its_reported_usage_else_its_counted_output(ledger):
    tasks = Tasks()
    f = await admitted(ledger, tasks)
    f.settle_body(b'{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}')
    assert await org_day(ledger, tasks) == (12, 0)
    res = await ledger.reserve("r2", Amounts(1000, 1), SCOPES)
    g = Flight(ledger, tasks, res, MODEL, ENDPOINTS["chat"], PROMPT, lambda t: len(t.split()))
    g.settle_body(b'{"choices": [{"message": {"content": "four words right here"}}]}')
    assert await org_day(ledger, tasks) == (12 + PROMPT + 4, 0)


async def test_the_lease_is_extended_while_the_flight_is_open(ledger, monkeypatch):
    tasks = Tasks()
    monkeypatch.setattr(type(ledger.policy), "lease_seconds", property(lambda self: 0.3))
    f = await admitted(ledger, tasks)
    first = f.res.deadline_ms
    await asyncio.sleep(0.25)                    # a third of the lease: one extension at least
    assert f.res.deadline_ms > first
    f.release_soon()
    tasks.closing.set()
    assert await org_day(ledger, tasks) == (0, 0)
