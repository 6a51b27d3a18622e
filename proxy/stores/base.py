"""The store interface: atomic operations only. Policy arithmetic and routing live in the ledger."""

from __future__ import annotations

import abc
import enum
from typing import NamedTuple, Sequence

# How long a settled id is remembered so a repeated settle or reserve is a no-op: retries come
# within seconds (redis-py's own within one), and at thousands of requests a second a longer
# memory costs real RAM (an hour of ids is gigabytes).
SETTLED_TTL_MS = 120_000
# An open reservation's record outlives its lease deadline by this much: long enough for the
# sweeper of any surviving process to find it, bounded so a store without sweepers still empties.
OPEN_RECORD_MARGIN_MS = 35 * 86_400_000
# Settlement log entries kept by default (a capped stream on Redis, a ring in memory; the oldest
# go first). About 420-520 bytes each on Redis: 100,000 entries are ~45 MB. `budget-proxy audit`
# needs the log to reach back to the start of the window it checks.
LOG_LENGTH = 100_000


class Status(enum.IntEnum):
    REFUSED = 0     # a counter would go over its limit; nothing was written
    ADMITTED = 1    # every counter was charged
    DUPLICATE = 2   # this reservation id already reserved; nothing was written again
    FORCED = 3      # over a limit but written anyway (shadow mode)


class Counter(NamedTuple):
    """One scope in one window. A NamedTuple, not a dataclass: a request builds a dozen of these.

    Counters of one window share its key (one hash per window, a field per scope); a request's
    counters come grouped by window, which lets a store read and write each window once."""
    window: str        # the window's key, e.g. "{bp}:w:d20261129"
    scope: str         # the scope's field in it, e.g. "org:acme"
    token_limit: int   # -1: unlimited
    usd_limit: int     # micro-dollars; -1: unlimited
    expire_at: int     # epoch ms after which the window may vanish (its end plus a margin)


class Totals(NamedTuple):
    """One counter's amounts: tokens and micro-dollars, used (settled) and reserved (open)."""
    tokens_used: int
    tokens_reserved: int
    usd_used: int
    usd_reserved: int


EMPTY = Totals(0, 0, 0, 0)


class Seen(NamedTuple):
    """A limited counter as a reserve read it, before adding its own amounts."""
    index: int         # position in the counters passed to reserve
    totals: Totals


class ReserveOutcome(NamedTuple):
    status: Status
    over: Seen | None = None       # REFUSED / FORCED: the first counter over its limit
    seen: tuple[Seen, ...] = ()    # ADMITTED / FORCED: every limited counter, so the caller knows
    #                                the balances without another round trip: its totals in the
    #                                units it limits (a unit it does not limit may read 0: the
    #                                Redis store leaves it out of its reply)


class Expired(NamedTuple):
    """An open reservation whose lease deadline has passed (its process likely died)."""
    id: str
    counters: tuple[Counter, ...]


class Note(NamedTuple):
    """What a settlement's log record says beyond the amounts (see proxy/settlement_log.py)."""
    outcome: str             # ok | cut | client_gone | upstream_error | released (expired and
    #                          corrected are the store's own)
    usage: str = ""          # "<prompt> <cached> <completion> <reasoning>" tokens, or "" unknown
    latency_ms: str = ""     # upstream latency, or "" unknown


class LogEntry(NamedTuple):
    """One settlement as the store logged it, in the same atomic call that moved the counters."""
    seq: str                 # its position in the log ("<ms>-<n>", as a Redis stream id)
    time_ms: int             # when it was written (the store's clock)
    id: str                  # reservation id
    outcome: str
    tokens: int              # what the counters' used amounts moved by (a correction: the delta)
    usd: int                 # micro-dollars, likewise
    usage: str               # as in Note
    latency_ms: str
    info: str                # the request, as passed to reserve (opaque to the store)
    windows: tuple[tuple[str, tuple[str, ...]], ...]   # (window key, scope fields charged there)


class Store(abc.ABC):
    """Counters and reservations. Every method is atomic; every failure is StoreUnavailable.

    Settling is idempotent by reservation id: `commit`, `release` and `expire` answer False and
    write nothing when the reservation was already settled."""

    @abc.abstractmethod
    async def reserve(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                      deadline_ms: int, force: bool, info: str = "") -> ReserveOutcome:
        """Check every counter (used + reserved + amount <= limit), then charge every counter's
        reserved amount, or none. Records the reservation with a lease until `deadline_ms`.
        A second call with the same `rid` writes nothing and answers DUPLICATE. With `force`,
        charge even when over (answering FORCED with the first counter over its limit). `info`
        (one line) is kept with the reservation and copied into its settlement's log entry."""

    @abc.abstractmethod
    async def commit(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                     note: Note = Note("ok")) -> bool:
        """Move reservation `rid` from reserved to used with the actual amounts. After `expire`
        charged it, correct that charge to the actual amounts (once). Unknown `rid` (the store
        lost it): charge the amounts anyway, the usage is real."""

    @abc.abstractmethod
    async def release(self, rid: str, counters: Sequence[Counter], note: Note = Note("released")) -> bool:
        """Give reservation `rid` back, nothing used (after `expire`: refund what it charged).
        Unknown `rid`: marked settled, so a reserve retried later under it writes nothing."""

    @abc.abstractmethod
    async def expire(self, rid: str, counters: Sequence[Counter], charge: bool, now_ms: int) -> bool:
        """The sweeper: settle open reservation `rid` if its lease deadline is not after
        `now_ms`, charging what it reserved (`charge`) or nothing. What it charged is kept, so a
        later `commit` or `release` of the live request corrects it once. False if not due."""

    @abc.abstractmethod
    async def extend(self, rid: str, deadline_ms: int) -> bool:
        """Push the lease deadline of an open reservation; False if it is already settled."""

    @abc.abstractmethod
    async def expired(self, now_ms: int, limit: int) -> list[Expired]:
        """Up to `limit` open reservations whose lease deadline is <= `now_ms`, with their counters."""

    @abc.abstractmethod
    async def snapshot(self, counters: Sequence[Counter]) -> list[Totals]:
        """The totals of each counter (zeros for a counter never written)."""

    @abc.abstractmethod
    async def windows(self, keys: Sequence[str]) -> list[dict[str, Totals]]:
        """Every scope field of each window with its totals: the index of the scopes seen there."""

    @abc.abstractmethod
    async def settlements(self, since_ms: int | None, until_ms: int | None, limit: int,
                          before: str | None = None) -> list[LogEntry]:
        """Up to `limit` log entries written in [since_ms, until_ms], newest first; `before`
        (an entry's `seq`) continues a previous page with the entries older than it."""

    @abc.abstractmethod
    async def log_trimmed_to(self) -> int:
        """Epoch ms up to which the capped settlement log may have dropped entries (0: none),
        so an audit knows whether the log still reaches back to a window's start. Exact in
        memory; on Redis the time of the oldest entry kept (MAXLEN trims the oldest, but the
        stream does not say which), which errs towards refusing an audit, never towards a
        wrong one."""

    @abc.abstractmethod
    async def claim(self, name: str, expire_at_ms: int) -> bool:
        """True for the first caller (any process) to claim `name` until `expire_at_ms`."""

    async def give_back(self) -> int:
        """Return what leased allowances of shared scopes hold unused and idle (the cluster
        store, docs/cluster.md); the number returned. Nothing to do on a single store."""
        return 0

    async def close(self) -> None:
        """Release connections."""
