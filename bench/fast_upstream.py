"""A minimal, fast OpenAI-compatible upstream for benchmarking the proxy.

    python bench/fast_upstream.py --port 9100 [--host 127.0.0.1]

A raw `asyncio.Protocol` HTTP/1.1 server (no aiohttp, no per-request JSON work) so that the
upstream costs as little CPU as possible and the benchmark measures the proxy, not the fake.

* POST /v1/chat/completions answers a canned `chat.completion` with `usage`.
* When the body has `"stream": true` the answer is `text/event-stream`, chunked: a few
  `chat.completion.chunk` events in OpenAI's compact form, then (if the body has
  `"include_usage": true`) a usage-only chunk with `"choices": []`, then `data: [DONE]`.
* Keep-alive and pipelined requests are handled in order; request bodies may be framed by
  Content-Length or by chunked transfer encoding.
* Any other path gets a 404 JSON error; GET /healthz answers 200 "ok".

Every response body is built once at start-up; per request the server only scans the headers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys

MODEL = "gpt-4o-mini-2024-07-18"
CREATED = 1_700_000_000
PROMPT_TOKENS = 13
WORDS = ["Hello", "!"]
COMPLETION_TOKENS = len(WORDS)
USAGE = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
         "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE_TRUE = re.compile(rb'"include_usage"\s*:\s*true')


def _compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _completion_body() -> bytes:
    return _compact({
        "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion", "created": CREATED,
        "model": MODEL, "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS),
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE,
    })


def _sse_events(include_usage: bool) -> list[bytes]:
    """The SSE events of one streamed answer, each a complete `data: ...\\n\\n`."""
    base = {"id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
            "created": CREATED, "model": MODEL, "system_fingerprint": "fp_bench"}
    extra = {"usage": None} if include_usage else {}
    deltas = [{"role": "assistant", "content": "", "refusal": None}] + [{"content": w} for w in WORDS]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}], **extra}
              for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                   **extra})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": USAGE})
    events = [b"data: " + _compact(c) + b"\n\n" for c in chunks]
    events.append(b"data: [DONE]\n\n")
    return events


def _chunked(events: list[bytes]) -> bytes:
    """Each event in its own HTTP chunk, then the terminating zero-length chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _head(status: str, ctype: bytes, length: int | None, close: bool) -> bytes:
    lines = [b"HTTP/1.1 " + status.encode(), b"Content-Type: " + ctype,
             b"x-request-id: req_bench", b"openai-processing-ms: 1"]
    if length is None:
        lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"Cache-Control: no-cache")
    else:
        lines.append(b"Content-Length: %d" % length)
    lines.append(b"Connection: close" if close else b"Connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Responses:
    """All canned responses, keyed by (kind, close)."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, bool], bytes] = {}
        plain = _completion_body()
        notfound = _compact({"error": {"message": "Unknown path", "type": "invalid_request_error",
                                       "param": None, "code": "unknown_url"}})
        bad = _compact({"error": {"message": "Bad request", "type": "invalid_request_error",
                                  "param": None, "code": None}})
        for close in (False, True):
            self.table["plain", close] = _head("200 OK", b"application/json", len(plain), close) + plain
            for usage in (False, True):
                self.table[f"stream{int(usage)}", close] = (
                    _head("200 OK", b"text/event-stream; charset=utf-8", None, close)
                    + _chunked(_sse_events(usage)))
            self.table["health", close] = _head("200 OK", b"text/plain", 2, close) + b"ok"
            self.table["404", close] = _head("404 Not Found", b"application/json", len(notfound), close) + notfound
            self.table["400", True] = _head("400 Bad Request", b"application/json", len(bad), True) + bad


RESPONSES = Responses()


class _BadRequest(Exception):
    pass


class UpstreamProtocol(asyncio.Protocol):
    """One connection: parse as many complete requests as the buffer holds, answer each in order."""

    __slots__ = ("transport", "buf", "closed")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out = []
        close = False
        try:
            while buf and not close:
                got = self._one(buf)
                if got is None:
                    break
                consumed, response, close = got
                del buf[:consumed]
                out.append(response)
        except _BadRequest:
            out.append(RESPONSES.table["400", True])
            close = True
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close and self.transport is not None:
            self.transport.close()
            buf.clear()
        elif len(buf) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
            if self.transport is not None:
                self.transport.close()

    @staticmethod
    def _one(buf: bytearray) -> tuple[int, bytes, bool] | None:
        """(bytes consumed, response, close?) for the first complete request, or None if incomplete."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise _BadRequest
            return None
        head = bytes(buf[:end])
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _BadRequest
        method, target, version = parts
        length = 0
        chunked = False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _BadRequest
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise _BadRequest from None
                if length < 0 or length > MAX_BODY_BYTES:
                    raise _BadRequest
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                v = value.strip().lower()
                if v == b"close":
                    close = True
                elif v == b"keep-alive":
                    close = False
        start = end + 4
        if chunked:
            got = _dechunk(buf, start)
            if got is None:
                return None
            body, consumed = got
        else:
            if len(buf) - start < length:
                return None
            body = bytes(buf[start:start + length])
            consumed = start + length
        path = target.split(b"?", 1)[0]
        if method == b"POST" and path == b"/v1/chat/completions":
            if _STREAM_TRUE.search(body):
                kind = "stream1" if _INCLUDE_USAGE_TRUE.search(body) else "stream0"
            else:
                kind = "plain"
        elif method == b"GET" and path == b"/healthz":
            kind = "health"
        else:
            kind = "404"
        return consumed, RESPONSES.table[kind, close], close


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at `pos`: (body, end offset), or None if incomplete."""
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadRequest from None
        if size < 0 or size > MAX_BODY_BYTES:
            raise _BadRequest
        pos = eol + 2
        if size == 0:
            # trailers (usually none), then an empty line
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return b"".join(parts), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos:pos + size]))
        pos += size + 2


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready is not None:
        ready.set()
    print(f"fast_upstream listening on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
