"""Settling one admitted request: commit what it used, or release what it reserved, exactly once.

A `Flight` is built from what it needs - the ledger, the reservation, the model (its prices), a
callable that counts output tokens, and the task tracker - and never calls back into whoever made
it. It settles with the real usage when the upstream reported it, else an estimate that is never
zero for a request that produced output; a request that may have reached the upstream but got no
answer is charged its prompt; one that cannot have reached it is released.

Every settlement is claimed synchronously (so no path can settle twice, and the handler's
last-resort `ensure_settled` knows whether one is under way) and then runs in a tracked task that
retries while the store is unreachable: a cancelled handler never cuts a settlement short. (Not
run in the handler even where the store never waits: under load that cost more CPU per request
than the task, whose settlements run together after the loop's handlers; bench/results/hotpath-3.md.)
While open, the lease is extended every third of its length (by the task tracker's `Renewals`: one
loop timer for every open request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Callable

from . import jsonmember, metrics, pricing, retry
from .config import Model
from .endpoints import Endpoint
from .errors import StoreUnavailable
from .ledger import Amounts, Ledger, Reservation
from .observer import Observer
from .settlement_log import TokenCounts
from .tasks import Tasks

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4      # for output we could not count: English text averages about 4 characters a token
# How far from the end of a whole answer its `usage` member is looked for before the whole is parsed:
# OpenAI, Anthropic and LiteLLM put it last or nearly (a Responses answer's few members after it
# are under 2 KB unless its metadata is large).
USAGE_TAIL_BYTES = 16 * 1024
_COMMIT_SECONDS = metrics.STORE["commit"]


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
        self.sent_at: float | None = None   # monotonic time the request went upstream (it may have reached it)
        self.latency_ms: int | None = None   # upstream time, from sending to the end of the answer
        self.observer = observer    # told of the commit (metrics, alerts); None in unit tests
        self.org = org
        self._settled = res is None
        if res is not None:
            tasks.renewals.add(self, self._first_period(res), self._renew)

    # --- the lease --------------------------------------------------------------------------

    def _period(self) -> float:
        return self.ledger.policy.lease_seconds / 3

    def _first_period(self, res: Reservation) -> float:
        """The first renewal comes a third of the way through the lease the reservation holds,
        not the current policy's: a reload that lengthened `lease_seconds` while the reserve was
        out would otherwise put the first renewal after this lease ends. (Once per request:
        `_period` spelt out.)"""
        ledger = self.ledger
        held = res.deadline_ms / 1000 - ledger.now()
        return max(0.01, min(ledger.policy.lease_seconds / 3, held / 3))

    def _renew(self) -> float:
        """Every third of the lease while open (the task tracker's renewals call it)."""
        if not self._settled:
            self.tasks.spawn(self._extend())
        return self._period()

    async def _extend(self) -> None:
        try:
            self.res = await self.ledger.extend(self.res)
        except StoreUnavailable as exc:
            log.warning("could not extend lease %s: %s", self.res.id, exc)

    # --- claiming a settlement ----------------------------------------------------------------

    @property
    def sent(self) -> bool:
        return self.sent_at is not None

    def mark_sent(self) -> None:
        self.sent_at = time.monotonic()     # (not the loop's time: a getpid() call to find the loop)

    def _claim(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        if self.res is not None:
            self.tasks.renewals.discard(self)
        if self.sent_at is not None:
            self.latency_ms = round((time.monotonic() - self.sent_at) * 1000)
        return True

    # Outcomes, as the settlement log records them: ok (answered), cut (the upstream stream broke
    # off), client_gone (the client left first), upstream_error (the upstream failed or could not
    # be reached, or the proxy failed after sending), released (never sent).

    def release_soon(self, outcome: str = "released") -> None:
        """Nothing was used (the upstream was never reached, or refused before any output)."""
        if self._claim():
            self.tasks.spawn(self._release(outcome))

    def commit_soon(self, usage: pricing.Usage, outcome: str = "ok") -> None:
        if self._claim():
            self.tasks.spawn(self._commit(usage, outcome))

    def charge_prompt_soon(self, outcome: str = "upstream_error") -> None:
        """The upstream may have read (and will bill) the prompt, but answered nothing."""
        self.commit_soon(pricing.estimate(self.prompt, 0), outcome)

    def ensure_settled(self, outcome: str = "upstream_error") -> None:
        """Last resort when the handler ends: a request that may have reached the upstream is
        charged its prompt; one that cannot have is released."""
        if self._settled:                   # the usual case: settled on the way (nothing to price)
            return
        if self.sent:
            self.charge_prompt_soon(outcome)
        else:
            self.release_soon()

    # --- from what the upstream answered -----------------------------------------------------

    def settle_stream(self, tap, ended: str = "ok") -> None:
        """From a stream tap: its usage if the upstream reported it; released if the upstream
        failed before any output; else what is known of the input (the estimate, or the exact
        input a stream reported at its start) plus an estimate of the output streamed.
        `ended`: how the stream ended (ok, cut, client_gone), the log's outcome."""
        read = self.endpoint.read_usage
        usage = read(tap.usage)
        if usage is not None:
            self.commit_soon(usage, ended)
        elif tap.error is not None and not tap.output_chunks:
            self.release_soon("upstream_error")      # an upstream error before any output
        else:
            # Only typed-event taps may know part of the usage (Anthropic: the exact input).
            known = read(getattr(tap, "partial", None)) or pricing.estimate(self.prompt, 0)
            estimate = max(known.output, tap.output_chunks, math.ceil(tap.output_chars / CHARS_PER_TOKEN))
            log.info("stream %s ended without usage; charging an estimate of %d output tokens",
                     self.res.id if self.res else "-", estimate)
            self.commit_soon(known._replace(output=estimate), ended)

    def settle_body(self, data: bytes) -> None:
        """Settle from a whole response body; parsing it happens in the task, after the reply."""
        if self._claim():
            self.tasks.spawn(self._settle_body(data))

    async def _settle_body(self, data: bytes) -> None:
        """The answer's top-level `usage` is read on its own when it sits in the answer's last
        USAGE_TAIL_BYTES (it ends every OpenAI and Anthropic answer), without parsing the rest:
        parsing the whole was 5 % of the proxy's CPU for a short chat answer (bench/instructions.py)
        and, for an embeddings answer of many MB, a long stall of the loop. Otherwise, or if that
        `usage` is not one the endpoint can read, the whole answer is parsed as before (its output
        counted when it has no usable usage)."""
        read = self.endpoint.read_usage
        found = jsonmember.value(data, "usage", USAGE_TAIL_BYTES)
        usage = read(found) if found is not jsonmember.MISSING else None
        if usage is None:
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError):
                obj = None
            usage = read(obj.get("usage") if isinstance(obj, dict) else None)
            if usage is None:
                usage = pricing.estimate(self.prompt, self._count_output(obj))
        await self._commit(usage)

    async def _commit(self, usage: pricing.Usage, outcome: str = "ok") -> None:
        """Tokens and the dollars of the model actually used, every token kind at its own rate."""
        actual = Amounts(usage.total_tokens, self.model.charge(usage))
        logged = TokenCounts(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, usage.reasoning)
        res, latency = self.res, self.latency_ms
        try:            # the first attempt without retry's layers (a lambda and two coroutines)
            started = time.perf_counter()       # timed inline: see gateway._RESERVE_SECONDS
            try:
                await self.ledger.commit(res, actual, logged, outcome, latency)
            finally:
                _COMMIT_SECONDS.observe(time.perf_counter() - started)
            stored = True
        except StoreUnavailable as exc:
            stored = await _retried(lambda: self._timed("commit", self.ledger.commit(res, actual, logged, outcome,
                                                                                     latency)),
                                    f"commit of {res.id}", exc)
        if not stored:
            metrics.JOB_FAILURES.labels("settlement").inc()
        elif self.observer is not None:
            self.observer.committed(res, actual, self.org, self.model.name, usage.prompt_tokens,
                                    usage.cached_tokens, usage.completion_tokens)

    async def _release(self, outcome: str) -> None:
        res, latency = self.res, self.latency_ms
        try:
            with metrics.Timer(metrics.STORE["release"]):
                await self.ledger.release(res, outcome, latency)
        except StoreUnavailable as exc:
            await _retried(lambda: self._timed("release", self.ledger.release(res, outcome, latency)),
                           f"release of {res.id}", exc)

    @staticmethod
    async def _timed(operation: str, call):
        with metrics.Timer(metrics.STORE[operation]):
            return await call

    def _count_output(self, obj: Any) -> int:
        if not self.endpoint.output or not isinstance(obj, dict):
            return 0
        return sum(self.count(t) for t in self.endpoint.output_texts(obj) if isinstance(t, str))


async def _retried(call: Callable[[], Any], what: str, failed: StoreUnavailable) -> bool:
    """retry.until_stored's other attempts, after a first that failed with `failed`: the same
    count in all (the back-off starts again from its shortest once)."""
    if retry.ATTEMPTS <= 1:
        log.error("%s failed %d times, leaving it to lease expiry: %s", what, retry.ATTEMPTS, failed)
        return False
    await asyncio.sleep(retry.backoff(0))
    return await retry.until_stored(call, what, retry.ATTEMPTS - 1)
