"""A fake OpenAI upstream that behaves like the real one where the proxy cares.

It streams chat and completion chunks in OpenAI's format, honours `stream_options.include_usage`
(every chunk then carries "usage": null and a final usage-only chunk with empty choices follows),
reports usage on plain responses, and records what it received and whether a stream was cut.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

UPSTREAM_KEY = "sk-upstream-test"
WORDS = ["Hello", " from", " the", " fake", " upstream", "!"]


@dataclass
class Seen:
    path: str
    body: dict
    headers: dict


@dataclass
class FakeOpenAI:
    words: list[str] = field(default_factory=lambda: list(WORDS))
    chunk_delay: float = 0.0          # seconds between stream chunks
    fail_with: int | None = None      # answer every request with this status
    cut_after: int | None = None      # drop the connection after this many stream chunks
    seen: list[Seen] = field(default_factory=list)
    reported: list[dict] = field(default_factory=list)    # usage objects it reported
    prompt_counter: object = None     # body -> prompt tokens to report, instead of the rough default
    cut_streams: int = 0              # streams whose reader went away mid-way
    finished_streams: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        return app

    def prompt_tokens(self, body: dict) -> int:
        if self.prompt_counter is not None:
            return self.prompt_counter(body)
        return 7 + len(json.dumps(body.get("messages") or body.get("prompt") or body.get("input"))) // 10

    def usage(self, request: web.Request, body: dict, completion: int) -> dict:
        """Usage to report; recorded unless the call came straight from a test (not via the proxy)."""
        p = self.prompt_tokens(body)
        u = {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}
        if "x-test-direct" not in request.headers:
            self.reported.append(u)
        return u

    def answer(self, body: dict) -> tuple[list[str], str]:
        """The words to answer (one token each) and the finish reason: like OpenAI, a completion
        limit (`max_completion_tokens`, else `max_tokens`) cuts the answer with "length"."""
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        if cap is not None and cap < len(self.words):
            return self.words[:cap], "length"
        return self.words, "stop"

    async def _admit(self, request: web.Request) -> dict | web.Response:
        body = await request.json()
        self.seen.append(Seen(request.path, body, dict(request.headers)))
        given = request.headers.get("Authorization", "")
        if given != f"Bearer {UPSTREAM_KEY}":
            key = given.removeprefix("Bearer ")         # OpenAI quotes part of a wrong key back
            return web.json_response({"error": {"message": f"Incorrect API key provided: {key[:6]}***{key[-3:]}.",
                                                "type": "invalid_request_error", "param": None,
                                                "code": "invalid_api_key"}}, status=401)
        if self.fail_with:
            return web.json_response({"error": {"message": "The server had an error.",
                                                "type": "server_error", "param": None, "code": None}},
                                     status=self.fail_with)
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        if isinstance(body, web.Response):
            return body
        if body.get("stream"):
            return await self._stream(request, body, "chat.completion.chunk")
        words, finish = self.answer(body)
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": "".join(words)}}],
            "usage": self.usage(request, body, len(words))})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        if isinstance(body, web.Response):
            return body
        if body.get("stream"):
            return await self._stream(request, body, "text_completion")
        words, finish = self.answer(body)
        return web.json_response({
            "id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "text": "".join(words), "finish_reason": finish, "logprobs": None}],
            "usage": self.usage(request, body, len(words))})

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        if isinstance(body, web.Response):
            return body
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        p = self.usage(request, body, 0)["prompt_tokens"]
        return web.json_response({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
            "usage": {"prompt_tokens": p, "total_tokens": p}})

    def _chunk(self, body: dict, obj: str, piece: dict, usage_field: bool) -> bytes:
        c = {"id": "chatcmpl-fake", "object": obj, "created": 1700000000, "model": body["model"],
             "system_fingerprint": "fp_fake", **piece}
        if usage_field:
            c["usage"] = None
        c["obfuscation"] = "AAatV4uAp"        # OpenAI pads chunks with this member, after usage
        return b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"   # compact, as OpenAI sends

    def _pieces(self, obj: str, words: list[str], finish: str) -> list[dict]:
        if obj == "text_completion":
            return [{"choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": None}]}
                    for w in words] + \
                   [{"choices": [{"index": 0, "text": "", "finish_reason": finish, "logprobs": None}]}]
        return [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}] + \
               [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words] + \
               [{"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}]

    async def _stream(self, request: web.Request, body: dict, obj: str) -> web.StreamResponse:
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        words, finish = self.answer(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": "req-fake"})
        await resp.prepare(request)
        try:
            for i, piece in enumerate(self._pieces(obj, words, finish)):
                if i == self.cut_after:
                    request.transport.abort()          # the upstream dies mid-stream
                    self.cut_streams += 1
                    return resp
                await resp.write(self._chunk(body, obj, piece, include))
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            if include:
                await resp.write(self._chunk(body, obj, {"choices": [], "usage": self.usage(request, body, len(words))},
                                             False))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.cut_streams += 1
            raise
        self.finished_streams += 1
        return resp
