"""The admin page's rendering: bars from usage entries, colours, order, escaping."""

from __future__ import annotations

import re

from proxy import dashboard
from proxy.ledger import Refusal, Scope
from proxy.observer import RefusalSeen

START, NOW = "2026-11-28T00:00:00Z", 1_795_860_000.0        # NOW is 10:00 that day


def entry(scope_type, scope_id, used, reserved, limit, unit="usd", window="day"):
    other = "tokens" if unit == "usd" else "usd"
    return {"scope": {"type": scope_type, "id": scope_id}, "window": window, "start": START,
            "end": "2026-11-29T00:00:00Z", "used": {unit: used, other: 5}, "reserved": {unit: reserved, other: 0},
            "limit": {unit: limit, other: None}, "remaining": {unit: None if limit is None else max(0, limit - used - reserved), other: None}}


def refusal(scope: Scope, unit="usd") -> RefusalSeen:
    return RefusalSeen(NOW, "acme", "acme/bob", "gpt-4o",
                       Refusal(scope, "day", unit, 10_000_000, 9_000_000, 0, 2_000_000, 3600.0))


def render(entries, refused=()):
    return dashboard.page(entries, [], list(refused), scope_type=None, window=None, warn_at=0.8, now=NOW)


def rows(html: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr class="budget (\w+)" data-scope-type="[^"]*" data-scope-id="([^"]*)"', html)


def test_bars_are_sorted_by_closeness_and_coloured_by_threshold():
    html = render([entry("org", "calm", 1.0, 0.0, 10.0), entry("org", "busy", 8.0, 0.5, 10.0),
                   entry("user", "spent", 10.0, 0.0, 10.0), entry("model", "gpt-4o", 100, 0, None)])
    # Unlimited units get no bar; the spent scope is red and first, then amber, then green.
    assert rows(html) == [("over", "spent"), ("warn", "busy"), ("ok", "calm")]
    busy = re.search(r'data-scope-id="busy".*?</tr>', html).group()
    assert 'class="used" style="left:0;width:80.0000%"' in busy
    assert 'class="reserved" style="left:80.0000%;width:5.0000%"' in busy


def test_a_scope_refused_in_the_window_is_red_even_below_its_limit():
    html = render([entry("org", "acme", 9.0, 0.0, 10.0), entry("org", "other", 9.0, 0.0, 10.0)],
                  [refusal(Scope("org", "acme"))])
    assert rows(html) == [("over", "acme"), ("warn", "other")]
    assert "acme/bob" in html                                  # the refusal is listed too


def test_client_supplied_scope_ids_are_escaped():
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    html = render([entry("user", evil, 1.0, 0.0, 10.0)], [refusal(Scope("user", evil))])
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_no_external_resources_and_a_refresh():
    html = render([entry("org", "acme", 1.0, 0.0, 10.0)])
    assert not re.search(r"(src|href)=\"https?:", html) and "@import" not in html and "<script" not in html
    assert '<meta http-equiv="refresh" content="15;' in html
