"""Choosing a model among the candidates, from a snapshot of the budgets (advisory).

The reservation that follows is authoritative; the router only picks the order to try.
Rule: the first candidate whose reservation would leave every limited counter at or above
`downgrade_below` of its limit; else the first that fits at all; else none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .ledger import Amounts, Balance, Scope

CACHE_SECONDS = 1.0
CACHE_SCOPES = 50_000


class BalanceCache:
    """Balances of limited counters per scope, as last seen, for up to CACHE_SECONDS.

    Every reservation returns the balances it read, so a busy scope is routed without a
    snapshot round trip; the reservation itself stays authoritative. Another process's spending
    shows up within a second; this process's commits show up with its next reservation."""

    def __init__(self) -> None:
        self._by_scope: dict[Scope, tuple[float, list[Balance]]] = {}

    def get(self, scopes: Iterable[Scope], now: float) -> list[Balance] | None:
        out: list[Balance] = []
        for scope in scopes:
            hit = self._by_scope.get(scope)
            if hit is None or hit[0] < now:
                return None
            out += hit[1]
        return out

    def put(self, scopes: Iterable[Scope], balances: Iterable[Balance], now: float) -> None:
        if len(self._by_scope) > CACHE_SCOPES:
            self._by_scope.clear()
        fresh: dict[Scope, list[Balance]] = {s: [] for s in scopes}
        for b in balances:
            if b.scope in fresh:
                fresh[b.scope].append(b)
        until = now + CACHE_SECONDS
        for scope, found in fresh.items():
            self._by_scope[scope] = (until, found)


@dataclass(frozen=True, slots=True)
class Candidate:
    model: str
    amounts: Amounts
    scopes: tuple[Scope, ...]


def _headroom(c: Candidate, balances: dict[tuple[Scope, str], list[Balance]]) -> float | None:
    """The smallest remaining fraction across limited counters after reserving `c`; None if it
    does not fit at all; 1.0 if nothing limits it."""
    worst = 1.0
    for scope in c.scopes:
        for b in [*balances.get((scope, "tokens"), ()), *balances.get((scope, "usd"), ())]:
            want = c.amounts.tokens if b.unit == "tokens" else c.amounts.usd
            left = b.limit - b.used - b.reserved - want
            if left < 0:
                return None
            worst = min(worst, left / b.limit if b.limit else 0.0)
    return worst


def order(candidates: Sequence[Candidate], snapshot: Sequence[Balance], threshold: float) -> list[Candidate]:
    """Candidates in the order to try: the preferred one first, then the rest that may fit,
    best first. Empty when none fits by the snapshot."""
    by_scope: dict[tuple[Scope, str], list[Balance]] = {}
    for b in snapshot:
        if b.limit is not None:
            by_scope.setdefault((b.scope, b.unit), []).append(b)
    fits = [(c, h) for c in candidates if (h := _headroom(c, by_scope)) is not None]
    if not fits:
        return []
    preferred = next((c for c, h in fits if h >= threshold), fits[0][0])
    return [preferred] + [c for c, _ in fits if c is not preferred and _after(c, preferred, candidates)]


def _after(c: Candidate, preferred: Candidate, candidates: Sequence[Candidate]) -> bool:
    """Only cheaper (later) candidates are fallbacks after a lost race."""
    return candidates.index(c) > candidates.index(preferred)
