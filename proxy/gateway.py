"""One proxied request, read top to bottom:

authenticate -> parse -> estimate -> plan -> reserve -> forward -> stream -> settle.

The gateway holds what lives as long as the app (config, ledger, token counter, upstream
sessions, task tracker); each admitted request becomes a `settlement.Flight` built from just what
it needs, which settles it exactly once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import re
import time
from collections import Counter
from json.encoder import c_make_encoder, encode_basestring
from typing import NamedTuple, Sequence

from aiohttp import web

from . import auth, body, metrics, planner
from .config import Config, Model
from .endpoints import ENDPOINTS, models_for
from .errors import ServiceUnavailable, StoreUnavailable, UpstreamFailed, UpstreamIOError, UpstreamUnsent
from .http1 import Response as Answer
from .ledger import Ledger, Refusal, RequestInfo, Reservation
from .observer import Observer
from .quota import budget_headers, refusal_error
from .settlement import Flight
from .tasks import Tasks
from .upstream import SSE, Upstreams, check_credentials, passed_headers, redacted, unreachable

log = logging.getLogger(__name__)
_BLANKS = re.compile(rb"[ \t\r\n]*")
# Timed inline on the request path (a perf_counter before, an observe after): a `metrics.Timer`
# block is three Python calls more, ~1 % of the proxy's instructions for its three timings.
_RESERVE_SECONDS = metrics.STORE["reserve"]
_new = tuple.__new__        # a NamedTuple built without its Python-level __new__ (as stores/memory.py)
# Built once: json.dumps with any keyword builds an encoder on every call (what it writes is the same).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# And its C encoder made once too: each encode() builds one, with a dict to detect cycles that a
# body parsed from JSON cannot have. The same bytes (tests/test_gateway_encode.py), 2.85 -> 1.5 µs
# for the bench's body (bench/results/hotpath-4.md).
_C_ENCODE = c_make_encoder(None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, True) \
    if c_make_encoder is not None else None


def upstream_body(payload: dict) -> bytes:
    """The JSON the upstream is sent: compact, UTF-8, as `_ENCODER` writes it."""
    if _C_ENCODE is None:
        return _ENCODER.encode(payload).encode()
    return "".join(_C_ENCODE(payload, 0)).encode()


class Admitted(NamedTuple):
    flight: Flight
    headers: dict[str, str]        # x-budget-* for the response
    cap: int | None                # completion limit to send upstream for a call that set none


class Gateway:
    def __init__(self, config: Config, ledger: Ledger | None, tokens, upstreams: Upstreams,
                 tasks: Tasks, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or Observer()       # metrics, alerts, recent refusals
        self.ledger = ledger            # None when enforcement is disabled: the store is never contacted
        self.tokens = tokens
        self.upstreams = upstreams
        self.tasks = tasks
        self.stats: Counter[str] = Counter()
        self.balance_cache = planner.BalanceCache()
        # Reservation ids: a random process prefix and a counter; unique across processes and
        # cheaper than a uuid4 per request.
        self._ids = itertools.count()
        self._counts: dict[str, functools.partial] = {}        # output counters, by upstream model name
        self._id_prefix = os.urandom(8).hex()

    def reconfigure(self, config: Config) -> None:
        """A reloaded config.yaml: requests already admitted keep the model (and prices) they
        were admitted with; new ones see the new config whole."""
        self.upstreams.reconfigure(config)
        self.config = config

    async def handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        config = self.config                # one config for the whole request, even across a reload
        endpoint = ENDPOINTS[kind]
        key = auth.authenticate(auth.presented(request.headers, endpoint.api), config.keys)
        raw = await body.read(request, config.max_body_bytes)
        call, size = body.parse(raw, kind), len(raw)
        del raw                             # a large body is not kept beside its parsed form
        models = models_for(config, call.model, endpoint)
        who = auth.caller(key, call.end_user)
        self.stats["requests"] += 1
        prompt = await self.tokens.estimate(kind, call.body, models[0].upstream, size)
        admitted = await self._reserve(call, who, models, prompt)
        try:
            return await self._forward(request, call, admitted)
        except asyncio.CancelledError:
            admitted.flight.ensure_settled("client_gone")
            raise
        finally:
            admitted.flight.ensure_settled()     # a no-op unless some path above forgot, or raised

    # --- plan and reserve -----------------------------------------------------------------

    async def _reserve(self, call: body.ApiCall, who: auth.Caller, models: Sequence[Model],
                       prompt: int) -> Admitted:
        """Plan, then try the candidates in order until one is reserved; else the 429."""
        ledger = self.ledger
        if ledger is None:
            return self._unreserved(models[0], call, prompt, who)
        rid = f"{self._id_prefix}{next(self._ids):x}"
        refusal: Refusal | None = None
        try:
            # A call whose completion was sized from the balances and lost a race is sized again
            # from a fresh snapshot, once: it fits what is really left instead of failing.
            for fresh in (False, True):
                plan = await self._plan(ledger, call, who, models, prompt, fresh)
                refusal = plan.short
                for c in plan.candidates:
                    started = time.perf_counter()
                    try:
                        got = await ledger.reserve(rid, c.amounts, c.scopes, _info(call, who, models, c.model))
                    finally:
                        _RESERVE_SECONDS.observe(time.perf_counter() - started)
                    if isinstance(got, Reservation):
                        self.balance_cache.put(c.scopes, got.balances, time.monotonic(), ledger.policy)
                        return self._admitted(got, c, models, call, prompt, who)
                    refusal = refusal or got
                if not any(c.cap is not None for c in plan.candidates):
                    break
        except StoreUnavailable as exc:
            self.stats["store_unavailable"] += 1
            self.observer.store_unavailable()
            if self.config.enforcement == "strict":
                raise ServiceUnavailable("The budget store is unavailable; the request was not sent.",
                                         code="BUDGET_STORE_UNAVAILABLE", headers={"Retry-After": "1"}) from exc
            log.warning("budget store unavailable (%s); advisory mode forwards without a reservation", exc)
            return self._unreserved(models[0], call, prompt, who)
        self.stats["refused"] += 1
        assert refusal is not None
        self.observer.refused(refusal, who.org, who.user, models[0].name)
        raise refusal_error(refusal)

    async def _plan(self, ledger: Ledger, call: body.ApiCall, who: auth.Caller, models: Sequence[Model],
                    prompt: int, fresh: bool = False) -> planner.Plan:
        """Plan from the balances of the limited counters the candidates touch: none when they
        cannot change a decision; else cached ones when fresh, else one snapshot round trip.
        Cached balances count reservations that may have settled since (for less), so a plan
        they would cap or refuse is made again from a fresh snapshot."""
        policy = ledger.policy
        if not planner.needs_balances(call, models):
            return planner.plan(call, who, models, prompt, policy, (), ledger.now())
        scopes = list(dict.fromkeys(s for m in models for s in planner.scopes_for(who, m)))
        if not planner.any_limited(policy, scopes):
            return planner.plan(call, who, models, prompt, policy, (), ledger.now())
        now = time.monotonic()
        cached = None if fresh else self.balance_cache.get(scopes, now, policy)
        if cached is not None:
            plan = planner.plan(call, who, models, prompt, policy, cached, ledger.now())
            if not plan.short and all(c.cap is None or c.cap >= policy.default_max_tokens
                                      for c in plan.candidates):
                return plan
        with metrics.Timer(metrics.STORE["snapshot"]):
            balances = await ledger.snapshot(scopes, limited_only=True)
        self.balance_cache.put(scopes, balances, now, policy)
        return planner.plan(call, who, models, prompt, policy, balances, ledger.now())

    def _admitted(self, res: Reservation, c: planner.Candidate, models: Sequence[Model],
                  call: body.ApiCall, prompt: int, who: auth.Caller) -> Admitted:
        if res.would_refuse is not None:
            self.stats["shadow_refused"] += 1
            r = res.would_refuse
            log.info("shadow: would refuse %s/%s %s %s", r.scope.type, r.scope.id, r.window, r.unit)
        if c.model != models[0].name:
            self.stats["downgraded"] += 1
        self.observer.admitted(res, models[0].name, c.model)
        model = _named(models, c.model)
        cap = c.cap if self.ledger.policy.send_cap_upstream else None
        return Admitted(self._flight(res, model, call, prompt, who),
                        budget_headers(c.model, models[0].name, res.balances), cap)

    def _unreserved(self, model: Model, call: body.ApiCall, prompt: int, who: auth.Caller) -> Admitted:
        """Forwarded without a reservation (enforcement disabled, or advisory with the store down)."""
        return Admitted(self._flight(None, model, call, prompt, who), budget_headers(model.name, model.name, ()),
                        None)

    def _flight(self, res: Reservation | None, model: Model, call: body.ApiCall, prompt: int,
                who: auth.Caller) -> Flight:
        count = self._counts.get(model.upstream)
        if count is None:       # one per upstream model name (config-bounded), not one per request
            if len(self._counts) > 1024:
                self._counts.clear()
            count = self._counts[model.upstream] = functools.partial(self.tokens.count, model=model.upstream)
        return Flight(self.ledger, self.tasks, res, model, call.endpoint, prompt, count, self.observer, who.org)

    # --- forward and stream ---------------------------------------------------------------

    async def _forward(self, request: web.Request, call: body.ApiCall, admitted: Admitted) -> web.StreamResponse:
        flight = admitted.flight
        model = flight.model
        payload = dict(call.body)
        payload["model"] = model.upstream
        route = self.upstreams.routes.get(model.provider)
        if admitted.cap is not None and route is not None:
            payload[route.cap_fields[call.endpoint.kind]] = admitted.cap
        inject = call.stream and call.endpoint.usage_opt_in and not call.client_wants_usage
        if inject:
            payload["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
        data = upstream_body(payload)
        if route is None:                                   # a config reload removed it meanwhile
            flight.release_soon("upstream_error")
            raise unreachable(model.provider, ConnectionRefusedError())
        flight.mark_sent()
        try:
            try:
                up = await self.upstreams.post(model.provider, call.endpoint, data, SSE if call.stream else None,
                                               request.headers)
            finally:        # from when it was sent (mark_sent's clock), to its headers
                metrics.upstream(model.provider).observe(time.monotonic() - flight.sent_at)
        except UpstreamUnsent as exc:
            flight.release_soon("upstream_error")   # never reached the upstream: nothing to pay
            raise unreachable(model.provider, exc) from None
        except UpstreamIOError as exc:
            flight.charge_prompt_soon()
            raise unreachable(model.provider, exc) from None
        try:
            headers = passed_headers(up)
            headers.update(admitted.headers)
            if up.status >= 400:
                return await self._error_passthrough(up, headers, flight)
            if call.stream and up.content_type == SSE:
                return await self._stream(request, up, headers, flight, call.endpoint.tap(inject))
            return await self._whole(up, headers, flight)
        finally:
            up.release()

    async def _error_passthrough(self, up, headers, flight: Flight) -> web.Response:
        """Upstream refused before any output: release, and pass its status and body through.
        Except 401/403: those are about the proxy's own upstream key (OpenAI's message even
        quotes part of it), which the client can neither see nor fix: a 502 of our own."""
        flight.release_soon("upstream_error")
        self.stats["upstream_errors"] += 1
        provider = flight.model.provider
        try:
            data = await up.read()
        except UpstreamIOError as exc:
            raise unreachable(provider, exc) from None
        check_credentials(provider, up.status)
        return web.Response(status=up.status, body=redacted(self.upstreams.routes[provider], data), headers=headers)

    async def _whole(self, up: Answer, headers, flight: Flight) -> web.Response:
        try:
            data = await up.read()
        except UpstreamIOError as exc:
            flight.charge_prompt_soon()
            raise unreachable(flight.model.provider, exc) from None
        if not _json_object(data):
            # A 200 the SDK cannot parse (an HTML page from a wrong base URL, a proxy's text):
            # the upstream got the prompt and may bill it, so it is charged, as any call that
            # reached the upstream and got no usable answer.
            flight.charge_prompt_soon()
            self.stats["upstream_errors"] += 1
            log.warning("provider %s answered HTTP %d with a body that is not a JSON object "
                        "(%s, %d bytes)", flight.model.provider, up.status, up.content_type, len(data))
            raise UpstreamFailed(f"The upstream provider '{flight.model.provider}' answered with a body "
                                 f"that is not JSON.", code="upstream_bad_response")
        flight.settle_body(data)
        return web.Response(status=up.status, body=data, headers=headers)

    async def _stream(self, request: web.Request, up: Answer, headers, flight: Flight,
                      tap) -> web.StreamResponse:
        resp = web.StreamResponse(status=up.status, headers=headers)
        try:
            await resp.prepare(request)
            async for chunk in up.iter_any():
                await _write(resp, tap.feed(chunk))
            await _write(resp, tap.close())
            await resp.write_eof()
        except asyncio.CancelledError:
            up.close()                      # the client left: stop paying, drop the upstream now
            self.stats["client_disconnects"] += 1
            flight.settle_stream(tap, "client_gone")
            raise
        except (UpstreamIOError, ConnectionError) as exc:
            # Either side broke: the client (a write failed) or the upstream (a read failed).
            client_gone = request.transport is None or request.transport.is_closing()
            up.close()
            self.stats["client_disconnects" if client_gone else "upstream_cut"] += 1
            log.info("stream ended early (%s): %s", "client gone" if client_gone else "upstream cut",
                     type(exc).__name__)
            flight.settle_stream(tap, "client_gone" if client_gone else "cut")
            if not client_gone and request.transport is not None:
                # Do not let aiohttp end the response cleanly: the client must see the cut too.
                request.transport.abort()
            return resp
        flight.settle_stream(tap)
        return resp


async def _write(resp: web.StreamResponse, pieces) -> None:
    """One write per upstream read: with chunked encoding every write is a chunk on the wire, so
    the few slices of a read that had bytes left out are joined (a copy of one read, no more)."""
    if len(pieces) == 1:
        await resp.write(pieces[0])
    elif pieces:
        await resp.write(b"".join(pieces))


def _json_object(data: bytes) -> bool:
    """Does the body look like one JSON object? Its first and last non-blank bytes are checked,
    not the whole: parsing a large embeddings answer on the loop before replying would stall it
    (settlement parses it after the reply)."""
    if data[:1] == b"{" and data[-1:] == b"}":       # a compact answer: no blanks to skip
        return True
    start = _BLANKS.match(data).end()
    end = len(data)
    while end > start and data[end - 1] in b" \t\r\n":
        end -= 1
    return data[start:start + 1] == b"{" and data[end - 1:end] == b"}"


def _named(models: Sequence[Model], name: str) -> Model:
    """The candidate called `name`: nearly always the first (no generator for it, 0.4 µs)."""
    first = models[0]
    return first if first.name == name else next(m for m in models if m.name == name)


def _info(call: body.ApiCall, who: auth.Caller, models: Sequence[Model], model: str) -> RequestInfo:
    """What the settlement log records of this request (kept with its reservation): the model
    name the client sent (a route or a model), the model used, and the first candidate when it
    was downgraded from it."""
    asked = models[0]
    used = _named(models, model)
    return _new(RequestInfo, (who.org, who.user, call.end_user, call.endpoint.kind, call.model, model, used.provider,
                              call.stream, asked.name if model != asked.name else None))
