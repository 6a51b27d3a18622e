"""What every route's handler is wrapped in (proxy/app.py `fronted`): the open-auth Host check,
errors as responses, and every answer counted once, in that order."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import REGISTRY

from proxy import metrics
from proxy.app import GATEWAY, fronted
from proxy.errors import ApiError


async def _ok(request: web.Request) -> web.Response:
    return web.Response(status=201, body=b"{}")


async def _refused(request: web.Request) -> web.Response:
    raise ApiError("no", status=429, code="nope")


async def _moved(request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


async def _bug(request: web.Request) -> web.Response:
    raise KeyError("a bug")


async def _gone(request: web.Request) -> web.Response:
    raise asyncio.CancelledError


ROUTES = {"/v1/ok": _ok, "/v1/refused": _refused, "/v1/moved": _moved, "/v1/bug": _bug, "/v1/gone": _gone,
          "/healthz": _ok}


@pytest.fixture
async def app():
    app = web.Application()
    for path, handler in ROUTES.items():
        app.router.add_get(path, fronted(handler, v1=path.startswith("/v1/")))
    app[GATEWAY] = SimpleNamespace(config=SimpleNamespace(keys={}, allow_open_auth=False))
    runner = web.AppRunner(app)
    await runner.setup()
    yield app
    await runner.cleanup()


def _count(path: str, status: int) -> float:
    metrics.flush()
    return REGISTRY.get_sample_value("budget_proxy_requests_total", {"endpoint": path, "status": str(status)}) or 0.0


async def _answer(app: web.Application, path: str, host: str = "127.0.0.1:8000") -> web.StreamResponse:
    return await app._handle(make_mocked_request("GET", path, app=app, headers={"Host": host}))


async def test_answers_and_errors_are_counted_once_by_their_status(app, caplog):
    cases = [("/v1/ok", 201), ("/v1/refused", 429), ("/v1/bug", 500)]
    before = {c: _count(*c) for c in cases}
    answers = {path: await _answer(app, path) for path, _ in cases}
    assert {p: r.status for p, r in answers.items()} == dict(cases)
    assert json.loads(answers["/v1/refused"].body)["error"]["code"] == "nope"
    assert json.loads(answers["/v1/bug"].body)["error"]["code"] == "internal_error"
    assert "unhandled error on GET /v1/bug" in caplog.text and "KeyError" in caplog.text
    assert {c: _count(*c) - before[c] for c in cases} == {c: 1 for c in cases}


async def test_a_redirect_and_a_client_gone_pass_through_counted(app):
    moved, gone = _count("/v1/moved", 302), _count("/v1/gone", 499)
    with pytest.raises(web.HTTPFound):
        await _answer(app, "/v1/moved")
    with pytest.raises(asyncio.CancelledError):
        await _answer(app, "/v1/gone")
    assert (_count("/v1/moved", 302) - moved, _count("/v1/gone", 499) - gone) == (1, 1)


async def test_open_auth_answers_v1_only_on_a_loopback_host_and_counts_the_refusal(app):
    refused, ok = _count("/v1/ok", 403), _count("/v1/ok", 201)
    r = await _answer(app, "/v1/ok", host="evil.example:8000")
    assert r.status == 403 and json.loads(r.body)["error"]["code"] == "host_not_allowed"
    assert (await _answer(app, "/healthz", host="evil.example:8000")).status == 201     # not /v1
    assert (await _answer(app, "/v1/ok", host="localhost:8000")).status == 201
    assert (_count("/v1/ok", 403) - refused, _count("/v1/ok", 201) - ok) == (1, 1)
    app[GATEWAY].config.keys = {"sha": object()}                # keys configured: any Host
    assert (await _answer(app, "/v1/ok", host="evil.example:8000")).status == 201
