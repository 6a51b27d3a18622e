"""One proxied request, from the client's bytes to the settled reservation.

authenticate -> parse -> estimate -> (snapshot -> route) -> reserve -> forward -> stream -> settle.
Settlement that must outlive the handler (a client that disconnected, a response already sent)
runs in tasks the gateway tracks and the app awaits at shutdown.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections import Counter
from typing import Any, Awaitable

import aiohttp
from aiohttp import web

from . import auth, body, router
from .budget import Flight, budget_headers, refusal_error
from .config import Config
from .errors import ApiError, NotFound, PayloadTooLarge, ServiceUnavailable, StoreUnavailable, UpstreamFailed
from .ledger import Amounts, Ledger, Refusal, Reservation, Scope
from .sse import UsageTap
from .upstream import Upstreams, passed_headers

log = logging.getLogger(__name__)
SSE = "text/event-stream"


class Gateway:
    def __init__(self, config: Config, ledger: Ledger | None, tokens, upstreams: Upstreams) -> None:
        self.config = config
        self.ledger = ledger            # None when enforcement is disabled: the store is never contacted
        self.tokens = tokens
        self.upstreams = upstreams
        self.stats: Counter[str] = Counter()
        self.tasks: set[asyncio.Task] = set()
        self.balance_cache = router.BalanceCache()
        self.closing = False
        # Reservation ids: a random process prefix and a counter; unique across processes and
        # cheaper than a uuid4 per request.
        self._ids = itertools.count()
        self._id_prefix = os.urandom(8).hex()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run work that must finish even if the handler is cancelled; awaited at shutdown."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        key = auth.authenticate(request.headers.get("Authorization"), self.config.keys)
        req = body.parse(await self._read(request), kind)
        names = self.config.candidates(req.model)
        if not names:
            raise NotFound(f"The model `{req.model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        who = auth.caller(key, req.end_user)
        self.stats["requests"] += 1
        first = self.config.models[names[0]]
        prompt = await self.tokens.estimate(kind, req.body, first.upstream)
        flight = await self._reserve(req, who, names, prompt)
        try:
            return await self._forward(request, req, flight)
        finally:
            flight.ensure_settled()         # a no-op unless some path above forgot, or raised

    async def _read(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"Request body of {request.content_length} bytes is over the "
                                  f"{limit}-byte limit.")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"Request body is over the {limit}-byte limit.") from None

    # --- budget ---------------------------------------------------------------------------

    def _scopes(self, who: auth.Caller, model: str) -> tuple[Scope, ...]:
        m = self.config.models[model]
        return (Scope("global", "*"), Scope("org", who.org), Scope("user", who.user),
                Scope("provider", m.provider), Scope("model", model))

    def _candidates(self, req: body.Request, who, names, prompt: int, policy, caps) -> list[router.Candidate]:
        out = []
        for name in names:
            m = self.config.models[name]
            scopes = self._scopes(who, name)
            completion = 0
            if req.kind != "embedding":
                asked = req.max_output
                per_choice = asked if asked is not None else caps(name, scopes, policy.default_max_tokens,
                                                                   req.choices)
                completion = per_choice * req.choices
            amounts = Amounts(prompt + completion, m.cost(prompt, completion))
            out.append(router.Candidate(name, amounts, scopes))
        return out

    async def _reserve(self, req: body.Request, who: auth.Caller, names, prompt: int) -> Flight:
        rid = f"{self._id_prefix}{next(self._ids):x}"
        ledger = self.ledger
        if ledger is None:
            return Flight(self, None, names[0], names[0], prompt)
        policy = ledger.policy
        try:
            balances = await self._balances(ledger, policy, who, names, req)
            caps = _default_cap(self.config, balances, prompt, req.max_output)
            cands = self._candidates(req, who, names, prompt, policy, caps)
            # By the snapshot nothing fits: still ask the store, whose answer is authoritative.
            ordered = (router.order(cands, balances, policy.downgrade_below) or cands) if balances else cands
            refusal: Refusal | None = None
            for c in ordered:
                got = await ledger.reserve(rid, c.amounts, c.scopes)
                if isinstance(got, Reservation):
                    self.balance_cache.put(c.scopes, got.balances, time.monotonic())
                    return self._admitted(got, c, names, prompt)
                refusal = refusal or got
        except StoreUnavailable as exc:
            self.stats["store_unavailable"] += 1
            if self.config.enforcement == "strict":
                raise ServiceUnavailable("The budget store is unavailable; the request was not sent.",
                                         code="BUDGET_STORE_UNAVAILABLE", headers={"Retry-After": "1"}) from exc
            log.warning("budget store unavailable (%s); advisory mode forwards without a reservation", exc)
            return Flight(self, None, names[0], names[0], prompt)
        self.stats["refused"] += 1
        assert refusal is not None
        raise refusal_error(refusal)

    async def _balances(self, ledger: Ledger, policy, who, names, req: body.Request) -> list:
        """Balances of the limited counters the candidates touch, for routing and for capping the
        default completion: [] when nothing is limited or nothing is to be decided (one candidate
        and no default to cap); from the cache when fresh; else one snapshot round trip."""
        if len(names) == 1 and (req.max_output is not None or req.kind == "embedding"):
            return []
        scopes: dict[Scope, None] = {}
        for name in names:
            for s in self._scopes(who, name):
                scopes[s] = None
        if not any(any(t >= 0 or d >= 0 for t, d in policy.limits_for(s.type, s.id).table) for s in scopes):
            return []
        now = time.monotonic()
        cached = self.balance_cache.get(scopes, now)
        if cached is not None:
            return cached
        balances = await ledger.snapshot(list(scopes), limited_only=True)
        self.balance_cache.put(scopes, balances, now)
        return balances

    def _admitted(self, res: Reservation, c: router.Candidate, names, prompt: int) -> Flight:
        if res.would_refuse is not None:
            self.stats["shadow_refused"] += 1
            log.info("shadow: would refuse %s/%s %s %s", res.would_refuse.scope.type,
                     res.would_refuse.scope.id, res.would_refuse.window, res.would_refuse.unit)
        if c.model != names[0]:
            self.stats["downgraded"] += 1
        return Flight(self, res, c.model, names[0], prompt)

    # --- forwarding -----------------------------------------------------------------------

    async def _forward(self, request: web.Request, req: body.Request, flight: Flight) -> web.StreamResponse:
        model = self.config.models[flight.model]
        payload = dict(req.body)
        payload["model"] = model.upstream
        inject = req.stream and not req.client_wants_usage
        if inject:
            payload["stream_options"] = {**(req.body.get("stream_options") or {}), "include_usage": True}
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        flight.sent = True
        try:
            up = await self.upstreams.post(model.provider, req.kind, data, SSE if req.stream else None)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, ConnectionRefusedError) as exc:
            flight.release_soon()                   # never reached the upstream: nothing to pay
            raise _upstream_error(model.provider, exc) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            flight.estimate_soon(0)                 # it may have read (and will bill) the prompt
            raise _upstream_error(model.provider, exc) from None
        try:
            headers = passed_headers(up)
            headers.update(budget_headers(flight))
            if up.status >= 400:
                return await self._error_passthrough(up, headers, flight)
            if req.stream and up.content_type == SSE:
                return await self._stream(request, up, headers, flight, inject)
            return await self._whole(up, headers, flight, req)
        finally:
            up.release()

    async def _error_passthrough(self, up, headers, flight: Flight) -> web.Response:
        """Upstream refused before any output: release, and pass its status and body through.
        Except 401/403: those are about the proxy's own upstream key (OpenAI's message even
        quotes part of it), which the client can neither see nor fix: a 502 of our own."""
        flight.release_soon()
        self.stats["upstream_errors"] += 1
        provider = self.config.models[flight.model].provider
        try:
            data = await up.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _upstream_error(provider, exc) from None
        if up.status in (401, 403):
            log.error("provider %s rejected the proxy's credentials (HTTP %d)", provider, up.status)
            raise UpstreamFailed(f"The upstream provider '{provider}' rejected the proxy's credentials; "
                                 f"tell the proxy's operator.", code="upstream_auth_failed")
        key = self.upstreams.routes[provider].key
        if key and key.encode() in data:
            data = data.replace(key.encode(), b"[redacted]")
        return web.Response(status=up.status, body=data, headers=headers)

    async def _whole(self, up: aiohttp.ClientResponse, headers, flight: Flight, req: body.Request) -> web.Response:
        try:
            data = await up.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            flight.estimate_soon(0)
            raise _upstream_error(self.config.models[flight.model].provider, exc) from None
        flight.body_soon(data, req.kind)
        return web.Response(status=up.status, body=data, headers=headers)

    async def _stream(self, request: web.Request, up: aiohttp.ClientResponse, headers, flight: Flight,
                      inject: bool) -> web.StreamResponse:
        tap = UsageTap(drop_usage_chunk=inject)
        resp = web.StreamResponse(status=up.status, headers=headers)
        try:
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await _write(resp, tap.feed(chunk))
            await _write(resp, tap.close())
            await resp.write_eof()
        except asyncio.CancelledError:
            up.close()                      # the client left: stop paying, drop the upstream now
            self.stats["client_disconnects"] += 1
            flight.stream_soon(tap)
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            # Either side broke: the client (a write failed) or the upstream (a read failed).
            client_gone = request.transport is None or request.transport.is_closing()
            up.close()
            self.stats["client_disconnects" if client_gone else "upstream_cut"] += 1
            log.info("stream ended early (%s): %s", "client gone" if client_gone else "upstream cut",
                     type(exc).__name__)
            flight.stream_soon(tap)
            if not client_gone and request.transport is not None:
                # Do not let aiohttp end the response cleanly: the client must see the cut too.
                request.transport.abort()
            return resp
        flight.stream_soon(tap)
        return resp


async def _write(resp: web.StreamResponse, pieces) -> None:
    """One write per upstream read: with chunked encoding every write is a chunk on the wire, so
    the few slices of a read that had bytes left out are joined (a copy of one read, no more)."""
    if len(pieces) == 1:
        await resp.write(pieces[0])
    elif pieces:
        await resp.write(b"".join(pieces))


def _default_cap(config: Config, balances, prompt: int, asked: int | None):
    """A function (model, scopes, default, choices) -> completion tokens per choice to reserve
    when the client set none: the policy default, capped by what remains (shared by the n
    choices), so a worst-case guess cannot pin a budget.
    A client's own max_tokens is reserved in full (it asked for that much)."""
    if asked is not None or not balances:
        return lambda model, scopes, default, choices: default

    def cap(model: str, scopes, default: int, choices: int) -> int:
        mine = [b for b in balances if b.scope in scopes]
        tokens_left = min((b.limit - b.used - b.reserved for b in mine if b.unit == "tokens"), default=None)
        usd_left = min((b.limit - b.used - b.reserved for b in mine if b.unit == "usd"), default=None)
        m = config.models[model]
        room = default * choices
        if tokens_left is not None:
            room = min(room, tokens_left - prompt)
        if usd_left is not None and m.output_per_million > 0:
            room = min(room, int((usd_left - m.cost(prompt, 0)) / m.output_per_million))
        return max(1, min(default, room // choices))

    return cap


def _upstream_error(provider: str, exc: BaseException) -> ApiError:
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailed(f"The upstream provider '{provider}' timed out.", status=504,
                              code="upstream_timeout")
    return UpstreamFailed(f"The upstream provider '{provider}' could not be reached.")
