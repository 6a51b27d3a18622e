"""Shared helpers for the ledger's tests: scopes, a settable clock, policies, a mixed workload."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from proxy.ledger import Amounts, Ledger, Refusal, RequestInfo, Scope, TokenCounts
from proxy.policy import parse

SCOPES = (Scope("global", "*"), Scope("org", "acme"), Scope("user", "alice"),
          Scope("provider", "openai"), Scope("model", "gpt-4o"))


def tomorrow_at(hour: int, minute: int = 0, second: float = 0) -> float:
    """A fixed instant in the future: Redis deletes keys whose expiry is already past."""
    day = datetime.now(timezone.utc).date() + timedelta(days=1)
    base = datetime(day.year, day.month, day.day, hour, minute, tzinfo=timezone.utc)
    return base.timestamp() + second


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_policy(**over):
    data = {"version": 1, "defaults": {}, "reservation": {"lease_seconds": 60}}
    data.update(over)
    return parse(data, "test-policy")


def ledger_for(store, clock=None, **policy):
    return Ledger(store, make_policy(**policy), clock=clock or Clock(tomorrow_at(12)))


INFO = RequestInfo("acme", "alice", "end:user 1", "chat", "smart", "gpt-4o-mini", "openai", True, "gpt-4o")


async def mixed_workload(ledger, clock) -> None:
    """Commits, a release, an expiry and a late correction, a refusal, spread over scopes."""
    users = [Scope("user", u) for u in ("alice", "bob", "carol")]
    for i in range(30):
        scopes = (*SCOPES[:2], users[i % 3], *SCOPES[3:])
        res = await ledger.reserve(f"m{i}", Amounts(100 + i, 1000 + i), scopes, INFO)
        if i % 5 == 0:
            await ledger.release(res, "upstream_error")
        elif i % 7 == 0:
            continue                                   # left open: the sweeper settles it
        else:
            await ledger.commit(res, Amounts(50 + i, 600 + 3 * i), TokenCounts(40, 0, 10 + i, 0))
    late = await ledger.reserve("late", Amounts(500, 5000), SCOPES, INFO)
    assert isinstance(await ledger.reserve("refused", Amounts(10 ** 9, 1), SCOPES, INFO), Refusal)
    clock.t += 61
    assert await ledger.sweep() == 4 + 1
    await asyncio.sleep(0.005)     # log times are the store's clock, in ms: keep `late` the only newest
    await ledger.commit(late, Amounts(800, 9000), TokenCounts(700, 0, 100, 0))


MIXED_POLICY = {"defaults": {"user": {"minute": {"tokens": 10_000}, "day": {"tokens": 10 ** 6}}},
                "reservation": {"lease_seconds": 60, "on_expiry": "commit"}}
