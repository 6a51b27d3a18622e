"""The /admin/ routes on the real app: login, the API's query checks, prod without admin keys."""

from __future__ import annotations

import hashlib

import aiohttp

from .harness import CLIENT_KEY

ADMIN = "bp-admin-key-for-tests"
ADMIN_KEYS = {"admin_keys": {"ops": {"sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}}}


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
