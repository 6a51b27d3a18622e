"""End to end: bad input and odd upstreams get a clear answer in OpenAI's shape, never a 500,
and leave nothing reserved (harness.stop checks every counter of every scope)."""

from __future__ import annotations

import json

import aiohttp
import pytest

from . import harness, rawhttp
from .fake_upstream import UPSTREAM_KEY
from .rawhttp import post

BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def proxy(store_url, tokens):
    h = await harness.start(store_url, {"defaults": {"org": {"day": {"usd": 100}}}}, tokens)
    try:
        yield h
        used, reserved = await h.books()
        assert reserved == 0 and used == harness.reported_tokens(h)     # bad input charged nothing
    finally:
        await harness.stop(h)


async def raw_http(h: harness.Harness, request: bytes) -> tuple[int, dict[str, str], bytes]:
    return await rawhttp.raw_http(h.proxy.host, h.proxy.port, request)


def openai_error(status: int, body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


# Each surface with a body of its own: OpenAI's chat and Responses, Anthropic's Messages (whose
# errors come in Anthropic's shape, and whose SDK sends its key as x-api-key).
SURFACES = {
    "chat": ("/v1/chat/completions", BODY, b"Authorization: Bearer "),
    "responses": ("/v1/responses", json.dumps({"model": "gpt-4o", "input": "hi"}).encode(),
                  b"Authorization: Bearer "),
    "messages": ("/v1/messages", json.dumps({"model": "claude-haiku-4-5", "max_tokens": 16,
                                             "messages": [{"role": "user", "content": "hi"}]}).encode(),
                 b"x-api-key: "),
}


def error_of(path: str, body: bytes) -> dict:
    """The error object, in the shape of the API at `path` (checked)."""
    got = json.loads(body)
    if path.startswith("/v1/messages"):
        assert got["type"] == "error"
    err = got["error"]
    assert set(err) >= {"message", "type"}
    return err


@pytest.mark.parametrize("surface", sorted(SURFACES))
@pytest.mark.parametrize("token", [b"caf\xe9", b"\xff\xfekey", "ключ".encode()])
async def test_a_non_utf8_or_unknown_key_is_a_401(proxy, token, surface):
    path, body, header = SURFACES[surface]
    status, headers, answer = await raw_http(proxy, post(path, body, header + token))
    assert status == 401 and headers["content-type"].startswith("application/json")
    assert error_of(path, answer)["type"] in ("invalid_request_error", "authentication_error")
    assert proxy.fake.seen == []


@pytest.mark.parametrize("token", [b"caf\xe9", b"\xff\xfekey"])
async def test_a_non_utf8_key_is_a_401_on_models_too(proxy, token):
    status, _, body = await raw_http(proxy, b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
                                            b"Authorization: Bearer " + token + b"\r\n\r\n")
    assert status == 401 and openai_error(status, body)["code"] == "invalid_api_key"


@pytest.mark.parametrize("surface", sorted(SURFACES))
async def test_a_lone_surrogate_in_raw_utf8_is_a_400_before_any_reservation(proxy, surface):
    path, body, header = SURFACES[surface]
    raw = body.replace(b'"hi"', b'"hi \xed\xa0\x80"')
    assert raw != body
    status, _, answer = await raw_http(proxy, post(path, raw, header + harness.CLIENT_KEY.encode()))
    assert status == 400
    err = error_of(path, answer)
    assert "not valid UTF-8 (byte 0xed" in err["message"]
    assert proxy.fake.seen == [] and proxy.gateway.stats["requests"] == 0


@pytest.mark.parametrize("page", [b"<html><body>Welcome to nginx!</body></html>", b"", b"OK",
                                  b'{"id": "chatcmpl-cut-short'])
async def test_an_upstream_200_that_is_not_json_is_a_502_charged_the_prompt(store_url, tokens, page):
    h = await harness.start(store_url, {"defaults": {"org": {"day": {"usd": 100}}}}, tokens)
    try:
        h.fake.page = page
        status, headers, body = await harness.post(h, "/chat/completions", json.loads(BODY))
        assert status == 502 and headers["Content-Type"].startswith("application/json")
        assert openai_error(status, body)["code"] == "upstream_bad_response"
        used, reserved = await h.books()
        prompt = await h.tokens.estimate("chat", json.loads(BODY), "gpt-4o")
        assert (used, reserved) == (prompt, 0)             # the prompt, as for any call that got no answer
        assert h.gateway.stats["upstream_errors"] == 1
    finally:
        await harness.stop(h)


async def test_gzip_bodies_work_and_a_body_that_is_not_gzip_is_a_400(proxy):
    import gzip
    import zlib
    key = b"Authorization: Bearer " + harness.CLIENT_KEY.encode()
    for enc, packed in ((b"gzip", gzip.compress(BODY)), (b"deflate", zlib.compress(BODY))):
        header = b"Content-Encoding: " + enc
        status, _, body = await raw_http(proxy, post("/v1/chat/completions", packed, key, header))
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]
        status, _, body = await raw_http(proxy, post("/v1/chat/completions", BODY, key, header))
        assert status == 400, body
        err = openai_error(status, body)
        assert err["code"] == "invalid_content_encoding" and enc.decode() in err["message"]
    assert len(proxy.fake.seen) == 2                    # only the two well-encoded calls
    # The size limit applies to the decoded body: a small gzip of 9 MB is a 413, not a 500.
    bomb = gzip.compress(BODY.replace(b'"hi"', b'"' + b"a" * 9_000_000 + b'"'))
    status, _, body = await raw_http(proxy, post("/v1/chat/completions", bomb, key, b"Content-Encoding: gzip"))
    assert status == 413 and openai_error(status, body)["code"] == "request_too_large"


@pytest.mark.parametrize("shape", ["openai", "litellm", "in_last", "null_first"])
async def test_streams_reach_the_client_as_a_direct_call_gives_them_whatever_the_upstream_shape(proxy, shape):
    proxy.fake.stream_shape = shape
    for options in ({}, {"stream_options": {"include_usage": True}}):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": 50, **options}
        status, headers, via = await harness.post(proxy, "/chat/completions", body)
        assert status == 200
        async with aiohttp.ClientSession() as s:
            async with s.post(str(proxy.upstream.make_url("/v1/chat/completions")), json=body,
                              headers={"Authorization": f"Bearer {UPSTREAM_KEY}", "x-test-direct": "1"}) as r:
                direct = await r.read()
        assert via == direct, shape
        assert (b'"usage"' in via) is bool(options)


@pytest.mark.parametrize("data, ok", [(b"{}", True), (b'{"a": 1}', True), (b' \r\n\t{"a": 1}\n ', True), (b"{\n}\n", True),
                                      (b"", False), (b"{", False), (b"}", False), (b" ", False), (b"[1]", False),
                                      (b"<html></html>", False), (b'{"a": 1} x', False), (b'x {"a": 1}', False)])
def test_an_answer_is_taken_for_a_json_object_by_its_first_and_last_non_blank_bytes(data, ok):
    from proxy.gateway import _json_object
    assert _json_object(data) is ok
