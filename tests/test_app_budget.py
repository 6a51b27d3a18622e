"""Budgets as the client sees them: downgrades, 429s, store outages, modes, bad input."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math

import aiohttp
import yarl
import openai
import pytest

from proxy.ledger import Scope

from . import harness
from .fake_upstream import FakeOpenAI
from .harness import MSGS, post, reported_tokens


async def test_low_budget_downgrades_to_the_cheaper_model(store_url, tokens, start_proxy):
    # A gpt-4o request reserves about $0.0103 (1024 default completion tokens at $10/M). Org acme
    # has $0.012 a day: gpt-4o would leave it under the 20 % threshold, gpt-4o-mini (~$0.0006)
    # would not. Org globex has $1: it keeps gpt-4o.
    h = await start_proxy(store_url, {"defaults": {"org": {"day": {"usd": 1}}},
                                          "overrides": {"org": {"acme": {"day": {"usd": 0.012}}}}})
    models = []
    for key in (harness.OTHER_KEY, harness.CLIENT_KEY):
        raw = await h.client(key).chat.completions.with_raw_response.create(model="smart", messages=MSGS)
        models.append((raw.headers["x-budget-model"], raw.headers.get("x-budget-downgraded-from")))
    assert models == [("gpt-4o", None), ("gpt-4o-mini", "gpt-4o")]
    assert [s.body["model"] for s in h.fake.seen] == ["gpt-4o", "gpt-4o-mini-2024-07-18"]
    used, reserved = await h.books()
    assert (used, reserved) == (reported_tokens(h), 0)


async def test_budget_exhausted_is_a_429_the_sdk_does_not_retry(store_url, tokens, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 50}}}})
    client = h.client(max_retries=2)
    with pytest.raises(openai.RateLimitError) as exc:
        await client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=100)
    assert h.gateway.stats["requests"] == 1                 # x-should-retry: false was obeyed
    prompt = tokens.chat_prompt({"messages": MSGS}, "gpt-4o")
    assert exc.value.body == {
        "message": exc.value.body["message"], "type": "insufficient_quota", "param": None,
        "code": "BUDGET_EXCEEDED",
        "scope": {"type": "user", "id": "app", "window": "day", "unit": "tokens", "limit": 50,
                  "used": 0, "requested": prompt + 100}}
    assert "Budget exceeded for user 'app'" in exc.value.body["message"]
    headers = exc.value.response.headers
    assert headers["x-should-retry"] == "false"
    wait = int(headers["Retry-After"])
    assert 0 < wait <= 86400 and math.isclose(int(headers["retry-after-ms"]) / 1000, wait, abs_tol=1)
    assert h.fake.seen == []
    assert (await h.books()) == (0, 0)


async def test_minute_window_refusal_lets_the_sdk_retry(store_url, tokens, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"org": {"minute": {"tokens": 10}}}})
    status, headers, body = await post(h, "/chat/completions", {"model": "gpt-4o", "messages": MSGS})
    assert status == 429 and json.loads(body)["error"]["scope"]["window"] == "minute"
    assert headers["x-should-retry"] == "true" and 0 < int(headers["Retry-After"]) <= 60


async def test_shadow_mode_counts_but_never_refuses(store_url, tokens, start_proxy):
    h = await start_proxy(store_url, {"shadow": True, "defaults": {"user": {"day": {"tokens": 5}}}})
    r = await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert r.choices[0].message.content
    assert h.gateway.stats["shadow_refused"] == 1
    used, reserved = await h.books()
    assert (used, reserved) == (reported_tokens(h), 0)


async def test_end_user_field_names_the_user_scope_within_the_org_when_the_key_allows_it(store_url, tokens, start_proxy):
    h = await start_proxy(store_url, {})
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, user="bob")
    await h.client(harness.OTHER_KEY).chat.completions.create(model="gpt-4o", messages=MSGS, user="eve")
    await h.settled()
    bob = (await h.balances(Scope("user", "acme/bob")))[("day", "tokens")]
    eve = (await h.balances(Scope("user", "globex/eve")))[("day", "tokens")]
    other = (await h.balances(Scope("user", "other")))[("day", "tokens")]
    globex = (await h.balances(Scope("org", "globex")))[("day", "tokens")]
    assert bob.used > 0 and eve.used == 0 and other.used == globex.used > 0


@pytest.mark.parametrize("mode", ["strict", "advisory", "disabled"])
async def test_enforcement_modes_with_redis_stopped(redis_server, redis_url, mode, start_proxy):
    h = await start_proxy(redis_url, {"defaults": {"org": {"day": {"usd": 10}}}}, enforcement=mode)
    try:
        redis_server.stop()
        status, headers, body = await post(h, "/chat/completions", {"model": "gpt-4o", "messages": MSGS})
        if mode == "strict":
            assert status == 503
            assert json.loads(body)["error"]["code"] == "BUDGET_STORE_UNAVAILABLE"
            assert h.fake.seen == []
        else:
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
            assert len(h.fake.seen) == 1
        assert h.gateway.stats["store_unavailable"] == (0 if mode == "disabled" else 1)
    finally:
        if redis_server.proc is None:
            redis_server.start()


async def test_open_auth_outside_prod_accepts_any_bearer(store_url, tokens, start_proxy):
    h = await start_proxy(store_url, {}, keys=False)
    await h.client("anything").chat.completions.create(model="gpt-4o", messages=MSGS, user="zed")
    await h.settled()
    assert (await h.balances(Scope("org", "default")))[("day", "tokens")].used > 0
    assert (await h.balances(Scope("user", "default/zed")))[("day", "tokens")].used > 0
    status, _, body = await post(h, "/chat/completions", {"model": "gpt-4o", "messages": MSGS}, key=None)
    assert status == 401


CHAT = {"model": "gpt-4o", "messages": MSGS}
BAD = [
    # (path, body or raw bytes, key, status, param, code)
    ("/chat/completions", CHAT, None, 401, None, "invalid_api_key"),
    ("/chat/completions", CHAT, "wrong-key", 401, None, "invalid_api_key"),
    ("/chat/completions", b"{not json", harness.CLIENT_KEY, 400, None, "invalid_json"),
    ("/chat/completions", b"[1, 2]", harness.CLIENT_KEY, 400, None, "invalid_json"),
    ("/chat/completions", b"\xff\xfe", harness.CLIENT_KEY, 400, None, "invalid_json"),
    ("/chat/completions", b'{"model":"gpt-4o","messages":[{"role":"user","content":"x \\ud83d"}]}',
     harness.CLIENT_KEY, 400, None, "invalid_json"),
    ("/chat/completions", b'{"model":"gpt-4o","messages":' + b"[" * 5000, harness.CLIENT_KEY, 400, None,
     "invalid_json"),
    ("/chat/completions", b'{"model":"gpt-4o","n":' + b"9" * 5000 + b"}", harness.CLIENT_KEY, 400, None,
     "invalid_json"),
    ("/chat/completions", b'{"model":"gpt-4o","temperature":NaN,"messages":[]}', harness.CLIENT_KEY, 400,
     None, "invalid_json"),
    ("/chat/completions", {**CHAT, "user": "a\r\nb"}, harness.CLIENT_KEY, 400, "user", "invalid_value"),
    ("/chat/completions", {**CHAT, "user": "u" * 300}, harness.CLIENT_KEY, 400, "user", "invalid_value"),
    ("/chat/completions", {**CHAT, "max_tokens": 10 ** 16}, harness.CLIENT_KEY, 400, "max_tokens",
     "invalid_value"),
    ("/chat/completions", {"messages": MSGS}, harness.CLIENT_KEY, 400, "model", None),
    ("/chat/completions", {"model": 7, "messages": MSGS}, harness.CLIENT_KEY, 400, "model", "invalid_value"),
    ("/chat/completions", {"model": "gpt-4o"}, harness.CLIENT_KEY, 400, "messages", "invalid_value"),
    ("/chat/completions", {"model": "gpt-4o", "messages": []}, harness.CLIENT_KEY, 400, "messages", "invalid_value"),
    ("/chat/completions", {"model": "gpt-4o", "messages": ["hi"]}, harness.CLIENT_KEY, 400, "messages[0]",
     "invalid_value"),
    ("/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}, harness.CLIENT_KEY,
     400, "messages[0].content", "invalid_value"),
    ("/chat/completions", {**CHAT, "max_tokens": -1}, harness.CLIENT_KEY, 400, "max_tokens", "invalid_value"),
    ("/chat/completions", {**CHAT, "max_tokens": "10"}, harness.CLIENT_KEY, 400, "max_tokens", "invalid_value"),
    ("/chat/completions", {**CHAT, "max_completion_tokens": 1.5}, harness.CLIENT_KEY, 400,
     "max_completion_tokens", "invalid_value"),
    ("/chat/completions", {**CHAT, "n": 0}, harness.CLIENT_KEY, 400, "n", "invalid_value"),
    ("/chat/completions", {**CHAT, "stream": "yes"}, harness.CLIENT_KEY, 400, "stream", "invalid_value"),
    ("/chat/completions", {**CHAT, "stream_options": {"include_usage": "y"}}, harness.CLIENT_KEY, 400,
     "stream_options", "invalid_value"),
    ("/chat/completions", {**CHAT, "user": 5}, harness.CLIENT_KEY, 400, "user", "invalid_value"),
    ("/chat/completions", {**CHAT, "tools": {"a": 1}}, harness.CLIENT_KEY, 400, "tools", "invalid_value"),
    ("/chat/completions", {**CHAT, "model": "nope"}, harness.CLIENT_KEY, 404, "model", "model_not_found"),
    ("/completions", {"model": "gpt-3.5-turbo-instruct"}, harness.CLIENT_KEY, 400, "prompt", "invalid_value"),
    ("/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": [1, "a"]}, harness.CLIENT_KEY, 400,
     "prompt", "invalid_value"),
    ("/embeddings", {"model": "text-embedding-3-small", "input": []}, harness.CLIENT_KEY, 400, "input",
     "invalid_value"),
    ("/embeddings", {"model": "text-embedding-3-small", "input": "x", "stream": True}, harness.CLIENT_KEY, 400,
     "stream", "invalid_value"),
    ("/files", {}, harness.CLIENT_KEY, 404, None, "unknown_url"),
]


@pytest.mark.parametrize("path, body, key, status, param, code", BAD)
async def test_malformed_requests_get_openai_shaped_4xx(store_url, path, body, key, status, param, code, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"org": {"day": {"usd": 10}}}})
    raw = body if isinstance(body, bytes) else None
    got, headers, data = await post(h, path, body, key=key, raw=raw)
    err = json.loads(data)["error"]
    assert (got, err["param"], err["code"]) == (status, param, code)
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    assert harness.CLIENT_KEY not in data.decode(errors="replace")
    assert h.fake.seen == []
    assert (await h.books()) == (0, 0)


async def test_oversized_body_is_413(store_url, start_proxy):
    h = await start_proxy(store_url, {})
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    status, _, data = await post(h, "/chat/completions", big)
    assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
    assert h.fake.seen == []


async def test_wrong_method_is_openai_shaped(store_url, start_proxy):
    h = await start_proxy(store_url, {})
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.url}/chat/completions") as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "method_not_allowed"


async def test_urls_no_route_takes_are_answered_openai_shaped_and_counted_unmatched(store_url, start_proxy):
    from proxy import metrics
    from prometheus_client import REGISTRY

    def unmatched() -> float:
        metrics.flush()
        return REGISTRY.get_sample_value("budget_proxy_requests_total",
                                         {"endpoint": "unmatched", "status": "404"}) or 0.0

    h = await start_proxy(store_url, {})
    root = h.url.rsplit("/v1", 1)[0]
    before = unmatched()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{root}/healthz") as r:           # a route for GET only
            assert (r.status, r.headers["Allow"]) == (405, "GET,HEAD")
            assert (await r.json())["error"]["code"] == "method_not_allowed"
        async with s.get(f"{root}/nowhere") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with s.head(f"{root}/healthz") as r:
            assert r.status == 200
        # A newline in the path (%0A): still ours, not aiohttp's text/plain 404.
        async with s.get(yarl.URL(f"{root}/no%0Awhere", encoded=True)) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with s.get(yarl.URL(f"{root}/v1/no%0Awhere", encoded=True)) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"
    assert unmatched() - before == 2


def test_hash_key_matches_config_lookup():
    assert hashlib.sha256(harness.CLIENT_KEY.encode()).hexdigest() in json.dumps(
        harness.config_data("http://x/v1", "memory://"))


async def test_policy_edits_apply_while_running_and_bad_edits_never_stop_the_watcher(
        tmp_path, monkeypatch, start_proxy):
    from proxy import app as app_mod
    from proxy import policy as policy_mod
    from proxy import watch
    monkeypatch.setattr(watch, "POLL_SECONDS", 0.02)
    path = tmp_path / "dev.yaml"
    path.write_text("version: 1\ndefaults: {user: {day: {tokens: 5}}}\n")
    h = await start_proxy("memory://", str(path))
    day = policy_mod.WINDOWS.index("day")
    before = app_mod._stats(h.gateway)["job_failures"]       # reload failures count process-wide

    async def edited(text: str, failures: int, tokens: int) -> None:
        path.write_bytes(text.encode("latin-1"))       # \xe9 below is one byte: not UTF-8
        for _ in range(500):
            if app_mod._stats(h.gateway)["job_failures"] - before == failures and \
                    h.gateway.ledger.policy.limits_for("user", "app").table[day][0] == tokens:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"watcher: {h.gateway.stats}, {h.gateway.ledger.policy}")

    status, _, _ = await post(h, "/chat/completions", {"model": "gpt-4o", "messages": MSGS})
    assert status == 429
    await edited("version: 1\ndefaults: {user: {day: {tokens: 100000}}}\n", 0, 100000)
    status, _, _ = await post(h, "/chat/completions", {"model": "gpt-4o", "messages": MSGS})
    assert status == 200
    for n, bad in enumerate(["version: 1\ndefaults: {user: {day: {tokens: -1}}}\n",
                             "version: 1\ndefaults: {user: {day: {usd: .inf}}}\n",
                             "version: 1\ndefaults: {user: {day: {usd: 1e400}}}\n",
                             "version: 1\ndefaults: {user: {day: {usd: .nan, usd: 1}}}\n",
                             "version: 1\n# \xe9t\xe9\n"], start=1):
        await edited(bad, n, 100000)                   # rejected, counted, running policy kept
    real_parse = policy_mod.parse
    monkeypatch.setattr(policy_mod, "parse", lambda data, source: 1 / 0)     # a bug, not a bad file
    await edited("version: 1\ndefaults: {user: {day: {tokens: 7}}}\n", 6, 100000)
    monkeypatch.setattr(policy_mod, "parse", real_parse)
    await edited("version: 1\ndefaults: {user: {day: {tokens: 77}}}\n", 6, 77)    # still watching
    async with aiohttp.ClientSession() as s:
        async with s.get(str(h.proxy.make_url("/healthz"))) as r:
            assert (await r.json())["stats"]["job_failures"] - before == 6


async def test_the_sweeper_survives_failing_rounds(monkeypatch, start_proxy):
    from proxy import app as app_mod
    monkeypatch.setattr(app_mod, "SWEEP_SECONDS", 0.01)
    h = await start_proxy("memory://", {})
    rounds = []

    async def broken() -> int:
        rounds.append(1)
        raise RuntimeError("a bug") if len(rounds) % 2 else OSError("disk")
    monkeypatch.setattr(h.gateway.ledger, "sweep", broken)
    for _ in range(500):
        if len(rounds) >= 4:
            break
        await asyncio.sleep(0.01)
    assert len(rounds) >= 4 and h.gateway.stats["job_failures"] >= 3


async def test_racing_requests_never_overspend_and_fall_back_to_cheaper(store_url, start_proxy):
    # Room for about four gpt-4o reservations; 40 racers at once. The snapshot each saw was stale,
    # so the store refuses the losers, which then try gpt-4o-mini; the books never go over.
    # The upstream answers after a second, so every racer reserves before any commit frees the
    # difference between its reservation and its (smaller) real cost: the count below is exact
    # however slowly the machine runs the 40 reservations.
    h = await start_proxy(store_url, {"router": {"downgrade_below": 0},
                                          "defaults": {"org": {"day": {"usd": 0.042}}}},
                          fake=FakeOpenAI(answer_delay=1.0))
    body = {"model": "smart", "messages": MSGS, "max_tokens": 1000}
    results = await asyncio.gather(*(post(h, "/chat/completions", body) for _ in range(40)))
    by_model = {}
    for status, headers, _ in results:
        assert status in (200, 429)
        if status == 200:
            by_model[headers["x-budget-model"]] = by_model.get(headers["x-budget-model"], 0) + 1
    assert 1 <= by_model.get("gpt-4o", 0) <= 4
    assert by_model.get("gpt-4o-mini", 0) >= 1
    await h.settled()
    day = (await h.balances(Scope("org", "acme")))[("day", "usd")]
    assert day.reserved == 0 and day.used <= 42_000
    assert (await h.books()) == (reported_tokens(h), 0)


async def test_an_end_user_name_cannot_reach_another_orgs_user_budget(store_url, tokens, start_proxy):
    # globex's key has no end users: its user is "other". acme sends user="other" in the body.
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 200}}}})
    for _ in range(3):
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, user="other",
                                                 max_tokens=20)
    r = await h.client(harness.OTHER_KEY).chat.completions.create(model="gpt-4o", messages=MSGS,
                                                                  max_tokens=20)
    assert r.choices[0].message.content
    await h.settled()
    assert (await h.balances(Scope("user", "other")))[("day", "tokens")].used == \
        h.fake.reported[-1]["total_tokens"]


async def test_redis_frozen_mid_call_is_a_503_that_leaves_nothing_reserved(redis_server, redis_url, start_proxy):
    # Redis freezes (SIGSTOP): the reserve times out, the client gets a 503 in about three
    # seconds, and after Redis wakes nothing is left reserved.
    import signal
    h = await start_proxy(redis_url, {"defaults": {"org": {"day": {"usd": 10}}}})
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        # one candidate and its own max_tokens: no snapshot, the reserve is the first call
        status, _, body = await post(h, "/chat/completions",
                                     {"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 10})
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert status == 503 and json.loads(body)["error"]["code"] == "BUDGET_STORE_UNAVAILABLE"
    if len(h.gateway.ledger.tasks):
        await asyncio.wait(h.gateway.ledger.tasks.pending(), timeout=20)
    await asyncio.sleep(0.2)
    assert h.fake.seen == []
    assert await h.reserved_anywhere() == []
