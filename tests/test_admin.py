"""The admin gate: admin keys (bearer or the page's cookie) open /admin/; proxy keys never do;
with none configured outside prod, only loopback peers get in."""

from __future__ import annotations

import hashlib

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import COOKIE, SESSION_SECONDS, AdminGate
from proxy.app import errors
from proxy.config import AdminKey

ADMIN = "bp-admin-secret"
OPS = AdminKey("ops", hashlib.sha256(ADMIN.encode()).hexdigest())


async def client_for(gate: AdminGate, host: str = "127.0.0.1") -> TestClient:
    app = web.Application(middlewares=[errors])

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"admin": gate.admit(request)})

    app.router.add_get("/admin/v1/hello", gate.guard(hello))
    client = TestClient(TestServer(app, host=host))
    await client.start_server()
    return client


async def test_an_admin_key_opens_and_anything_else_is_a_401_in_openai_shape():
    c = await client_for(AdminGate((OPS,), "prod"))
    try:
        ok = await c.get("/admin/v1/hello", headers={"Authorization": f"Bearer {ADMIN}"})
        assert ok.status == 200 and (await ok.json()) == {"admin": "ops"}
        for headers in ({}, {"Authorization": "Bearer bp-test-client-key"}, {"Authorization": f"Basic {ADMIN}"}):
            r = await c.get("/admin/v1/hello", headers=headers)
            assert r.status == 401
            err = (await r.json())["error"]
            assert err["code"] == "invalid_admin_key" and set(err) == {"message", "type", "param", "code"}
            assert ADMIN not in await r.text()
    finally:
        await c.close()


async def test_the_session_cookie_opens_until_it_expires_and_never_holds_the_key():
    now = [1_000_000.0]
    gate = AdminGate((OPS,), "dev", clock=lambda: now[0])
    cookie = gate.session(OPS)
    assert ADMIN not in cookie and OPS.sha256 not in cookie
    assert gate.from_cookie(cookie) == OPS
    name, expires, mac = cookie.split(".")
    assert gate.from_cookie(f"{name}.{int(expires) + 3600}.{mac}") is None       # a longer life is forged
    assert gate.from_cookie(f"{name}.{expires}.{'0' * 64}") is None
    other = AdminGate((AdminKey("ops", hashlib.sha256(b"rotated").hexdigest()),), "dev", clock=lambda: now[0])
    assert other.from_cookie(cookie) is None                                      # rotating the key revokes
    for odd in (f"{name}.{expires}.{mac[:-1]}é", f"{name}.²{expires}.{mac}", "", "..", "ops"):
        assert gate.from_cookie(odd) is None                                     # client input: never a 500
    now[0] += SESSION_SECONDS + 1
    assert gate.from_cookie(cookie) is None

    c = await client_for(AdminGate((OPS,), "dev"))
    try:
        good = AdminGate((OPS,), "dev").session(OPS)
        r = await c.get("/admin/v1/hello", headers={"Cookie": f"{COOKIE}={good}"})
        assert r.status == 200
        r = await c.get("/admin/v1/hello", headers={"Cookie": f"{COOKIE}=ops.99999999999.{'a' * 64}"})
        assert r.status == 401
    finally:
        await c.close()


async def test_without_admin_keys_only_loopback_peers_get_in():
    gate = AdminGate((), "dev")
    assert gate.enabled and gate.loopback_only
    c = await client_for(gate)
    try:
        r = await c.get("/admin/v1/hello")
        assert r.status == 200 and (await r.json()) == {"admin": "loopback"}
        # Through a reverse proxy on the same host the real client is elsewhere.
        r = await c.get("/admin/v1/hello", headers={"X-Forwarded-For": "203.0.113.7"})
        assert r.status == 403 and (await r.json())["error"]["code"] == "admin_loopback_only"
    finally:
        await c.close()


def _non_loopback_address() -> str | None:
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))          # no packet is sent: this only picks a source address
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


async def test_without_admin_keys_a_peer_off_loopback_is_refused():
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    c = await client_for(AdminGate((), "dev"), host=addr)
    try:
        r = await c.get("/admin/v1/hello")
        assert r.status == 403 and (await r.json())["error"]["code"] == "admin_loopback_only"
    finally:
        await c.close()


def test_in_prod_admin_endpoints_exist_only_with_admin_keys():
    assert not AdminGate((), "prod").enabled
    assert AdminGate((OPS,), "prod").enabled
