"""The budget ledger: reserve, commit, release and snapshot across every scope of a request.

A request touches one counter per scope (global, org, user, provider, model) and window (minute,
hour, day, month); each counter holds tokens and micro-dollars. Day and month counters are kept
for every scope, limited or not: a limit added to the policy while the proxy runs then applies to
what was already spent this day or month, and the snapshot reports spend everywhere. Minute and
hour counters are kept only where the policy limits them (a new one starts from zero): they are
half of all counters and nobody reads an unlimited minute's spend, while each counter costs Redis
work on every request.

Windows are fixed at reserve time: the reservation carries its counter keys, so a request that
starts at 23:59:59 and ends after midnight is charged to the day it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from .keys import scope_field, window_key
from .policy import UNLIMITED, Policy
from .errors import StoreUnavailable
from .stores import Counter, ReserveOutcome, Seen, Status, Store
from .windows import WINDOWS, Window, windows_at

log = logging.getLogger(__name__)
MAX_AMOUNT = 2 ** 50          # per request and unit: exact as a Lua number, far above any real use
_ALWAYS_TRACKED = WINDOWS.index("day")     # windows from here on are kept even when unlimited


class Scope(NamedTuple):
    type: str     # global | org | user | provider | model
    id: str


@dataclass(frozen=True, slots=True)
class Amounts:
    tokens: int
    usd: int      # micro-dollars


@dataclass(frozen=True, slots=True)
class Refusal:
    """The first counter a request would exceed, in the order minute, hour, day, month and,
    within a window, the order of the request's scopes (amounts in the unit's integer form)."""
    scope: Scope
    window: str
    unit: str            # "tokens" or "usd" (micro-dollars)
    limit: int
    used: int
    reserved: int
    requested: int
    reset_in: float      # seconds until that window resets


class Balance(NamedTuple):
    scope: Scope
    window: str
    unit: str
    limit: int | None    # None: unlimited
    used: int
    reserved: int
    remaining: int | None
    resets_at: float     # epoch seconds


class Slot(NamedTuple):
    """One counter of a request with the scope and window it counts."""
    counter: Counter
    scope: Scope
    window: Window


class Plan(NamedTuple):
    """The counters of a set of scopes in the current windows (`counters` as the store takes them)."""
    counters: tuple[Counter, ...]
    slots: tuple[Slot, ...]


FAR_FUTURE_MS = 2 ** 62


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    amounts: Amounts
    counters: tuple[Counter, ...]
    deadline_ms: int
    would_refuse: Refusal | None = None     # shadow mode: admitted although over this limit
    # The limited counters right after this reservation (it included), as the store saw them.
    balances: tuple[Balance, ...] = ()


class Ledger:
    def __init__(self, store: Store, policy: Policy, *, namespace: str = "bp", clock=time.time) -> None:
        self.store = store
        self.policy = policy          # swapped whole on reload; read once per call
        self._ns = namespace
        self._clock = clock
        self._windows_cache: tuple[int, object, tuple[Window, ...]] = (-1, None, ())
        self._plans: dict[tuple[Scope, ...], Plan] = {}   # for the current windows and policy
        self._plans_for: tuple = (None, None)
        self.pending: set[asyncio.Task] = set()    # undo tasks; the app waits for them at shutdown

    def now(self) -> float:
        """The ledger's clock (epoch seconds): windows and lease deadlines are read from it."""
        return self._clock()

    def _windows(self, now: float, policy: Policy) -> tuple[Window, ...]:
        second, tz, wins = self._windows_cache
        if int(now) != second or tz is not policy.timezone:
            wins = windows_at(int(now), policy.timezone)
            self._windows_cache = (int(now), policy.timezone, wins)
        return wins

    def _plan(self, scopes: Sequence[Scope], now: float, policy: Policy) -> Plan:
        """The counters of `scopes` now, cached until the windows or the policy change."""
        wins = self._windows(now, policy)
        if self._plans_for[0] is not wins or self._plans_for[1] is not policy or len(self._plans) > 4096:
            self._plans = {}
            self._plans_for = (wins, policy)
        key = tuple(scopes)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build_plan(key, wins, policy)
        return plan

    def _build_plan(self, scopes: tuple[Scope, ...], wins: tuple[Window, ...], policy: Policy) -> Plan:
        """Window by window (the store reads and writes each window once), scope by scope."""
        lease_margin = 2 * policy.lease_seconds
        tables = [policy.limits_for(scope.type, scope.id).table for scope in scopes]
        slots = []
        for i, w in enumerate(wins):
            key = window_key(self._ns, w.label)
            expire_ms = int((w.end + max(w.end - w.start, lease_margin)) * 1000)
            for scope, table in zip(scopes, tables):
                tl, dl = table[i]
                if i < _ALWAYS_TRACKED and tl == UNLIMITED and dl == UNLIMITED:
                    continue
                slots.append(Slot(Counter(key, scope_field(scope.type, scope.id), tl, dl, expire_ms), scope, w))
        return Plan(tuple(s.counter for s in slots), tuple(slots))

    async def reserve(self, rid: str, amounts: Amounts, scopes: Sequence[Scope]) -> Reservation | Refusal:
        """Reserve `amounts` on every counter of `scopes`, or refuse naming the first one over."""
        if not (0 <= amounts.tokens <= MAX_AMOUNT and 0 <= amounts.usd <= MAX_AMOUNT):
            raise ValueError(f"amounts out of range: {amounts}")
        policy = self.policy
        now = self._clock()
        plan = self._plan(scopes, now, policy)
        counters = plan.counters
        deadline = int((now + policy.lease_seconds) * 1000)
        try:
            out = await self.store.reserve(rid, counters, amounts.tokens, amounts.usd, deadline, policy.shadow)
        except (StoreUnavailable, asyncio.CancelledError):
            # The answer was lost (timeout, dropped connection, the caller went away) but the
            # script may have run: undo it by id, off the caller's task, retrying a while.
            task = asyncio.ensure_future(self._undo(rid, counters))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
            raise
        if out.status is Status.REFUSED:
            return self._refusal(out, plan, amounts, now)
        refusal = self._refusal(out, plan, amounts, now) if out.status is Status.FORCED else None
        return Reservation(rid, amounts, counters, deadline, refusal, self._after(out.seen, plan, amounts))

    @staticmethod
    def _after(seen: Sequence[Seen], plan: Plan, amounts: Amounts) -> tuple[Balance, ...]:
        out = []
        for i, (t, tr, d, dr) in seen:
            c, scope, w = plan.slots[i]
            if c.token_limit >= 0:
                tr += amounts.tokens
                out.append(Balance(scope, w.name, "tokens", c.token_limit, t, tr,
                                   max(0, c.token_limit - t - tr), w.end))
            if c.usd_limit >= 0:
                dr += amounts.usd
                out.append(Balance(scope, w.name, "usd", c.usd_limit, d, dr, max(0, c.usd_limit - d - dr), w.end))
        return tuple(out)

    @staticmethod
    def _refusal(out: ReserveOutcome, plan: Plan, amounts: Amounts, now: float) -> Refusal:
        assert out.over is not None
        c, scope, w = plan.slots[out.over.index]
        t, tr, d, dr = out.over.totals
        if c.token_limit >= 0 and t + tr + amounts.tokens > c.token_limit:
            return Refusal(scope, w.name, "tokens", c.token_limit, t, tr, amounts.tokens, w.end - now)
        return Refusal(scope, w.name, "usd", c.usd_limit, d, dr, amounts.usd, w.end - now)

    async def _undo(self, rid: str, counters, attempts: int = 10) -> None:
        """Release a reserve whose answer was lost (a settle of an unknown id only marks it
        settled, so a reserve retried later under that id is a no-op too). If the store stays
        down through every attempt, the lease expires and the sweeper settles it."""
        for attempt in range(attempts):
            try:
                await self.store.release(rid, counters)
                return
            except StoreUnavailable:
                await asyncio.sleep(min(0.1 * 2 ** attempt, 5.0))
        log.error("could not release reservation %s whose answer was lost; its lease will expire", rid)

    async def commit(self, res: Reservation, actual: Amounts) -> bool:
        """Charge the actual amounts in the reservation's windows. False if already settled."""
        self._check_overrun(res, actual)
        tokens, usd = (min(max(0, v), MAX_AMOUNT) for v in (actual.tokens, actual.usd))
        return await self.store.commit(res.id, res.counters, tokens, usd)

    async def release(self, res: Reservation) -> bool:
        """Give the reservation back; nothing used. False if already settled."""
        return await self.store.release(res.id, res.counters)

    async def extend(self, res: Reservation) -> Reservation:
        """Push the lease of a long-running request by another lease length from now."""
        deadline = int((self._clock() + self.policy.lease_seconds) * 1000)
        if await self.store.extend(res.id, deadline):
            return Reservation(res.id, res.amounts, res.counters, deadline, res.would_refuse)
        return res

    async def sweep(self, limit: int = 100) -> int:
        """Settle reservations whose lease expired (their process died); the count settled."""
        now_ms = int(self._clock() * 1000)
        charge = self.policy.on_expiry == "commit"
        n = 0
        for rid, counters in await self.store.expired(now_ms, limit):
            if await self.store.expire(rid, counters, charge, now_ms):
                log.warning("lease of reservation %s expired; %s", rid,
                            "charged at its reserved amount" if charge else "released")
                n += 1
        return n

    async def snapshot(self, scopes: Sequence[Scope], limited_only: bool = False) -> list[Balance]:
        """Limit, used, reserved and remaining per scope, window and unit (every tracked counter:
        day and month always, minute and hour where limited; only limited ones if asked)."""
        policy = self.policy
        slots = self._plan(scopes, self._clock(), policy).slots
        if limited_only:
            slots = tuple(s for s in slots if s.counter.token_limit >= 0 or s.counter.usd_limit >= 0)
        rows = await self.store.snapshot([s.counter for s in slots]) if slots else []
        out = []
        for (c, scope, w), (t, tr, d, dr) in zip(slots, rows):
            for unit, limit, used, reserved in (("tokens", c.token_limit, t, tr), ("usd", c.usd_limit, d, dr)):
                if limited_only and limit == UNLIMITED:
                    continue
                lim = None if limit == UNLIMITED else limit
                rem = None if lim is None else max(0, lim - used - reserved)
                out.append(Balance(scope, w.name, unit, lim, used, reserved, rem, w.end))
        return out

    async def open_reservations(self, limit: int = 1000) -> list[str]:
        """Ids of reservations not yet settled, whatever their lease (tests and operators: after
        every request has finished, none should remain)."""
        return [e.id for e in await self.store.expired(FAR_FUTURE_MS, limit)]

    @staticmethod
    def _check_overrun(res: Reservation, actual: Amounts) -> None:
        for unit, got, held in (("tokens", actual.tokens, res.amounts.tokens), ("usd", actual.usd, res.amounts.usd)):
            if got > held:
                level = logging.CRITICAL if got > 5 * held else logging.WARNING
                log.log(level, "reservation %s used %d %s, more than the %d reserved", res.id, got,
                        unit if unit == "tokens" else "micro-USD", held)


__all__ = ["Amounts", "Balance", "Ledger", "Refusal", "Reservation", "Scope", "WINDOWS"]
