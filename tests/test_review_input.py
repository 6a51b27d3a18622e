"""Review findings: client input that was a 500 on routes other than the metered ones."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from proxy import body, server
from proxy.app import errors

from . import harness, rawhttp
from .rawhttp import post
from .harness import ADMIN, ADMIN_KEYS

COUNT = json.dumps({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def test_count_tokens_reads_its_body_as_the_metered_routes_do(start_proxy):
    h = await start_proxy("memory://")
    key = b"x-api-key: " + harness.CLIENT_KEY.encode()
    status, _, body = await rawhttp.raw_http(h.proxy.host, h.proxy.port, post(
        "/v1/messages/count_tokens", COUNT, key, b"Content-Encoding: gzip"))
    assert status == 400, body
    err = json.loads(body)
    assert err["type"] == "error" and err["error"]["code"] == "invalid_content_encoding"
    # The body limit holds here too: 413, not read whole.
    big = COUNT.replace(b'"hi"', b'"' + b"a" * 9_000_000 + b'"')
    status, _, body = await rawhttp.raw_http(h.proxy.host, h.proxy.port, post("/v1/messages/count_tokens", big, key))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


async def test_a_login_form_the_proxy_cannot_read_is_no_key_never_a_500(start_proxy):
    h = await start_proxy("memory://", config=ADMIN_KEYS)
    bad = [
        ({"Content-Type": "application/x-www-form-urlencoded; charset=foo-bar"}, b"key=nope"),
        ({"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"}, b"key=x"),
        ({"Content-Type": "multipart/form-data; boundary=zz"}, b"--zz\r\nbad"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"key=\xff\xfe"),
    ]
    # One connection a request: after a body that fails to decode, aiohttp drops the connection.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for headers, data in bad:
            async with s.post(h.proxy.make_url("/admin/login"), data=data, headers=headers,
                              allow_redirects=False) as r:
                assert r.status in (400, 401), (headers, r.status, await r.text())
                assert "Set-Cookie" not in r.headers
        # and the page's own form still logs in
        async with s.post(h.proxy.make_url("/admin/login"), data={"key": ADMIN}, allow_redirects=False) as r:
            assert r.status == 303 and "bp_admin=" in r.headers["Set-Cookie"]


async def test_since_that_overflows_a_float_or_a_limit_of_unicode_digits_is_a_400(start_proxy):
    h = await start_proxy("memory://", config=ADMIN_KEYS)
    async with aiohttp.ClientSession() as s:
        for param, value in (("since", "1e400"), ("since", "-1e400"), ("since", "inf"), ("limit", "²"),
                             ("limit", "1²")):
            async with s.get(h.proxy.make_url("/admin/v1/settlements"), params={param: value},
                             headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 400, (value, await r.text())
                assert (await r.json())["error"]["param"] == param


async def test_a_body_that_fails_to_decode_closes_the_connection_cleanly_without_a_traceback(caplog):
    # The 400 came, but aiohttp then drained the undecodable body again, logged "Unhandled
    # exception" with a traceback (client bytes filling the error log), and dropped the
    # keep-alive connection under the client's next request (connection reset). Served as
    # `serve` serves (server.runner), with the one body reader and the app's error middleware.
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await body.read(request, 1000))

    app = web.Application(middlewares=[errors])
    app.router.add_post("/", echo)
    run = server.runner(app, 1.0)
    await run.setup()
    site = web.TCPSite(run, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{run.addresses[0][1]}/"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(url, data=b"not gzip", headers={"Content-Encoding": "gzip"}) as r:
                    assert r.status == 400 and r.headers.get("Connection", "").lower() == "close"
                async with s.post(url, data=b"fine") as r:
                    assert r.status == 200 and await r.read() == b"fine"
    finally:
        await run.cleanup()
    assert "Unhandled exception" not in caplog.text and "Traceback" not in caplog.text


async def test_a_pass_through_query_string_reaches_the_upstream_as_the_client_encoded_it(start_proxy):
    h = await start_proxy("memory://")
    r = await h.client().responses.create(model="gpt-4o", input="hi", max_output_tokens=20)
    async with aiohttp.ClientSession() as s:
        async with s.get(h.proxy.make_url(f"/v1/responses/{r.id}/input_items").with_query(
                {"after": "msg_a&limit=100#x", "limit": "2"}),
                headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"}) as resp:
            assert resp.status == 200
    seen = h.fake.seen[-1].path
    assert seen == f"/v1/responses/{r.id}/input_items?after=msg_a%26limit%3D100%23x&limit=2", seen
