"""GET /admin/: every limited budget as a bar, the latest settlements and refusals.

Server-rendered, one self-contained document: inline CSS, no script, no external CDN or font (it
works offline and under a `default-src 'none'` Content-Security-Policy). It refreshes itself with
a meta refresh, keeping its filters (they are query parameters). Every value that reaches the page
is escaped: scope ids come from clients (the OpenAI `user` field).

Colours: green below the policy's first alert threshold (80 % by default), amber from there,
red at or over the limit, or when the scope refused a request in the window shown (a refusal
can come before 100 %: the request needed more than was left).
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Iterable, Mapping, NamedTuple, Sequence

from .observer import RefusalSeen
from .policy import SCOPE_TYPES
from .usage import UNITS, iso
from .windows import WINDOWS

REFRESH_SECONDS = 15
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1f2328;background:#fff}
h1{font-size:1.3rem;margin:0 0 .8rem}h2{font-size:1.05rem;margin:1.6rem 0 .5rem}
form.filters{margin:0 0 1rem}form.filters label{margin-right:1rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #d8dee4;
vertical-align:middle;font-variant-numeric:tabular-nums}th{font-weight:600;background:#f6f8fa}
.bar{position:relative;width:320px;height:14px;background:#eaeef2;border-radius:3px;overflow:hidden}
.bar .used,.bar .reserved{position:absolute;top:0;bottom:0}
.bar .reserved{opacity:.45}
.ok .used,.ok .reserved{background:#2da44e}.warn .used,.warn .reserved{background:#d4a72c}
.over .used,.over .reserved{background:#cf222e}
.state{font-weight:600}.ok .state{color:#1a7f37}.warn .state{color:#9a6700}.over .state{color:#cf222e}
.muted{color:#656d76}.error{color:#cf222e}
"""


class Bar(NamedTuple):
    scope_type: str
    scope_id: str
    window: str
    unit: str
    used: float
    reserved: float
    limit: float
    state: str               # ok | warn | over
    share: float             # (used + reserved) / limit


def bars(entries: Iterable[Mapping], warn_at: float, refused: Sequence[RefusalSeen], now: float,
         scope_type: str | None = None, window: str | None = None) -> list[Bar]:
    """One bar per limited (scope, window, unit), refused ones first, then closest to the limit."""
    out = []
    for e in entries:
        start = datetime.fromisoformat(e["start"].replace("Z", "+00:00")).timestamp()
        for unit in UNITS:
            limit = e["limit"][unit]
            if limit is None:
                continue
            used, reserved = e["used"][unit] or 0, e["reserved"][unit] or 0
            share = (used + reserved) / limit if limit else 1.0
            hit = any(r.refusal.scope.type == e["scope"]["type"] and r.refusal.scope.id == e["scope"]["id"]
                      and r.refusal.window == e["window"] and r.refusal.unit == unit and r.time >= start
                      for r in refused)
            state = "over" if share >= 1 or hit else "warn" if share >= warn_at else "ok"
            out.append(Bar(e["scope"]["type"], e["scope"]["id"], e["window"], unit, used, reserved, limit,
                           state, share))
    out += _refused_only(out, refused, now, scope_type, window)
    out.sort(key=lambda b: (b.state != "over", -b.share, b.scope_type, b.scope_id))
    return out


def _refused_only(shown: list[Bar], refused: Sequence[RefusalSeen], now: float, scope_type: str | None,
                  window: str | None) -> list[Bar]:
    """Scopes refused in a window still open that the usage index does not list (refused before
    they ever spent): shown red from the refusal's own numbers, latest refusal first."""
    seen = {(b.scope_type, b.scope_id, b.window, b.unit) for b in shown}
    out = []
    for seen_at, *_, r in reversed(refused):
        key = (r.scope.type, r.scope.id, r.window, r.unit)
        if key in seen or seen_at + r.reset_in <= now or scope_type not in (None, r.scope.type) \
                or window not in (None, r.window):
            continue
        seen.add(key)
        k = 1_000_000 if r.unit == "usd" else 1
        out.append(Bar(r.scope.type, r.scope.id, r.window, r.unit, r.used / k, r.reserved / k, r.limit / k, "over",
                       (r.used + r.reserved) / r.limit if r.limit else 1.0))
    return out


def _amount(unit: str, v: float) -> str:
    if unit == "tokens":
        return f"{int(v):,} tokens"
    return f"{v:,.6f} USD" if 0 < v < 0.01 else f"{v:,.2f} USD"       # cents hide small spend


def _bar_row(b: Bar) -> str:
    used_pct = min(100.0, 100.0 * b.used / b.limit) if b.limit else 100.0
    res_pct = min(100.0 - used_pct, 100.0 * b.reserved / b.limit) if b.limit else 0.0
    label = {"ok": "ok", "warn": "near limit", "over": "exhausted"}[b.state]
    return (f'<tr class="budget {b.state}" data-scope-type="{escape(b.scope_type)}" '
            f'data-scope-id="{escape(b.scope_id)}" data-window="{b.window}" data-unit="{b.unit}" '
            f'data-used="{b.used}" data-reserved="{b.reserved}" data-limit="{b.limit}">'
            f"<td>{escape(b.scope_type)}</td><td>{escape(b.scope_id)}</td><td>{b.window}</td>"
            f'<td><div class="bar" title="{b.share:.1%}"><div class="used" style="left:0;width:{used_pct:.4f}%"></div>'
            f'<div class="reserved" style="left:{used_pct:.4f}%;width:{res_pct:.4f}%"></div></div></td>'
            f"<td>{_amount(b.unit, b.used)} used, {_amount(b.unit, b.reserved)} reserved, "
            f"of {_amount(b.unit, b.limit)}</td><td>{b.share:.0%}</td><td class=\"state\">{label}</td></tr>")


def _select(name: str, options: Sequence[str], chosen: str | None) -> str:
    opts = [f'<option value=""{"" if chosen else " selected"}>all</option>']
    opts += [f'<option value="{o}"{" selected" if o == chosen else ""}>{o}</option>' for o in options]
    return f'<select name="{name}" id="{name}">{"".join(opts)}</select>'


def _table(head: Sequence[str], rows: Iterable[Sequence], empty: str, css: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{escape('–' if c is None else str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    if not body:
        return f'<p class="muted">{escape(empty)}</p>'
    return (f'<table class="{css}"><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + body + "</table>")


SETTLEMENT_COLUMNS = ("time", "org", "user", "model", "prompt_tokens", "completion_tokens", "usd_micro", "outcome")


def page(entries: Iterable[Mapping], settlements: Iterable[Mapping], refused: Sequence[RefusalSeen], *,
         scope_type: str | None, window: str | None, warn_at: float, now: float, error: str | None = None) -> str:
    rows = bars(entries, warn_at, refused, now, scope_type, window)
    budget_html = (f'<table class="budgets"><tr><th>type</th><th>scope</th><th>window</th><th>budget</th>'
                   f"<th>amounts</th><th>share</th><th>state</th></tr>{''.join(_bar_row(b) for b in rows)}</table>"
                   if rows else '<p class="muted">No limited budget has been used in this window.</p>')
    refusal_rows = [(iso(r.time), r.org, r.user, r.model, f"{r.refusal.scope.type}:{r.refusal.scope.id}",
                     f"{r.refusal.window} {r.refusal.unit}") for r in reversed(refused)]
    query = "&".join(f"{k}={v}" for k, v in (("type", scope_type), ("window", window)) if v)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}; url=/admin/{'?' + escape(query) if query else ''}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>budget-proxy: budgets</title><style>{_CSS}</style></head><body>
<h1>budget-proxy budgets</h1>
<form class="filters" method="get" action="/admin/">
<label for="type">scope type {_select("type", SCOPE_TYPES, scope_type)}</label>
<label for="window">window {_select("window", WINDOWS, window)}</label>
<button type="submit">filter</button>
<span class="muted">updated {iso(now)}, refreshes every {REFRESH_SECONDS} s</span></form>
{f'<p class="error">{escape(error)}</p>' if error else ''}
{budget_html}
<h2>Latest refusals (this process)</h2>
{_table(("time", "org", "user", "model", "scope", "limit"), refusal_rows, "No refusals since start-up.", "refusals")}
<h2>Latest settlements</h2>
{_table(SETTLEMENT_COLUMNS, ([s.get(c, "") for c in SETTLEMENT_COLUMNS] for s in settlements),
        "No settlements yet.", "settlements")}
<form method="post" action="/admin/logout"><button type="submit">log out</button></form>
</body></html>"""


def login_page(message: str | None = None) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>budget-proxy: admin login</title>
<style>{_CSS}</style></head><body>
<h1>budget-proxy admin</h1>
{f'<p class="error">{escape(message)}</p>' if message else ''}
<form method="post" action="/admin/login">
<label for="key">admin key</label> <input type="password" name="key" id="key" autocomplete="current-password" required>
<button type="submit">log in</button></form>
<p class="muted">The key is checked once; the browser then holds a session cookie that is not the key.</p>
</body></html>"""
