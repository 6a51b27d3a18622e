from __future__ import annotations

import json

import pytest

from proxy import jsonmember

KEY = b'"usage"'


def cut(text: bytes) -> bytes | None:
    found = jsonmember.span(text, KEY, 0, len(text))
    return None if found is None else text[:found[0]] + text[found[1]:]


@pytest.mark.parametrize("text, left", [
    (b'{"a":1,"usage":null}', b'{"a":1}'),
    (b'{"a":1,"usage":{"x":[1,{"y":"}"}]},"b":2}', b'{"a":1,"b":2}'),
    (b'{"usage":null,"a":1}', b'{"a":1}'),
    (b'{ "usage" : null ,  "a": 1}', b'{ "a": 1}'),
    (b'{"a": 1, "usage": {"t": 2} }', b'{"a": 1 }'),
    (b'{"usage":null}', b'{}'),
    (b'{"a":{"usage":null},"usage":null}', b'{"a":{"usage":null}}'),       # the nested one stays
    (b'{"a":"\\"usage\\":null,","usage":null}', b'{"a":"\\"usage\\":null,"}'),
])
def test_the_top_level_member_is_cut_with_one_comma(text, left):
    assert cut(text) == left
    assert json.loads(left) == {k: v for k, v in json.loads(text).items() if k != "usage"}


@pytest.mark.parametrize("text", [
    b'{"a":{"usage":null}}',                    # nested only
    b'{"a":"usage"}',                           # a value, not a key
    b'{"x\\"usage":1}',                         # inside a key, after an escaped quote
    b'{"a":["usage", 1]}',
    b'{"a":1}',
])
def test_no_top_level_member_no_span(text):
    assert cut(text) is None


NONE = jsonmember.MISSING


@pytest.mark.parametrize("text, within, found", [
    (b'{"a":1,"usage":{"t":2}}', 100, {"t": 2}),
    (b'{"usage" : {"t": [1, "}"]} , "b":2 }\n', 100, {"t": [1, "}"]}),
    (b'{"a":{"usage":1},"usage":null}', 100, None),
    (b'{"usage":1,"usage":2}', 100, 2),                         # the last, as json.loads takes it
    (b'{"a":"\xc3\xa9","usage":{"n":"\xc3\xa9"}}', 100, {"n": "\u00e9"}),
    (b'{"a":{"usage":1}}', 100, NONE),                          # nested only
    (b'{"a":{"usage":1},"b":2}', 100, NONE),
    (b'{"a":"\\"usage\\":1"}', 100, NONE),                      # inside a string
    (b'{"a":"usage"}', 100, NONE),                              # a value, not a key
    (b'[{"usage":1}]', 100, NONE),                              # not an object's member
    (b'{"a":1 "usage":1}', 100, NONE),                          # not after `{` or `,`
    (b'{"usage":1}xyz', 100, NONE),                             # text after the object
    (b'{"usage":1,"b":}', 100, NONE),                           # broken after it
    (b'{"usage":1,"\\u0075sage":2}', 100, NONE),                # a later one spelt otherwise: parse the whole
    (b'{"usage":1,"pad":"' + b"p" * 200 + b'"}', 100, NONE),  # its key is before the tail looked at
    (b'{"usage":1,"pad":"' + b"p" * 200 + b'"}', 300, 1),
])
def test_the_value_of_a_top_level_member_is_read_from_the_tail(text, within, found):
    got = jsonmember.value(text, "usage", within)
    assert got == found if found is not NONE else got is NONE
    if found is not NONE:
        assert found == json.loads(text)["usage"]


def test_every_nested_candidate_is_refused():
    text = b'{"a":[' + b",".join([b'{"usage":1}'] * 1500) + b"]}"
    assert jsonmember.value(text, "usage", 64 * 1024) is NONE
