"""The task tracker's renewals: one loop timer renews every registered key once per period."""

from __future__ import annotations

import asyncio

from proxy.tasks import Renewals, Tasks


def counter(period: float):
    calls = []

    def renew() -> float:
        calls.append(asyncio.get_running_loop().time())
        return period
    return calls, renew


async def test_a_key_is_renewed_every_period_until_discarded():
    tasks = Tasks()
    calls, renew = counter(0.05)
    start = asyncio.get_running_loop().time()
    tasks.renewals.add("lease", 0.05, renew)
    await asyncio.sleep(0.04)
    assert calls == []                               # not before its period
    await asyncio.sleep(0.16)
    assert len(calls) >= 2 and calls[0] - start >= 0.05
    tasks.renewals.discard("lease")
    assert len(tasks.renewals) == 0
    done = len(calls)
    await asyncio.sleep(0.1)
    assert len(calls) == done


async def test_a_short_period_is_not_held_up_by_a_long_one():
    tasks = Tasks()
    slow, renew_slow = counter(60)
    fast, renew_fast = counter(0.04)
    tasks.renewals.add("slow", 60, renew_slow)       # the timer ticks every 15 s for it alone
    tasks.renewals.add("fast", 0.04, renew_fast)
    await asyncio.sleep(0.15)
    assert len(fast) >= 2 and slow == []
    tasks.renewals.discard("fast")
    tasks.renewals.discard("slow")


async def test_nothing_is_renewed_once_closing():
    closing = asyncio.Event()
    renewals = Renewals(closing)
    calls, renew = counter(0.03)
    renewals.add("lease", 0.03, renew)
    closing.set()
    await asyncio.sleep(0.1)
    assert calls == []


async def test_a_renewal_that_raises_neither_stops_the_ticker_nor_starves_the_others(caplog):
    # One timer carries every open request's lease: an exception from one key's renew must not
    # leave the others unrenewed (a timer per request used to confine it to its own request).
    tasks = Tasks()
    failed = []

    def broken() -> float:
        failed.append(1)
        raise RuntimeError("boom")
    tasks.renewals.add("broken", 0.03, broken)       # first in the dict: renewed first
    calls, renew = counter(0.03)
    tasks.renewals.add("lease", 0.03, renew)
    await asyncio.sleep(0.25)
    assert len(calls) >= 3 and len(failed) >= 2      # both still renewed, period after period
    assert "boom" in caplog.text
    tasks.renewals.discard("broken")
    tasks.renewals.discard("lease")


async def test_a_key_with_a_shorter_period_never_postpones_a_due_renewal():
    # A key with a shorter period (a policy reload shortened the lease) re-arms the timer to tick
    # faster; re-arming from now must not push back a tick that was due sooner, or a stream of
    # ever shorter periods keeps every other lease from being renewed at all.
    tasks = Tasks()
    loop = asyncio.get_running_loop()
    calls, renew = counter(0.8)
    start = loop.time()
    tasks.renewals.add("lease", 0.8, renew)          # due at 0.8 s, the timer ticks every 0.2 s
    for i in range(1, 26):                           # every 0.1 s a key whose tick is 0.19875 .. 0.16875 s
        await asyncio.sleep(0.1)
        tasks.renewals.add(i, 0.8 - 0.005 * i, counter(1)[1])
    # At most a tick late, plus slack for a loaded machine's loop; postponed, the first renewal
    # would come only after the last add (2.5 s or later).
    assert calls and calls[0] - start < 0.8 + 0.2 + 0.6
    for key in ["lease", *range(1, 26)]:
        tasks.renewals.discard(key)


def test_tasks_follow_the_running_loop_to_the_next_one():
    # The loop is looked up once and kept (a lookup is a getpid() call on 3.11); a kept loop that
    # is no longer running (stopped, not closed) must not get the next loop's tasks.
    tasks = Tasks()

    async def spawned():
        return await tasks.spawn(asyncio.sleep(0, "ran"))
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert first.run_until_complete(spawned()) == "ran"
        assert second.run_until_complete(spawned()) == "ran"     # the first: stopped, still open
    finally:
        first.close()
        second.close()
