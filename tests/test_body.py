"""Body parsing: what the proxy relies on is checked, with OpenAI's `param` named."""

from __future__ import annotations

import json

import pytest

from proxy import body as body_mod
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


@pytest.mark.parametrize("data", [b"{nope", b"[1]", b'{"a": NaN}', b'{"model": "m", "temperature": 1e400}', b"[" * 100_000, b'{"model": "\\ud800"}'])
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


# --- Responses and Messages ---------------------------------------------------------------

RESP = {"model": "gpt-4.1", "input": "hi"}
MSG = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def bad(kind: str, body: dict) -> BadRequest:
    with pytest.raises(BadRequest) as exc:
        parse(json.dumps(body).encode(), kind)
    return exc.value


def test_a_responses_call_exposes_what_the_proxy_uses():
    call = parse(json.dumps({**RESP, "stream": True, "max_output_tokens": 64, "user": "bob",
                             "background": False, "previous_response_id": None}).encode(), "responses")
    assert (call.endpoint.kind, call.model, call.stream, call.max_output, call.choices, call.end_user) == \
        ("responses", "gpt-4.1", True, 64, 1, "bob")
    assert call.client_wants_usage                  # nothing is ever injected into a Responses stream
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    assert parse(json.dumps({**RESP, "input": items}).encode(), "responses").max_output is None


@pytest.mark.parametrize("field, value", [("background", True), ("previous_response_id", "resp_1"),
                                          ("conversation", "conv_1"), ("prompt", {"id": "pmpt_1"})])
def test_responses_with_input_the_proxy_cannot_see_are_refused_naming_the_field(field, value):
    err = bad("responses", {**RESP, field: value})
    assert (err.status, err.param, err.code) == (400, field, "unsupported_parameter")
    assert "not supported by this budget proxy" in err.message


@pytest.mark.parametrize("over, param", [
    ({"input": None}, "input"), ({"input": 5}, "input"), ({"input": ["x"]}, "input[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"max_output_tokens": 15}, "max_output_tokens"), ({"max_output_tokens": "9"}, "max_output_tokens"),
    ({"instructions": ["x"]}, "instructions"), ({"tools": {}}, "tools"), ({"user": "\x00"}, "user"),
    ({"model": None}, "model"), ({"stream": "yes"}, "stream")])
def test_bad_responses_fields_name_their_param(over, param):
    assert bad("responses", {**RESP, **over}).param == param


def test_a_messages_call_exposes_what_the_proxy_uses():
    call = parse(json.dumps({**MSG, "stream": True, "system": [{"type": "text", "text": "Be brief."}],
                             "metadata": {"user_id": "u-42"}}).encode(), "messages")
    assert (call.endpoint.kind, call.model, call.stream, call.max_output, call.choices, call.end_user) == \
        ("messages", "claude-haiku-4-5", True, 100, 1, "u-42")


def test_messages_require_max_tokens_as_anthropic_does():
    err = bad("messages", {k: v for k, v in MSG.items() if k != "max_tokens"})
    assert (err.message, err.param, err.code) == ("max_tokens: Field required", "max_tokens",
                                                  "missing_required_parameter")


@pytest.mark.parametrize("over, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0"), ({"system": 5}, "system"),
    ({"tools": "x"}, "tools"), ({"metadata": []}, "metadata"), ({"metadata": {"user_id": "x" * 300}},
                                                                 "metadata.user_id")])
def test_bad_messages_fields_name_their_param(over, param):
    assert bad("messages", {**MSG, **over}).param == param


def test_one_utf8_bom_is_accepted_as_json_loads_accepts_it_and_a_second_is_not():
    raw = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "h\xc3\xa9"}]}'
    assert parse(b"\xef\xbb\xbf" + raw, "chat").body == parse(raw, "chat").body == json.loads(b"\xef\xbb\xbf" + raw)
    with pytest.raises(BadRequest) as exc:
        parse(b"\xef\xbb\xbf\xef\xbb\xbf" + raw, "chat")
    assert exc.value.code == "invalid_json"
    # The offending byte is named, at its offset in the body as sent (the BOM counted: utf-8-sig
    # reports offsets after it, and the byte there is another one).
    for bad in (raw.replace(b"\xc3\xa9", b"\xff"), b"\xef\xbb\xbf" + raw.replace(b"\xc3\xa9", b"\xff")):
        with pytest.raises(BadRequest) as exc:
            parse(bad, "chat")
        at = bad.index(b"\xff")
        assert exc.value.code == "invalid_json" and f"not valid UTF-8 (byte 0xff at offset {at})" in str(exc.value)


@pytest.mark.parametrize("text", [
    '{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":16}',
    '{}', '{"a":1}{"b":2}', '{"a":1} }', '{"a":1}  ', '  {"a":1}', '{"a":1', '{"a":}', '{"a":NaN}',
    '{"a":1e400}', '{a:1}', '{"a":[1,2,]}', '{"a":"\\ud800"}', '{"a":1,"a":2}', '[1]', '"x"', '', '}', '{',
    '{"a":1}\n', '{"a":1}x}', '{"a":{"b":[' * 3 + ']}}' * 3,
])
def test_the_compact_object_fast_path_decodes_and_fails_as_the_decoder_does(text):
    def outcome(decode):
        try:
            return "ok", decode(text)
        except ValueError as exc:
            return type(exc), str(exc)
    assert outcome(body_mod._decode) == outcome(body_mod._DECODER.decode)
