"""Body parsing: what the proxy relies on is checked, with OpenAI's `param` named."""

from __future__ import annotations

import json

import pytest

from proxy.body import parse
from proxy.errors import BadRequest

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def raw(**over) -> bytes:
    return json.dumps({**CHAT, **over}).encode()


def test_a_chat_call_exposes_what_the_proxy_uses():
    call = parse(raw(stream=True, stream_options={"include_usage": True}, max_tokens=50, n=2, user="bob"), "chat")
    assert (call.endpoint.kind, call.model, call.stream, call.client_wants_usage) == ("chat", "gpt-4o", True, True)
    assert (call.max_output, call.choices, call.end_user) == (50, 2, "bob")
    assert call.body["messages"] == CHAT["messages"]


def test_max_completion_tokens_wins_over_the_legacy_field():
    assert parse(raw(max_tokens=50, max_completion_tokens=70), "chat").max_output == 70
    assert parse(raw(), "chat").max_output is None


@pytest.mark.parametrize("over, param", [
    ({"model": 5}, "model"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": 1}}, "stream_options"),
    ({"user": "x" * 257}, "user"),
    ({"user": "a\nb"}, "user"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 1_000_001}, "max_completion_tokens"),
    ({"n": 129}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"tools": {}}, "tools"),
])
def test_bad_fields_are_400s_naming_the_param(over, param):
    with pytest.raises(BadRequest) as exc:
        parse(raw(**over), "chat")
    assert exc.value.param == param and exc.value.status == 400


@pytest.mark.parametrize("data", [b"{nope", b"[1]", b'{"a": NaN}', b"[" * 100_000, b'{"model": "\\ud800"}'])
def test_unparseable_bodies_are_invalid_json(data):
    with pytest.raises(BadRequest) as exc:
        parse(data, "chat")
    assert exc.value.code == "invalid_json"


def test_completion_and_embedding_inputs():
    assert parse(b'{"model": "m", "prompt": [[1, 2], [3]]}', "completion").endpoint.kind == "completion"
    with pytest.raises(BadRequest) as exc:
        parse(b'{"model": "m", "prompt": [1, "a"]}', "completion")
    assert exc.value.param == "prompt"
    with pytest.raises(BadRequest) as exc:
        parse(b'{"model": "m", "input": "a", "stream": true}', "embedding")
    assert exc.value.param == "stream"
