"""Watch typed-event streams (OpenAI Responses, Anthropic Messages) on their way to the client.

Unlike chat completions, the proxy adds nothing to these streams (both APIs always report
usage), so the bytes are passed through untouched and uncopied: a tap only parses on the side,
keeping the incomplete trailing event between reads. Events are split by the same WHATWG SSE
rules as the chat tap (`proxy.sse`); an event's kind is its JSON `type` (both APIs repeat it
there), so the `event:` line needs no parsing.

A tap exposes what settlement needs (usage objects as the provider wrote them, like the chat
tap's; the endpoint's `read_usage` normalizes them):
- `usage`: the final usage object, once the stream reported it;
- `partial`: a usage object known before the end (Anthropic's `message_start` carries the exact
  input), for charging a cut stream;
- `output_chunks` / `output_chars`: output-volume counters (delta events seen, characters in
  them), for estimating the output of a stream cut before its usage;
- `error`: an upstream error event, `model`, `response_id` and `done`.
"""

from __future__ import annotations

import abc
from typing import Any

from . import pricing
from .sse import BLANK_LINES, BOM, boundary, decode_event, event_data

# Deltas whose strings are generated output. Responses: every `response.*.delta` event carries
# its text (output text, refusal, function-call arguments, reasoning summaries...) in `delta`;
# Anthropic: `content_block_delta` carries it under one of these keys, by delta type.
_ANTHROPIC_DELTA_TEXT = ("text", "partial_json", "thinking")


class EventTap(abc.ABC):
    """Splits an SSE stream into events and hands each decoded JSON object to `_account`."""

    __slots__ = ("usage", "partial", "model", "response_id", "done", "error",
                 "output_chunks", "output_chars", "_tail", "_at_start")

    def __init__(self) -> None:
        self.usage: dict | None = None
        self.partial: dict | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.done = False
        self.error: dict | None = None
        self.output_chunks = 0
        self.output_chars = 0
        self._tail = bytearray()     # the incomplete trailing event, nothing more
        self._at_start = True

    def feed(self, chunk: bytes) -> list[bytes]:
        """Parse `chunk` on the side; return it, untouched, as the one piece to send on."""
        if not chunk:
            return []
        if self._tail:
            buf = self._tail
            old = len(buf)
            buf += chunk
            # A new boundary needs a new byte and is at most 4 bytes long: no rescan of old bytes.
            end = self._scan(buf, max(0, old - 3))
            if end:
                self._tail = buf[end:]
        else:
            end = self._scan(chunk, 0)
            if end < len(chunk):
                self._tail = bytearray(chunk[end:])     # only an incomplete event is ever kept
        return [chunk]

    def close(self) -> list[bytes]:
        """End of stream: an unterminated last event still counts (the upstream billed it)."""
        tail, self._tail = bytes(self._tail), bytearray()
        if tail.strip(b"\r\n"):
            self._dispatch(tail)
        return []

    def _scan(self, data: bytes | bytearray, search_from: int) -> int:
        """Dispatch every complete event in data; return where the incomplete tail starts."""
        pos, size = 0, len(data)
        lf_only = data.find(b"\r", search_from) < 0
        while pos < size:
            if data[pos] in b"\r\n":
                pos = BLANK_LINES.match(data, pos).end()
                continue
            start, stop = boundary(data, max(pos, search_from), lf_only)
            if start < 0:
                break
            self._dispatch(bytes(data[pos:start]))
            pos = stop
        return pos

    def _dispatch(self, content: bytes) -> None:
        if self._at_start:
            self._at_start = False
            content = content.removeprefix(BOM)
        payload = event_data(content)
        obj = decode_event(payload) if payload is not None else None
        if obj is not None and isinstance(obj.get("type"), str):
            self._account(obj["type"], obj)

    @abc.abstractmethod
    def _account(self, kind: str, obj: dict[str, Any]) -> None:
        """Take in one typed event (`kind` is its `type`)."""

    def _output(self, text: Any) -> None:
        if isinstance(text, str) and text:
            self.output_chunks += 1
            self.output_chars += len(text)


class ResponsesTap(EventTap):
    """OpenAI Responses API events: `response.created` ... `response.completed` (or
    `response.incomplete` / `response.failed`), whose `response.usage` is the final usage."""

    __slots__ = ()

    _FINAL = frozenset(("response.completed", "response.incomplete", "response.failed"))

    def _account(self, kind: str, obj: dict[str, Any]) -> None:
        if kind.endswith(".delta"):
            self._output(obj.get("delta"))
            return
        response = obj.get("response")
        if isinstance(response, dict):
            self._response(response)
            if kind in self._FINAL:
                self.done = True
                usage = response.get("usage")
                if pricing.from_responses(usage) is not None:
                    self.usage = usage
                if kind == "response.failed" and self.usage is None:
                    self.error = obj
        elif kind == "error":
            self.error = obj

    def _response(self, response: dict[str, Any]) -> None:
        if self.response_id is None and isinstance(response.get("id"), str):
            self.response_id = response["id"]
        if self.model is None and isinstance(response.get("model"), str):
            self.model = response["model"]


_ANTHROPIC_INPUT_FIELDS = frozenset({"input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"})


def _lower(new: Any, known: Any) -> bool:
    return isinstance(new, int) and isinstance(known, int) and new < known


class MessagesTap(EventTap):
    """Anthropic Messages events. `message_start` carries the input usage (exact: `partial`);
    every `message_delta` carries CUMULATIVE usage, so the last one seen is authoritative: its
    fields replace those of `message_start`, never add to them."""

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, Any] = {}

    def _account(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self._output(next((delta[k] for k in _ANTHROPIC_DELTA_TEXT if isinstance(delta.get(k), str)), None))
        elif kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                self._start(message)
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                for k, v in usage.items():
                    # Input counts are known from message_start: a delta may repeat or raise them,
                    # never lower them (a stray 0 would commit the input as free).
                    if v is not None and not (k in _ANTHROPIC_INPUT_FIELDS and _lower(v, self._raw.get(k))):
                        self._raw[k] = v
                if "input_tokens" in self._raw:     # never a usage that says the input was 0
                    self.usage = dict(self._raw)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = obj

    def _start(self, message: dict[str, Any]) -> None:
        if isinstance(message.get("id"), str):
            self.response_id = message["id"]
        if isinstance(message.get("model"), str):
            self.model = message["model"]
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._raw = dict(usage)
            self.partial = usage
