"""Budget alerts: the payload, and deliveries through real HTTP receivers."""

from __future__ import annotations

import calendar

from proxy.alerts import Crossing, payload
from proxy.ledger import Scope

END = calendar.timegm((2026, 11, 30, 0, 0, 0))


def test_threshold_payload_has_the_fields_and_a_human_text():
    body = payload(Crossing("budget_threshold", Scope("org", "acme"), "day", "usd", 0.8, 8_123_400, 10_000_000, END))
    assert body == {
        "event": "budget_threshold", "scope": {"type": "org", "id": "acme"}, "window": "day", "unit": "usd",
        "threshold": 0.8, "used": 8.1234, "limit": 10.0, "window_end": "2026-11-30T00:00:00Z",
        "text": "budget-proxy: org 'acme' has used 81% of its day USD limit (8.1234 of 10.0 USD; alert at 80%). "
                "The window resets at 2026-11-30T00:00:00Z."}


def test_exhausted_payload_in_tokens():
    body = payload(Crossing("budget_exhausted", Scope("user", "acme/bob"), "minute", "tokens", 1.0, 990, 1000,
                            END))
    assert (body["event"], body["used"], body["limit"], body["threshold"]) == ("budget_exhausted", 990, 1000, 1.0)
    assert body["text"] == ("budget-proxy: user 'acme/bob' has run out of its minute tokens budget (990 of 1000 "
                            "tokens used); its requests are refused until 2026-11-30T00:00:00Z.")
