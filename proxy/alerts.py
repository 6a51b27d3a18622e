"""Budget alerts: a webhook call when a commit crosses a threshold of a limit, and at a scope's
first refusal in a window.

Once, everywhere: each (scope, window, unit, threshold) is claimed in the store before it is sent
(`Ledger.claim`, atomic across every proxy process sharing the store), so however many workers
and machines see the crossing, one of them sends it. Thresholds are on *used* (committed) spend;
reservations in flight do not fire them.

Cheap on the request path: a commit is checked against the balances its reservation already
read (no store call) and only when those say a threshold not yet fired here may have been
reached does a background task read the counters (one snapshot) and claim. Deliveries go
through a bounded queue to a few sender tasks that retry with exponential backoff; a full queue
drops the alert (logged and counted), so a dead receiver never slows or blocks a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Iterable, NamedTuple
from urllib.parse import urlsplit

import aiohttp

from . import metrics
from .errors import BudgetProxyError
from .ledger import Amounts, Balance, Ledger, Refusal, Reservation, Scope
from .policy import Webhook
from .tasks import Tasks

log = logging.getLogger(__name__)

CLAIM_MARGIN_MS = 86_400_000      # a claim outlives its window by a day: late commits stay deduplicated
FIRED_MEMORY = 10_000             # local memory of fired alerts, to skip store calls; pruned past it


class Crossing(NamedTuple):
    event: str                    # budget_threshold | budget_exhausted
    scope: Scope
    window: str
    unit: str                     # tokens | usd
    threshold: float
    used: int                     # tokens or micro-USD
    limit: int
    window_end: float             # epoch seconds

    def key(self) -> str:
        return (f"alert:{self.event}:{self.scope.type}:{self.scope.id}:{self.window}:"
                f"{round(self.window_end)}:{self.unit}:{self.threshold:g}")


def payload(c: Crossing) -> dict:
    """The JSON body: machine-readable fields, and `text` for Slack or Teams to show as is."""
    shown = (lambda v: round(v / 1_000_000, 6)) if c.unit == "usd" else (lambda v: v)
    unit = "USD" if c.unit == "usd" else "tokens"
    end = datetime.fromtimestamp(c.window_end, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    who = f"{c.scope.type} '{c.scope.id}'"
    amounts = f"{shown(c.used)} of {shown(c.limit)} {unit}"
    if c.event == "budget_exhausted":
        text = (f"budget-proxy: {who} has run out of its {c.window} {unit} budget ({amounts} used); "
                f"its requests are refused until {end}.")
    else:
        text = (f"budget-proxy: {who} has used {c.used / c.limit:.0%} of its {c.window} {unit} limit "
                f"({amounts}; alert at {c.threshold:.0%}). The window resets at {end}.")
    return {"event": c.event, "scope": {"type": c.scope.type, "id": c.scope.id}, "window": c.window,
            "unit": c.unit, "threshold": c.threshold, "used": shown(c.used), "limit": shown(c.limit),
            "window_end": end, "text": text}


class Sender:
    """Delivers alert bodies to webhooks from a bounded queue, with retries and backoff."""

    def __init__(self, *, queue_size: int = 1000, workers: int = 4, attempts: int = 5,
                 backoff: float = 0.5, timeout: float = 5.0) -> None:
        self.queue: asyncio.Queue[tuple[Webhook, dict]] = asyncio.Queue(queue_size)
        self._workers = workers
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]

    async def close(self, grace: float = 2.0) -> None:
        """Give queued alerts a moment, then stop (an alert still queued at shutdown is lost)."""
        if self._tasks and not self.queue.empty():
            try:
                await asyncio.wait_for(self.queue.join(), grace)
            except asyncio.TimeoutError:
                log.warning("%d alerts not delivered at shutdown", self.queue.qsize())
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1)
        if self._session is not None:
            await self._session.close()

    def send(self, hook: Webhook, body: dict) -> None:
        try:
            self.queue.put_nowait((hook, body))
        except asyncio.QueueFull:
            metrics.ALERTS.labels("dropped").inc()
            log.error("alert queue full (%d): dropped %s for %s:%s", self.queue.maxsize, body["event"],
                      body["scope"]["type"], body["scope"]["id"])

    async def _work(self) -> None:
        while True:
            hook, body = await self.queue.get()
            try:
                await self._deliver(hook, body)
            finally:
                self.queue.task_done()

    async def _deliver(self, hook: Webhook, body: dict) -> None:
        host = urlsplit(hook.url).hostname          # the rest of the URL is usually a secret
        for attempt in range(self._attempts):
            try:
                async with self._session.post(hook.url, json=body) as resp:
                    if resp.status < 300:
                        metrics.ALERTS.labels("delivered").inc()
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                problem = type(exc).__name__
            if attempt + 1 < self._attempts:
                log.warning("alert to %s failed (%s); retrying", host, problem)
                await asyncio.sleep(self._backoff * 2 ** attempt)
        metrics.ALERTS.labels("failed").inc()
        log.error("alert %s to %s failed %d times (%s); giving up", body["event"], host, self._attempts, problem)


class Alerts:
    def __init__(self, ledger: Ledger, tasks: Tasks, sender: Sender, clock=time.time) -> None:
        self.ledger = ledger
        self.tasks = tasks
        self.sender = sender
        self._clock = clock
        self._fired: dict[str, float] = {}       # claim key -> window end: already sent (anywhere)

    # --- hooks (synchronous, no I/O) --------------------------------------------------------

    def committed(self, res: Reservation, actual: Amounts) -> None:
        alerts = self.ledger.policy.alerts
        if not alerts.webhooks or not res.balances:
            return
        scopes = {b.scope for b in self._maybe_crossed(res, actual, alerts.thresholds)}
        if scopes:
            self.tasks.spawn(self._check(list(scopes), alerts.thresholds))

    def refused(self, r: Refusal) -> None:
        if not self.ledger.policy.alerts.webhooks:
            return
        end = self._clock() + r.reset_in
        crossing = Crossing("budget_exhausted", r.scope, r.window, r.unit, 1.0, r.used, r.limit, end)
        if crossing.key() not in self._fired:
            self.tasks.spawn(self._claim_and_send([crossing]))

    def _maybe_crossed(self, res: Reservation, actual: Amounts, thresholds) -> Iterable[Balance]:
        """Balances that may now be past a threshold not yet fired here. At reservation time,
        used + reserved already counted this request's reservation; an overrun adds the excess."""
        extra = {"tokens": max(0, actual.tokens - res.amounts.tokens), "usd": max(0, actual.usd - res.amounts.usd)}
        for b in res.balances:
            projected = b.used + b.reserved + extra[b.unit]
            for t in thresholds:
                if projected >= t * b.limit and self._key(b, t) not in self._fired:
                    yield b
                    break

    @staticmethod
    def _key(b: Balance, threshold: float) -> str:
        return Crossing("budget_threshold", b.scope, b.window, b.unit, threshold, 0, 0, b.resets_at).key()

    # --- background ----------------------------------------------------------------------------

    async def _check(self, scopes: list[Scope], thresholds) -> None:
        try:
            balances = await self.ledger.snapshot(scopes, limited_only=True)
        except BudgetProxyError as exc:
            metrics.JOB_FAILURES.labels("alert_check").inc()
            log.warning("alert check failed: %s", exc)
            return
        crossings = [Crossing("budget_threshold", b.scope, b.window, b.unit, t, b.used, b.limit, b.resets_at)
                     for b in balances if b.limit for t in thresholds if b.used >= t * b.limit]
        await self._claim_and_send(crossings)

    async def _claim_and_send(self, crossings: list[Crossing]) -> None:
        """Claim every crossing not yet fired; of those won for one counter, send only the
        highest (a commit that jumps from 50 % to 97 % sends one alert, not two)."""
        latest: dict[tuple, Crossing] = {}
        for c in sorted(crossings, key=lambda c: c.threshold):
            key = c.key()
            if key in self._fired:
                continue
            try:
                won = await self.ledger.claim(key, round(c.window_end * 1000) + CLAIM_MARGIN_MS)
            except BudgetProxyError as exc:
                metrics.JOB_FAILURES.labels("alert_check").inc()
                log.warning("alert claim failed: %s", exc)
                break
            self._remember(key, c.window_end)
            if won:
                latest[(c.event, c.scope, c.window, c.unit)] = c
        hooks = self.ledger.policy.alerts.webhooks
        for c in latest.values():
            body = payload(c)
            for hook in hooks:
                if hook.wants(c.scope.type):
                    self.sender.send(hook, body)

    def _remember(self, key: str, window_end: float) -> None:
        if len(self._fired) >= FIRED_MEMORY:
            now = self._clock()
            self._fired = {k: end for k, end in self._fired.items() if end > now}
            if len(self._fired) >= FIRED_MEMORY:
                self._fired.clear()          # only costs a few store claims that answer "taken"
        self._fired[key] = window_end
