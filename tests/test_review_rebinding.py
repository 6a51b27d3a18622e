"""Review finding (security): trusted-for-being-local must mean addressed to localhost too.

With no API keys (open auth, allowed on loopback) or no admin keys (the admin page opens on
loopback), a web page the operator visits can rebind its own domain to 127.0.0.1 and then call
the proxy same-origin: spend the operator's upstream key, read every org's usage. The browser
still sends the attacker's domain as Host; those requests are refused."""

from __future__ import annotations

import json

import aiohttp
import pytest

from proxy.loopback import loopback_host

from . import rawhttp

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


def request(path: str, host: bytes, body: bytes | None = None) -> bytes:
    head = (b"POST " if body is not None else b"GET ") + path.encode() + b" HTTP/1.1\r\nHost: " + host + \
        b"\r\nConnection: close\r\nAuthorization: Bearer anything\r\n"
    if body is None:
        return head + b"\r\n"
    return head + b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


@pytest.mark.parametrize("host, local", [
    ("localhost:8787", True), ("127.0.0.1", True), ("127.1.2.3:80", True), ("[::1]:8787", True), ("[::1]", True),
    ("app.localhost", True), ("LOCALHOST.", True), (None, True),
    ("evil.example:8787", False), ("evil.example", False), ("10.0.0.1", False), ("[::2]:1", False),
    ("127.0.0.1.evil.example", False), ("", True)])
def test_loopback_host(host, local):
    assert loopback_host(host) is local


async def test_open_auth_answers_only_requests_addressed_to_localhost(start_proxy):
    h = await start_proxy("memory://", {}, keys=False)
    status, _, body = await rawhttp.raw_http(h.proxy.host, h.proxy.port, request("/v1/chat/completions",
                                                                                 b"rebind.evil.example:8787", CHAT))
    assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
    assert h.fake.seen == []                                    # nothing was sent upstream
    status, _, _ = await rawhttp.raw_http(h.proxy.host, h.proxy.port, request("/v1/chat/completions",
                                                                              b"localhost:8787", CHAT))
    assert status == 200


async def test_admin_without_keys_answers_only_requests_addressed_to_localhost(start_proxy):
    h = await start_proxy("memory://", {})
    status, _, _ = await rawhttp.raw_http(h.proxy.host, h.proxy.port, request("/admin/v1/usage", b"rebind.evil.example"))
    assert status == 403
    async with aiohttp.ClientSession() as s:
        async with s.get(h.proxy.make_url("/admin/v1/usage")) as r:
            assert r.status == 200
