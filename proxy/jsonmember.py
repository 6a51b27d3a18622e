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


def value(text: bytes, key: bytes, within: int) -> Any:
    """The parsed value of the top-level member named `key` (with its quotes) of the JSON object
    `text`, if its key starts in the last `within` bytes; MISSING if not (absent, elsewhere, or
    not provably top-level): the caller then parses the whole.

    Proved top-level by reading, with json's C scanner, the members after it to the object's end:
    that must be the end of the text (a nested object would close there, not the text). Only the
    tail from the key on is decoded and read: a 100 MB embeddings answer is not scanned from its
    start. A key not after `{` or `,`, or inside a string (an escaped quote), is never one."""
    stop = len(text)
    lo = max(0, stop - within)
    at = stop
    while (at := text.rfind(key, lo, at)) >= 0:
        if at and text[at - 1] == 0x5C and _escaped(text, at):
            continue                       # inside a string
        try:
            found = _last_members(text[at:].decode(), len(key))
        except (UnicodeDecodeError, ValueError, StopIteration, RecursionError):
            continue
        if found is not MISSING:
            return found
    return MISSING


def _escaped(content: bytes, at: int) -> bool:
    """Is the quote at `at` escaped (an odd run of backslashes before it)?"""
    slashes = 0
    while at - slashes > 0 and content[at - slashes - 1] == 0x5C:
        slashes += 1
    return slashes % 2 == 1


def _next(tail: str, pos: int) -> int:
    """The first position at or after pos that is not JSON whitespace (compact JSON: pos)."""
    return _BLANKS.match(tail, pos).end() if tail[pos:pos + 1] in _WS_TEXT else pos


def _last_members(tail: str, key_len: int) -> Any:
    """The value of the member whose key opens `tail`, if the members after it end the object
    and the object ends the text; else MISSING. (In valid JSON an unescaped quoted key followed
    by a colon is a member's key; what ends the text after it decides which object's.)"""
    pos = _next(tail, key_len)
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
        name, pos = _SCAN(tail, _next(tail, pos + 1))
        pos = _next(tail, pos)
        if not isinstance(name, str) or tail[pos:pos + 1] != ":":
            return MISSING
        _, pos = _SCAN(tail, _next(tail, pos + 1))


def _value_at(content: bytes, at: int, key_len: int, start: int, stop: int) -> tuple[int, int] | None:
    """Where the value of the member whose key was found at `at` starts (after its colon) and
    ends (its `,` or the object's `}`), if the member is one of the top-level object's in
    content[start:stop]."""
    slashes = 0
    while at - slashes > start and content[at - slashes - 1] == 0x5C:
        slashes += 1
    if slashes % 2:                        # an escaped quote: the bytes sit inside a string
        return None
    colon = _skip_ws(content, at + key_len, stop)
    if content[colon:colon + 1] != b":":
        return None
    end = _value_end(content, colon + 1, stop)
    return None if end is None else (colon + 1, end)


def _member_at(content: bytes, at: int, key_len: int, start: int, stop: int) -> tuple[int, int] | None:
    """The span for a key found at `at`, if it is the key of a top-level member of the JSON
    object in content[start:stop]."""
    found = _value_at(content, at, key_len, start, stop)
    if found is None:
        return None
    end = found[1]
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
