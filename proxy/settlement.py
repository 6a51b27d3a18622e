"""Settling one admitted request: commit what it used, or release what it reserved, exactly once.

A `Flight` is built from what it needs - the ledger, the reservation, the model (its prices), a
callable that counts output tokens, and the task tracker - and never calls back into whoever made
it. It settles with the real usage when the upstream reported it, else an estimate that is never
zero for a request that produced output; a request that may have reached the upstream but got no
answer is charged its prompt; one that cannot have reached it is released.

Every settlement is claimed synchronously (so no path can settle twice, and the handler's
last-resort `ensure_settled` knows whether one is under way) and then runs in a tracked task that
retries while the store is unreachable: a cancelled handler never cuts a settlement short.
While open, the lease is extended every third of its length.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, Callable

from . import metrics, retry
from .config import Model
from .endpoints import Endpoint
from .errors import StoreUnavailable
from .ledger import Amounts, Ledger, Reservation
from .observer import Observer
from .settlements import Usage
from .tasks import Tasks

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4      # for output we could not count: English text averages about 4 characters a token


def reported_usage(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, or None if it is not one."""
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        return usage["prompt_tokens"], int(usage.get("completion_tokens") or 0)
    return None


class Flight:
    def __init__(self, ledger: Ledger | None, tasks: Tasks, res: Reservation | None, model: Model,
                 endpoint: Endpoint, prompt: int, count: Callable[[str], int],
                 observer: Observer | None = None, org: str = "") -> None:
        self.ledger = ledger
        self.tasks = tasks
        self.res = res              # None: enforcement disabled, or the store was down (advisory)
        self.model = model          # the registry model actually used
        self.endpoint = endpoint
        self.prompt = prompt        # estimated prompt tokens
        self.count = count          # output text -> tokens, with the model's encoding
        self.sent = False           # the request may have reached the upstream
        self.observer = observer    # told of the commit (metrics, alerts); None in unit tests
        self.org = org
        self._settled = res is None
        self._timer: asyncio.TimerHandle | None = None
        if res is not None:
            self._arm()

    # --- the lease --------------------------------------------------------------------------

    def _arm(self) -> None:
        period = self.ledger.policy.lease_seconds / 3
        self._timer = asyncio.get_running_loop().call_later(period, self._tick)

    def _tick(self) -> None:
        if not self._settled and not self.tasks.closing.is_set():
            self.tasks.spawn(self._extend())
            self._arm()

    async def _extend(self) -> None:
        try:
            self.res = await self.ledger.extend(self.res)
        except StoreUnavailable as exc:
            log.warning("could not extend lease %s: %s", self.res.id, exc)

    # --- claiming a settlement ----------------------------------------------------------------

    def _claim(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        if self._timer is not None:
            self._timer.cancel()
        return True

    def release_soon(self) -> None:
        """Nothing was used (the upstream was never reached, or refused before any output)."""
        if self._claim():
            res = self.res
            self.tasks.spawn(retry.until_stored(lambda: self._timed("release", self.ledger.release(res)),
                                                f"release of {res.id}"))

    def commit_soon(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self._claim():
            self.tasks.spawn(self._commit(prompt_tokens, completion_tokens))

    def charge_estimate_soon(self, output_tokens: int) -> None:
        """No usage from the upstream: the prompt estimate plus what we counted of the output."""
        self.commit_soon(self.prompt, output_tokens)

    def charge_prompt_soon(self) -> None:
        """The upstream may have read (and will bill) the prompt, but answered nothing."""
        self.charge_estimate_soon(0)

    def ensure_settled(self) -> None:
        """Last resort when the handler ends: a request that may have reached the upstream is
        charged its prompt; one that cannot have is released."""
        if self.sent:
            self.charge_prompt_soon()
        else:
            self.release_soon()

    # --- from what the upstream answered -----------------------------------------------------

    def settle_stream(self, tap) -> None:
        reported = reported_usage(tap.usage)
        if reported is not None:
            self.commit_soon(*reported)
        elif tap.error is not None and not tap.output_chunks:
            self.release_soon()              # an upstream error before any output
        else:
            estimate = max(tap.output_chunks, math.ceil(tap.output_chars / CHARS_PER_TOKEN))
            log.info("stream %s ended without usage; charging an estimate of %d output tokens",
                     self.res.id if self.res else "-", estimate)
            self.charge_estimate_soon(estimate)

    def settle_body(self, data: bytes) -> None:
        """Settle from a whole response body; parsing it happens in the task, after the reply."""
        if self._claim():
            self.tasks.spawn(self._settle_body(data))

    async def _settle_body(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            obj = None
        reported = reported_usage(obj.get("usage") if isinstance(obj, dict) else None)
        if reported is not None:
            await self._commit(*reported)
        else:
            await self._commit(self.prompt, self._count_output(obj))

    async def _commit(self, prompt_tokens: int, completion_tokens: int) -> None:
        actual = Amounts(prompt_tokens + completion_tokens, self.model.cost(prompt_tokens, completion_tokens))
        res = self.res
        usage = Usage(prompt_tokens, 0, completion_tokens, 0)      # cached/reasoning: not read yet
        stored = await retry.until_stored(lambda: self._timed("commit", self.ledger.commit(res, actual, usage)),
                                          f"commit of {res.id}")
        if not stored:
            metrics.JOB_FAILURES.labels("settlement").inc()
        elif self.observer is not None:
            self.observer.committed(res, actual, self.org, self.model.name, prompt_tokens, 0, completion_tokens)

    @staticmethod
    async def _timed(operation: str, call):
        with metrics.Timer(metrics.STORE[operation]):
            return await call

    def _count_output(self, obj: Any) -> int:
        if not self.endpoint.output or not isinstance(obj, dict):
            return 0
        texts = []
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            msg = choice.get("message") if self.endpoint.kind == "chat" else None
            texts.append(msg.get("content") if isinstance(msg, dict) else choice.get("text"))
        return sum(self.count(t) for t in texts if isinstance(t, str))
