"""What the proxy tells its operators about budget events, in one place: the gateway and the
settlement call these hooks, and the hooks fan out to the metrics, the alerts and the ring of
recent refusals the admin page shows. Every hook is cheap and synchronous: anything that needs
the store or the network (alert checks, deliveries) is handed to a background task.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

from . import metrics
from .ledger import Amounts, Refusal, Reservation, overrun

if TYPE_CHECKING:
    from .alerts import Alerts

RECENT_REFUSALS = 50


class RefusalSeen(NamedTuple):
    time: float               # epoch seconds
    org: str
    user: str
    model: str                # the first candidate asked for
    refusal: Refusal


class Observer:
    def __init__(self, alerts: "Alerts | None" = None, clock=time.time) -> None:
        self.alerts = alerts
        # This process's latest refusals, newest last (a page answered by one worker shows its own).
        self.refusals: deque[RefusalSeen] = deque(maxlen=RECENT_REFUSALS)
        self._clock = clock
        # (org, model) -> its spend counters (USD, prompt, cached and completion tokens): one
        # look-up a commit instead of four. Bounded as the metrics' own labels are.
        self._spend: dict[tuple[str, str], tuple] = {}

    def admitted(self, res: Reservation, asked: str, model: str) -> None:
        metrics.reservations("forced" if res.would_refuse is not None else "admitted").inc()
        if model != asked:
            metrics.downgrades(asked, model).inc()

    def refused(self, refusal: Refusal, org: str, user: str, asked: str) -> None:
        metrics.reservations("refused").inc()
        self.refusals.append(RefusalSeen(self._clock(), org, user, asked, refusal))
        if self.alerts is not None:
            self.alerts.refused(refusal)

    def store_unavailable(self) -> None:
        metrics.reservations("store_unavailable").inc()

    def committed(self, res: Reservation, actual: Amounts, org: str, model: str, prompt: int,
                  cached: int, completion: int) -> None:
        spend = self._spend.get((org, model))
        if spend is None:
            if len(self._spend) > 10_000:
                self._spend.clear()
            spend = self._spend[org, model] = (
                metrics.spend_usd(org, model), metrics.spend_tokens(org, model, "prompt"),
                metrics.spend_tokens(org, model, "cached"), metrics.spend_tokens(org, model, "completion"))
        usd_spent, prompt_spent, cached_spent, completion_spent = spend
        usd_spent.inc(actual.usd / 1_000_000)
        prompt_spent.inc(prompt)
        if cached:
            cached_spent.inc(cached)
        completion_spent.inc(completion)
        severity = overrun(res.amounts, actual)
        if severity is not None:
            metrics.overruns(severity).inc()
        if self.alerts is not None:
            self.alerts.committed(res, actual)
