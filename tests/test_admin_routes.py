"""The /admin/ routes on the real app: login, the API's query checks, prod without admin keys."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json

import aiohttp

from proxy.cli import main
from proxy.config import AdminKey
from proxy.ledger import Amounts, RequestInfo, Scope
from proxy.settlement_log import EXPORT_FIELDS

from .harness import ADMIN, ADMIN_KEYS, CLIENT_KEY, OTHER_KEY, config_data



async def get(h, path: str, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.get(h.proxy.make_url(path), allow_redirects=False, **kw) as r:
            return r.status, r.headers, await r.text()


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_key(start_proxy):
    h = await start_proxy("memory://", config=ADMIN_KEYS)
    status, headers, text = await get(h, "/admin/")
    assert status == 401 and '<form method="post" action="/admin/login">' in text
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    async with aiohttp.ClientSession() as s:
        for wrong in ("nope", CLIENT_KEY):                       # a proxy key never opens /admin/
            async with s.post(h.proxy.make_url("/admin/login"), data={"key": wrong}, allow_redirects=False) as r:
                assert r.status == 401 and "Incorrect admin key." in await r.text()
                assert "Set-Cookie" not in r.headers
        async with s.post(h.proxy.make_url("/admin/login"), data={"key": ADMIN}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/admin/"
            cookie = r.headers["Set-Cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "samesite", "path"} <= attrs and "SameSite=Strict" in cookie and "Path=/admin/" in cookie
    assert ADMIN not in cookie and hashlib.sha256(ADMIN.encode()).hexdigest() not in cookie


async def test_the_api_refuses_proxy_keys_and_checks_its_query(start_proxy):
    h = await start_proxy("memory://", config=ADMIN_KEYS)
    status, _, _ = await get(h, "/admin/v1/usage", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert status == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for path, param in (("/admin/v1/usage?type=team", "type"), ("/admin/v1/usage?window=week", "window"),
                        ("/admin/v1/settlements?limit=0", "limit"), ("/admin/v1/settlements?limit=x", "limit"),
                        ("/admin/v1/settlements?since=yesterday", "since")):
        async with aiohttp.ClientSession() as s:
            async with s.get(h.proxy.make_url(path), headers=admin) as r:
                assert r.status == 400, path
                err = (await r.json())["error"]
                assert err["param"] == param and err["type"] == "invalid_request_error"


async def test_in_prod_without_admin_keys_there_are_no_admin_endpoints(start_proxy):
    h = await start_proxy("memory://", config={"environment": "prod"})
    for path in ("/admin/", "/admin/v1/usage", "/admin/login"):
        status, _, _ = await get(h, path, headers={"Authorization": f"Bearer {ADMIN}"})
        assert status == 404, path
    # Admin keys follow a config reload: once one is configured, the endpoints exist.
    key = AdminKey("ops", hashlib.sha256(ADMIN.encode()).hexdigest())
    h.gateway.reconfigure(dataclasses.replace(h.gateway.config, admin_keys=(key,)))
    status, _, _ = await get(h, "/admin/v1/usage", headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200
    status, _, _ = await get(h, "/admin/v1/usage", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert status == 401


# --- usage and settlements, from the API and the CLI ---------------------------------------

USAGE_POLICY = {"defaults": {"org": {"day": {"tokens": 1_000, "usd": 1.0}}},
                "overrides": {"org": {"globex": {"day": {"tokens": 100}}}}}


async def admin_json(h, path: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(h.proxy.make_url(path), headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def test_usage_api_lists_every_scope_closest_first_and_the_cli_prints_the_same(
        redis_url, start_proxy, tmp_path, capsys):
    h = await start_proxy(redis_url, USAGE_POLICY, config=ADMIN_KEYS)
    msgs = [{"role": "user", "content": "Say hello."}]
    await h.client().chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=8)
    await h.client(OTHER_KEY).chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=8)
    await h.settled()

    doc = await admin_json(h, "/admin/v1/usage?window=day")
    entries = doc["data"]
    scopes = [(e["scope"]["type"], e["scope"]["id"]) for e in entries]
    assert set(scopes) == {("global", "*"), ("org", "acme"), ("org", "globex"), ("user", "app"),
                           ("user", "other"), ("provider", "openai"), ("model", "gpt-4o-mini")}
    assert scopes[0] == ("org", "globex")                    # 100-token limit: the closest to it
    globex = entries[0]
    day = {(b.window, b.unit): b for b in await h.gateway.ledger.snapshot([Scope("org", "globex")])}
    assert globex["used"]["tokens"] == day[("day", "tokens")].used > 0
    assert globex["limit"] == {"tokens": 100, "usd": 1.0}
    assert globex["remaining"]["tokens"] == 100 - globex["used"]["tokens"]
    assert isinstance(globex["used"]["usd"], float) and globex["window"] == "day"
    assert globex["start"].endswith("T00:00:00Z") and globex["end"].endswith("T00:00:00Z")
    model = next(e for e in entries if e["scope"]["type"] == "model")
    assert model["limit"] == {"tokens": None, "usd": None} and model["remaining"] == {"tokens": None, "usd": None}

    orgs = await admin_json(h, "/admin/v1/usage?type=org&window=day")
    assert [e["scope"]["id"] for e in orgs["data"]] == ["globex", "acme"]
    one = await admin_json(h, "/admin/v1/usage?type=org&id=acme")
    assert {e["window"] for e in one["data"]} >= {"day", "month"}
    assert {e["scope"]["id"] for e in one["data"]} == {"acme"}

    # The CLI reads the store itself: the same document, with the proxy down.
    config = tmp_path / "config.yaml"
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps({"version": 1, **USAGE_POLICY}))
    config.write_text(json.dumps({**config_data("http://127.0.0.1:9/v1", redis_url), "policy": str(policy_file)}))
    await h.proxy.close()
    assert await asyncio.to_thread(main, ["usage", "--config", str(config), "--window", "day", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == doc
    assert await asyncio.to_thread(main, ["usage", "--config", str(config), "--type", "org", "--window", "day"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == ["org:globex", "org:acme"]
    assert lines[1].rstrip().endswith("]") and "#" in lines[1]


async def test_settlements_api_is_newest_first_and_filters(start_proxy):
    h = await start_proxy("memory://", config=ADMIN_KEYS)
    ledger = h.gateway.ledger
    for i, (org, user) in enumerate((("acme", "ann"), ("globex", "gil"), ("acme", "bob"))):
        info = RequestInfo(org, user, None, "chat", "gpt-4o", "gpt-4o", "openai", False, None)
        res = await ledger.reserve(f"r{i}", Amounts(10, 100), [Scope("org", org)], info)
        await ledger.commit(res, Amounts(5 + i, 50 + i))
        await asyncio.sleep(0.002)                          # distinct milliseconds
    got = (await admin_json(h, "/admin/v1/settlements"))["data"]
    assert [r["id"] for r in got] == ["r2", "r1", "r0"]
    assert list(got[0]) == list(EXPORT_FIELDS) and got[0]["time"].endswith("Z") and got[0]["usd_micro"] == 52
    assert [r["id"] for r in (await admin_json(h, "/admin/v1/settlements?org=acme"))["data"]] == ["r2", "r0"]
    assert [r["id"] for r in (await admin_json(h, "/admin/v1/settlements?user=gil"))["data"]] == ["r1"]
    assert [r["id"] for r in (await admin_json(h, "/admin/v1/settlements?limit=1"))["data"]] == ["r2"]
    future = (await admin_json(h, "/admin/v1/settlements?since=2999-01-01T00:00:00Z"))["data"]
    assert future == []


async def test_the_settlement_log_names_who_spent_on_what(start_proxy):
    h = await start_proxy("memory://", config=ADMIN_KEYS)
    msgs = [{"role": "user", "content": "Say hello."}]
    await h.client().chat.completions.create(model="smart", messages=msgs, max_tokens=8, user="zoe")
    await h.settled()
    (rec,) = (await admin_json(h, "/admin/v1/settlements"))["data"]
    assert (rec["org"], rec["user"], rec["end_user"], rec["endpoint"]) == ("acme", "acme/zoe", "zoe", "chat")
    assert (rec["model_requested"], rec["model"], rec["provider"], rec["stream"]) == ("smart", "gpt-4o", "openai",
                                                                                     False)
    assert rec["outcome"] == "ok" and rec["usd_micro"] > 0
    (reported,) = h.fake.reported
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (reported["prompt_tokens"], reported["completion_tokens"])


def test_start_up_says_where_the_admin_endpoints_answer(caplog, monkeypatch):
    import logging
    import os

    from proxy.app import load
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.delenv("APP_ENV", raising=False)
    with caplog.at_level(logging.WARNING, logger="proxy"):
        cfg, _ = load(os.path.join(root, "config.yaml"))
    assert not cfg.admin_keys and cfg.environment != "prod"
    assert "no admin_keys configured: /admin/ answers only on loopback, without authentication" in caplog.text


async def test_with_the_store_down_the_api_is_a_503_and_the_page_says_so(redis_server, redis_url, start_proxy):
    h = await start_proxy(redis_url, config=ADMIN_KEYS)
    redis_server.stop()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(h.proxy.make_url("/admin/v1/usage"), headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "BUDGET_STORE_UNAVAILABLE"
            async with s.get(h.proxy.make_url("/admin/"), headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 200 and "The budget store is unavailable" in await r.text()
    finally:
        redis_server.start()


async def test_without_admin_keys_outside_prod_the_page_opens_on_loopback_without_a_login(start_proxy):
    h = await start_proxy("memory://", {"defaults": {"org": {"day": {"tokens": 1000}}}})
    await h.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                             max_tokens=8)
    await h.settled()
    status, _, text = await get(h, "/admin/")
    assert status == 200 and 'data-scope-id="acme"' in text
    status, headers, _ = await get(h, "/admin/login")
    assert status == 303 and headers["Location"] == "/admin/"
