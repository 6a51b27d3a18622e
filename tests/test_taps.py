from __future__ import annotations

import random

import pytest

from proxy.pricing import Usage, from_anthropic, from_responses
from proxy.taps import MessagesTap, ResponsesTap

from . import wire

PIECES = ["Hello", ", wor", "ld — ", "ça va ? ", "日本語", "!"]
CHARS = sum(map(len, PIECES))


def run(tap, events: list[bytes], seed: int, crlf: bool = False) -> bytes:
    """Feed the stream split at random byte boundaries; return what the tap passed on."""
    data = b"".join(events)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(data)]):
        chunk = data[a:b]
        pieces = tap.feed(chunk)
        assert len(pieces) == 1 and pieces[0] is chunk          # untouched and uncopied
        out.append(pieces[0])
    assert tap.close() == []
    return b"".join(out)


@pytest.mark.parametrize("seed", range(12))
def test_responses_tap_reads_usage_from_response_completed(seed):
    usage = wire.responses_usage(5000, 900, cached=2048, reasoning=640, cache_write=(1000, 500))
    events = wire.responses_stream("resp_1", "gpt-4.1-2025-04-14", PIECES, usage)
    tap = ResponsesTap()
    assert run(tap, events, seed, crlf=seed % 3 == 0) == b"".join(events).replace(
        b"\n", b"\r\n" if seed % 3 == 0 else b"\n")
    assert from_responses(tap.usage) == Usage(input=1452, cached_input=2048, cache_write=1000, cache_write_1h=500,
                              output=900, reasoning=640)
    assert (tap.output_chunks, tap.output_chars) == (len(PIECES), CHARS)
    assert (tap.response_id, tap.model, tap.done, tap.error) == ("resp_1", "gpt-4.1-2025-04-14", True, None)


@pytest.mark.parametrize("final", ["response.incomplete", "response.failed"])
def test_responses_tap_reads_usage_from_incomplete_and_failed(final):
    events = wire.responses_stream("resp_2", "gpt-4o", PIECES, wire.responses_usage(30, 7), final=final)
    tap = ResponsesTap()
    run(tap, events, 1)
    assert from_responses(tap.usage) == Usage(input=30, output=7) and tap.done and tap.error is None


def test_responses_tap_on_a_cut_stream_has_only_the_output_counters():
    tap = ResponsesTap()
    run(tap, wire.responses_stream("resp_3", "gpt-4o", PIECES, None), 2)
    assert tap.usage is None and tap.partial is None and not tap.done
    assert (tap.output_chunks, tap.output_chars) == (len(PIECES), CHARS)


def test_responses_tap_error_event():
    tap = ResponsesTap()
    err = {"type": "error", "code": "server_error", "message": "The server had an error", "param": None,
           "sequence_number": 1}
    run(tap, [wire.sse("error", err)], 3)
    assert tap.error == err and tap.usage is None and tap.output_chunks == 0
    failed = {"type": "response.failed", "response": wire.response_object("r", "m", "", None, status="failed")}
    tap = ResponsesTap()
    run(tap, [wire.sse("response.failed", failed)], 3)
    assert tap.error == failed and tap.usage is None


def test_an_unterminated_last_event_still_counts():
    events = wire.responses_stream("resp_4", "gpt-4o", PIECES, wire.responses_usage(3, 2))
    data = b"".join(events)[:-2]                   # the final blank line never came
    tap = ResponsesTap()
    tap.feed(data)
    assert tap.usage is None
    tap.close()
    assert from_responses(tap.usage) == Usage(input=3, output=2)


@pytest.mark.parametrize("seed", range(12))
def test_messages_tap_takes_the_last_message_delta_as_authoritative(seed):
    usage = wire.anthropic_usage(1237, 701, cache_read=5003, write_5m=2000, write_1h=1001, thinking=200)
    events = wire.messages_stream("msg_1", "claude-sonnet-4-5-20250929", PIECES, usage, deltas=3)
    tap = MessagesTap()
    run(tap, events, seed, crlf=seed % 4 == 1)
    # cumulative: the three deltas' output counts are not added up, the 5m/1h split of
    # message_start is kept, the writes counted once
    assert from_anthropic(tap.usage) == Usage(input=1237, cached_input=5003, cache_write=2000, cache_write_1h=1001,
                              output=701, reasoning=200)
    assert from_anthropic(tap.partial) == Usage(input=1237, cached_input=5003, cache_write=2000, cache_write_1h=1001, output=1)
    assert (tap.output_chunks, tap.output_chars) == (len(PIECES), CHARS)
    assert (tap.response_id, tap.model, tap.done, tap.error) == \
        ("msg_1", "claude-sonnet-4-5-20250929", True, None)


def test_messages_tap_on_a_cut_stream_knows_the_exact_input():
    usage = wire.anthropic_usage(40, 9, cache_read=100)
    tap = MessagesTap()
    run(tap, wire.messages_stream("msg_2", "claude-haiku-4-5", PIECES, None), 5)
    assert tap.usage is None and not tap.done
    tap = MessagesTap()
    run(tap, wire.messages_stream("msg_2", "claude-haiku-4-5", PIECES, usage)[:-3], 5)
    assert tap.usage is None
    assert from_anthropic(tap.partial) == Usage(input=40, cached_input=100, output=1)
    assert (tap.output_chunks, tap.output_chars) == (len(PIECES), CHARS)


def test_messages_tap_counts_tool_input_and_thinking_deltas_and_sees_errors():
    events = [wire.sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "thinking_delta", "thinking": "Let me see"}}),
              wire.sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                               "delta": {"type": "input_json_delta", "partial_json": '{"a": 1'}}),
              wire.sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                               "delta": {"type": "signature_delta", "signature": "Eq=="}}),
              wire.sse("error", wire.anthropic_error("overloaded_error", "Overloaded"))]
    tap = MessagesTap()
    run(tap, events, 6)
    assert (tap.output_chunks, tap.output_chars) == (2, len("Let me see") + len('{"a": 1'))
    assert tap.error == wire.anthropic_error("overloaded_error", "Overloaded")


def test_odd_events_are_passed_on_and_ignored():
    events = [b": keep-alive\n\n", b"event: ping\ndata: not json\n\n", b"data: [1,2]\n\n",
              b"data: {\"no\": \"type\"}\n\n", b"\xef\xbb\xbfdata: {\"type\": 5}\n\n"]
    for tap in (ResponsesTap(), MessagesTap()):
        assert run(tap, events, 7) == b"".join(events)
        assert tap.usage is None and tap.error is None and tap.output_chunks == 0


def test_messages_tap_never_reports_usage_without_the_input():
    """A delta alone (its message_start never seen) is no usage: settlement estimates the input
    rather than committing it as 0."""
    tap = MessagesTap()
    run(tap, [wire.sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 9},
                                         "delta": {"stop_reason": "end_turn"}})], 8)
    assert tap.usage is None and tap.partial is None


def test_a_message_delta_never_lowers_the_input_message_start_reported():
    """A delta that repeats input counts may raise them (cumulative) but a stray 0 must not
    commit the input as free (review finding)."""
    start = {"type": "message_start", "message": {"id": "m", "model": "claude-haiku-4-5", "usage": {
        "input_tokens": 900, "cache_read_input_tokens": 300, "output_tokens": 1}}}
    tap = MessagesTap()
    run(tap, [wire.sse("message_start", start),
              wire.sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                         "usage": {"input_tokens": 0, "cache_read_input_tokens": 0,
                                                   "output_tokens": 42}})], 9)
    assert from_anthropic(tap.usage) == Usage(input=900, cached_input=300, output=42)
