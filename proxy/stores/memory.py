"""The embedded store: one process, nothing to install.

Same semantics as the Redis store. Atomicity comes from the event loop: no method awaits between
its first read and its last write, so no other task can interleave.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Sequence

from .base import Counter, ReserveOutcome, Status, Store

# How long a settled id is remembered so a repeated settle or reserve is a no-op: retries come
# within seconds, and at thousands of requests a second a longer memory costs real RAM.
SETTLED_TTL_MS = 120_000
OPEN_RECORD_MARGIN_MS = 35 * 86_400_000
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
            seen.append((i, t, tr, d, dr))
            if first is None and ((c.token_limit >= 0 and t + tr + tokens > c.token_limit) or
                                  (c.usd_limit >= 0 and d + dr + usd > c.usd_limit)):
                first = ReserveOutcome(Status.REFUSED, i, t, tr, d, dr)
                if not force:
                    break
        if first is not None and not force:
            return first
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
        if first is None:
            return ReserveOutcome(Status.ADMITTED, seen=tuple(seen))
        return ReserveOutcome(Status.FORCED, first.index, first.used_tokens, first.reserved_tokens,
                              first.used_usd, first.reserved_usd, tuple(seen))

    async def settle(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                     not_after_ms: int = 0) -> bool:
        rec = self._records.get(rid)
        state = rec.state if rec else None
        res_t, res_d = (rec.tokens, rec.usd) if rec else (0, 0)
        if tokens < 0:
            tokens, usd = res_t, res_d
        if not_after_ms:                                 # the sweeper, for an expired lease
            if state != "r" or rec.deadline > not_after_ms:
                return False
            self._apply(counters, tokens, usd, res_t, res_d)
            # Kept (with what was charged) while its counters live: a late commit corrects it.
            forget = max((c.expire_at for c in counters), default=not_after_ms)
            self._remember(rid, _Record("x", tokens, usd, 0, (), forget))
            return True
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

    async def expired(self, now_ms: int, limit: int) -> list[tuple[str, list[Counter]]]:
        self._purge()
        due = [(rid, list(r.counters)) for rid, r in self._open.items() if r.deadline <= now_ms]
        return due[:limit]

    async def snapshot(self, keys: Sequence[str]) -> list[tuple[int, int, int, int]]:
        get = self._counters.get
        return [tuple((get(k) or _EMPTY)[:4]) for k in keys]  # type: ignore[misc]

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
