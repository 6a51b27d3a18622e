"""The bytes of one top-level member of a JSON object, found in its text without parsing it.

Used to leave a member out of a streamed event byte for byte (proxy/sse.py). A member is found by
its key, `"usage"` say: a match whose opening quote is not escaped is a real key (inside a JSON
string every quote is escaped, and a closing quote cannot be followed by a letter), and it is
proved top-level by scanning the JSON tokens after it to the object's end. The span returned
takes one separating comma with the member: the one before it, or - for the first member - the
one after it and the blanks after that, so what is left is still the same JSON, spaced the same.

Also used to read one member without parsing the rest (`value`: the `usage` of a whole answer,
proxy/settlement.py), with the same proof that the key found is the top-level one.
"""

from __future__ import annotations

import re

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


def value(text: bytes, key: bytes, within: int) -> bytes | None:
    """The bytes of the value of the top-level member named `key` (with its quotes) of the JSON
    object `text`, blanks around it removed, if its key starts in the last `within` bytes; None if
    not (absent, elsewhere, or not provably top-level): the caller then parses the whole. Bounded
    work: what is scanned is the tail from the key to the end (a `usage` sits near the end of
    every answer that has one; a 100 MB embeddings answer is not scanned from its start)."""
    stop = len(text)
    lo = max(0, stop - within)
    at = stop
    while (at := text.rfind(key, lo, at)) >= 0:
        found = _value_at(text, at, len(key), 0, stop)
        if found is not None and _key_position(text, at, 0):
            begin, end = found
            return text[_skip_ws(text, begin, end):_back_ws(text, end, begin)]
    return None


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


def _key_position(content: bytes, at: int, start: int) -> bool:
    """Does a member start at `at`: right after the object's `{` or a `,`?"""
    before = _back_ws(content, at, start) - 1
    return before >= start and content[before] in b"{,"


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
