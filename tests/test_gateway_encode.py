"""The body sent upstream (proxy/gateway.py upstream_body): the bytes json.dumps writes."""

from __future__ import annotations

import json

import pytest

from proxy import gateway

BODIES = [
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello in one word."}], "max_tokens": 16},
    {"model": "m", "messages": [{"role": "user", "content": "héllo \u2028 \"quoted\" \\ \n\t \u0000 \U0001F600"}],
     "temperature": 0.1, "top_p": 1e-7, "n": 2 ** 70, "stream": True, "stream_options": {"include_usage": True},
     "user": None, "logit_bias": {"50256": -100}, "stop": [], "tools": [{}], "seed": -1, "x": 1.5e300},
    {"": {"a": [[[]], {}], "b": [False, None, 0, -0.0, 12345678901234567890.5]}},
]


@pytest.mark.parametrize("body", BODIES)
def test_upstream_body_is_json_dumps_compact_utf8(body):
    want = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert gateway.upstream_body(body) == want
    assert json.loads(gateway.upstream_body(body)) == json.loads(want)


def test_upstream_body_refuses_what_json_cannot_write():
    with pytest.raises(TypeError):
        gateway.upstream_body({"model": object()})


def test_upstream_body_without_the_c_encoder_writes_the_same(monkeypatch):
    monkeypatch.setattr(gateway, "_C_ENCODE", None)
    for body in BODIES:
        assert gateway.upstream_body(body) == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
