"""The store interface: atomic operations only. Policy arithmetic and routing live in the ledger."""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import NamedTuple, Sequence


class Status(enum.IntEnum):
    REFUSED = 0     # a counter would go over its limit; nothing was written
    ADMITTED = 1    # every counter was charged
    DUPLICATE = 2   # this reservation id already reserved; nothing was written again
    FORCED = 3      # over a limit but written anyway (shadow mode)


class Counter(NamedTuple):
    """A NamedTuple, not a dataclass: a request builds a dozen of these, and tuples are cheap."""
    key: str
    token_limit: int   # -1: unlimited
    usd_limit: int     # micro-dollars; -1: unlimited
    expire_at: int     # epoch ms after which the key may vanish (its window's end plus a margin)


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    status: Status
    index: int = -1          # first counter over its limit, or -1
    used_tokens: int = 0     # that counter's usage before this request
    reserved_tokens: int = 0
    used_usd: int = 0
    reserved_usd: int = 0
    # When admitted: (counter index, t, tr, d, dr) of every limited counter, read before this
    # reservation was added, so the caller knows the balances without another round trip.
    seen: tuple[tuple[int, int, int, int, int], ...] = ()


class Store(abc.ABC):
    """Counters and reservations. Every method is atomic; every failure is StoreUnavailable."""

    @abc.abstractmethod
    async def reserve(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                      deadline_ms: int, force: bool) -> ReserveOutcome:
        """Check every counter (used + reserved + amount <= limit), then charge every counter's
        reserved amount, or none. Records the reservation with a lease until `deadline_ms`.
        A second call with the same `rid` writes nothing and answers DUPLICATE. With `force`,
        charge even when over (answering FORCED with the first counter over its limit)."""

    @abc.abstractmethod
    async def settle(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                     not_after_ms: int = 0) -> bool:
        """Move reservation `rid` from reserved to used with the actual amounts (0, 0 = release;
        -1, -1 = charge what was reserved). With `not_after_ms` (the sweeper), only if its lease
        deadline is not after it; what it charged is kept, and a later plain settle of the same
        id (the live request finishing after all) corrects the charge to its actual amounts,
        once. False when already settled or not due: settling is idempotent."""

    @abc.abstractmethod
    async def extend(self, rid: str, deadline_ms: int) -> bool:
        """Push the lease deadline of an open reservation; False if it is already settled."""

    @abc.abstractmethod
    async def expired(self, now_ms: int, limit: int) -> list[tuple[str, list[Counter]]]:
        """Up to `limit` open reservations whose lease deadline has passed, with their counters."""

    @abc.abstractmethod
    async def snapshot(self, keys: Sequence[str]) -> list[tuple[int, int, int, int]]:
        """(tokens used, tokens reserved, micro-USD used, micro-USD reserved) per key."""

    async def close(self) -> None:
        """Release connections."""
