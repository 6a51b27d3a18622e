"""The one owner of background work: tasks that must outlive the handler that started them.

aiohttp cancels a handler when its client disconnects, and its docs warn against a bare
`asyncio.shield` for work that must still finish: such work runs in tasks tracked here, which the
app drains (with a bound) at shutdown. `closing` tells periodic work (lease timers, sweeps,
watchers) to stop re-arming once shutdown has begun.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable

log = logging.getLogger(__name__)


class Tasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self.closing = asyncio.Event()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Awaitable[Any]) -> asyncio.Task:
        """Run `work` to completion even if the caller is cancelled; drained at shutdown."""
        task = asyncio.ensure_future(work)
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
