"""The bytes of one top-level member of a JSON object, found in its text without parsing it.

Used to leave a member out of a streamed event byte for byte (proxy/sse.py). A member is found by
its key, `"usage"` say: a match whose opening quote is not escaped is a real key (inside a JSON
string every quote is escaped, and a closing quote cannot be followed by a letter), and it is
proved top-level by scanning the JSON tokens after it to the object's end. The span returned
takes one separating comma with the member: the one before it, or - for the first member - the
one after it and the blanks after that, so what is left is still the same JSON, spaced the same.

Also used to read one member without parsing the rest (`value`: the `usage` of a whole answer,
proxy/settlement.py), proved top-level by reading the members after it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# The JSON tokens that matter for finding where a value ends: strings (skipped whole, escapes
# included), brackets and commas.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],]')
_WS = b" \t\r\n"


def span(text: bytes, key: bytes, start: int, stop: int) -> tuple[int, int] | None:
    """Bytes to cut for the top-level member named `key` (with its quotes) of the JSON object in
    text[start:stop]; None if there is none (or it cannot be found exactly)."""
    at = stop
    while (at := text.rfind(key, start, at)) >= 0:
        found = _member_at(text, at, len(key), start, stop)
        if found is not None:
            return found
    return None


MISSING = object()       # what `value` returns when it finds no member to read
_SCAN = json.JSONDecoder().scan_once
_BLANKS = re.compile(r"[ \t\r\n]*")
_WS_TEXT = frozenset(" \t\r\n")


def value(text: bytes, name: str, within: int) -> Any:
    """The parsed value of the top-level member called `name` of the JSON object `text`, if its
    key starts in the last `within` bytes; MISSING if not (absent, elsewhere, or not provably
    top-level): the caller then parses the whole.

    Only that tail is decoded (once) and read: a 100 MB embeddings answer is not scanned from
    its start. A key counts when its quote is not escaped (inside a string every quote is) and it
    follows the object's `{` or a `,`; it is proved top-level by reading, with json's C scanner,
    its value and the members after it to the object's end, which must end the text (a nested
    object would close before it). A later member of the same name (spelt with an escape, which
    the search cannot see) sends the caller to the whole, where json.loads would take that one.
    The text before the key is not checked: an answer broken there (which json.loads refuses)
    still has the usage it reports read."""
    lo = max(0, len(text) - within)
    tail = text[lo:].decode("utf-8", "surrogateescape")    # a character cut at `lo`: escaped, never read
    key = f'"{name}"'
    at = len(tail)
    while (at := tail.rfind(key, 0, at)) >= 0:
        if not _member_starts(tail, at):
            continue
        try:
            found = _last_members(tail, at + len(key), name)
        except (ValueError, StopIteration, RecursionError):
            continue
        if found is not MISSING:
            return found
    return MISSING


def _member_starts(tail: str, at: int) -> bool:
    """Does the quote at `at` open a member's key: not escaped, after `{` or `,` (and blanks)?"""
    slashes = 0
    while at - slashes > 0 and tail[at - slashes - 1] == "\\":
        slashes += 1
    if slashes % 2:
        return False
    before = at - 1
    while before >= 0 and tail[before] in _WS_TEXT:
        before -= 1
    return before >= 0 and tail[before] in "{,"


def _next(tail: str, pos: int) -> int:
    """The first position at or after pos that is not JSON whitespace (compact JSON: pos)."""
    return _BLANKS.match(tail, pos).end() if tail[pos:pos + 1] in _WS_TEXT else pos


def _last_members(tail: str, pos: int, name: str) -> Any:
    """The value of the member whose key ends at `pos`, if the members after it end the object,
    the object ends the text, and none of them has the same name; else MISSING."""
    pos = _next(tail, pos)
    if tail[pos:pos + 1] != ":":
        return MISSING
    found, pos = _SCAN(tail, _next(tail, pos + 1))
    while True:
        pos = _next(tail, pos)
        c = tail[pos:pos + 1]
        if c == "}":
            return found if _next(tail, pos + 1) == len(tail) else MISSING
        if c != ",":
            return MISSING
        other, pos = _SCAN(tail, _next(tail, pos + 1))
        pos = _next(tail, pos)
        if not isinstance(other, str) or other == name or tail[pos:pos + 1] != ":":
            return MISSING
        _, pos = _SCAN(tail, _next(tail, pos + 1))


def _member_at(content: bytes, at: int, key_len: int, start: int, stop: int) -> tuple[int, int] | None:
    """The span for a key found at `at`, if it is the key of a top-level member of the JSON
    object in content[start:stop]."""
    slashes = 0
    while at - slashes > start and content[at - slashes - 1] == 0x5C:
        slashes += 1
    if slashes % 2:                        # an escaped quote: the bytes sit inside a string
        return None
    colon = _skip_ws(content, at + key_len, stop)
    if content[colon:colon + 1] != b":":
        return None
    end = _value_end(content, colon + 1, stop)
    if end is None:
        return None
    before = _back_ws(content, at, start) - 1
    if before >= start and content[before] == 0x2C:          # `,"usage":…`
        return before, _back_ws(content, end, start)
    if before < start or content[before] != 0x7B:              # not after `{` either
        return None
    if content[end] == 0x2C:               # the first member: take the comma after it instead
        return at, _skip_ws(content, end + 1, stop)
    return at, _back_ws(content, end, start)       # the only member: {"usage":null} -> {}


def _value_end(content: bytes, pos: int, stop: int) -> int | None:
    """Where the member value starting at pos ends (its `,` or the object's `}`), provided the
    member sits at the top level: the object must close exactly at the end of the value."""
    depth, end = 1, None
    for token in _TOKEN.finditer(content, pos, stop):
        first = content[token.start()]
        if first == 0x22:                  # a string
            continue
        if first in b"{[":
            depth += 1
        elif first == 0x2C:                # a comma
            if depth == 1 and end is None:
                end = token.start()
        else:
            depth -= 1
            if depth == 0:                 # closed before the end: not the top-level object
                return None if content[token.end():stop].strip(_WS) else \
                    (token.start() if end is None else end)
    return None


def _skip_ws(content: bytes, pos: int, stop: int) -> int:
    """The first position at or after pos (and before stop) that is not JSON whitespace."""
    while pos < stop and content[pos] in _WS:
        pos += 1
    return pos


def _back_ws(content: bytes, pos: int, start: int) -> int:
    """Where the JSON whitespace run ending at pos starts (not before start)."""
    while pos > start and content[pos - 1] in _WS:
        pos -= 1
    return pos
