"""Review finding (security, fixed): every response tells its caller the balance of the
shared scopes it touched (global, provider, model) in `x-budget-remaining-*` (and a 429 names
their `used` and `limit`). Those balances move with every org's spending, so one org reads
another org's spend, request by request, by watching its own headers. A gateway that separates
tenants should show a caller only its own org's and user's numbers (and name a shared scope
that refuses without its amounts)."""

from __future__ import annotations

import re

import pytest

from . import harness

MSGS = [{"role": "user", "content": "hi"}]


async def test_a_caller_sees_no_balance_of_a_scope_other_orgs_spend_from(start_proxy):
    # Only the global scope is limited: nothing of globex's own is, so nothing should be shown.
    h = await start_proxy("memory://", {"defaults": {"global": {"day": {"usd": 100}}}})
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=4)     # acme spends
    await h.settled()
    raw = await h.client(harness.OTHER_KEY).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=4)
    assert "x-budget-remaining-usd" not in raw.headers, (raw.headers.get("x-budget-scope"),
                                                         raw.headers.get("x-budget-remaining-usd"))


async def test_a_refusal_by_a_shared_scope_names_it_without_its_amounts(start_proxy):
    import openai
    h = await start_proxy("memory://", {"defaults": {"global": {"day": {"tokens": 30}}}})
    with pytest.raises(openai.RateLimitError) as exc:
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=100)
    scope = exc.value.body["scope"]
    assert (scope["type"], scope["window"], scope["limit"], scope["used"]) == ("global", "day", None, None)
    # (the limit as a number of its own: the message's "resets in 43083 s" holds the digits "30")
    assert scope["requested"] > 30 and not re.search(r"(?<![\d.])30(?!\d)", exc.value.body["message"])
