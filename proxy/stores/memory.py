"""The embedded store: one process, nothing to install.

Same semantics and layout as the Redis store (a table per window, a row per scope). Atomicity
comes from the event loop: no method awaits between its first read and its last write, so no other
task can interleave.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from .base import (EMPTY, LOG_LENGTH, OPEN_RECORD_MARGIN_MS, SETTLED_TTL_MS, Counter, Expired, LogEntry,
                   Note, ReserveOutcome, Seen, Status, Store, Totals)

_ZERO = (0, 0, 0, 0)
# Per reserve a Seen and a Totals for each limited counter (five in the bench's policy): built as
# NamedTuple._make builds them, without their Python-level __new__ (2.5 -> 1.5 µs for five).
_new = tuple.__new__


@dataclass(slots=True)
class _Window:
    expire_at: int                                             # epoch ms
    rows: dict[str, list[int]] = field(default_factory=dict)   # scope -> [t, tr, d, dr]


@dataclass(slots=True)
class _Record:
    state: str                       # "r" open, "x" settled by lease expiry (settled: _settled)
    tokens: int                      # "r": reserved; "x": what the sweeper charged
    usd: int
    deadline: int
    counters: tuple[Counter, ...]
    forget_at: int
    info: str = ""


class MemoryStore(Store):
    def __init__(self, clock=time.time, log_length: int = LOG_LENGTH) -> None:
        self._clock = clock
        self._log: deque[tuple] = deque(maxlen=log_length)        # LogEntry fields, see _append
        self._charged: dict[int, tuple] = {}     # id(counters) -> (counters, LogEntry.windows)
        self._trimmed_to = 0                                       # ms of the newest entry dropped
        self._seq = itertools.count()
        self._claims: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}
        self._records: dict[str, _Record] = {}      # open ("r") and expired ("x") reservations
        # Settled ids -> when to forget them (epoch ms), so that a repeated settle is a no-op and a
        # retried reserve a duplicate. Plain ints, not a _Record each: a dict of strings and ints
        # is one object the collector skips, where a record per request, kept SETTLED_TTL_MS (2
        # minutes: 360,000 of them at 3,000 requests/s), made every full collection walk them all
        # (bench/results/memory-gc.md).
        self._settled: dict[str, int] = {}
        self._open: dict[str, _Record] = {}          # the reserved (unsettled) subset, for expiry
        self._expiries: list[tuple[int, str]] = []   # heap of (expire_at, window key)
        self._forget: list[tuple[int, str]] = []     # heap of (forget_at, reservation id)
        self._next_purge = 0.0
        # Rows of a counters tuple seen before (the ledger passes one tuple per plan): id ->
        # (the tuple, generation, its rows, (index, row, token limit, micro-USD limit) of each
        # limited one). Valid while no window was dropped (`_generation`); built once every row
        # exists, so a refusal never creates rows.
        self._hot: dict[int, tuple] = {}
        self._generation = 0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _row(self, c: Counter) -> list[int] | None:
        win = self._windows.get(c.window)
        return win.rows.get(c.scope) if win is not None else None

    def _new_row(self, c: Counter) -> list[int]:
        win = self._windows.get(c.window)
        if win is None:
            win = self._windows[c.window] = _Window(c.expire_at)
            heapq.heappush(self._expiries, (c.expire_at, c.window))
        elif c.expire_at > win.expire_at:
            win.expire_at = c.expire_at
            heapq.heappush(self._expiries, (c.expire_at, c.window))
        row = win.rows[c.scope] = [0, 0, 0, 0]
        return row

    async def reserve(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                      deadline_ms: int, force: bool, info: str = "") -> ReserveOutcome:
        self._purge()
        if rid in self._records or rid in self._settled:
            return ReserveOutcome(Status.DUPLICATE)
        hot = self._hot.get(id(counters))
        if hot is not None and hot[0] is counters and hot[1] == self._generation:
            return self._reserve_hot(rid, hot, tokens, usd, deadline_ms, force, info)
        first = None
        seen = []
        rows = []                    # rows looked up once, inline (no method calls)
        windows = self._windows
        for i, c in enumerate(counters):
            win = windows.get(c.window)
            row = win.rows.get(c.scope) if win is not None else None
            rows.append(row)
            if c.token_limit < 0 and c.usd_limit < 0:
                continue
            t, tr, d, dr = row or _ZERO
            seen.append(_new(Seen, (i, _new(Totals, (t, tr, d, dr)))))
            if first is None and ((c.token_limit >= 0 and t + tr + tokens > c.token_limit) or
                                  (c.usd_limit >= 0 and d + dr + usd > c.usd_limit)):
                first = seen[-1]
                if not force:
                    return ReserveOutcome(Status.REFUSED, first)
        for j, (c, row) in enumerate(zip(counters, rows)):
            if row is None:                  # looked up again: a counter named twice is one row
                row = rows[j] = self._row(c) or self._new_row(c)
            row[1] += tokens
            row[3] += usd
        self._remember(rid, _Record("r", tokens, usd, deadline_ms, tuple(counters),
                                    deadline_ms + OPEN_RECORD_MARGIN_MS, info))
        if isinstance(counters, tuple):
            self._warm(counters, rows)
        return ReserveOutcome(Status.ADMITTED if first is None else Status.FORCED, first, tuple(seen))

    def _warm(self, counters: tuple[Counter, ...], rows: list[list[int]]) -> None:
        if len(self._hot) > 4096:
            self._hot.clear()
        limited = tuple((i, row, c.token_limit, c.usd_limit) for i, (c, row) in enumerate(zip(counters, rows))
                        if c.token_limit >= 0 or c.usd_limit >= 0)
        self._hot[id(counters)] = (counters, self._generation, tuple(rows), limited)

    def _reserve_hot(self, rid: str, hot: tuple, tokens: int, usd: int, deadline_ms: int, force: bool,
                     info: str) -> ReserveOutcome:
        """`reserve` for counters whose rows all exist: the same checks and writes, on rows
        held from an earlier call instead of two dict look-ups per counter."""
        counters, _, rows, limited = hot
        first = None
        seen = []
        for i, row, tl, dl in limited:
            t, tr, d, dr = row
            seen.append(_new(Seen, (i, _new(Totals, (t, tr, d, dr)))))
            if first is None and ((tl >= 0 and t + tr + tokens > tl) or (dl >= 0 and d + dr + usd > dl)):
                first = seen[-1]
                if not force:
                    return ReserveOutcome(Status.REFUSED, first)
        for row in rows:
            row[1] += tokens
            row[3] += usd
        self._remember(rid, _Record("r", tokens, usd, deadline_ms, counters, deadline_ms + OPEN_RECORD_MARGIN_MS, info))
        return _new(ReserveOutcome, (Status.ADMITTED if first is None else Status.FORCED, first, tuple(seen)))

    async def commit(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                     note: Note = Note("ok")) -> bool:
        return self._settle(rid, counters, tokens, usd, note)

    async def release(self, rid: str, counters: Sequence[Counter], note: Note = Note("released")) -> bool:
        return self._settle(rid, counters, 0, 0, note)

    async def expire(self, rid: str, counters: Sequence[Counter], charge: bool, now_ms: int) -> bool:
        rec = self._records.get(rid)
        if rec is None or rec.state != "r" or rec.deadline > now_ms:
            return False
        tokens, usd = (rec.tokens, rec.usd) if charge else (0, 0)
        self._apply(counters, tokens, usd, rec.tokens, rec.usd)
        self._append(rid, Note("expired"), tokens, usd, rec.info, counters)
        # Kept (with what was charged) while its windows live: a late commit corrects it.
        forget = max((c.expire_at for c in counters), default=now_ms)
        self._remember(rid, _Record("x", tokens, usd, 0, (), forget, rec.info))
        return True

    def _settle(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int, note: Note) -> bool:
        rec = self._records.get(rid)
        state = rec.state if rec else None
        if state is None and rid in self._settled:
            return False                                 # already settled
        if state == "r":
            self._apply(counters, tokens, usd, rec.tokens, rec.usd)
        elif state == "x":                               # late: correct the sweeper's charge
            tokens, usd = tokens - rec.tokens, usd - rec.usd
            self._apply(counters, tokens, usd, 0, 0)
            note = note._replace(outcome="corrected")
        else:
            self._apply(counters, tokens, usd, 0, 0)     # record lost (purged): usage is real
        self._append(rid, note, tokens, usd, rec.info if rec else "", counters)
        if rec is not None:
            del self._records[rid]
            self._open.pop(rid, None)
        forget = self._settled[rid] = self._now_ms() + SETTLED_TTL_MS
        heapq.heappush(self._forget, (forget, rid))
        return True

    def _append(self, rid: str, note: Note, tokens: int, usd: int, info: str, counters: Sequence[Counter]) -> None:
        """One entry: a plain tuple of strings, ints and plain tuples of strings (the LogEntry is
        built when read). Nothing in it is a NamedTuple, which the collector never untracks: a
        100,000-entry ring holding the Note and counters of each settlement was 200,000 objects
        every full collection walked; plain tuples of atoms it untracks once and skips."""
        now = self._now_ms()
        if len(self._log) == self._log.maxlen:
            self._trimmed_to = self._log[0][1]           # the oldest entry is about to drop
        held = self._charged.get(id(counters))
        if held is not None and held[0] is counters:
            windows = held[1]
        else:
            windows = _charged(counters)
            if isinstance(counters, tuple):              # the ledger's: one tuple per plan, reused
                if len(self._charged) > 4096:
                    self._charged.clear()
                self._charged[id(counters)] = (counters, windows)
        self._log.append((f"{now}-{next(self._seq)}", now, rid, note.outcome, tokens, usd, note.usage,
                          note.latency_ms, info, windows))

    def _apply(self, counters: Sequence[Counter], used_t: int, used_d: int, res_t: int, res_d: int) -> None:
        hot = self._hot.get(id(counters))
        if hot is not None and hot[0] is counters and hot[1] == self._generation:
            rows = hot[2]
        else:
            rows = []
            windows = self._windows
            for c in counters:
                win = windows.get(c.window)
                row = win.rows.get(c.scope) if win is not None else None
                if row is not None:
                    rows.append(row)
                elif used_t > 0 or used_d > 0:
                    # The window's data is gone (purged): record the usage, nothing to un-reserve.
                    self._new_row(c)[:] = [max(used_t, 0), 0, max(used_d, 0), 0]
        for row in rows:
            row[0] += used_t
            row[1] -= res_t
            row[2] += used_d
            row[3] -= res_d
            if row[0] < 0 or row[1] < 0 or row[2] < 0 or row[3] < 0:
                row[:] = [max(v, 0) for v in row]

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

    async def snapshot(self, counters: Sequence[Counter]) -> list[Totals]:
        return [Totals(*row) if (row := self._row(c)) else EMPTY for c in counters]

    async def windows(self, keys: Sequence[str]) -> list[dict[str, Totals]]:
        self._purge()
        out = []
        for key in keys:
            win = self._windows.get(key)
            out.append({f: Totals(*row) for f, row in win.rows.items()} if win else {})
        return out

    async def settlements(self, since_ms: int | None, until_ms: int | None, limit: int,
                          before: str | None = None) -> list[LogEntry]:
        out = []
        older = _seq_key(before) if before else None
        for raw in reversed(self._log):
            seq, ms = raw[0], raw[1]
            if older is not None and _seq_key(seq) >= older:
                continue
            if until_ms is not None and ms > until_ms:
                continue
            if since_ms is not None and ms < since_ms:
                break
            out.append(LogEntry(*raw))
            if len(out) >= limit:
                break
        return out

    async def log_trimmed_to(self) -> int:
        return self._trimmed_to

    async def claim(self, name: str, expire_at_ms: int) -> bool:
        now = self._now_ms()
        if self._claims.get(name, 0) > now:
            return False
        if len(self._claims) > 10_000:
            self._claims = {k: v for k, v in self._claims.items() if v > now}
        self._claims[name] = expire_at_ms
        return True

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

        The heaps may hold stale entries (a record re-remembered, a window whose expiry grew); an
        entry only deletes when the live item's own time has passed."""
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + 1.0
        now_ms = int(now * 1000)
        while self._expiries and self._expiries[0][0] <= now_ms:
            _, key = heapq.heappop(self._expiries)
            win = self._windows.get(key)
            if win is not None and win.expire_at <= now_ms:
                del self._windows[key]
                self._generation += 1             # rows held in _hot may be gone
        while self._forget and self._forget[0][0] <= now_ms:
            _, rid = heapq.heappop(self._forget)
            rec = self._records.get(rid)
            if rec is not None:
                if rec.forget_at <= now_ms:
                    del self._records[rid]
                    self._open.pop(rid, None)
            elif self._settled.get(rid, now_ms + 1) <= now_ms:
                del self._settled[rid]


def _seq_key(seq: str) -> tuple[int, int]:
    ms, _, n = seq.partition("-")
    return int(ms), int(n or 0)


def _charged(counters: Sequence[Counter]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """LogEntry.windows: (window key, its scope fields) in the counters' order."""
    windows: dict[str, list[str]] = {}
    for c in counters:
        windows.setdefault(c.window, []).append(c.scope)
    return tuple((k, tuple(v)) for k, v in windows.items())
