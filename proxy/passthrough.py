"""Authenticated calls relayed to a provider and never charged: they generate nothing.

- `GET` / `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items` (OpenAI
  Responses): the proxy keeps no record of which provider served a response id (no state that
  would have to be shared across processes), so the openai-kind providers are asked in config
  order until one does not answer 404; with one OpenAI provider, that is one call. A response id
  is an unguessable capability, as it is at OpenAI: any proxy key that knows one may read it
  (every org of the proxy shares the provider's project, so the provider cannot tell them apart
  either).
- `POST /v1/messages/count_tokens` (Anthropic): the model (a registry name or route, as for
  /v1/messages) is rewritten to its upstream name and the body sent to its provider.

Upstream errors pass through as for metered calls, the proxy's own key redacted; a 401/403 about
the proxy's upstream credentials becomes a 502 of our own.
"""

from __future__ import annotations

import json
import logging
import re

from aiohttp import web

from . import auth, body
from .config import Config
from .endpoints import ENDPOINTS, models_for
from .errors import BadRequest, NotFound, UpstreamIOError
from .http1 import Response as Answer
from .upstream import Upstreams, check_credentials, passed_headers, redacted, unreachable

log = logging.getLogger(__name__)
_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


async def _relay(up: Answer, upstreams: Upstreams, provider: str) -> web.Response:
    try:
        data = await up.read()
    except UpstreamIOError as exc:
        raise unreachable(provider, exc) from None
    check_credentials(provider, up.status)
    if up.status >= 400:
        data = redacted(upstreams.routes[provider], data)
    return web.Response(status=up.status, body=data, headers=passed_headers(up))


async def _call(upstreams: Upstreams, method: str, provider: str, path: str, payload: bytes | None,
                request: web.Request) -> Answer:
    try:
        return await upstreams.request(method, provider, path, payload, request.headers)
    except UpstreamIOError as exc:
        raise unreachable(provider, exc) from None


async def stored_response(request: web.Request, config: Config, upstreams: Upstreams) -> web.Response:
    """GET/DELETE /v1/responses/{id}[/input_items]: to the openai provider that knows the id."""
    auth.authenticate(request.headers.get("Authorization"), config.keys)
    rid = request.match_info["id"]
    if not _RESPONSE_ID.fullmatch(rid):
        # Built from a checked id, never the raw path: "..%2F" must not reach another upstream URL.
        raise NotFound(f"No response with id '{rid[:64]}'.", param="response_id", code="not_found")
    path = f"/responses/{rid}" + ("/input_items" if request.path.endswith("/input_items") else "")
    if request.rel_url.raw_query_string:
        # As the client encoded it: the decoded form would turn an `after=a%26b` cursor into two
        # parameters, or a `%23` into the start of a fragment.
        path += "?" + request.rel_url.raw_query_string
    providers = [name for name, p in config.providers.items() if p.kind == "openai" and name in upstreams.routes]
    for i, provider in enumerate(providers):
        up = await _call(upstreams, request.method, provider, path, None, request)
        try:
            if up.status == 404 and i + 1 < len(providers):
                continue                    # not this provider's response: ask the next
            return await _relay(up, upstreams, provider)
        finally:
            up.release()
    raise BadRequest("No OpenAI provider is configured.", code="no_provider")


async def count_tokens(request: web.Request, config: Config, upstreams: Upstreams) -> web.Response:
    """POST /v1/messages/count_tokens: counted by the model's Anthropic provider, never charged."""
    endpoint = ENDPOINTS["messages"]
    auth.authenticate(auth.presented(request.headers, endpoint.api), config.keys)
    payload = body.json_object(await body.read(request, config.max_body_bytes))
    name = payload.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("model: Field required", param="model", code="missing_required_parameter")
    model = models_for(config, name, endpoint)[0]
    data = json.dumps({**payload, "model": model.upstream}, ensure_ascii=False, separators=(",", ":")).encode()
    up = await _call(upstreams, "POST", model.provider, endpoint.path + "/count_tokens", data, request)
    try:
        return await _relay(up, upstreams, model.provider)
    finally:
        up.release()
