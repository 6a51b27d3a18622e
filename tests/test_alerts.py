"""Budget alerts: the payload, and deliveries through real HTTP receivers."""

from __future__ import annotations

import asyncio
import calendar
import os
import subprocess
import sys
import time

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.alerts import Crossing, payload
from proxy.ledger import Scope

from . import harness
from .fake_upstream import UPSTREAM_KEY, FakeOpenAI
from .redis_server import free_port

END = calendar.timegm((2026, 11, 30, 0, 0, 0))


def test_threshold_payload_has_the_fields_and_a_human_text():
    body = payload(Crossing("budget_threshold", Scope("org", "acme"), "day", "usd", 0.8, 8_123_400, 10_000_000, END))
    assert body == {
        "event": "budget_threshold", "scope": {"type": "org", "id": "acme"}, "window": "day", "unit": "usd",
        "threshold": 0.8, "used": 8.1234, "limit": 10.0, "window_end": "2026-11-30T00:00:00Z",
        "text": "budget-proxy: org 'acme' has used 81% of its day USD limit (8.1234 of 10.0 USD; alert at 80%). "
                "The window resets at 2026-11-30T00:00:00Z."}


def test_exhausted_payload_in_tokens():
    body = payload(Crossing("budget_exhausted", Scope("user", "acme/bob"), "minute", "tokens", 1.0, 990, 1000,
                            END))
    assert (body["event"], body["used"], body["limit"], body["threshold"]) == ("budget_exhausted", 990, 1000, 1.0)
    assert body["text"] == ("budget-proxy: user 'acme/bob' has run out of its minute tokens budget (990 of 1000 "
                            "tokens used); its requests are refused until 2026-11-30T00:00:00Z.")


# --- deliveries, end to end -------------------------------------------------------------------



MSGS = [{"role": "user", "content": "Say hello."}]
LIMIT = 200                       # org day tokens; a request here is about 17 tokens


class Receiver:
    """A webhook receiver: fails its first `fail_first` calls with a 500, or hangs while `hang`."""

    def __init__(self, fail_first: int = 0, hang: bool = False) -> None:
        self.fail_first, self.hang = fail_first, hang
        self.attempts = 0
        self.bodies: list[dict] = []
        self.delivered = asyncio.Event()
        self.release = asyncio.Event()
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.hang:
            await self.release.wait()
            return web.Response(status=204)
        if self.attempts <= self.fail_first:
            return web.Response(status=500)
        self.bodies.append(await request.json())
        self.delivered.set()
        return web.Response(status=204)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.server = TestServer(app)
        await self.server.start_server()
        return str(self.server.make_url("/hook"))

    async def close(self) -> None:
        self.release.set()
        await self.server.close()

    def events(self, event: str) -> list[dict]:
        return [b for b in self.bodies if b["event"] == event]


def alert_policy(url: str, thresholds=(0.5,)) -> dict:
    return {"defaults": {"org": {"day": {"tokens": LIMIT}}},
            "alerts": {"thresholds": list(thresholds), "webhooks": [{"url": url}]}}


async def spend(client: openai.AsyncOpenAI, n: int) -> int:
    """n requests; the number refused."""
    refused = 0
    for _ in range(n):
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=8)
        except openai.RateLimitError:
            refused += 1
    return refused


@pytest.fixture
async def receiver():
    made: list[Receiver] = []

    async def make(**kw) -> tuple[Receiver, str]:
        r = Receiver(**kw)
        made.append(r)
        return r, await r.start()

    yield make
    for r in made:
        await r.close()


async def test_a_crossing_and_the_first_refusal_are_each_sent_once(store_url, start_proxy, receiver):
    rec, url = await receiver()
    h = await start_proxy(store_url, alert_policy(url))
    client = h.client()
    await spend(client, 7)                                  # past 50 % of 200 tokens
    await h.settled()
    await asyncio.wait_for(rec.delivered.wait(), 10)
    assert await spend(client, 12) >= 3                     # until refused, several times
    await h.settled()
    await asyncio.sleep(0.5)                                # time for any duplicate to arrive
    (crossing,) = rec.events("budget_threshold")
    assert crossing["scope"] == {"type": "org", "id": "acme"} and crossing["threshold"] == 0.5
    assert (crossing["window"], crossing["unit"], crossing["limit"]) == ("day", "tokens", LIMIT)
    assert LIMIT / 2 <= crossing["used"] < LIMIT and crossing["text"].startswith("budget-proxy: org 'acme'")
    (exhausted,) = rec.events("budget_exhausted")
    assert exhausted["scope"] == {"type": "org", "id": "acme"} and exhausted["limit"] == LIMIT


async def test_a_receiver_failing_twice_gets_the_alert_on_the_third_try(start_proxy, receiver):
    rec, url = await receiver(fail_first=2)
    h = await start_proxy("memory://", alert_policy(url))
    await spend(h.client(), 7)
    await h.settled()
    await asyncio.wait_for(rec.delivered.wait(), 15)        # backoff 0.5 s, then 1 s
    assert rec.attempts == 3 and len(rec.bodies) == 1


async def test_a_receiver_that_never_answers_does_not_slow_requests(start_proxy, receiver):
    rec, url = await receiver(hang=True)
    h = await start_proxy("memory://", alert_policy(url, thresholds=(0.1, 0.3, 0.5)))
    client = h.client()
    await spend(client, 1)
    t0 = time.perf_counter()
    await spend(client, 1)
    baseline = time.perf_counter() - t0
    await spend(client, 7)                                  # crosses every threshold: deliveries hang
    await h.settled()
    deadline = time.monotonic() + 5
    while rec.attempts == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert rec.attempts >= 1 and not rec.bodies             # a delivery is stuck in the receiver...
    t0 = time.perf_counter()
    await spend(client, 2)
    per_request = (time.perf_counter() - t0) / 2
    assert per_request < max(0.5, 20 * baseline)            # ...and requests do not wait for it


async def _ready(url: str, deadline: float) -> None:
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} never became ready")
            await asyncio.sleep(0.2)


async def test_two_proxy_processes_on_one_redis_send_each_crossing_once(redis_url, tmp_path, receiver):
    rec, url = await receiver()
    fake = FakeOpenAI()
    upstream = TestServer(fake.app())
    await upstream.start_server()
    cfg = harness.config_data(str(upstream.make_url("/v1")), redis_url)
    cfg["policy"] = str(tmp_path / "policy.yaml")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"version": 1, **alert_policy(url, (0.3, 0.6))}))
    ports = [free_port(), free_port()]
    env = {**os.environ, "BP_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "LOG_LEVEL": "WARNING"}
    procs = [subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(tmp_path / "config.yaml"),
                               "--port", str(p)], env=env) for p in ports]
    clients = []
    try:
        deadline = time.monotonic() + 60
        for p in ports:
            await _ready(f"http://127.0.0.1:{p}/readyz", deadline)
        clients = [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key=harness.CLIENT_KEY,
                                      max_retries=0, timeout=30) for p in ports]
        # Both processes at once, so both see each crossing: the store's claim picks one sender.
        await asyncio.gather(*(spend(clients[i % 2], 1) for i in range(10)))
        deadline = time.monotonic() + 10
        while len(rec.bodies) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)                            # time for any duplicate to arrive
    finally:
        for c in clients:
            await c.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        await upstream.close()
    assert sum(u["total_tokens"] for u in fake.reported) >= 0.6 * LIMIT      # both thresholds were crossed
    sent = sorted(b["threshold"] for b in rec.events("budget_threshold"))
    # Each crossing once; a commit that jumps both thresholds sends only the higher one.
    assert sent in ([0.3, 0.6], [0.6])
