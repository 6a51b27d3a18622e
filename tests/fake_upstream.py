"""A fake OpenAI (and Anthropic) upstream that behaves like the real ones where the proxy cares.

Besides chat/completions/embeddings it serves OpenAI's Responses API (create, stream, retrieve,
delete, input items) and, at the same root, Anthropic's Messages API (create, stream,
count_tokens; `x-api-key` and `anthropic-version` checked), with usage objects that carry every
cache field (tests/wire.py writes both wire formats).

It streams chat and completion chunks in OpenAI's format, honours `stream_options.include_usage`
(every chunk then carries "usage": null and a final usage-only chunk with empty choices follows),
reports usage on plain responses, and records what it received and whether a stream was cut.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

from . import wire

UPSTREAM_KEY = "sk-upstream-test"
WORDS = ["Hello", " from", " the", " fake", " upstream", "!"]
# Reasoning (Responses) and thinking (Messages) tokens the fakes report, part of their output.
RESPONSES_REASONING, MESSAGES_THINKING = 2, 3


def cache_split(prompt: int) -> tuple[int, int, int, int]:
    """How the fakes split a prompt: (plain input, cache reads, short-retention writes,
    long-retention writes), so every usage object carries every cache field."""
    read, short, long = prompt // 2, prompt // 4, prompt // 8
    return prompt - read - short - long, read, short, long


@dataclass
class Seen:
    path: str
    body: dict
    headers: dict


@dataclass
class FakeOpenAI:
    words: list[str] = field(default_factory=lambda: list(WORDS))
    chunk_delay: float = 0.0          # seconds between stream chunks
    answer_delay: float = 0.0         # seconds before answering a chat completion (requests overlap)
    fail_with: int | None = None      # answer every request with this status
    cut_after: int | None = None      # drop the connection after this many stream chunks
    page: bytes | None = None         # answer every request 200 with this (non-JSON) body, as text/html
    # How a stream carries usage when asked (include_usage): "openai" ("usage":null on every
    # chunk, then a usage chunk with empty choices), "litellm" (no null members; the usage chunk's
    # choices are [{"index":0,"delta":{}}]), "in_last" (usage in the finish chunk, no usage chunk),
    # "null_first" (OpenAI's, with "usage":null as the first member).
    stream_shape: str = "openai"
    seen: list[Seen] = field(default_factory=list)
    reported: list[dict] = field(default_factory=list)    # usage objects it reported
    prompt_counter: object = None     # body -> prompt tokens to report, instead of the rough default
    cut_streams: int = 0              # streams whose reader went away mid-way
    finished_streams: int = 0
    cached_prompt: int = 0            # chat/completions: prompt tokens reported as cached
    reported_messages: list[dict] = field(default_factory=list)   # Anthropic usage objects it reported
    stored: dict = field(default_factory=dict)                    # response id -> (response, input items)
    cookie: str | None = None         # set on every answer (OpenAI's edge sets __cf_bm, _cfuvid)
    _ids: object = field(default_factory=itertools.count)

    def app(self) -> web.Application:
        app = web.Application()
        async def set_cookie(request, response) -> None:
            if self.cookie is not None:
                response.headers.add("Set-Cookie", f"{self.cookie}; Path=/; HttpOnly")
        app.on_response_prepare.append(set_cookie)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/responses/{id}", self.retrieve)
        app.router.add_delete("/v1/responses/{id}", self.retrieve)
        app.router.add_get("/v1/responses/{id}/input_items", self.input_items)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        return app

    def prompt_tokens(self, body: dict) -> int:
        if self.prompt_counter is not None:
            return self.prompt_counter(body)
        return 7 + len(json.dumps(body.get("messages") or body.get("prompt") or body.get("input"))) // 10

    def usage(self, request: web.Request, body: dict, completion: int) -> dict:
        """Usage to report; recorded unless the call came straight from a test (not via the proxy)."""
        p = self.prompt_tokens(body)
        u = {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}
        if self.cached_prompt:
            u["prompt_tokens_details"] = {"cached_tokens": min(p, self.cached_prompt), "audio_tokens": 0}
            u["completion_tokens_details"] = {"reasoning_tokens": 0, "audio_tokens": 0}
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
        if self.page is not None:
            return web.Response(body=self.page, content_type="text/html")
        if self.fail_with:
            return web.json_response({"error": {"message": "The server had an error.",
                                                "type": "server_error", "param": None, "code": None}},
                                     status=self.fail_with)
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        if isinstance(body, web.Response):
            return body
        if self.answer_delay:
            await asyncio.sleep(self.answer_delay)
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
        c = {"usage": None} if usage_field and self.stream_shape == "null_first" else {}
        c.update({"id": "chatcmpl-fake", "object": obj, "created": 1700000000, "model": body["model"],
                  "system_fingerprint": "fp_fake", **piece})
        if usage_field and self.stream_shape in ("openai", "null_first"):
            c.setdefault("usage", None)
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
        pieces = self._pieces(obj, words, finish)
        if include and self.stream_shape == "in_last":
            pieces[-1] = {**pieces[-1], "usage": self.usage(request, body, len(words))}
        elif include:
            empty = [{"index": 0, "delta": {}}] if self.stream_shape == "litellm" else []
            pieces.append({"choices": empty, "usage": self.usage(request, body, len(words))})
        try:
            for i, piece in enumerate(pieces):
                if i == self.cut_after:
                    request.transport.abort()          # the upstream dies mid-stream
                    self.cut_streams += 1
                    return resp
                await resp.write(self._chunk(body, obj, piece, include and "usage" not in piece))
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.cut_streams += 1
            raise
        self.finished_streams += 1
        return resp

    # --- OpenAI Responses -------------------------------------------------------------------

    def responses_usage(self, body: dict, output: int) -> dict:
        p = self.prompt_tokens({"input": body.get("input"), "instructions": body.get("instructions")})
        _, read, short, long = cache_split(p)
        u = wire.responses_usage(p, output + RESPONSES_REASONING, cached=read, reasoning=RESPONSES_REASONING,
                                 cache_write=(short, long))
        self.reported.append(u)
        return u

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit(request)
        if isinstance(body, web.Response):
            return body
        cap = body.get("max_output_tokens")
        words = self.words if cap is None or cap >= len(self.words) + RESPONSES_REASONING else \
            self.words[:max(0, cap - RESPONSES_REASONING)]
        final = "response.completed" if words is self.words else "response.incomplete"
        rid = f"resp_fake{next(self._ids)}"
        usage = self.responses_usage(body, len(words))
        obj = wire.response_object(rid, body["model"], "".join(words), usage, status=final.removeprefix("response."))
        items = body["input"] if isinstance(body["input"], list) else \
            [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": body["input"]}]}]
        self.stored[rid] = (obj, [{"id": f"msg_in{i}", **it} for i, it in enumerate(items)])
        if not body.get("stream"):
            return web.json_response(obj)
        return await self._events(request, wire.responses_stream(rid, body["model"], words, usage, final))

    async def retrieve(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path, {}, dict(request.headers)))
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response({"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401)
        rid = request.match_info["id"]
        if rid not in self.stored:
            return web.json_response({"error": {"message": f"Response with id '{rid}' not found.",
                                                "type": "invalid_request_error", "param": None, "code": None}},
                                     status=404)
        if request.method == "DELETE":
            del self.stored[rid]
            return web.json_response({"id": rid, "object": "response", "deleted": True})
        return web.json_response(self.stored[rid][0])

    async def input_items(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path_qs, {}, dict(request.headers)))    # with its query, as sent
        obj, items = self.stored[request.match_info["id"]]
        return web.json_response({"object": "list", "data": items, "first_id": items[0]["id"],
                                  "last_id": items[-1]["id"], "has_more": False})

    async def _events(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "request-id": "req_fake"})
        await resp.prepare(request)
        try:
            for i, event in enumerate(events):
                if i == self.cut_after:
                    request.transport.abort()
                    self.cut_streams += 1
                    return resp
                await resp.write(event)
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.cut_streams += 1
            raise
        self.finished_streams += 1
        return resp

    # --- Anthropic Messages -----------------------------------------------------------------

    async def _admit_anthropic(self, request: web.Request) -> dict | web.Response:
        body = await request.json()
        self.seen.append(Seen(request.path, body, dict(request.headers)))
        if request.headers.get("x-api-key") != UPSTREAM_KEY or not request.headers.get("anthropic-version"):
            return web.json_response(wire.anthropic_error("authentication_error", "invalid x-api-key"), status=401)
        if self.fail_with:
            return web.json_response(wire.anthropic_error("api_error", "Internal server error"),
                                     status=self.fail_with)
        return body

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._admit_anthropic(request)
        if isinstance(body, web.Response):
            return body
        words = self.words[:max(0, body["max_tokens"] - MESSAGES_THINKING)]
        plain, read, short, long = cache_split(self.prompt_tokens(body))
        usage = wire.anthropic_usage(plain, len(words) + MESSAGES_THINKING, read, short, long,
                                     thinking=MESSAGES_THINKING)
        self.reported_messages.append(usage)
        mid = f"msg_fake{next(self._ids)}"
        if not body.get("stream"):
            obj = wire.message_object(mid, body["model"], "".join(words), usage)
            if len(words) < len(self.words):
                obj["stop_reason"] = "max_tokens"
            return web.json_response(obj)
        return await self._events(request, wire.messages_stream(mid, body["model"], words, usage, deltas=2))

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = await self._admit_anthropic(request)
        if isinstance(body, web.Response):
            return body
        return web.json_response({"input_tokens": self.prompt_tokens(body)})
