"""The server as `budget-proxy serve` runs it: what aiohttp's HTTP parser rejects is answered in
OpenAI's error shape, never as text/plain echoing the bytes sent."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import signal
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import config as config_mod
from proxy import server
from proxy.app import build_app
from proxy.ledger import Ledger, Scope
from proxy.policy import load as load_policy
from proxy.policy import parse as parse_policy
from proxy.stores import open_store

from . import harness
from .fake_upstream import UPSTREAM_KEY, FakeOpenAI
from .redis_server import free_port
from .rawhttp import CMD, ROOT, post, raw_http, wait_for_port

BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()

KEY = b"Authorization: Bearer " + harness.CLIENT_KEY.encode()


class Served:
    """A proxy served as `budget-proxy serve` serves it, in this process."""

    def __init__(self, host: str, port: int, fake: FakeOpenAI) -> None:
        self.host, self.port, self.fake = host, port, fake


@pytest.fixture
async def served(tokens):
    fake = FakeOpenAI()
    upstream = TestServer(fake.app())
    await upstream.start_server()
    data = harness.config_data(str(upstream.make_url("/v1")), "memory://")
    cfg = config_mod.parse(data, "test-config.yaml", env={"BP_TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    run = server.runner(build_app(cfg, parse_policy({"version": 1}, "p.yaml"), tokens=tokens), 5)
    await run.setup()
    site = web.TCPSite(run, "127.0.0.1", 0)
    await site.start()
    try:
        yield Served(*run.addresses[0][:2], fake)
    finally:
        await run.cleanup()
        await upstream.close()


CHUNKED = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
           b"Content-Type: application/json\r\n" + KEY + b"\r\n\r\n")


@pytest.mark.parametrize("request_bytes, why", [
    (b"HELLO WORLD\r\n\r\n", "the request line is not valid HTTP"),
    (b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Big: " + b"k" * 9000 + b"\r\n\r\n",
     "a request line or header is longer than 8190 bytes"),
    (b"GET /v1/models HTTP/1.1\r\nHost: p\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
     "Too many headers received"),
    (CHUNKED + b"zz\r\n" + BODY + b"\r\n0\r\n\r\n", "Invalid character in chunk size"),
    (post("/v1/chat/completions", BODY, KEY, b"Content-Encoding: br"),
     "the Content-Encoding is not supported; send the body uncompressed, gzip or deflate"),
    (post("/v1/chat/completions", BODY, KEY, b"Content-Encoding: zstd"),
     "the Content-Encoding is not supported; send the body uncompressed, gzip or deflate"),
])
async def test_what_the_parser_rejects_is_an_openai_shaped_400(served, request_bytes, why):
    status, headers, body = await raw_http(served.host, served.port, request_bytes)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"error": {"message": f"The HTTP request could not be read: {why}.",
                                          "type": "invalid_request_error", "param": None,
                                          "code": "invalid_http_request"}}
    assert b"kkkk" not in body and served.fake.seen == []


async def test_well_formed_requests_are_served_as_before(served):
    status, _, body = await raw_http(served.host, served.port, post("/v1/chat/completions", gzip.compress(BODY), KEY,
                                                  b"Content-Encoding: gzip"))
    assert status == 200 and json.loads(body)["usage"]["total_tokens"] > 0


async def test_sigterm_cuts_streams_after_the_grace_period_and_settles_what_was_streamed(redis_url, tokens):
    fake = FakeOpenAI(words=[f" w{i}" for i in range(100)], chunk_delay=0.2)     # a 20 s stream
    upstream = TestServer(fake.app())
    await upstream.start_server()
    policy = os.path.join(ROOT, "policies", "dev.yaml")
    port = free_port()
    env = {**os.environ, "OPENAI_BASE_URL": str(upstream.make_url("/v1")), "OPENAI_API_KEY": UPSTREAM_KEY,
           "APP_ENV": "dev", "BUDGET_POLICY_PATH": policy, "REDIS_URL": redis_url, "LOG_LEVEL": "INFO",
           "BUDGET_PROXY_SHUTDOWN_GRACE_SECONDS": "3"}
    proc = await asyncio.create_subprocess_exec(*CMD, "serve", "--config", os.path.join(ROOT, "config.yaml"),
                                                "--port", str(port),
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "count"}], "stream": True}
    try:
        await wait_for_port(port, proc)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                              headers={"Authorization": "Bearer anything"}) as r:
                for _ in range(4):
                    await r.content.readuntil(b"\n\n")
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                with pytest.raises(aiohttp.ClientPayloadError):      # cut, not a clean end
                    await asyncio.wait_for(r.read(), 30)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        took = time.monotonic() - sent
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await upstream.close()
    log = err.decode()
    assert proc.returncode == 0, log
    assert 3 <= took < 5.5, log             # the grace (3 s), not twice it, nor the 20 s stream
    estimate = int(re.search(r"ended without usage; charging an estimate of (\d+) output tokens", log)[1])
    assert 3 <= estimate < 100
    ledger = Ledger(open_store(redis_url), load_policy(policy))
    try:
        day = {(b.window, b.unit): b for b in await ledger.snapshot([Scope("global", "*")])}
    finally:
        await ledger.store.close()
    prompt = await tokens.estimate("chat", body, "gpt-4o")
    assert day[("day", "tokens")].reserved == 0
    assert day[("day", "tokens")].used == prompt + estimate  # what was streamed, not the reservation


@pytest.mark.parametrize("allow", [False, True])
async def test_open_auth_beyond_loopback_is_refused_at_start_up_unless_allowed(allow):
    env = {**os.environ, "BUDGET_PROXY_HOST": "0.0.0.0", "APP_ENV": "dev", "LOG_LEVEL": "WARNING"}
    env.pop("REDIS_URL", None)
    if allow:
        env["BUDGET_PROXY_ALLOW_OPEN_AUTH"] = "true"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(*CMD, "serve", "--config", os.path.join(ROOT, "config.yaml"),
                                                "--port", str(port), env=env, cwd=ROOT,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        if allow:
            await wait_for_port(port, proc)
            return
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.communicate()
    assert proc.returncode == 2
    config = os.path.join(ROOT, "config.yaml")
    assert err.decode().endswith(
        f"budget-proxy: {config}: keys: no API keys are configured, so auth is open, and the proxy would "
        f"listen on '0.0.0.0', which other machines can reach; configure `keys`, listen on 127.0.0.1, "
        f"or set listen.allow_open_auth: true to serve anyone\n")
