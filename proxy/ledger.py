"""The budget ledger: reserve, commit, release and snapshot across every scope of a request.

A request touches one counter per scope (global, org, user, provider, model) and window (minute,
hour, day, month); each counter holds tokens and micro-dollars. Day and month counters are kept
for every scope, limited or not: a limit added to the policy while the proxy runs then applies to
what was already spent this day or month, and the snapshot reports spend everywhere. Minute and
hour counters are kept only where the policy limits them (a new one starts from zero): they are
half of all counters and nobody reads an unlimited minute's spend, while each counter costs Redis
work on every request.

Windows are fixed at reserve time: the reservation carries its counters, so a request that
starts at 23:59:59 and ends after midnight is charged to the day it started.

Every settlement also appends a record to the settlement log in the same store call (see
settlements.py); `settlements`, `usage`, `audit` and `claim` are the reads and the one write the
admin API, the CLI and alerts build on.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from .keys import parse_scope_field, scope_field, window_key
from .policy import UNLIMITED, Policy
from .errors import AuditIncomplete, StoreUnavailable
from .settlement_log import OUTCOMES, Drift, RequestInfo, SettlementRecord, TokenCounts, audit, record
from .stores import Counter, ReserveOutcome, Seen, Status, Store
from .stores.base import Note
from . import retry
from .tasks import Tasks
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


class Layout(NamedTuple):
    """The counters of a set of scopes in the current windows (`counters` as the store takes them)."""
    counters: tuple[Counter, ...]
    slots: tuple[Slot, ...]


FAR_FUTURE_MS = 2 ** 62
_new = tuple.__new__


class Pair(NamedTuple):
    tokens: int | None     # None: unlimited (in a limit or what remains of one)
    usd: int | None        # micro-dollars


class ScopeUsage(NamedTuple):
    """One scope in one window, as the usage API shows it."""
    scope: Scope
    window: str            # minute | hour | day | month
    start: float           # epoch seconds
    end: float
    used: Pair
    reserved: Pair
    limit: Pair
    remaining: Pair


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
    def __init__(self, store: Store, policy: Policy, *, namespace: str = "bp", clock=time.time,
                 tasks: Tasks | None = None) -> None:
        self.store = store
        self.policy = policy          # swapped whole on reload; read once per call
        self._ns = namespace
        self._clock = clock
        self._windows_cache: tuple[int, object, tuple[Window, ...]] = (-1, None, ())
        self._layouts: dict[tuple[Scope, ...], Layout] = {}   # for the current windows and policy
        self._layouts_for: tuple = (None, None)
        self.tasks = tasks or Tasks()   # runs undos of lost reserves; the app's, drained at shutdown

    def now(self) -> float:
        """The ledger's clock (epoch seconds): windows and lease deadlines are read from it."""
        return self._clock()

    def counters(self, scopes: Sequence[Scope]) -> tuple[Counter, ...]:
        """The store counters `scopes` are charged to now (what a reservation of them would hold)."""
        return self._layout(scopes, self._clock(), self.policy).counters

    def _windows(self, now: float, policy: Policy) -> tuple[Window, ...]:
        second, tz, wins = self._windows_cache
        if int(now) != second or tz is not policy.timezone:
            wins = windows_at(int(now), policy.timezone)
            self._windows_cache = (int(now), policy.timezone, wins)
        return wins

    def _layout(self, scopes: Sequence[Scope], now: float, policy: Policy) -> Layout:
        """The counters of `scopes` now, cached until the windows or the policy change."""
        wins = self._windows(now, policy)
        if self._layouts_for[0] is not wins or self._layouts_for[1] is not policy or len(self._layouts) > 4096:
            self._layouts = {}
            self._layouts_for = (wins, policy)
        key = tuple(scopes)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._build_layout(key, wins, policy)
        return layout

    def _build_layout(self, scopes: tuple[Scope, ...], wins: tuple[Window, ...], policy: Policy) -> Layout:
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
        return Layout(tuple(s.counter for s in slots), tuple(slots))

    async def reserve(self, rid: str, amounts: Amounts, scopes: Sequence[Scope],
                      info: RequestInfo | None = None) -> Reservation | Refusal:
        """Reserve `amounts` on every counter of `scopes`, or refuse naming the first one over.
        `info` is kept with the reservation for its settlement's log record."""
        if not (0 <= amounts.tokens <= MAX_AMOUNT and 0 <= amounts.usd <= MAX_AMOUNT):
            raise ValueError(f"amounts out of range: {amounts}")
        policy = self.policy
        now = self._clock()
        layout = self._layout(scopes, now, policy)
        counters = layout.counters
        deadline = int((now + policy.lease_seconds) * 1000)
        try:
            out = await self.store.reserve(rid, counters, amounts.tokens, amounts.usd, deadline, policy.shadow,
                                           info.pack() if info else "")
        except (StoreUnavailable, asyncio.CancelledError):
            # The answer was lost (timeout, dropped connection, the caller went away) but the
            # script may have run: undo it by id, off the caller's task, retrying a while.
            self.tasks.spawn(self._undo(rid, counters))
            raise
        if out.status is Status.REFUSED:
            return self._refusal(out, layout, amounts, now)
        refusal = self._refusal(out, layout, amounts, now) if out.status is Status.FORCED else None
        return Reservation(rid, amounts, counters, deadline, refusal, self._balances_after(out.seen, layout, amounts))

    @staticmethod
    def _balances_after(seen: Sequence[Seen], layout: Layout, amounts: Amounts) -> tuple[Balance, ...]:
        """Every reservation's balances (a handful): built as NamedTuple._make builds them,
        without the Python-level __new__ of a NamedTuple call (3.3 -> 2.2 µs for five)."""
        out = []
        tokens, usd = amounts.tokens, amounts.usd
        slots = layout.slots
        for i, (t, tr, d, dr) in seen:
            c, scope, w = slots[i]
            limit = c.token_limit
            if limit >= 0:
                tr += tokens
                left = limit - t - tr
                out.append(_new(Balance, (scope, w.name, "tokens", limit, t, tr, left if left > 0 else 0, w.end)))
            limit = c.usd_limit
            if limit >= 0:
                dr += usd
                left = limit - d - dr
                out.append(_new(Balance, (scope, w.name, "usd", limit, d, dr, left if left > 0 else 0, w.end)))
        return tuple(out)

    @staticmethod
    def _refusal(out: ReserveOutcome, layout: Layout, amounts: Amounts, now: float) -> Refusal:
        assert out.over is not None
        c, scope, w = layout.slots[out.over.index]
        t, tr, d, dr = out.over.totals
        if c.token_limit >= 0 and t + tr + amounts.tokens > c.token_limit:
            return Refusal(scope, w.name, "tokens", c.token_limit, t, tr, amounts.tokens, w.end - now)
        return Refusal(scope, w.name, "usd", c.usd_limit, d, dr, amounts.usd, w.end - now)

    async def _undo(self, rid: str, counters) -> None:
        """Release a reserve whose answer was lost (a settle of an unknown id only marks it
        settled, so a reserve retried later under that id is a no-op too). If the store stays
        down through every attempt, the lease expires and the sweeper settles it."""
        await retry.until_stored(lambda: self.store.release(rid, counters),
                                 f"release of reservation {rid} whose answer was lost")

    async def commit(self, res: Reservation, actual: Amounts, usage: TokenCounts | None = None,
                     outcome: str = "ok", latency_ms: int | None = None) -> bool:
        """Charge the actual amounts in the reservation's windows, logging `usage` and `outcome`
        (ok, cut, client_gone, upstream_error). False if already settled."""
        self._check_overrun(res, actual)
        tokens = min(max(0, actual.tokens), MAX_AMOUNT)
        usd = min(max(0, actual.usd), MAX_AMOUNT)
        return await self.store.commit(res.id, res.counters, tokens, usd, _note(outcome, usage, latency_ms))

    async def release(self, res: Reservation, outcome: str = "released", latency_ms: int | None = None) -> bool:
        """Give the reservation back; nothing used. False if already settled."""
        return await self.store.release(res.id, res.counters, _note(outcome, None, latency_ms))

    async def extend(self, res: Reservation) -> Reservation:
        """Push the lease of a long-running request by another lease length from now."""
        deadline = int((self._clock() + self.policy.lease_seconds) * 1000)
        if await self.store.extend(res.id, deadline):
            return Reservation(res.id, res.amounts, res.counters, deadline, res.would_refuse)
        return res

    async def sweep(self, limit: int = 100) -> int:
        """Settle reservations whose lease expired (their process died); the count settled."""
        await self.store.give_back()     # idle allowances go back first (cluster store)
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
        slots = self._layout(scopes, self._clock(), policy).slots
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

    async def usage(self, window: str | None = None, type: str | None = None,  # noqa: A002 - API names
                    id: str | None = None) -> list[ScopeUsage]:  # noqa: A002
        """Every scope seen in the current windows (or the one named), read from each window's
        index in one pipeline. Minute and hour windows list the scopes limited there (only those
        are counted; see the module docstring); day and month every scope that spent."""
        policy = self.policy
        now = self._clock()
        wins = [w for w in self._windows(now, policy) if window is None or w.name == window]
        if window is not None and not wins:
            raise ValueError(f"window: expected one of {', '.join(WINDOWS)}, got {window!r}")
        tables = await self.store.windows([window_key(self._ns, w.label) for w in wins])
        # Every scope of the window (one per end user, so possibly tens of thousands): built in a
        # thread, so an admin page never stalls the requests on the event loop (20,000 end users:
        # about a second of CPU).
        return await asyncio.to_thread(_usage_rows, wins, tables, policy, type, id)

    async def settlements(self, since_ms: int | None = None, until_ms: int | None = None, limit: int = 100,
                          org: str | None = None, user: str | None = None) -> list[SettlementRecord]:
        """The settlement log, newest first, filtered by time (epoch ms) and org / user."""
        out: list[SettlementRecord] = []
        before = None
        size = min(max(limit, 100), 2000)        # pages bound each reply (the log may be 100 MB)
        while len(out) < limit:
            page = await self.store.settlements(since_ms, until_ms, size, before)
            for entry in page:
                r = record(entry)
                if (org is None or r.org == org) and (user is None or r.user == user):
                    out.append(r)
                    if len(out) == limit:
                        break
            if len(page) < size:
                break
            before = page[-1].seq
        return out

    async def audit(self, window: str = "day") -> list[Drift]:
        """Every scope's used amounts in the current `window`, recomputed from the settlement log
        (which must reach back to the window's start), beside the counters."""
        w = next((w for w in self._windows(self._clock(), self.policy) if w.name == window), None)
        if w is None:
            raise ValueError(f"window: expected one of {', '.join(WINDOWS)}, got {window!r}")
        trimmed = await self.store.log_trimmed_to()
        if trimmed >= w.start * 1000:
            raise AuditIncomplete(
                f"the settlement log no longer reaches back to the {window} window's start: records "
                f"up to {_iso(trimmed)} may have been trimmed (settlement_log.max_records), so the "
                f"{window} cannot be recomputed; audit a shorter window or keep more records")
        key = window_key(self._ns, w.label)
        (table,) = await self.store.windows([key])
        return audit(key, table, await self.settlements(limit=2 ** 62))

    async def claim(self, key: str, expire_at_ms: int) -> bool:
        """True for exactly one caller across every process sharing the store, until the claim
        expires (e.g. one alert per scope, window, unit and threshold)."""
        return await self.store.claim(key, expire_at_ms)

    @staticmethod
    def _check_overrun(res: Reservation, actual: Amounts) -> None:
        severity = overrun(res.amounts, actual)
        if severity is None:
            return
        level = logging.CRITICAL if severity == "critical" else logging.WARNING
        for unit, got, held in (("tokens", actual.tokens, res.amounts.tokens), ("usd", actual.usd, res.amounts.usd)):
            if got > held:
                log.log(level, "reservation %s used %d %s, more than the %d reserved", res.id, got,
                        unit if unit == "tokens" else "micro-USD", held)


OVERRUN_CRITICAL = 5       # a commit over five times what it reserved is critical


def overrun(reserved: Amounts, actual: Amounts) -> str | None:
    """None when a commit stayed within its reservation; else "warning", or "critical" when it
    used more than OVERRUN_CRITICAL times what it reserved (in either unit)."""
    if actual.tokens <= reserved.tokens and actual.usd <= reserved.usd:
        return None
    worst = max(actual.tokens / max(reserved.tokens, 1), actual.usd / max(reserved.usd, 1))
    return "critical" if worst > OVERRUN_CRITICAL else "warning"


def _note(outcome: str, usage: TokenCounts | None, latency_ms: int | None) -> Note:
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome: expected one of {', '.join(OUTCOMES)}, got {outcome!r}")
    return Note(outcome, usage.pack() if usage else "", "" if latency_ms is None else str(int(latency_ms)))


def _usage_rows(wins: Sequence[Window], tables: Sequence[Mapping[str, Any]], policy: Policy,
                type: str | None, id: str | None) -> list[ScopeUsage]:  # noqa: A002 - API names
    out = []
    for w, table in zip(wins, tables):
        i = WINDOWS.index(w.name)
        for field, (t, tr, d, dr) in sorted(table.items()):
            scope = Scope(*parse_scope_field(field))
            if (type is not None and scope.type != type) or (id is not None and scope.id != id):
                continue
            tl, dl = (None if v == UNLIMITED else v for v in policy.limits_for(scope.type, scope.id).table[i])
            left = Pair(None if tl is None else max(0, tl - t - tr), None if dl is None else max(0, dl - d - dr))
            out.append(ScopeUsage(scope, w.name, w.start, w.end, Pair(t, d), Pair(tr, dr), Pair(tl, dl), left))
    return out


__all__ = ["Amounts", "Balance", "Ledger", "Pair", "Refusal", "RequestInfo", "Reservation", "Scope",
           "ScopeUsage", "SettlementRecord", "TokenCounts", "WINDOWS"]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
