from __future__ import annotations

import json
import random
import re

import pytest

from proxy.sse import UsageTap

MODEL = "gpt-4o-mini-2024-07-18"
USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 5,
    "total_tokens": 24,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


def data(obj: object) -> bytes:
    """One single-line `data:` event, UTF-8 kept raw as OpenAI sends it."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


def chunk(delta: dict | None = None, finish: str | None = None, **extra: object) -> dict:
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": "chatcmpl-9x", "object": "chat.completion.chunk", "created": 1726000000,
            "model": MODEL, "system_fingerprint": "fp_e2bc", "choices": choices}
    body.update(extra)
    return body


DONE = b"data: [DONE]\n\n"
USAGE_EVENT = data(chunk(usage=USAGE))

# (event bytes, is it the usage-only event?) of a stream requested with include_usage.
CHAT = [
    (data(chunk({"role": "assistant", "content": "", "refusal": None}, usage=None)), False),
    (data(chunk({"content": "Hello"}, usage=None)), False),
    (data(chunk({"content": " wörld 👋"}, usage=None)), False),
    (data(chunk({}, "stop", usage=None)), False),
    (USAGE_EVENT, True),
    (DONE, False),
]
CHAT_STATE = (USAGE, MODEL, True, 2, len("Hello") + len(" wörld 👋"), None)

# The same kind of stream, using every SSE feature that the parser must survive.
FANCY = [
    (b": keep-alive\n\n", False),
    (b"event: message\nid: 1\ndata: " + json.dumps(chunk({"content": "Hi"})).encode() + b"\n\n",
     False),
    (b"\n\n", False),  # stray blank lines dispatch nothing
    (b"data:{\"choices\":[{\"delta\":\ndata: {\"content\":\"\xc3\xa9!\"}}]}\n\n", False),
    (b": comment inside\nretry: 3000\ndata: " + json.dumps(chunk({}, "stop")).encode() + b"\n\n",
     False),
    (b"id: 2\ndata: {\"choices\": [],\ndata:  \"usage\": " + json.dumps(USAGE).encode()
     + b"}\n\n", True),
    (b"data\n\n", False),  # a bare field name: empty data, not JSON
    (DONE, False),
]
FANCY_STATE = (USAGE, MODEL, True, 2, len("Hi") + len("é!"), None)


def joined(events: list[tuple[bytes, bool]], keep_usage: bool = True) -> bytes:
    """The stream; without usage, as the client must see it: no usage-only event, and no
    `"usage":null` member that asking for usage added to the other chunks."""
    if keep_usage:
        return b"".join(event for event, _ in events)
    return b"".join(event.replace(b',"usage":null}', b"}") for event, usage in events if not usage)


def endings(raw: bytes, newline: bytes) -> bytes:
    # Payloads are JSON with escaped newlines, so every \n here is an SSE line terminator.
    return raw.replace(b"\n", newline)


def state(tap: UsageTap) -> tuple:
    return tap.usage, tap.model, tap.done, tap.output_chunks, tap.output_chars, tap.error


def flat(pieces: list) -> bytes:
    return b"".join(bytes(p) for p in pieces)


def run(tap: UsageTap, reads: list[bytes]) -> bytes:
    out = [piece for read in reads for piece in tap.feed(read)]
    return flat(out + tap.close())


STREAMS = {
    "chat-lf": (CHAT, b"\n", CHAT_STATE),
    "chat-crlf": (CHAT, b"\r\n", CHAT_STATE),
    "chat-cr": (CHAT, b"\r", CHAT_STATE),
    "fancy-lf": (FANCY, b"\n", FANCY_STATE),
    "fancy-crlf": (FANCY, b"\r\n", FANCY_STATE),
    "fancy-cr": (FANCY, b"\r", FANCY_STATE),
}


def case(name: str, drop: bool) -> tuple[bytes, bytes, tuple]:
    """The upstream stream, what the client must receive, and the expected accounting."""
    events, newline, expected_state = STREAMS[name]
    stream = endings(joined(events), newline)
    return stream, endings(joined(events, keep_usage=not drop), newline), expected_state


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_whole_stream(name: str, drop: bool) -> None:
    stream, expected, expected_state = case(name, drop)
    tap = UsageTap(drop_usage_chunk=drop)
    assert run(tap, [stream]) == expected
    assert state(tap) == expected_state


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_one_byte_at_a_time(name: str, drop: bool) -> None:
    stream, expected, expected_state = case(name, drop)
    tap = UsageTap(drop_usage_chunk=drop)
    assert run(tap, [stream[i:i + 1] for i in range(len(stream))]) == expected
    assert state(tap) == expected_state


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_two_piece_split(name: str, drop: bool) -> None:
    # Covers splits inside lines, between \r and \n, and inside multi-byte characters.
    stream, expected, expected_state = case(name, drop)
    for cut in range(len(stream) + 1):
        tap = UsageTap(drop_usage_chunk=drop)
        first = flat(tap.feed(stream[:cut]))
        # Whatever went out early is final: a usage chunk is never half-sent.
        assert expected.startswith(first), cut
        rest = flat(tap.feed(stream[cut:]) + tap.close())
        assert first + rest == expected, cut
        assert state(tap) == expected_state, cut


def test_passthrough_returns_the_read_itself() -> None:
    stream, _, _ = case("chat-lf", drop=False)
    tap = UsageTap(drop_usage_chunk=False)
    first = len(CHAT[0][0])
    # Memoryview reads, as bytes(read) would be no copy for bytes; they cover both a read
    # that starts on an event boundary and one that continues a held event.
    view = memoryview(stream)
    for read in (view[:first], view[first:first + 7], view[first + 7:]):
        out = tap.feed(read)
        assert len(out) == 1 and out[0] is read
    assert tap.close() == []
    assert tap.usage == USAGE


def test_client_asked_for_usage_gets_identical_bytes() -> None:
    stream, _, _ = case("chat-crlf", drop=False)
    tap = UsageTap(drop_usage_chunk=False)
    assert run(tap, [stream[:100], stream[100:]]) == stream
    assert USAGE_EVENT.replace(b"\n", b"\r\n") in stream
    assert tap.usage == USAGE and tap.done


def test_complete_events_without_usage_come_back_uncopied() -> None:
    read = data(chunk({"role": "assistant", "content": ""})) + data(chunk({"content": "Hello"}))
    tap = UsageTap(drop_usage_chunk=True)
    out = tap.feed(read)
    assert len(out) == 1 and out[0] is read


def test_dropping_returns_views_of_the_read() -> None:
    read = joined(CHAT)
    tap = UsageTap(drop_usage_chunk=True)
    out = tap.feed(read)
    assert flat(out) == joined(CHAT, keep_usage=False)
    assert all(isinstance(p, memoryview) and p.obj is read for p in out)


def test_incomplete_event_is_held_and_not_counted_early() -> None:
    tap = UsageTap(drop_usage_chunk=True)
    head = data(chunk({"content": "ab"}))
    out = tap.feed(head + USAGE_EVENT[:-1])
    assert flat(out) == head
    assert tap.usage is None and tap.output_chars == 2
    assert tap.feed(b"\n") == []   # the completed usage event is dropped
    assert tap.usage == USAGE


def test_close_returns_the_held_tail_unchanged() -> None:
    tap = UsageTap(drop_usage_chunk=True)
    tail = b'id: 9\r\ndata: {"choices":[{"delta":{"content":"x'
    out = tap.feed(joined(CHAT[:2]) + tail)
    assert flat(out) == joined(CHAT[:2], keep_usage=False)
    assert [bytes(p) for p in tap.close()] == [tail]
    assert tap.close() == []


def test_close_with_nothing_held() -> None:
    tap = UsageTap(drop_usage_chunk=True)
    tap.feed(joined(CHAT))
    assert tap.close() == []


def test_close_counts_an_unterminated_usage_chunk() -> None:
    # The upstream billed it even though the stream ended before the blank line.
    tap = UsageTap(drop_usage_chunk=True)
    unterminated = USAGE_EVENT.rstrip(b"\n")
    assert flat(tap.feed(joined(CHAT[:4]) + unterminated)) == joined(CHAT[:4], keep_usage=False)
    assert flat(tap.close()) == unterminated
    assert tap.usage == USAGE


def test_model_is_from_the_first_chunk_that_names_one() -> None:
    tap = UsageTap(drop_usage_chunk=False)
    tap.feed(data({"choices": []}) + data(chunk({}, model="")) + data(chunk({}))
             + data(chunk({}, model="other")))
    assert tap.model == MODEL


def test_usage_is_the_last_object_seen_and_null_is_ignored() -> None:
    # Some servers report running usage on every chunk; the last one is the total.
    early = {"prompt_tokens": 19, "completion_tokens": 1, "total_tokens": 20}
    tap = UsageTap(drop_usage_chunk=True)
    stream = data(chunk({"content": "a"}, usage=early)) + data(chunk({"content": "b"}, usage=None))
    # usage on a chunk with output is not usage-only: the chunk stays, its usage member goes
    assert flat(tap.feed(stream)) == data(chunk({"content": "a"})) + data(chunk({"content": "b"}))
    assert tap.usage == early
    tap.feed(USAGE_EVENT)
    assert tap.usage == USAGE


def test_empty_choices_without_usage_is_kept() -> None:
    # Azure sends prompt_filter_results in a chunk whose choices are empty.
    event = data({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                  "prompt_filter_results": [{"prompt_index": 0}], "usage": None})
    tap = UsageTap(drop_usage_chunk=True)
    assert flat(tap.feed(event)) == event.replace(b',"usage":null}', b"}")


def test_tool_call_argument_deltas_are_output() -> None:
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}
    deltas = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"loc'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ation": "Paris"}'}},
                        {"index": 1, "function": {"arguments": "{}"}}]},
    ]
    tap = UsageTap(drop_usage_chunk=False)
    tap.feed(b"".join(data(chunk(d)) for d in deltas))
    assert (tap.output_chunks, tap.output_chars) == (2, len('{"location": "Paris"}') + 2)


def test_legacy_function_call_and_refusal_deltas_are_output() -> None:
    tap = UsageTap(drop_usage_chunk=False)
    tap.feed(data(chunk({"function_call": {"name": "f", "arguments": '{"a":1}'}}))
             + data(chunk({"refusal": "I can't"})) + data(chunk({"content": ""})))
    assert (tap.output_chunks, tap.output_chars) == (2, len('{"a":1}') + len("I can't"))


def test_completions_text_chunks_and_usage_chunk() -> None:
    def text(t: str) -> dict:
        return {"id": "cmpl-1", "object": "text_completion", "created": 1,
                "model": "gpt-3.5-turbo-instruct",
                "choices": [{"text": t, "index": 0, "logprobs": None, "finish_reason": None}],
                "usage": None}
    usage_only = {"id": "cmpl-1", "object": "text_completion", "created": 1,
                  "model": "gpt-3.5-turbo-instruct", "choices": [], "usage": USAGE}
    kept = data(text("Once")) + data(text(" upon")) + data(text(""))
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [kept + data(usage_only) + DONE]) == kept.replace(b',"usage":null}', b"}") + DONE
    assert (tap.output_chunks, tap.output_chars) == (2, len("Once upon"))
    assert tap.usage == USAGE and tap.model == "gpt-3.5-turbo-instruct" and tap.done


def test_multibyte_character_split_across_reads() -> None:
    event = data(chunk({"content": "👋é"}))
    at = event.index("👋".encode()) + 2   # inside the 4-byte emoji
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [event[:at], event[at:]]) == event
    assert (tap.output_chunks, tap.output_chars) == (1, 2)


def test_cr_then_lf_in_the_next_read_is_one_terminator() -> None:
    # Read naively, the \r and the \n would make a blank line and split the event in two.
    event = b'data: {"choices":[{"delta":\r\ndata: {"content":"hey"}}]}\r\n\r\n'
    at = event.index(b"\r") + 1
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [event[:at], event[at:]]) == event
    assert (tap.output_chunks, tap.output_chars) == (1, 3)


def test_lf_completing_a_dropped_events_blank_line_is_dropped_too() -> None:
    usage = USAGE_EVENT.replace(b"\n", b"\r\n")
    tap = UsageTap(drop_usage_chunk=True)
    assert tap.feed(usage[:-1]) == []       # ends in \r: complete, maybe with a \n to come
    assert flat(tap.feed(b"\n" + DONE)) == DONE
    assert tap.usage == USAGE


def test_mid_stream_error_is_captured_and_forwarded() -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error",
                       "param": None, "code": None}}
    stream = data(chunk({"content": "a"})) + data(error)
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [stream]) == stream
    assert tap.error == error
    assert not tap.done


def test_malformed_events_are_forwarded_and_ignored() -> None:
    odd = (b"data: {not json\n\n" + b"data: [1, 2]\n\n" + b"data: \xff\xfe\n\n"
           + b"data: " + b"[" * 100_000 + b"\n\n" + b"data: null\n\n" + b"id: 5\n\n"
           + b'data: {"choices": 7, "usage": [], "model": 3}\n\n'
           + b'data: {"choices": [3, {"delta": "x"}, {"delta": {"content": 5}}]}\n\n')
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [odd]) == odd
    assert state(tap) == (None, None, False, 0, 0, None)


@pytest.mark.parametrize("before, after", [(b"\n", b"\r"), (b"\r\n\n", b"\n\r")])
def test_blank_lines_around_a_dropped_event_are_kept(before: bytes, after: bytes) -> None:
    stream = before + USAGE_EVENT + after + DONE
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [stream]) == before + after + DONE


def test_multi_line_data_is_joined_with_a_newline() -> None:
    tap = UsageTap(drop_usage_chunk=False)
    tap.feed(b'data: {"usage": {"total_tokens": 1\ndata: 2}}\n\ndata: [DO\ndata: NE]\n\n')
    assert tap.usage is None and not tap.done    # glued together they would be 12 and [DONE]


@pytest.mark.parametrize("event, done", [
    (b"event: end\ndata: [DONE]\n\n", True),
    (b"data:[DONE]\n\n", True),
    (b"id: 3\ndata:[DONE]\n\n", True),
    (b"id: 3\ndata:  [DONE]\n\n", False),     # only one space after the colon is dropped
    (b"data:  [DONE]\n\n", False),
])
def test_one_optional_space_after_the_colon(event: bytes, done: bool) -> None:
    tap = UsageTap(drop_usage_chunk=False)
    tap.feed(event)
    assert tap.done is done


def test_utf8_bom_at_stream_start_is_ignored() -> None:
    stream = b"\xef\xbb\xbf" + USAGE_EVENT + DONE
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [stream[:2], stream[2:]]) == DONE
    assert tap.usage == USAGE


def test_memoryview_reads_are_accepted() -> None:
    stream = joined(CHAT)
    tap = UsageTap(drop_usage_chunk=True)
    view = memoryview(stream)
    assert run(tap, [view[:50], view[50:]]) == joined(CHAT, keep_usage=False)
    assert state(tap) == CHAT_STATE


def reference_events(stream: bytes) -> tuple[list[tuple[int, int, bytes | None]], int]:
    """A plain per-line WHATWG reading: (start, end, data) of each complete event, and where
    the unfinished rest begins. Used to cross-check the fast scanner."""
    events, data, start, pos = [], [], None, 0
    while True:
        ends = [i for i in (stream.find(b"\r", pos), stream.find(b"\n", pos)) if i >= 0]
        if not ends:
            break
        line, nxt = stream[pos:min(ends)], min(ends) + 1
        nxt += stream[min(ends):nxt + 1] == b"\r\n"
        if line:
            start = pos if start is None else start
            name, _, value = line.partition(b":")
            data += [value[1:] if value[:1] == b" " else value] if name == b"data" else []
        elif start is not None:
            events.append((start, nxt, b"\n".join(data) if data else None))
            data, start = [], None
        pos = nxt
    return events, pos if start is None else start


def is_usage_only(payload: bytes | None) -> bool:
    try:
        obj = json.loads(payload or b"")
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and obj.get("usage") == USAGE


def random_stream(rng: random.Random, parts: list[bytes]) -> tuple[bytes, list[bytes]]:
    """A stream of 1-12 random parts, and the same bytes cut into up to five reads at random."""
    stream = b"".join(rng.choice(parts) for _ in range(rng.randint(1, 12)))
    cuts = sorted(rng.sample(range(len(stream) + 1), rng.randint(0, min(4, len(stream)))))
    return stream, [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]


def test_matches_a_reference_parser_on_random_streams() -> None:
    rng = random.Random(7)
    usage_line = b"data: " + json.dumps(chunk(usage=USAGE)).encode()
    parts = [b"\r", b"\n", b"\r\n", b"data: [DONE]", usage_line, b"data:[DO", b"data: NE]",
             b": c", b"id: 1", b"data"]
    for _ in range(1500):
        stream, reads = random_stream(rng, parts)
        events, tail = reference_events(stream)
        expected, pos = b"", 0
        for start, end, payload in events:
            if is_usage_only(payload):
                expected, pos = expected + stream[pos:start], end
        tap = UsageTap(drop_usage_chunk=True)
        out = flat([piece for read in reads for piece in tap.feed(read)])
        assert out == expected + stream[pos:tail], (stream, reads)
        assert tap.done is any(payload == b"[DONE]" for _, _, payload in events), (stream, reads)
        saw_usage = any(is_usage_only(payload) for _, _, payload in events)
        assert (tap.usage is not None) is saw_usage, (stream, reads)
        assert flat(tap.close()) == stream[tail:], (stream, reads)


def test_null_usage_member_before_other_members_is_removed_too() -> None:
    # OpenAI's chunks now end with an "obfuscation" member after usage.
    event = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
             b'{"content":"Hi"}}],"usage":null,"obfuscation":"AAatV4uAp"}\n\n')
    assert run(UsageTap(drop_usage_chunk=True), [event]) == event.replace(b',"usage":null', b"")
    quoted = b'data: {"choices":[{"delta":{"content":"a \\",\\"usage\\":null}"}}]}\n\n'
    assert run(UsageTap(drop_usage_chunk=True), [quoted]) == quoted      # inside a string: kept


def test_null_usage_member_is_removed_only_when_the_proxy_asked_for_usage() -> None:
    compact = data(chunk({"content": "a"}, usage=None))
    spaced = b'data: {"choices": [{"delta": {"content": "b"}}], "usage": null}\n\n'
    first = b'data: {"usage":null,"choices":[{"delta":{"content":"c"}}]}\n\n'
    first_spaced = b'data: { "usage" : null ,  "choices": [{"delta": {"content": "d"}}]}\n\n'
    stream = compact + spaced + first + first_spaced
    assert flat(UsageTap(drop_usage_chunk=False).feed(stream)) == stream
    assert run(UsageTap(drop_usage_chunk=True), [stream]) == (
        compact.replace(b',"usage":null}', b"}") + spaced.replace(b', "usage": null}', b"}")
        + b'data: {"choices":[{"delta":{"content":"c"}}]}\n\n'
        + b'data: { "choices": [{"delta": {"content": "d"}}]}\n\n')


# Shapes of upstreams other than OpenAI (each: what the proxy gets having asked for usage, and
# what the same upstream sends without include_usage: what the client must receive).
LITELLM_USAGE = (b'data: {"id":"c1","created":1,"model":"m","object":"chat.completion.chunk",'
                 b'"choices":[{"index":0,"delta":{}}],"usage":' + json.dumps(USAGE).encode() + b"}\n\n",
                 b"")
USAGE_IN_LAST = (b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}],'
                 b'"usage":' + json.dumps(USAGE).encode() + b',"obfuscation":"x"}\n\n',
                 b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}],'
                 b'"obfuscation":"x"}\n\n')
NULL_FIRST = (b'data: {"usage":null,"id":"c1","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
              b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
USAGE_FIRST_SPACED = (b'data: {"usage": ' + json.dumps(USAGE).encode() + b', "choices": [{"index": 0, '
                      b'"delta": {}, "finish_reason": "length"}]}\n\n',
                      b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n')
SHAPES = {"litellm-usage-chunk": LITELLM_USAGE, "usage-in-last-chunk": USAGE_IN_LAST,
          "null-usage-first": NULL_FIRST, "usage-first-spaced": USAGE_FIRST_SPACED}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_other_upstream_shapes_reach_the_client_as_a_direct_call_would(name: str) -> None:
    sent, direct = SHAPES[name]
    stream = data(chunk({"content": "Hi"}, usage=None)) + sent + DONE
    expected = data(chunk({"content": "Hi"})) + direct + DONE
    for cut in range(len(stream) + 1):
        tap = UsageTap(drop_usage_chunk=True)
        assert run(tap, [stream[:cut], stream[cut:]]) == expected, cut
        assert tap.usage == (USAGE if b"usage\":{" in sent or b"usage\": {" in sent else None)
    tap = UsageTap(drop_usage_chunk=False)
    assert run(tap, [stream]) == stream                  # the client asked for usage: untouched


def test_a_choice_with_output_or_a_role_is_never_dropped_with_its_usage() -> None:
    role = data(chunk({"role": "assistant", "content": None}, usage=USAGE))
    done = data(chunk({}, "stop", usage=USAGE))
    tap = UsageTap(drop_usage_chunk=True)
    assert run(tap, [role + done]) == data(chunk({"role": "assistant", "content": None})) + data(chunk({}, "stop"))


def test_usage_keys_that_are_not_the_top_level_member_are_kept() -> None:
    nested = (b'data: {"choices":[{"index":0,"delta":{"content":"\\"usage\\":null,"},"usage":null}],'
              b'"x":{"usage":null},"usage":null}\n\n')
    assert run(UsageTap(drop_usage_chunk=True), [nested]) == nested.replace(b',"usage":null}\n', b"}\n")
    only = b'data: {"usage":null}\n\n'
    assert run(UsageTap(drop_usage_chunk=True), [only]) == b"data: {}\n\n"


# Lines for the randomized check: (as sent with include_usage, as the client must get it).
RANDOM_SHAPES = [(LITELLM_USAGE[0].rstrip(b"\n"), None),
                 (USAGE_IN_LAST[0].rstrip(b"\n"), USAGE_IN_LAST[1].rstrip(b"\n")),
                 (NULL_FIRST[0].rstrip(b"\n"), NULL_FIRST[1].rstrip(b"\n"))]


def test_other_shapes_match_a_reference_on_random_streams() -> None:
    rng = random.Random(11)
    parts = [b"\r", b"\n", b"\r\n", b"data: [DONE]", b": c", b"id: 1", b"data"] + [s for s, _ in RANDOM_SHAPES]
    # Events are recognised by their JSON (data lines join with \n, which JSON reads as a blank).
    shape_of = {json.dumps(json.loads(s[6:]), sort_keys=True): (s, d) for s, d in RANDOM_SHAPES}
    for _ in range(1000):
        stream, reads = random_stream(rng, parts)
        events, tail = reference_events(stream)
        expected, pos = b"", 0
        for start, end, payload in events:
            try:
                sent, direct = shape_of[json.dumps(json.loads(payload or b""), sort_keys=True)]
            except (ValueError, KeyError):
                continue
            expected += stream[pos:start]
            if direct is not None:                   # strip the member: the same event, one line changed
                lines = re.split(rb"(\r\n|\r|\n)", stream[start:end])
                expected += b"".join(direct if line == sent else line for line in lines)
            pos = end
        tap = UsageTap(drop_usage_chunk=True)
        out = flat([piece for read in reads for piece in tap.feed(read)])
        assert out == expected + stream[pos:tail], (stream, reads)
        assert flat(tap.close()) == stream[tail:], (stream, reads)


def test_only_the_data_line_loses_the_member() -> None:
    # A field line that merely ends like OpenAI's usage member is not the event's JSON.
    event = b'data: {"usage":null,"a":1}\nid: x,"usage":null}\n\n'
    assert run(UsageTap(drop_usage_chunk=True), [event]) == b'data: {"a":1}\nid: x,"usage":null}\n\n'
