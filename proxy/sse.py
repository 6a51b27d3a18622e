"""Watch an OpenAI Server-Sent Events stream on its way to the client.

The proxy forwards streamed chat/completions responses unbuffered and byte for byte, but it must
learn what the request really cost. `UsageTap` parses the stream on the side (WHATWG SSE rules),
records the usage, model and output volume, and - when the proxy itself added
`stream_options.include_usage` - takes out what that added, so the client sees exactly the stream
it would have seen without the proxy, whatever shape the upstream gives it:

- a usage-only event is left out whole: usage and no output, i.e. `choices` empty (OpenAI) or
  every choice empty - a delta whose fields are all null, no text, no finish_reason, no logprobs
  (LiteLLM's `[{"index":0,"delta":{}}]`);
- every other event that has a top-level `usage` member (`null`, as OpenAI adds to every chunk, or
  an object, as servers that report usage in the last content chunk do) loses that member: its
  bytes from the comma before it (or, when it is the first member, up to the first byte after the
  comma that follows it) to the end of its value. Everything else is kept byte for byte.

Bytes are never rewritten, only left out (proxy/jsonmember.py finds a member's bytes). An event
whose JSON is split over several `data:` lines (no known server does that) keeps its member. The
pieces handed back are the caller's own chunk or memoryview slices of it wherever possible.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import jsonmember

# A blank line ends an event: two line terminators in a row, each \r\n, \r or \n. The first
# look-behind rejects the \n of a \r\n as a terminator start (even when a search starts between
# the two bytes); `(?:(?<=\r)\n)?+` takes the \n after a \r into the same terminator, for good.
# Leading with a plain class lets the regex engine skip ahead quickly.
_BOUNDARY = re.compile(rb"[\r\n](?<!\r\n)(?:(?<=\r)\n)?+[\r\n](?:(?<=\r)\n)?+")
# Empty lines where an event would start: they dispatch nothing and belong to no event (so a
# dropped event never takes a neighbour's stray blank line with it).
BLANK_LINES = re.compile(rb"[\r\n]+")
_LINE_SPLIT = re.compile(rb"\r\n?|\n")
_LINE = re.compile(rb"[^\r\n]+")
BOM = b"\xef\xbb\xbf"
# The member include_usage adds; OpenAI's two places for it (last, or before the padding).
_USAGE_KEY = b'"usage"'
_OPENAI_TAIL = b',"usage":null}'
_OPENAI_PADDED = b',"usage":null,"obfuscation":"'
# What _dispatch tells the scanner to do with an event.
KEEP, DROP, STRIP = 0, 1, 2
_CR = 0x0D
_LF = 0x0A

Piece = bytes | memoryview


def _field(line: bytes) -> tuple[bytes, bytes]:
    """Split one field line; a comment (leading ':') comes back with an empty name."""
    name, _, value = line.partition(b":")
    if value[:1] == b" ":
        value = value[1:]
    return name, value


def event_data(content: bytes) -> bytes | None:
    """The joined `data` of one event's lines, or None when the event has no data field."""
    # OpenAI sends single-line `data: {...}` events; skip the line split for them.
    if content.startswith(b"data: ") and b"\n" not in content and b"\r" not in content:
        return content[6:]
    values = [v for name, v in map(_field, _LINE_SPLIT.split(content)) if name == b"data"]
    return b"\n".join(values) if values else None


def decode_event(payload: bytes) -> dict[str, Any] | None:
    """The JSON object in an event, or None: odd events are forwarded, never fatal."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # includes bad UTF-8 and absurd nesting
        return None
    return obj if isinstance(obj, dict) else None


def _text_len(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0


def _arguments_len(call: Any) -> int:
    """Characters of a streamed function/tool call's `arguments`."""
    if not isinstance(call, dict):
        return 0
    fn = call.get("function", call)  # tool_calls nest under `function`; function_call does not
    return _text_len(fn.get("arguments")) if isinstance(fn, dict) else 0


def _choice_output(choice: Any) -> int:
    """Characters of generated output carried by one streamed choice."""
    if not isinstance(choice, dict):
        return 0
    chars = _text_len(choice.get("text"))  # /v1/completions
    delta = choice.get("delta")
    if isinstance(delta, dict):
        chars += _text_len(delta.get("content")) + _text_len(delta.get("refusal"))
        # Reasoning streamed by OpenAI-compatible servers (vLLM and DeepSeek: `reasoning_content`;
        # OpenRouter and others: `reasoning`): billed as output, so a cut stream counts it too.
        chars += _text_len(delta.get("reasoning_content")) + _text_len(delta.get("reasoning"))
        chars += _arguments_len(delta.get("function_call"))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            chars += sum(map(_arguments_len, calls))
    return chars


class UsageTap:
    """Watches an OpenAI SSE stream passing through the proxy."""

    __slots__ = ("usage", "model", "done", "output_chunks", "output_chars", "error",
                 "_drop", "_tail", "_at_start", "_cr_end", "_cr_dropped")

    def __init__(self, drop_usage_chunk: bool) -> None:
        self.usage: dict | None = None
        self.model: str | None = None
        self.done = False
        self.output_chunks = 0
        self.output_chars = 0
        self.error: dict | None = None
        self._drop = drop_usage_chunk
        self._tail = bytearray()     # the incomplete trailing event, nothing more
        self._at_start = True        # a BOM is only stripped from the very first event
        # The last event ended on a \r at the end of a read: a \n opening the next read is
        # still part of that event's blank line (and goes wherever that event went).
        self._cr_end = False
        self._cr_dropped = False

    def feed(self, chunk: bytes) -> list[Piece]:
        """Parse `chunk`; return the pieces to write to the client, in order.

        drop_usage_chunk False: return [chunk] itself, immediately and uncopied (parse on the
        side). drop_usage_chunk True: return the bytes of complete events only, leaving out
        usage-only events; bytes of an incomplete trailing event are held until the event
        completes (so a usage chunk split across reads is never half-sent)."""
        if not chunk:
            return []
        if self._tail:
            return self._feed_tail(chunk)
        return self._feed_fresh(chunk)

    def close(self) -> list[Piece]:
        """End of stream: whatever is held back (an incomplete trailing event) is returned as is."""
        tail, self._tail = bytes(self._tail), bytearray()
        if not tail:
            return []
        # SSE would discard an unterminated event, but the upstream still billed it: count it.
        self._dispatch(tail)
        return [tail] if self._drop else []

    def _feed_fresh(self, chunk: Piece) -> list[Piece]:
        """Feed a read that starts on an event boundary (nothing held back)."""
        # The scan needs bytes methods; a memoryview read is copied for parsing only.
        text = chunk.tobytes() if isinstance(chunk, memoryview) else chunk
        skip = 0
        if self._cr_end:
            self._cr_end = False
            skip = 1 if text[0] == _LF else 0
        lf_dropped = skip == 1 and self._cr_dropped
        end, dropped = self._scan(text, skip, skip)
        if end < len(text):
            self._tail = bytearray(text[end:])
        if not self._drop:
            return [chunk]
        if lf_dropped:
            dropped.insert(0, (0, 1))
        if not dropped and end == len(chunk):
            return [chunk]
        return _pieces(memoryview(chunk), end, dropped)

    def _feed_tail(self, chunk: Piece) -> list[Piece]:
        """Feed a read that continues the held-back event."""
        buf = self._tail
        old_len = len(buf)
        buf += chunk
        # A new boundary needs a new byte, and is at most 4 bytes long: no need to rescan.
        end, dropped = self._scan(buf, 0, max(0, old_len - 3))
        if end == 0:
            return [chunk] if not self._drop else []
        # Pieces below are views of `buf`, so it must never be resized again: replace it.
        self._tail = buf[end:]
        if not self._drop:
            return [chunk]
        return _pieces(memoryview(buf), end, dropped)

    def _scan(self, data: bytes | bytearray, pos: int,
              search_from: int) -> tuple[int, list[tuple[int, int]]]:
        """Dispatch every complete event in data[pos:]; no boundary starts before search_from.

        Returns where the incomplete tail starts and the byte ranges of usage-only events."""
        dropped: list[tuple[int, int]] = []
        size = len(data)
        # Without any \r a blank line is just b"\n\n", and memchr-based find beats the regex.
        # (A boundary found from search_from can't begin with a \n whose \r lies before it.)
        lf_only = data.find(b"\r", search_from) < 0
        while pos < size:
            if data[pos] == _LF or data[pos] == _CR:
                pos = BLANK_LINES.match(data, pos).end()
                continue
            start, stop = boundary(data, max(pos, search_from), lf_only)
            if start < 0:
                break
            content = bytes(data[pos:start])
            bom = 3 if self._at_start and content.startswith(BOM) else 0
            action = self._dispatch(content)
            if self._drop and action == DROP:
                dropped.append((pos, stop))
            elif self._drop and action == STRIP:
                cut = _usage_member(content, bom)
                if cut is not None:
                    dropped.append((pos + cut[0], pos + cut[1]))
            pos = stop
        if pos == size and data[size - 1] == _CR:
            self._cr_end = True
            self._cr_dropped = bool(dropped) and dropped[-1][1] == size
        return pos, dropped

    def _dispatch(self, content: bytes) -> int:
        """Account for one event (its lines, blank line excluded); say what include_usage added
        to it: DROP a usage-only event, STRIP a usage member, KEEP anything else."""
        if self._at_start:
            self._at_start = False
            if content.startswith(BOM):
                content = content[3:]
        payload = event_data(content)
        if payload is None:
            return KEEP
        if payload == b"[DONE]":
            self.done = True
            return KEEP
        obj = decode_event(payload)
        return KEEP if obj is None else self._account(obj)

    def _account(self, obj: dict[str, Any]) -> int:
        """Record what one decoded chunk tells us; DROP, STRIP or KEEP (see _dispatch)."""
        if obj.get("error") is not None:
            self.error = obj
        if self.model is None:
            model = obj.get("model")
            if isinstance(model, str) and model:
                self.model = model
        if "usage" not in obj:
            self._count(obj.get("choices"))
            return KEEP
        usage = obj["usage"]
        if not isinstance(usage, dict):
            self._count(obj.get("choices"))
            return STRIP if usage is None else KEEP     # not what include_usage adds: leave it
        self.usage = usage
        choices = obj.get("choices")
        if isinstance(choices, list) and all(map(_empty_choice, choices)):
            return DROP
        self._count(choices)
        return STRIP

    def _count(self, choices: Any) -> None:
        if isinstance(choices, list) and choices:
            chars = sum(map(_choice_output, choices))
            if chars:
                self.output_chunks += 1
                self.output_chars += chars


def _empty_choice(choice: Any) -> bool:
    """A streamed choice that carries nothing: no output, no role, no finish, no logprobs."""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if delta is not None and not (isinstance(delta, dict) and all(v is None for v in delta.values())):
        return False
    return (choice.get("text") in (None, "") and choice.get("finish_reason") is None
            and choice.get("logprobs") is None)


def _usage_member(content: bytes, begin: int) -> tuple[int, int] | None:
    """Byte span to leave out of an event (from content[begin:]) for its top-level `usage`
    member (see the module docstring), or None if it cannot be found exactly."""
    # OpenAI's shapes (one `data:` line), without a token scan: the member right before the
    # object's last `}`, or before a last plain-string "obfuscation" member, can only be top-level.
    if content.startswith(b"data:", begin) and b"\n" not in content and b"\r" not in content:
        if content.endswith(_OPENAI_TAIL):
            return len(content) - len(_OPENAI_TAIL), len(content) - 1
        at = content.rfind(_OPENAI_PADDED)
        end = len(content) - 2             # where the pad's closing quote must be
        if at >= 0 and content.endswith(b'"}') and content.find(b'"', at + len(_OPENAI_PADDED)) == end \
                and content.find(b"\\", at) < 0:
            return at, at + len(_OPENAI_TAIL) - 1
    region = _data_value(content, begin)
    if region is None:
        return None
    return jsonmember.span(content, _USAGE_KEY, *region)


def _data_value(content: bytes, begin: int) -> tuple[int, int] | None:
    """Span of the one non-empty `data` value of an event; None if its JSON spans several."""
    if content.startswith(b"data: ", begin) and b"\n" not in content and b"\r" not in content:
        return begin + 6, len(content)              # OpenAI's single `data: {...}` line
    found = None
    for line in _LINE.finditer(content, begin):
        name, colon, value = line.group().partition(b":")
        if name != b"data" or not value or value == b" ":
            continue
        if found is not None:
            return None
        found = (line.start() + 5 + (value[:1] == b" "), line.end())
    return found


def boundary(data: bytes | bytearray, start: int, lf_only: bool) -> tuple[int, int]:
    """Span of the first blank line's terminators at or after start; (-1, -1) if none yet."""
    if lf_only:
        at = data.find(b"\n\n", start)
        return (at, at + 2) if at >= 0 else (-1, -1)
    match = _BOUNDARY.search(data, start)
    return match.span() if match is not None else (-1, -1)


def _pieces(view: memoryview, end: int, dropped: list[tuple[int, int]]) -> list[Piece]:
    """Slices of view[:end] with the dropped ranges left out."""
    out: list[Piece] = []
    pos = 0
    for start, stop in dropped:
        if start > pos:
            out.append(view[pos:start])
        pos = stop
    if end > pos:
        out.append(view[pos:end])
    return out
