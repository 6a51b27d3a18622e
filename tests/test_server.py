"""The server as `budget-proxy serve` runs it: what aiohttp's HTTP parser rejects is answered in
OpenAI's error shape, never as text/plain echoing the bytes sent."""

from __future__ import annotations

import gzip
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import config as config_mod
from proxy import server
from proxy.app import build_app
from proxy.policy import parse as parse_policy

from . import harness
from .fake_upstream import UPSTREAM_KEY, FakeOpenAI
from .test_app_input import BODY, post, raw_http

KEY = b"Authorization: Bearer " + harness.CLIENT_KEY.encode()


class Served:
    """Enough of a Harness for raw_http: where the proxy listens."""

    def __init__(self, host: str, port: int, fake: FakeOpenAI) -> None:
        self.proxy = self
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
    status, headers, body = await raw_http(served, request_bytes)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {"error": {"message": f"The HTTP request could not be read: {why}.",
                                          "type": "invalid_request_error", "param": None,
                                          "code": "invalid_http_request"}}
    assert b"kkkk" not in body and served.fake.seen == []


async def test_well_formed_requests_are_served_as_before(served):
    status, _, body = await raw_http(served, post("/v1/chat/completions", gzip.compress(BODY), KEY,
                                                  b"Content-Encoding: gzip"))
    assert status == 200 and json.loads(body)["usage"]["total_tokens"] > 0
