"""Planning a reservation: which scopes a request touches, how much to reserve, which model first.

`plan` is one pure function (no store, no HTTP): from the parsed call, the caller, the candidate
models, the prompt estimate, the policy and a snapshot of the balances, it returns the
candidates in the order to try, each with its scopes and amounts. The reservation that follows
is authoritative; the snapshot only picks the order and caps a defaulted completion.

Order: the first candidate whose reservation would leave every limited counter at or above
`downgrade_below` of its limit; else the first that fits at all; after it, the cheaper (later)
candidates that fit, as fallbacks for a lost race. When the snapshot says nothing fits, every
candidate is still tried: the store has the last word.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from .auth import Caller
from .body import ApiCall
from .config import Model
from .ledger import Amounts, Balance, Scope
from .policy import UNLIMITED, Policy

CACHE_SECONDS = 1.0
CACHE_SCOPES = 50_000


class Candidate(NamedTuple):
    model: str                     # registry name
    amounts: Amounts               # what to reserve
    scopes: tuple[Scope, ...]
    default_cap: int | None = None     # completion tokens per choice reserved for a call that set none


def scopes_for(who: Caller, model: Model) -> tuple[Scope, ...]:
    return (Scope("global", "*"), Scope("org", who.org), Scope("user", who.user),
            Scope("provider", model.provider), Scope("model", model.name))


def any_limited(policy: Policy, scopes: Iterable[Scope]) -> bool:
    """Does any counter of these scopes have a limit (so balances can change a decision)?"""
    return any(t != UNLIMITED or d != UNLIMITED
               for s in scopes for t, d in policy.limits_for(s.type, s.id).table)


def needs_balances(call: ApiCall, models: Sequence[Model]) -> bool:
    """Balances decide something only with several candidates or a completion to default."""
    return len(models) > 1 or (call.endpoint.output and call.max_output is None)


def plan(call: ApiCall, who: Caller, models: Sequence[Model], prompt: int, policy: Policy,
         balances: Sequence[Balance]) -> list[Candidate]:
    cands = [_candidate(call, who, m, prompt, policy, balances) for m in models]
    if not balances:
        return cands
    return order(cands, balances, policy.downgrade_below) or cands


def _candidate(call: ApiCall, who: Caller, m: Model, prompt: int, policy: Policy,
               balances: Sequence[Balance]) -> Candidate:
    scopes = scopes_for(who, m)
    cap = None
    if not call.endpoint.output:
        per_choice = 0
    elif call.max_output is not None:
        per_choice = call.max_output           # the client asked for that much: reserved in full
    else:
        per_choice = cap = default_completion(m, scopes, balances, prompt, policy.default_max_tokens,
                                              call.choices)
    completion = per_choice * call.choices
    return Candidate(m.name, Amounts(prompt + completion, m.cost(prompt, completion)), scopes, cap)


def default_completion(m: Model, scopes: Sequence[Scope], balances: Sequence[Balance], prompt: int,
                       default: int, choices: int) -> int:
    """Completion tokens per choice to reserve for a call that set no limit: the policy default,
    capped by what remains in the tightest scope (shared by the `choices`), so a worst-case
    guess cannot pin a budget. At least 1."""
    tokens_left = usd_left = None
    for b in balances:
        if b.scope not in scopes or b.limit is None:
            continue
        left = b.limit - b.used - b.reserved
        if b.unit == "tokens":
            tokens_left = left if tokens_left is None else min(tokens_left, left)
        else:
            usd_left = left if usd_left is None else min(usd_left, left)
    room = default * choices
    if tokens_left is not None:
        room = min(room, tokens_left - prompt)
    if usd_left is not None and m.output_per_million > 0:
        room = min(room, int((usd_left - m.cost(prompt, 0)) / m.output_per_million))
    return max(1, min(default, room // choices))


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
    """Candidates in the order to try: the preferred one first, then the cheaper (later) ones
    that may fit. Empty when none fits by the snapshot."""
    by_scope: dict[tuple[Scope, str], list[Balance]] = {}
    for b in snapshot:
        if b.limit is not None:
            by_scope.setdefault((b.scope, b.unit), []).append(b)
    fits = [(i, c) for i, c in enumerate(candidates) if _headroom(c, by_scope) is not None]
    if not fits:
        return []
    first = next((i for i, c in fits if _headroom(c, by_scope) >= threshold), fits[0][0])
    return [c for i, c in fits if i >= first]


class BalanceCache:
    """Balances of limited counters per scope, as last seen, for up to CACHE_SECONDS.

    Every reservation returns the balances it read, so a busy scope is planned without a
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
