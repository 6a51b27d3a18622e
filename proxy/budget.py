"""What a request's budget looks like to the client, and how it is settled.

A `Flight` is one admitted request: it knows its reservation (None when enforcement is disabled
or the store was down in advisory mode) and settles it exactly once, with the real usage when
upstream reported it, else an estimate that is never zero for a request that produced output.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

from .errors import BudgetExceeded, StoreUnavailable
from .ledger import Amounts, Refusal, Reservation

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4      # for output we could not count: English text averages about 4 characters a token


def _display(unit: str, amount: int) -> float | int:
    return amount / 1_000_000 if unit == "usd" else amount


def refusal_error(r: Refusal) -> BudgetExceeded:
    """The 429. SDKs honour Retry-After only up to about a minute and retry 429s by default, so
    `x-should-retry: false` is sent for day and month windows and for any reset over 60 s away."""
    wait = max(0.0, r.reset_in)
    shown = {"type": r.scope.type, "id": r.scope.id, "window": r.window, "unit": r.unit,
             "limit": _display(r.unit, r.limit), "used": _display(r.unit, r.used),
             "requested": _display(r.unit, r.requested)}
    unit = "USD" if r.unit == "usd" else "tokens"
    message = (f"Budget exceeded for {r.scope.type} '{r.scope.id}': the {r.window} limit is "
               f"{shown['limit']} {unit}, {_display(r.unit, r.used + r.reserved)} are used or reserved, "
               f"and this request needs {shown['requested']}. The {r.window} window resets in "
               f"{math.ceil(wait)} s.")
    headers = {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000)),
               "x-should-retry": "false" if r.window in ("day", "month") or wait > 60 else "true"}
    return BudgetExceeded(message, headers=headers, extra={"scope": shown})


def budget_headers(flight: "Flight") -> dict[str, str]:
    out = {"x-budget-model": flight.model}
    if flight.model != flight.asked:
        out["x-budget-downgraded-from"] = flight.asked
    if flight.res is not None and flight.res.balances:
        out.update(_remaining(flight.res.balances))
    return out


def _remaining(balances) -> dict[str, str]:
    """The tightest scope after this reservation, like OpenAI's x-ratelimit-remaining-*."""
    tight = None
    low = {"tokens": None, "usd": None}
    for b in balances:
        left = b.remaining
        low[b.unit] = left if low[b.unit] is None else min(low[b.unit], left)
        frac = left / b.limit if b.limit else 0.0
        if tight is None or frac < tight[0]:
            tight = (frac, b)
    out = {}
    if low["tokens"] is not None:
        out["x-budget-remaining-tokens"] = str(low["tokens"])
    if low["usd"] is not None:
        out["x-budget-remaining-usd"] = f"{low['usd'] / 1_000_000:.6f}"
    if tight is not None:
        b = tight[1]
        out["x-budget-scope"] = f"{b.scope.type}:{quote(b.scope.id, safe='@/._-')} {b.window} {b.unit}"
    return out


class Flight:
    def __init__(self, gateway: "Gateway", res: Reservation | None, model: str, asked: str,
                 prompt: int) -> None:
        self.gateway = gateway
        self.res = res
        self.model = model          # the registry model actually used
        self.asked = asked          # the preferred candidate
        self.prompt = prompt        # estimated prompt tokens
        self._settled = False
        self._extending = False

    def keep_alive(self) -> None:
        """Extend the lease of a long stream once half of it has passed."""
        res = self.res
        if res is None or self._extending:
            return
        ledger = self.gateway.ledger
        half = ledger.policy.lease_seconds * 500
        if time.time() * 1000 < res.deadline_ms - half:
            return
        self._extending = True
        self.gateway.spawn(self._extend())

    async def _extend(self) -> None:
        try:
            self.res = await self.gateway.ledger.extend(self.res)
        except StoreUnavailable as exc:
            log.warning("could not extend lease %s: %s", self.res.id, exc)
        finally:
            self._extending = False

    async def release(self) -> None:
        if self._claim():
            try:
                await self.gateway.ledger.release(self.res)
            except StoreUnavailable as exc:
                log.error("release of %s failed (its lease will expire): %s", self.res.id, exc)

    async def commit(self, prompt_tokens: int, completion_tokens: int) -> None:
        if not self._claim():
            return
        m = self.gateway.config.models[self.model]
        actual = Amounts(prompt_tokens + completion_tokens, m.cost(prompt_tokens, completion_tokens))
        try:
            await self.gateway.ledger.commit(self.res, actual)
        except StoreUnavailable as exc:
            log.error("commit of %s failed (its lease will expire and be charged): %s", self.res.id, exc)

    def _claim(self) -> bool:
        if self._settled or self.res is None:
            return False
        self._settled = True
        return True

    async def settle_estimate(self, output_tokens: int) -> None:
        await self.commit(self.prompt, output_tokens)

    async def settle_stream(self, tap) -> None:
        usage = tap.usage
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            await self.commit(usage["prompt_tokens"], int(usage.get("completion_tokens") or 0))
            return
        estimate = max(tap.output_chunks, math.ceil(tap.output_chars / CHARS_PER_TOKEN))
        log.info("stream %s ended without usage; charging an estimate of %d output tokens",
                 self.res.id if self.res else "-", estimate)
        await self.commit(self.prompt, estimate)

    async def settle_body(self, data: bytes, kind: str) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            await self.commit(usage["prompt_tokens"], int(usage.get("completion_tokens") or 0))
            return
        await self.commit(self.prompt, self._count_output(obj, kind))

    def _count_output(self, obj, kind: str) -> int:
        if kind == "embedding" or not isinstance(obj, dict):
            return 0
        texts = []
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            msg = choice.get("message") if kind == "chat" else None
            texts.append(msg.get("content") if isinstance(msg, dict) else choice.get("text"))
        model = self.gateway.config.models[self.model].upstream
        return sum(self.gateway.tokens.count(t, model) for t in texts if isinstance(t, str))
