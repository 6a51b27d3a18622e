"""One retry loop for store calls that must happen (settlements, undoing a lost reserve).

Backoff doubles from 0.1 s to a 5 s cap: ten attempts cover about half a minute of store outage.
Past that the reservation's lease expires and any live proxy's sweeper settles it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from .errors import StoreUnavailable

log = logging.getLogger(__name__)

ATTEMPTS = 10


def backoff(attempt: int) -> float:
    return min(0.1 * 2 ** attempt, 5.0)


async def until_stored(call: Callable[[], Awaitable[Any]], what: str, attempts: int = ATTEMPTS) -> bool:
    """Await `call()` until the store answers; False (logged) if it never did."""
    for attempt in range(attempts):
        try:
            await call()
            return True
        except StoreUnavailable as exc:
            if attempt + 1 == attempts:
                log.error("%s failed %d times, leaving it to lease expiry: %s", what, attempts, exc)
                return False
            await asyncio.sleep(backoff(attempt))
    return False
