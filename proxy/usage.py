"""The usage and settlement documents: one shape for the admin API, the CLI's --json and the page.

A usage entry is one scope in one window:
`{"scope": {"type", "id"}, "window", "start", "end", "used": {"tokens", "usd"}, "reserved": {...},
"limit": {...}, "remaining": {...}}` — times in ISO 8601 UTC, USD as numbers (dollars), null
where there is no limit. Entries are sorted by closeness to a limit: the largest share of any
limit that is used or reserved first; scopes without limits last.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from .errors import BadRequest
from .policy import SCOPE_TYPES
from .windows import WINDOWS

UNITS = ("tokens", "usd")
MAX_SETTLEMENTS = 1000


def iso(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _usd(micro: int | None) -> float | None:
    return None if micro is None else round(micro / 1_000_000, 6)


def _pair(tokens: int | None, usd_micro: int | None) -> dict:
    return {"tokens": tokens, "usd": _usd(usd_micro)}


def entry(u: Any) -> dict:
    """One `Ledger.usage` row as the document's entry (amounts in tokens and micro-dollars in,
    tokens and dollars out)."""
    return {"scope": {"type": u.scope.type, "id": u.scope.id}, "window": u.window,
            "start": iso(u.start), "end": iso(u.end),
            "used": _pair(u.used.tokens, u.used.usd), "reserved": _pair(u.reserved.tokens, u.reserved.usd),
            "limit": _pair(u.limit.tokens, u.limit.usd), "remaining": _pair(u.remaining.tokens, u.remaining.usd)}


def closeness(e: Mapping) -> float:
    """The largest (used + reserved) / limit over the entry's limited units; -1 when unlimited."""
    shares = [((e["used"][u] or 0) + (e["reserved"][u] or 0)) / e["limit"][u]
              for u in UNITS if e["limit"][u] is not None and e["limit"][u] > 0]
    shares += [1.0 for u in UNITS if e["limit"][u] == 0]          # a zero limit is exhausted
    return max(shares, default=-1.0)


def document(rows: Iterable[Any]) -> dict:
    entries = [entry(u) for u in rows]
    entries.sort(key=lambda e: (-closeness(e), e["scope"]["type"], e["scope"]["id"], e["window"]))
    return {"data": entries}


def settlement(rec: Any) -> dict:
    """A settlement record with the export's field names and order (`time` in ISO 8601 UTC)."""
    return rec.export()


# --- query parameters ---------------------------------------------------------------------

def usage_query(q: Mapping[str, str]) -> dict:
    """type, id, window for `Ledger.usage`; a bad value is a 400 naming the parameter."""
    out: dict[str, str | None] = {"type": q.get("type") or None, "id": q.get("id") or None,
                                  "window": q.get("window") or None}
    if out["type"] is not None and out["type"] not in SCOPE_TYPES:
        raise BadRequest(f"type must be one of {', '.join(SCOPE_TYPES)}.", param="type", code="invalid_value")
    if out["window"] is not None and out["window"] not in WINDOWS:
        raise BadRequest(f"window must be one of {', '.join(WINDOWS)}.", param="window", code="invalid_value")
    if out["id"] is not None and len(out["id"]) > 512:
        raise BadRequest("id is longer than 512 characters.", param="id", code="invalid_value")
    return out


def since_ms(value: str | None, param: str = "since") -> int | None:
    """ISO 8601 (a `Z` or an offset; naive means UTC) or epoch seconds, as epoch milliseconds."""
    if not value:
        return None
    try:
        return int(float(value) * 1000)
    except (ValueError, OverflowError):     # not a number, NaN, or inf ("1e400")
        pass
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{param} must be an ISO 8601 time (e.g. 2026-11-28T00:00:00Z) or epoch seconds.",
                         param=param, code="invalid_value") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


def settlements_query(q: Mapping[str, str]) -> dict:
    raw = q.get("limit") or "100"
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_SETTLEMENTS:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_SETTLEMENTS}.", param="limit",
                         code="invalid_value")
    return {"since_ms": since_ms(q.get("since")), "limit": int(raw),
            "org": q.get("org") or None, "user": q.get("user") or None}


# --- the CLI's table -------------------------------------------------------------------------

BAR_WIDTH = 20


def _cell(e: Mapping, unit: str) -> str:
    used, limit = e["used"][unit] or 0, e["limit"][unit]
    fmt = (lambda v: f"{v:,.2f}") if unit == "usd" else (lambda v: f"{int(v):,}")
    return fmt(used) + ("" if limit is None else f" / {fmt(limit)}")


def bar(e: Mapping, width: int = BAR_WIDTH) -> str:
    """`[####++......]`: used (#) and reserved (+) of the unit closest to its limit; blank if unlimited."""
    limited = [u for u in UNITS if e["limit"][u] is not None]
    if not limited:
        return ""
    unit = max(limited, key=lambda u: ((e["used"][u] or 0) + (e["reserved"][u] or 0)) / (e["limit"][u] or 1e-9))
    limit = e["limit"][unit] or 1e-9
    used = min(width, round(width * (e["used"][unit] or 0) / limit))
    reserved = min(width - used, round(width * (e["reserved"][unit] or 0) / limit))
    return "[" + "#" * used + "+" * reserved + "." * (width - used - reserved) + "]"


def table(doc: Mapping) -> str:
    """The usage document as text, one row per scope and window, closest to a limit first."""
    head = ("SCOPE", "WINDOW", "TOKENS (used / limit)", "USD (used / limit)", "SHARE", "")
    rows = [head]
    for e in doc["data"]:
        share = closeness(e)
        rows.append((f"{e['scope']['type']}:{e['scope']['id']}", e["window"], _cell(e, "tokens"),
                     _cell(e, "usd"), "-" if share < 0 else f"{share:.0%}", bar(e)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
