"""The /admin/ routes: the usage and settlements API, the page, its login and logout.

Every route is behind the AdminGate. The API answers JSON (errors in OpenAI's shape); the page
answers HTML, and a browser without a session gets the login form instead of a JSON 401.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs

from aiohttp import web

from . import body, dashboard, usage
from .admin import AdminGate, NotAdmin, clear_session, set_session
from .errors import NotFound, ServiceUnavailable, StoreUnavailable

PAGE_SETTLEMENTS = 20
LOGIN_BODY_BYTES = 16_384      # a login form holds one key


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


def add(route, gate: AdminGate, ledger_key: web.AppKey, observer_key: web.AppKey) -> None:
    """The admin routes, each added by `route(method, path, handler)` (proxy/app.py's)."""
    async def usage_api(request: web.Request) -> web.Response:
        q = usage.usage_query(request.query)
        ledger = request.app[ledger_key]
        if ledger is None:
            return web.json_response({"data": []})
        try:
            rows = await ledger.usage(window=q["window"], type=q["type"], id=q["id"])
        except StoreUnavailable as exc:
            raise _unavailable(exc) from None
        return web.json_response(await asyncio.to_thread(usage.document, rows))

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
                rows = await ledger.usage(window=q["window"], type=q["type"])
                entries = (await asyncio.to_thread(usage.document, rows))["data"]
                settled = [usage.settlement(r) for r in await ledger.settlements(limit=PAGE_SETTLEMENTS)]
            except StoreUnavailable:
                error = "The budget store is unavailable: budgets cannot be shown right now."
        alerts = ledger.policy.alerts.thresholds if ledger is not None else (0.8,)
        # Sorting and rendering every scope (one per end user) off the event loop, as the rows.
        return _html(await asyncio.to_thread(
            dashboard.page, entries, settled, list(request.app[observer_key].refusals), scope_type=q["type"],
            window=q["window"], warn_at=min(alerts), now=time.time(), error=error))

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
        secret = await _form_key(request)
        key = gate.key_for(secret) if secret else None
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

    route("GET", "/admin/v1/usage", gate.guard(usage_api))
    route("GET", "/admin/v1/settlements", gate.guard(settlements_api))
    route("GET", "/admin/", page)
    route("GET", "/admin", _to_page)
    route("GET", "/admin/login", login_form)
    route("POST", "/admin/login", login)
    route("POST", "/admin/logout", logout)


async def _form_key(request: web.Request) -> str | None:
    """The `key` field of the login form. Read here rather than with `request.post()`, which
    raises on client input (an unknown charset, a broken multipart body, a bad gzip) and would
    be a 500: the page's form is url-encoded, anything else is simply no key."""
    if request.content_type != "application/x-www-form-urlencoded":
        return None
    raw = await body.read(request, LOGIN_BODY_BYTES)
    try:
        fields = parse_qs(raw.decode("ascii"), encoding="utf-8", errors="surrogateescape")
    except (UnicodeDecodeError, ValueError):
        return None
    return next(iter(fields.get("key", ())), None)


async def _to_page(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/admin/")
