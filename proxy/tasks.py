"""The one owner of background work: tasks that must outlive the handler that started them.

aiohttp cancels a handler when its client disconnects, and its docs warn against a bare
`asyncio.shield` for work that must still finish: such work runs in tasks tracked here, which the
app drains (with a bound) at shutdown. `closing` tells periodic work (lease timers, sweeps,
watchers) to stop re-arming once shutdown has begun.
"""

from __future__ import annotations

import asyncio
import logging
import math
from types import CoroutineType
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


class _OnLoop:
    """The loop an object's callbacks run on, looked up once instead of per call. On CPython
    3.11 `asyncio.get_running_loop()` makes a getpid() system call each time (its guard against
    a loop inherited through fork; 3.12 dropped it): 179 ns here against 52 ns for this, about
    1 µs a request over the hot path's eight lookups. Looked up again whenever the cached loop
    is not running (stopped or closed: a test's next loop), which costs what is_closed() would;
    the proxy's workers fork before any loop runs."""

    _loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop


class Tasks(_OnLoop):
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self.closing = asyncio.Event()
        self.renewals = Renewals(self.closing)

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Awaitable[Any]) -> asyncio.Task:
        """Run `work` to completion even if the caller is cancelled; drained at shutdown. (A
        coroutine goes to the loop's create_task directly: ensure_future's checks cost 0.7 µs,
        and a plain coroutine is told by its type, before asyncio.iscoroutine's Python call.)"""
        task = self.loop().create_task(work) if type(work) is CoroutineType or asyncio.iscoroutine(work) \
            else asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def pending(self) -> list[asyncio.Task]:
        return list(self._tasks)

    async def drain(self, timeout: float) -> None:
        """Stop periodic work, then wait for what is running, `timeout` seconds at most (a task
        stuck on an unreachable store must not hang shutdown); what is left is cancelled."""
        self.closing.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(list(self._tasks), timeout=deadline - loop.time())
        if self._tasks:
            log.warning("%d background tasks still running after %.0f s; cancelling them",
                        len(self._tasks), timeout)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.wait(list(self._tasks), timeout=1)


class Renewals(_OnLoop):
    """Work repeated for each registered key while it stays registered (the lease of every open
    request), on one loop timer for all of them. A timer per request - armed when it is
    admitted, cancelled when it settles, nearly always long before it fires - cost about 3 µs a
    request (bench/results/hotpath-2.md); a dict entry costs a tenth of that.

    A key's `renew()` runs one period after it was added or last renewed, up to a quarter of the
    shortest period late (the timer ticks GRAIN times per shortest period), and returns the
    period until its next renewal; one that raises is logged and tried again a period later (the
    others renewed as usual). Nothing is renewed once `closing` is set."""

    GRAIN = 4

    def __init__(self, closing: asyncio.Event) -> None:
        self._closing = closing
        self._due: dict[Any, tuple[float, float, Callable[[], float]]] = {}   # key -> (due, period, renew)
        self._timer: asyncio.TimerHandle | None = None
        self._tick = math.inf           # the ticker's interval (the armed timer's, or shorter from its next tick)

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: Any, period: float, renew: Callable[[], float]) -> None:
        loop = self.loop()
        now, tick = loop.time(), period / self.GRAIN
        self._due[key] = (now + period, period, renew)
        if tick < self._tick:                           # the first key, or a shorter period
            if self._timer is None or self._timer.when() > now + tick:
                self._arm(loop, tick)
            else:           # the armed tick comes sooner: kept (re-armed from now, it could be put off)
                self._tick = tick

    def discard(self, key: Any) -> None:
        self._due.pop(key, None)

    def _arm(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._tick = tick
        self._timer = loop.call_later(tick, self._run)

    def _run(self) -> None:
        self._timer, self._tick = None, math.inf
        if self._closing.is_set():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        shortest = math.inf
        for key, (due, period, renew) in list(self._due.items()):
            if due <= now and key in self._due:
                try:
                    period = renew()
                except Exception:       # one key's failure must not stop every other lease
                    log.exception("renewal of %r failed; tried again in %.1f s", key, period)
                self._due[key] = (now + period, period, renew)
            shortest = min(shortest, period)
        if self._due:
            self._arm(loop, shortest / self.GRAIN)
