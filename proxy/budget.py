"""What a request's budget looks like to the client, and how it is settled.

A `Flight` is one admitted request: it knows its reservation (None when enforcement is disabled
or the store was down in advisory mode) and settles it exactly once, with the real usage when
upstream reported it, else an estimate that is never zero for a request that produced output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import TYPE_CHECKING
from urllib.parse import quote

from .errors import BudgetExceeded, StoreUnavailable
from .ledger import Amounts, Refusal, Reservation

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4      # for output we could not count: English text averages about 4 characters a token
SETTLE_ATTEMPTS = 10     # with backoff from 0.1 s to 5 s: about half a minute of store outage


def _display(unit: str, amount: int) -> float | int:
    return amount / 1_000_000 if unit == "usd" else amount


def _reported(usage) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, or None if it is not one."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return usage["prompt_tokens"], int(usage.get("completion_tokens") or 0)
    return None


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
    """One admitted request's reservation, settled exactly once.

    Every settlement is claimed synchronously (so no path can settle twice, and the handler's
    last-resort `ensure_settled` knows whether one is under way) and then runs in a task the
    gateway tracks, retrying while the store is unreachable: a cancelled handler never cuts a
    settlement short. While open, the lease is extended every third of its length."""

    def __init__(self, gateway: "Gateway", res: Reservation | None, model: str, asked: str,
                 prompt: int) -> None:
        self.gateway = gateway
        self.res = res
        self.model = model          # the registry model actually used
        self.asked = asked          # the preferred candidate
        self.prompt = prompt        # estimated prompt tokens
        self.sent = False           # the request may have reached the upstream
        self._settled = res is None
        self._timer: asyncio.TimerHandle | None = None
        if res is not None:
            self._arm()

    # --- the lease --------------------------------------------------------------------------

    def _arm(self) -> None:
        period = self.gateway.ledger.policy.lease_seconds / 3
        self._timer = asyncio.get_running_loop().call_later(period, self._tick)

    def _tick(self) -> None:
        if not self._settled and not self.gateway.closing:
            self.gateway.spawn(self._extend())
            self._arm()

    async def _extend(self) -> None:
        try:
            self.res = await self.gateway.ledger.extend(self.res)
        except StoreUnavailable as exc:
            log.warning("could not extend lease %s: %s", self.res.id, exc)

    # --- settling ---------------------------------------------------------------------------

    def _claim(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        if self._timer is not None:
            self._timer.cancel()
        return True

    def release_soon(self) -> None:
        if self._claim():
            self.gateway.spawn(self._retrying("release", lambda: self.gateway.ledger.release(self.res)))

    def commit_soon(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self._claim():
            self.gateway.spawn(self._commit(prompt_tokens, completion_tokens))

    def estimate_soon(self, output_tokens: int) -> None:
        """No usage from upstream: the prompt estimate plus what we counted of the output."""
        self.commit_soon(self.prompt, output_tokens)

    def ensure_settled(self) -> None:
        """Last resort when the handler ends: a request that may have reached the upstream is
        charged its prompt; one that cannot have is released."""
        if self.sent:
            self.estimate_soon(0)
        else:
            self.release_soon()

    def stream_soon(self, tap) -> None:
        reported = _reported(tap.usage)
        if reported is not None:
            self.commit_soon(*reported)
        elif tap.error is not None and not tap.output_chunks:
            self.release_soon()              # an upstream error before any output
        else:
            estimate = max(tap.output_chunks, math.ceil(tap.output_chars / CHARS_PER_TOKEN))
            log.info("stream %s ended without usage; charging an estimate of %d output tokens",
                     self.res.id if self.res else "-", estimate)
            self.estimate_soon(estimate)

    def body_soon(self, data: bytes, kind: str) -> None:
        """Settle from a whole response body; parsing it happens in the task, after the reply."""
        if self._claim():
            self.gateway.spawn(self._settle_body(data, kind))

    async def _settle_body(self, data: bytes, kind: str) -> None:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            obj = None
        reported = _reported(obj.get("usage") if isinstance(obj, dict) else None)
        if reported is not None:
            await self._commit(*reported)
        else:
            await self._commit(self.prompt, self._count_output(obj, kind))

    async def _commit(self, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.gateway.config.models[self.model]
        actual = Amounts(prompt_tokens + completion_tokens, m.cost(prompt_tokens, completion_tokens))
        await self._retrying("commit", lambda: self.gateway.ledger.commit(self.res, actual))

    async def _retrying(self, what: str, call) -> None:
        """Retry while the store is unreachable; past that, the lease expires and the sweeper
        settles it (charging the reserved amount, by default)."""
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                await call()
                return
            except StoreUnavailable as exc:
                if attempt + 1 == SETTLE_ATTEMPTS:
                    log.error("%s of %s failed %d times, leaving it to lease expiry: %s",
                              what, self.res.id, SETTLE_ATTEMPTS, exc)
                    return
                await asyncio.sleep(min(0.1 * 2 ** attempt, 5.0))

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
