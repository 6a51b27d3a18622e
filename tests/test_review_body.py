"""Review findings on body parsing: what is reserved must bound what the upstream can bill."""

from __future__ import annotations

import json

from proxy.body import parse


def test_best_of_is_reserved_as_the_completions_generated_not_only_those_returned():
    # /v1/completions generates (and bills) `best_of` completions server-side and returns `n`:
    # reserving max_tokens x n let one call bill 20x what it reserved.
    call = parse(json.dumps({"model": "m", "prompt": "hi", "best_of": 20, "n": 2, "max_tokens": 10}).encode(),
                 "completion")
    assert call.choices == 20


def test_the_larger_of_two_completion_limits_is_reserved():
    # A server that reads only the legacy `max_tokens` may answer that much: reserve it.
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 10, "max_tokens": 5000}
    assert parse(json.dumps(body).encode(), "chat").max_output == 5000
