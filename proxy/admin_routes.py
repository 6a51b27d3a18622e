"""The /admin/ routes: the usage and settlements API, the page, its login and logout.

Every route is behind the AdminGate. The API answers JSON (errors in OpenAI's shape); the page
answers HTML, and a browser without a session gets the login form instead of a JSON 401.
"""

from __future__ import annotations

import time

from aiohttp import web

from . import dashboard, usage
from .admin import AdminGate, NotAdmin, clear_session, set_session
from .errors import NotFound, ServiceUnavailable, StoreUnavailable

PAGE_SETTLEMENTS = 20


def _html(text: str, status: int = 200) -> web.Response:
    resp = web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
    resp.headers["Content-Security-Policy"] = dashboard.CSP
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


def _unavailable(exc: StoreUnavailable) -> ServiceUnavailable:
    return ServiceUnavailable("The budget store is unavailable.", code="BUDGET_STORE_UNAVAILABLE",
                              headers={"Retry-After": "1"})


def add(app: web.Application, gate: AdminGate, ledger_key: web.AppKey, observer_key: web.AppKey) -> None:
    async def usage_api(request: web.Request) -> web.Response:
        q = usage.usage_query(request.query)
        ledger = request.app[ledger_key]
        if ledger is None:
            return web.json_response({"data": []})
        try:
            rows = await ledger.usage(window=q["window"], type=q["type"], id=q["id"])
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
        return web.json_response(usage.document(rows))

    async def settlements_api(request: web.Request) -> web.Response:
        q = usage.settlements_query(request.query)
        ledger = request.app[ledger_key]
        if ledger is None:
            return web.json_response({"data": []})
        try:
            recs = await ledger.settlements(**q)
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
        return web.json_response({"data": [usage.settlement(r) for r in recs]})

    async def page(request: web.Request) -> web.Response:
        try:
            gate.admit(request)
        except NotAdmin:
            return _html(dashboard.login_page(), status=401)
        q = usage.usage_query(request.query)
        ledger = request.app[ledger_key]
        entries, settled, error = [], [], None
        if ledger is not None:
            try:
                entries = usage.document(await ledger.usage(window=q["window"], type=q["type"]))["data"]
                settled = [usage.settlement(r) for r in await ledger.settlements(limit=PAGE_SETTLEMENTS)]
            except StoreUnavailable:
                error = "The budget store is unavailable: budgets cannot be shown right now."
        alerts = ledger.policy.alerts.thresholds if ledger is not None else (0.8,)
        return _html(dashboard.page(entries, settled, list(request.app[observer_key].refusals),
                                    scope_type=q["type"], window=q["window"], warn_at=min(alerts),
                                    now=time.time(), error=error))

    def exists(request: web.Request) -> None:
        if not gate.enabled:
            raise NotFound(f"Invalid URL ({request.method} {request.path})", code="unknown_url")

    async def login_form(request: web.Request) -> web.Response:
        exists(request)
        if gate.loopback_only:
            raise web.HTTPSeeOther("/admin/")
        return _html(dashboard.login_page())

    async def login(request: web.Request) -> web.StreamResponse:
        exists(request)
        if gate.loopback_only:
            raise web.HTTPSeeOther("/admin/")
        form = await request.post()
        secret = form.get("key")
        key = gate.key_for(secret) if isinstance(secret, str) and secret else None
        if key is None:
            return _html(dashboard.login_page("Incorrect admin key."), status=401)
        done = web.HTTPSeeOther("/admin/")
        set_session(done, request, gate.session(key))
        raise done

    async def logout(request: web.Request) -> web.StreamResponse:
        exists(request)
        done = web.HTTPSeeOther("/admin/login" if not gate.loopback_only else "/admin/")
        clear_session(done)
        raise done

    app.router.add_get("/admin/v1/usage", gate.guard(usage_api))
    app.router.add_get("/admin/v1/settlements", gate.guard(settlements_api))
    app.router.add_get("/admin/", page)
    app.router.add_get("/admin", _to_page)
    app.router.add_get("/admin/login", login_form)
    app.router.add_post("/admin/login", login)
    app.router.add_post("/admin/logout", logout)


async def _to_page(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/admin/")
