"""A proxy in front of the fake upstream, with the books checked after each test."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import aiohttp
import anthropic
import openai
import yaml
from aiohttp.test_utils import TestServer

from proxy import config as config_mod
from proxy.app import GATEWAY, build_app
from proxy.ledger import Scope
from proxy.policy import load as load_policy
from proxy.policy import parse as parse_policy

from .fake_upstream import UPSTREAM_KEY, FakeOpenAI

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
CLIENT_KEY = "bp-test-client-key"
OTHER_KEY = "bp-test-other-key"
ADMIN = "bp-admin-key-for-tests"
ADMIN_KEYS = {"admin_keys": {"ops": {"sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}}}

PRICES = {"gpt-4o": (2.5, 10.0), "gpt-4o-mini": (0.15, 0.6), "text-embedding-3-small": (0.02, 0.0),
          "gpt-3.5-turbo-instruct": (1.5, 2.0)}


# Models for the Responses and Messages surfaces, with every cache price (USD per million tokens).
TYPED_API_MODELS = {
    "gpt-4.1": {"provider": "openai", "input_per_million": 2.0, "cached_input_per_million": 0.5,
                "cache_write_per_million": 2.5, "cache_write_1h_per_million": 3.0, "output_per_million": 8.0,
                "upstream": "gpt-4.1-2025-04-14"},
    "claude-sonnet-4-6": {"provider": "anthropic", "input_per_million": 3.0, "cached_input_per_million": 0.3,
                          "cache_write_per_million": 3.75, "cache_write_1h_per_million": 6.0,
                          "output_per_million": 15.0, "upstream": "claude-sonnet-4-6-20260217",
                          "downgrade_to": ["claude-haiku-4-5"]},
    "claude-haiku-4-5": {"provider": "anthropic", "input_per_million": 1.0, "output_per_million": 5.0},
}


def config_data(upstream_url: str, store: str, enforcement: str = "strict", keys: bool = True) -> dict:
    models = {name: {"provider": "openai", "input_per_million": i, "output_per_million": o}
              for name, (i, o) in PRICES.items()}
    models["gpt-4o"]["downgrade_to"] = ["gpt-4o-mini"]
    models["gpt-4o"]["cached_input_per_million"] = 1.25
    models["gpt-4o-mini"]["upstream"] = "gpt-4o-mini-2024-07-18"
    models.update(TYPED_API_MODELS)
    data = {"environment": "dev", "enforcement": enforcement, "store": store,
            "providers": {"openai": {"base_url": upstream_url, "api_key_env": "BP_TEST_UPSTREAM_KEY",
                                     "connect_timeout": 2, "read_timeout": 10},
                          # Anthropic's base URL is the API root (its SDK adds /v1): the fake serves both
                          "anthropic": {"base_url": upstream_url.removesuffix("/v1"), "kind": "anthropic",
                                        "api_key_env": "BP_TEST_UPSTREAM_KEY", "connect_timeout": 2,
                                        "read_timeout": 10}},
            "models": models, "routes": {"smart": ["gpt-4o", "gpt-4o-mini"]}}
    if keys:
        data["keys"] = {
            "app": {"sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest(), "org": "acme",
                    "user": "app", "allow_end_user": True},
            "other": {"sha256": hashlib.sha256(OTHER_KEY.encode()).hexdigest(), "org": "globex"}}
    return data


class Harness:
    def __init__(self, fake: FakeOpenAI, upstream: TestServer, proxy: TestServer, tokens) -> None:
        self.fake = fake
        self.upstream = upstream
        self.proxy = proxy
        self.tokens = tokens
        self._clients: list[openai.AsyncOpenAI] = []

    @property
    def gateway(self):
        return self.proxy.app[GATEWAY]

    @property
    def url(self) -> str:
        return str(self.proxy.make_url("/v1"))

    def client(self, key: str = CLIENT_KEY, **kw) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)          # a stuck proxy fails the test instead of hanging it
        c = openai.AsyncOpenAI(base_url=self.url, api_key=key, **kw)
        self._clients.append(c)
        return c

    def anthropic(self, key: str = CLIENT_KEY, **kw) -> anthropic.AsyncAnthropic:
        """The official anthropic SDK pointed at the proxy, with a proxy key (sent as x-api-key)."""
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        c = anthropic.AsyncAnthropic(base_url=str(self.proxy.make_url("")), api_key=key, **kw)
        self._clients.append(c)
        return c

    def direct(self) -> openai.AsyncOpenAI:
        c = openai.AsyncOpenAI(base_url=str(self.upstream.make_url("/v1")), api_key=UPSTREAM_KEY,
                               max_retries=0, default_headers={"x-test-direct": "1"})
        self._clients.append(c)
        return c

    async def settled(self) -> None:
        """Wait for settlement tasks (they run after responses are sent), 30 s at most."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        tasks = self.gateway.tasks
        while len(tasks) and loop.time() < deadline:
            await asyncio.wait(tasks.pending(), timeout=1)
        if len(tasks):
            stacks = io.StringIO()
            for task in tasks.pending():
                task.print_stack(file=stacks)
            raise AssertionError(f"settlement tasks did not finish:\n{stacks.getvalue()}")

    async def balances(self, scope: Scope = Scope("global", "*")):
        ledger = self.gateway.ledger
        return {(b.window, b.unit): b for b in await ledger.snapshot([scope])}

    async def reserved_anywhere(self) -> list[str]:
        """Reservations still open, and scopes still holding a reserved amount in any current
        window, read through the ledger's public reads."""
        await self.settled()
        ledger = self.gateway.ledger
        held = [f"reservation {rid}" for rid in await ledger.open_reservations()]
        held += [f"{u.window} {u.scope.type}:{u.scope.id} reserved {u.reserved}"
                 for u in await ledger.usage() if u.reserved.tokens or u.reserved.usd]
        return held

    async def drift(self) -> list:
        """Scopes whose day or month counters disagree with the settlement log (budget-proxy audit)."""
        ledger = self.gateway.ledger
        return [d for window in ("day", "month") for d in await ledger.audit(window) if d.tokens or d.usd]

    async def books(self) -> tuple[int, int]:
        """(tokens used, tokens reserved) on the global day counter."""
        await self.settled()
        day = (await self.balances())[("day", "tokens")]
        return day.used, day.reserved


def reported_tokens(h: Harness) -> int:
    """Tokens the fake upstream reported over the whole test."""
    return sum(u["total_tokens"] for u in h.fake.reported)


async def post(h: Harness, path: str, body, key: str | None = CLIENT_KEY, raw: bytes | None = None):
    """A raw HTTP call to the proxy: (status, headers, body bytes)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s:
        data = raw if raw is not None else json.dumps(body).encode()
        async with s.post(f"{h.url}{path}", data=io.BytesIO(data) if len(data) > 2**20 else data,
                          headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


async def start(store_url: str, policy: dict | str, tokens, *, enforcement: str = "strict", keys: bool = True,
                fake: FakeOpenAI | None = None, env=None, clock=None, config_file: str | None = None,
                config: dict | None = None, provider_options: dict | None = None) -> Harness:
    """A fake upstream and a proxy in front of it. `policy`: the policy's YAML data, or the path
    of a policy file (watched while running). With `config_file`, the config is written there as
    YAML and loaded from it (for tests that edit it while the proxy runs). `config` adds or
    replaces top-level config.yaml keys (e.g. admin_keys); `provider_options` are added to the
    openai provider's entry."""
    fake = fake or FakeOpenAI()
    upstream = TestServer(fake.app())
    await upstream.start_server()
    data = {**config_data(str(upstream.make_url("/v1")), store_url, enforcement, keys), **(config or {})}
    data["providers"]["openai"].update(provider_options or {})
    env = {"BP_TEST_UPSTREAM_KEY": UPSTREAM_KEY, **(env or {})}
    if config_file:
        with open(config_file, "w") as fh:
            yaml.safe_dump(data, fh)
        cfg = config_mod.load(config_file, env)
    else:
        cfg = config_mod.parse(data, "test-config.yaml", env=env)
    pol = load_policy(policy) if isinstance(policy, str) else parse_policy({"version": 1, **policy},
                                                                         "test-policy.yaml")
    proxy = TestServer(build_app(cfg, pol, tokens=tokens, clock=clock))
    await proxy.start_server()
    return Harness(fake, upstream, proxy, tokens)


async def stop(h: Harness, check_reserved: bool = True) -> None:
    """Stop both servers; first assert that no counter of any scope still holds a reservation."""
    try:
        if check_reserved and h.gateway.ledger is not None:
            assert await h.reserved_anywhere() == []
            assert await h.drift() == []
    finally:
        await _close(h)


async def _close(h: Harness) -> None:
    for c in h._clients:
        await c.close()
    await h.proxy.close()
    await h.upstream.close()
