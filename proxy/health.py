"""Readiness: the store answers and a policy is loaded. (Liveness is /healthz: answering at all
proves the event loop runs.)"""

from __future__ import annotations

import asyncio

from aiohttp import web

from .errors import StoreUnavailable
from .keys import window_key
from .ledger import Ledger

PING_TIMEOUT_SECONDS = 2.0


async def readiness(ledger: Ledger | None, namespace: str) -> tuple[bool, dict]:
    """(ready, body). The ping reads a window index that never exists: the cheapest round trip the
    store interface has (no store method added for it); bounded so a frozen Redis answers 503."""
    if ledger is None:
        return True, {"status": "ready", "store": "disabled"}
    if ledger.policy is None:
        return False, {"status": "not ready", "reason": "no budget policy is loaded"}
    try:
        await asyncio.wait_for(ledger.store.windows([window_key(namespace, "readyz")]),
                               PING_TIMEOUT_SECONDS)
    except StoreUnavailable as exc:
        return False, {"status": "not ready", "reason": f"the budget store is unavailable: {exc}"}
    except asyncio.TimeoutError:
        return False, {"status": "not ready",
                       "reason": f"the budget store did not answer within {PING_TIMEOUT_SECONDS:g} s"}
    return True, {"status": "ready", "store": "ok", "policy": ledger.policy.source}


async def readyz(ledger: Ledger | None, namespace: str) -> web.Response:
    ok, body = await readiness(ledger, namespace)
    return web.json_response(body, status=200 if ok else 503)
