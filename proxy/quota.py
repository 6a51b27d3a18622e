"""What a request's budget looks like to the client: the 429 and the x-budget-* headers."""

from __future__ import annotations

import functools
import math
from typing import Sequence
from urllib.parse import quote

from .errors import BudgetExceeded
from .ledger import Balance, Refusal, Scope


def _display(unit: str, amount: int) -> float | int:
    return amount / 1_000_000 if unit == "usd" else amount


# Scopes every org spends from: their balances move with other tenants' spending, so a caller is
# never shown their amounts (one org could otherwise watch another's spend, call by call). The
# operator sees them in /admin, /metrics and `budget-proxy usage`.
SHARED = frozenset({"global", "provider", "model"})


def refusal_error(r: Refusal) -> BudgetExceeded:
    """The 429. SDKs honour Retry-After only up to about a minute and retry 429s by default, so
    `x-should-retry: false` is sent for day and month windows and for any reset over 60 s away.
    A shared scope is named without its limit and usage."""
    wait = max(0.0, r.reset_in)
    unit = "USD" if r.unit == "usd" else "tokens"
    shared = r.scope.type in SHARED
    shown = {"type": r.scope.type, "id": r.scope.id, "window": r.window, "unit": r.unit,
             "limit": None if shared else _display(r.unit, r.limit),
             "used": None if shared else _display(r.unit, r.used),
             "requested": _display(r.unit, r.requested)}
    if shared:
        message = (f"Budget exceeded for the shared {r.scope.type} budget '{r.scope.id}': its {r.window} "
                   f"limit leaves too little for this request ({shown['requested']} {unit}). The "
                   f"{r.window} window resets in {math.ceil(wait)} s.")
    else:
        message = (f"Budget exceeded for {r.scope.type} '{r.scope.id}': the {r.window} limit is "
                   f"{shown['limit']} {unit}, {_display(r.unit, r.used + r.reserved)} are used or reserved, "
                   f"and this request needs {shown['requested']}. The {r.window} window resets in "
                   f"{math.ceil(wait)} s.")
    headers = {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000)),
               "x-should-retry": "false" if r.window in ("day", "month") or wait > 60 else "true"}
    return BudgetExceeded(message, headers=headers, extra={"scope": shown})


def budget_headers(model: str, asked: str, balances: Sequence[Balance]) -> dict[str, str]:
    """x-budget-model (and -downgraded-from); for the caller's own limited scopes (org, user),
    never the shared ones, like OpenAI's x-ratelimit-remaining-*: the least remaining of each
    unit after this reservation (x-budget-remaining-tokens, -usd) and the tightest scope, by
    the share of its limit left (x-budget-scope; the first of equals).

    Every admitted request's headers: one pass over the balances, no intermediate list or dict,
    and the scope's text made once per scope, window and unit (2.7 -> 1.8 µs for five)."""
    out = {"x-budget-model": model}
    if model != asked:
        out["x-budget-downgraded-from"] = asked
    tight = tokens = usd = None
    tight_frac = 2.0                        # above any share left
    for b in balances:
        scope, _, unit, limit, _, _, left, _ = b      # one unpacking, not five attribute reads
        if scope.type in SHARED:
            continue
        if unit == "tokens":
            if tokens is None or left < tokens:
                tokens = left
        elif usd is None or left < usd:
            usd = left
        frac = left / limit if limit else 0.0
        if frac < tight_frac:
            tight, tight_frac = b, frac
    if tokens is not None:
        out["x-budget-remaining-tokens"] = str(tokens)
    if usd is not None:
        # Whole micro-dollars as dollars: exact at any size (a float's %.6f is not past 2**53), and
        # integer formatting costs less than a float's.
        out["x-budget-remaining-usd"] = f"{usd // 1_000_000}.{usd % 1_000_000:06d}"
    if tight is not None:
        out["x-budget-scope"] = _scope_text(tight.scope, tight.window, tight.unit)
    return out


@functools.lru_cache(maxsize=4096)
def _scope_text(scope: Scope, window: str, unit: str) -> str:
    """x-budget-scope's value; quote() costs about 1 µs and scopes repeat (bounded: end users are many)."""
    return f"{scope.type}:{quote(scope.id, safe='@/._-')} {window} {unit}"
