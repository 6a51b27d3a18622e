"""Talking to upstream providers: one pooled client session, per-provider headers and timeouts.

Everything per provider (URL prefix, auth header, timeouts) is computed once at start-up. The
upstream key is read from the environment variable the config names, once; the client's own key
is never forwarded. We ask upstream for identity encoding so the bytes we stream are the bytes
we parse (the client still gets them untouched).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import aiohttp
from multidict import CIMultiDict

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


@dataclass(frozen=True, slots=True)
class Route:
    urls: Mapping[str, str]            # endpoint kind -> full URL, for the endpoints this API serves
    root: str                          # the API's URL prefix, for pass-through paths below /v1
    headers: Mapping[str, str]
    timeout: aiohttp.ClientTimeout
    key: str | None = field(default=None, repr=False)    # to redact it from relayed errors
    cap_fields: Mapping[str, str] = field(default_factory=dict)   # endpoint kind -> where a completion cap goes


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
    return Route(MappingProxyType(urls), root, MappingProxyType(headers),
                 aiohttp.ClientTimeout(total=None, sock_connect=p.connect_timeout, sock_read=p.read_timeout),
                 p.api_key, MappingProxyType(caps))


class Upstreams:
    def __init__(self, config: Config) -> None:
        self.routes = {name: _route(p) for name, p in config.providers.items()}
        self.session: aiohttp.ClientSession | None = None

    def reconfigure(self, config: Config) -> None:
        """New providers (a reloaded config): swapped whole; pooled connections are kept."""
        self.routes = {name: _route(p) for name, p in config.providers.items()}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300,
                                         keepalive_timeout=60, enable_cleanup_closed=True)
        # No cookie jar: one session serves every tenant, and a cookie an upstream sets on one
        # tenant's answer (OpenAI's edge sets __cf_bm and _cfuvid) must not ride along on the
        # next tenant's request. (The client still gets its Set-Cookie headers: passed_headers.)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent",),
                                             cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def post(self, provider: str, endpoint: Endpoint, payload: bytes, accept: str | None,
             client_headers: Mapping[str, str] | None = None):
        route = self.routes[provider]
        headers = _headers(route, accept, client_headers)
        assert self.session is not None
        return self.session.post(route.urls[endpoint.kind], data=payload, headers=headers, timeout=route.timeout)

    def request(self, method: str, provider: str, path: str, payload: bytes | None,
                client_headers: Mapping[str, str] | None = None):
        """A pass-through call to `path` below the provider's API root (e.g. /responses/ID)."""
        route = self.routes[provider]
        assert self.session is not None
        return self.session.request(method, route.root + path, data=payload,
                                    headers=_headers(route, None, client_headers), timeout=route.timeout)


def _headers(route: Route, accept: str | None, client: Mapping[str, str] | None) -> Mapping[str, str]:
    extra = {name: client[name] for name in FORWARDED if name in client} if client else {}
    if accept is not None:
        extra["Accept"] = accept
    return {**route.headers, **extra} if extra else route.headers


def redacted(route: Route, data: bytes) -> bytes:
    """An upstream's error body with the proxy's own key cut out (OpenAI quotes part of a key)."""
    key = route.key
    return data.replace(key.encode(), b"[redacted]") if key and key.encode() in data else data


def passed_headers(resp: aiohttp.ClientResponse) -> CIMultiDict:
    out: CIMultiDict = CIMultiDict()
    passes = _passes
    for name, value in resp.headers.items():
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
