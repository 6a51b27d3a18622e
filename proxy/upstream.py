"""Talking to upstream providers: one pooled HTTP/1.1 client, per-provider heads and timeouts.

Everything per provider (URLs, auth header, timeouts) is computed once at start-up, down to the
bytes of each endpoint's request head: per request only a Content-Length (and a forwarded
`anthropic-beta`) is added (proxy/http1.py says why the proxy has its own client). The upstream
key is read from the environment variable the config names, once; the client's own key is never
forwarded. We ask upstream for identity encoding so the bytes we stream are the bytes we parse
(the client still gets them untouched).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from multidict import CIMultiDict

from . import http1
from .config import Config, Provider
from .endpoints import ENDPOINTS, Endpoint
from .errors import UpstreamFailed

log = logging.getLogger(__name__)

# Response headers a client of OpenAI or Anthropic relies on; everything else (hop-by-hop,
# length, server identity, cookies) is the proxy's own business.
_PASS = frozenset({"content-type", "content-encoding", "x-request-id", "openai-processing-ms",
                   "openai-version", "retry-after", "retry-after-ms", "x-should-retry", "request-id"})
_PASS_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
# A provider's base_url is what its own SDK takes as base_url: OpenAI's includes the version
# (https://api.openai.com/v1), Anthropic's is the API root (https://api.anthropic.com).
_API_PREFIX = {"openai": "", "anthropic": "/v1"}
# Request headers a client may send on to the upstream: Anthropic's opt-in to beta features
# (e.g. extended cache TTLs); the proxy sets everything else itself.
FORWARDED = ("anthropic-beta",)
SSE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Route:
    urls: Mapping[str, str]            # endpoint kind -> full URL, for the endpoints this API serves
    root: str                          # the API's URL prefix, for pass-through paths below /v1
    headers: Mapping[str, str] = field(repr=False)
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    key: str | None = field(default=None, repr=False)    # to redact it from relayed errors
    cap_fields: Mapping[str, str] = field(default_factory=dict)   # endpoint kind -> where a completion cap goes
    targets: Mapping[str, http1.Url] = field(default_factory=dict)  # endpoint kind -> its URL, split
    # (endpoint kind, Accept or None) -> the request's head, auth included: never in a repr
    heads: Mapping[tuple[str, str | None], bytes] = field(default_factory=dict, repr=False)


def _auth(p: Provider) -> dict[str, str]:
    """The provider's own credentials: OpenAI's bearer, or Anthropic's x-api-key and version."""
    key = p.api_key
    if p.api_key_env and not key:
        log.warning("provider %s: environment variable %s is not set; calling it without a key",
                    p.name, p.api_key_env)
    if p.kind == "anthropic":
        return {"anthropic-version": p.anthropic_version, **({"x-api-key": key} if key else {})}
    return {"Authorization": f"Bearer {key}"} if key else {}


def _route(p: Provider) -> Route:
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity", **_auth(p)}
    root = p.base_url + _API_PREFIX[p.kind]
    urls = {kind: root + e.path for kind, e in ENDPOINTS.items() if e.api == p.kind}
    caps = {kind: p.chat_max_tokens_field if kind == "chat" else e.cap_field
            for kind, e in ENDPOINTS.items() if e.api == p.kind and e.cap_field}
    targets = {kind: http1.Url.parse(url) for kind, url in urls.items()}
    heads = {(kind, accept): url.head("POST", {**headers, "Accept": accept} if accept else headers)
             for kind, url in targets.items() for accept in (None, SSE)}
    return Route(MappingProxyType(urls), root, MappingProxyType(headers), p.connect_timeout, p.read_timeout,
                 p.api_key, MappingProxyType(caps), MappingProxyType(targets), MappingProxyType(heads))


class Upstreams:
    def __init__(self, config: Config) -> None:
        self.routes = {name: _route(p) for name, p in config.providers.items()}
        self.client: http1.Client | None = None

    def reconfigure(self, config: Config) -> None:
        """New providers (a reloaded config): swapped whole; pooled connections are kept."""
        self.routes = {name: _route(p) for name, p in config.providers.items()}

    async def open(self) -> None:
        # One pool for every tenant. It keeps no cookies: a cookie an upstream sets on one
        # tenant's answer (OpenAI's edge sets __cf_bm and _cfuvid) must never ride along on the
        # next tenant's request (the client still gets its Set-Cookie headers: passed_headers).
        self.client = http1.Client(keepalive=60)
        self.client.tls()                  # the CA file read now, not on the first https request

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def post(self, provider: str, endpoint: Endpoint, payload: bytes, accept: str | None,
                   client_headers: Mapping[str, str] | None = None) -> http1.Response:
        route = self.routes[provider]
        head = route.heads[endpoint.kind, accept]
        if client_headers:
            head += _forwarded(client_headers)
        assert self.client is not None
        return await self.client.send(route.targets[endpoint.kind], head, payload, route.connect_timeout,
                                      route.read_timeout)

    async def request(self, method: str, provider: str, path: str, payload: bytes | None,
                      client_headers: Mapping[str, str] | None = None) -> http1.Response:
        """A pass-through call to `path` below the provider's API root (e.g. /responses/ID)."""
        route = self.routes[provider]
        url = http1.Url.parse(route.root + path)
        head = url.head(method, route.headers) + (_forwarded(client_headers) if client_headers else b"")
        assert self.client is not None
        return await self.client.send(url, head, payload, route.connect_timeout, route.read_timeout)


def _forwarded(client: Mapping[str, str]) -> bytes:
    """The client's headers that go on to the upstream (FORWARDED), as header lines."""
    lines = b""
    for name in FORWARDED:
        value = client.get(name)
        if value is not None:
            try:
                lines += http1.header_line(name, value)
            except ValueError:       # aiohttp's parser refuses these already; never sent on
                log.warning("a client's %s header holds a control character; not forwarded", name)
    return lines


def redacted(route: Route, data: bytes) -> bytes:
    """An upstream's error body with the proxy's own key cut out (OpenAI quotes part of a key)."""
    key = route.key
    return data.replace(key.encode(), b"[redacted]") if key and key.encode() in data else data


def passed_headers(resp: http1.Response) -> CIMultiDict:
    out: CIMultiDict = CIMultiDict()
    passes = _passes
    for name, value in resp.headers:
        keep = passes.get(name)
        if keep is None:
            keep = _decide(name)
        if keep:
            out.add(name, value)
    return out


# Whether a header name (as an upstream spells it) is passed on, decided once per spelling: an
# OpenAI answer has ~20 headers, and lowering and matching each was 3 of the 3.2 µs of this.
_passes: dict[str, bool] = {}


def _decide(name: str) -> bool:
    low = name.lower()
    if len(_passes) > 1000:            # bounded: the names come from the upstream
        _passes.clear()
    keep = _passes[name] = low in _PASS or low.startswith(_PASS_PREFIXES)
    return keep


def unreachable(provider: str, exc: BaseException | None = None) -> UpstreamFailed:
    """The client's error when the upstream could not be reached (502) or timed out (504)."""
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailed(f"The upstream provider '{provider}' timed out.", status=504,
                              code="upstream_timeout")
    return UpstreamFailed(f"The upstream provider '{provider}' could not be reached.")


def check_credentials(provider: str, status: int) -> None:
    """A 401/403 from upstream is about the proxy's own key (OpenAI's message even quotes part
    of it), which the client can neither see nor fix: a 502 of our own, logged for the operator."""
    if status in (401, 403):
        log.error("provider %s rejected the proxy's credentials (HTTP %d)", provider, status)
        raise UpstreamFailed(f"The upstream provider '{provider}' rejected the proxy's credentials; "
                             f"tell the proxy's operator.", code="upstream_auth_failed")
