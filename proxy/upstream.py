"""Talking to upstream providers: one pooled client session, per-provider headers and timeouts.

Everything per provider (URL prefix, auth header, timeouts) is computed once at start-up. The
upstream key is read from the environment variable the config names, once; the client's own key
is never forwarded. We ask upstream for identity encoding so the bytes we stream are the bytes
we parse (the client still gets them untouched).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import aiohttp
from multidict import CIMultiDict

from .config import Config, Provider
from .endpoints import ENDPOINTS, Endpoint

log = logging.getLogger(__name__)

# Response headers a client of OpenAI relies on; everything else (hop-by-hop, length, server
# identity, cookies) is the proxy's own business.
_PASS = frozenset({"content-type", "content-encoding", "x-request-id", "openai-processing-ms",
                   "openai-version", "retry-after", "retry-after-ms", "x-should-retry"})


@dataclass(frozen=True, slots=True)
class Route:
    urls: Mapping[str, str]            # kind -> full URL
    headers: Mapping[str, str]
    timeout: aiohttp.ClientTimeout
    key: str | None = field(default=None, repr=False)    # to redact it from relayed errors


def _route(p: Provider) -> Route:
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    key = p.api_key
    if p.api_key_env and not key:
        log.warning("provider %s: environment variable %s is not set; calling it without a key",
                    p.name, p.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return Route(MappingProxyType({kind: p.base_url + e.path for kind, e in ENDPOINTS.items()}),
                 MappingProxyType(headers),
                 aiohttp.ClientTimeout(total=None, sock_connect=p.connect_timeout, sock_read=p.read_timeout),
                 key)


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
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def post(self, provider: str, endpoint: Endpoint, payload: bytes, accept: str | None):
        route = self.routes[provider]
        headers = route.headers if accept is None else {**route.headers, "Accept": accept}
        assert self.session is not None
        return self.session.post(route.urls[endpoint.kind], data=payload, headers=headers, timeout=route.timeout)


def passed_headers(resp: aiohttp.ClientResponse) -> CIMultiDict:
    out: CIMultiDict = CIMultiDict()
    for name, value in resp.headers.items():
        low = name.lower()
        if low in _PASS or low.startswith("x-ratelimit-"):
            out.add(name, value)
    return out
