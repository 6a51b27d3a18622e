"""The embedded store: one process, nothing to install.

Same semantics as the Redis store. Atomicity comes from the event loop: no method awaits between
its first read and its last write, so no other task can interleave.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Sequence

from .base import (EMPTY, OPEN_RECORD_MARGIN_MS, SETTLED_TTL_MS, Counter, Expired, ReserveOutcome,
                   Seen, Status, Store, Totals)

_EMPTY = (0, 0, 0, 0, 0)


@dataclass(slots=True)
class _Record:
    state: str                       # "r" open, "c" settled, "x" settled by lease expiry
    tokens: int
    usd: int
    deadline: int
    counters: tuple[Counter, ...]
    forget_at: int


class MemoryStore(Store):
    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._counters: dict[str, list[int]] = {}    # key -> [t, tr, d, dr, expire_at]
        self._records: dict[str, _Record] = {}
        self._open: dict[str, _Record] = {}          # the reserved (unsettled) subset, for expiry
        self._expiries: list[tuple[int, str]] = []   # heap of (expire_at, counter key)
        self._forget: list[tuple[int, str]] = []     # heap of (forget_at, reservation id)
        self._next_purge = 0.0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def reserve(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                      deadline_ms: int, force: bool) -> ReserveOutcome:
        self._purge()
        if rid in self._records:
            return ReserveOutcome(Status.DUPLICATE)
        table = self._counters
        first = None
        seen = []
        for i, c in enumerate(counters):
            if c.token_limit < 0 and c.usd_limit < 0:
                continue
            t, tr, d, dr, _ = table.get(c.key) or _EMPTY
            seen.append(Seen(i, Totals(t, tr, d, dr)))
            if first is None and ((c.token_limit >= 0 and t + tr + tokens > c.token_limit) or
                                  (c.usd_limit >= 0 and d + dr + usd > c.usd_limit)):
                first = seen[-1]
                if not force:
                    return ReserveOutcome(Status.REFUSED, first)
        for c in counters:
            row = table.get(c.key)
            if row is None:
                table[c.key] = [0, tokens, 0, usd, c.expire_at]
                heapq.heappush(self._expiries, (c.expire_at, c.key))
            else:
                row[1] += tokens
                row[3] += usd
                if c.expire_at > row[4]:
                    row[4] = c.expire_at
                    heapq.heappush(self._expiries, (c.expire_at, c.key))
        self._remember(rid, _Record("r", tokens, usd, deadline_ms, tuple(counters),
                                    deadline_ms + OPEN_RECORD_MARGIN_MS))
        return ReserveOutcome(Status.ADMITTED if first is None else Status.FORCED, first, tuple(seen))

    async def commit(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int) -> bool:
        return self._settle(rid, counters, tokens, usd)

    async def release(self, rid: str, counters: Sequence[Counter]) -> bool:
        return self._settle(rid, counters, 0, 0)

    async def expire(self, rid: str, counters: Sequence[Counter], charge: bool, now_ms: int) -> bool:
        rec = self._records.get(rid)
        if rec is None or rec.state != "r" or rec.deadline > now_ms:
            return False
        tokens, usd = (rec.tokens, rec.usd) if charge else (0, 0)
        self._apply(counters, tokens, usd, rec.tokens, rec.usd)
        # Kept (with what was charged) while its counters live: a late commit corrects it.
        forget = max((c.expire_at for c in counters), default=now_ms)
        self._remember(rid, _Record("x", tokens, usd, 0, (), forget))
        return True

    def _settle(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int) -> bool:
        rec = self._records.get(rid)
        state = rec.state if rec else None
        res_t, res_d = (rec.tokens, rec.usd) if rec else (0, 0)
        if state == "r":
            self._apply(counters, tokens, usd, res_t, res_d)
        elif state == "x":                               # late commit: correct the sweeper's charge
            self._apply(counters, tokens - res_t, usd - res_d, 0, 0)
        elif state is not None:
            return False                                 # already settled
        else:
            self._apply(counters, tokens, usd, 0, 0)     # record lost (purged): usage is real
        self._remember(rid, _Record("c", 0, 0, 0, (), self._now_ms() + SETTLED_TTL_MS))
        return True

    def _apply(self, counters: Sequence[Counter], used_t: int, used_d: int, res_t: int, res_d: int) -> None:
        table = self._counters
        for c in counters:
            row = table.get(c.key)
            if row is None:
                # The window's data is gone (purged): record the usage, nothing to un-reserve.
                if used_t > 0 or used_d > 0:
                    table[c.key] = [max(used_t, 0), 0, max(used_d, 0), 0, c.expire_at]
                    heapq.heappush(self._expiries, (c.expire_at, c.key))
                continue
            row[0] += used_t
            row[1] = max(0, row[1] - res_t)
            row[2] += used_d
            row[3] = max(0, row[3] - res_d)

    async def extend(self, rid: str, deadline_ms: int) -> bool:
        rec = self._records.get(rid)
        if rec is None or rec.state != "r":
            return False
        rec.deadline = deadline_ms
        self._remember(rid, rec)
        return True

    async def expired(self, now_ms: int, limit: int) -> list[Expired]:
        self._purge()
        due = [Expired(rid, r.counters) for rid, r in self._open.items() if r.deadline <= now_ms]
        return due[:limit]

    async def snapshot(self, keys: Sequence[str]) -> list[Totals]:
        get = self._counters.get
        return [Totals(*row[:4]) if (row := get(k)) else EMPTY for k in keys]

    def _remember(self, rid: str, rec: _Record) -> None:
        if rec.state == "r":
            rec.forget_at = rec.deadline + OPEN_RECORD_MARGIN_MS
            self._open[rid] = rec
        else:
            self._open.pop(rid, None)
        self._records[rid] = rec
        heapq.heappush(self._forget, (rec.forget_at, rid))

    def _purge(self) -> None:
        """Drop expired windows and forgotten records, at most once a second.

        The heaps may hold stale entries (a record re-remembered, a key whose expiry grew); an
        entry only deletes when the live item's own time has passed."""
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + 1.0
        now_ms = int(now * 1000)
        while self._expiries and self._expiries[0][0] <= now_ms:
            _, key = heapq.heappop(self._expiries)
            row = self._counters.get(key)
            if row is not None and row[4] <= now_ms:
                del self._counters[key]
        while self._forget and self._forget[0][0] <= now_ms:
            _, rid = heapq.heappop(self._forget)
            rec = self._records.get(rid)
            if rec is not None and rec.forget_at <= now_ms:
                del self._records[rid]
                self._open.pop(rid, None)
