from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
import json
import threading
import time
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from proxy import encodings, tokens
from proxy.tokens import TokenCounter

ENCODINGS = ("cl100k_base", "o200k_base")
JAPANESE = "日本語のテキスト"  # 8 tokens in cl100k_base, 6 in o200k_base: tells them apart


class NetworkUsed(Exception):
    pass


def _cache_file(cache_dir: Path, name: str) -> Path:
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _restore_cache_env(monkeypatch):
    # Tests start without a user-set TIKTOKEN_CACHE_DIR (and get the caller's back after).
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise NetworkUsed("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def fresh_registry(monkeypatch):
    # tiktoken memoizes encodings process-wide; empty it so load() really reads files.
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


@pytest.fixture
def no_bundled_data(monkeypatch):
    def missing(name: str) -> bytes:
        raise FileNotFoundError(f"{name}.tiktoken.gz")

    monkeypatch.setattr(encodings, "_bundled_data", missing)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    counter = TokenCounter.load(cache_dir=tmp_path_factory.mktemp("tiktoken"))
    encodings = {name: tiktoken.get_encoding(name) for name in ENCODINGS}
    if saved is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = saved
    assert not counter.approximate
    return counter, encodings


@pytest.fixture
def counter(loaded) -> TokenCounter:
    return loaded[0]


@pytest.fixture
def o200k(loaded) -> tiktoken.Encoding:
    return loaded[1]["o200k_base"]


@pytest.fixture
def cl100k(loaded) -> tiktoken.Encoding:
    return loaded[1]["cl100k_base"]


# --- offline loading -------------------------------------------------------------------


def test_socket_guard_would_catch_a_tiktoken_download(no_network, fresh_registry, tmp_path, monkeypatch):
    # Proves the guard used below is real: plain tiktoken with an empty cache hits it.
    pytest.importorskip("requests")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(NetworkUsed):
        tiktoken.get_encoding("cl100k_base")


def test_load_is_offline_and_exact(no_network, fresh_registry, tmp_path):
    original_reader = tiktoken.load.read_file
    counter = TokenCounter.load(cache_dir=tmp_path)

    assert counter.approximate is False
    assert tiktoken.load.read_file is original_reader
    for model in ("gpt-4o", "gpt-4"):
        assert counter.count("hello world", model) == 2
        assert counter.count("tiktoken is great!", model) == 6
    assert counter.count(JAPANESE, "gpt-4o-mini") == 6
    assert counter.count(JAPANESE, "gpt-4-turbo") == 8


def test_empty_cache_dir_is_populated_with_verified_files(no_network, tmp_path):
    cache_dir = tmp_path / "not" / "yet" / "there"
    TokenCounter.load(cache_dir=str(cache_dir))

    for name in ENCODINGS:
        assert _sha256(_cache_file(cache_dir, name)) == encodings.ENCODING_SHA256[name]
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    assert "TIKTOKEN_CACHE_DIR" not in os.environ           # set only while tiktoken loaded


def test_a_user_set_cache_dir_is_used_and_left_as_set(no_network, fresh_registry, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(mine))
    assert TokenCounter.load().approximate is False
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(mine)
    for name in ENCODINGS:
        assert _sha256(_cache_file(mine, name)) == encodings.ENCODING_SHA256[name]


def test_a_cache_filled_at_build_time_is_only_read_at_start(no_network, fresh_registry, tmp_path, monkeypatch):
    # The image: its build fills TIKTOKEN_CACHE_DIR; each start (as another user) must read it,
    # never write, extract bundled data again, or make a temporary directory.
    built = tmp_path / "image-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(built))
    TokenCounter.load()
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(encodings, "_bundled_data", lambda name: pytest.fail("bundled data extracted again"))
    monkeypatch.setattr(encodings, "_atomic_write", lambda *a: pytest.fail("cache written at start"))
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: pytest.fail("temporary cache dir made"))
    counter = TokenCounter.load()
    assert counter.approximate is False and counter.count(JAPANESE, "gpt-4o") == 6
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(built)


def test_corrupted_cache_file_is_rewritten_not_fetched(no_network, fresh_registry, tmp_path):
    corrupt = _cache_file(tmp_path, "o200k_base")
    corrupt.write_bytes(b"definitely not a BPE file\n")

    counter = TokenCounter.load(cache_dir=tmp_path)

    assert counter.approximate is False
    assert _sha256(corrupt) == encodings.ENCODING_SHA256["o200k_base"]
    assert counter.count(JAPANESE, "gpt-4o") == 6


def test_valid_cache_is_reused_without_bundled_data(no_network, tmp_path, monkeypatch):
    TokenCounter.load(cache_dir=tmp_path)
    inodes = {name: _cache_file(tmp_path, name).stat().st_ino for name in ENCODINGS}
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(encodings, "_bundled_data", lambda name: pytest.fail("data re-read"))

    counter = TokenCounter.load(cache_dir=tmp_path)

    assert counter.approximate is False
    assert {n: _cache_file(tmp_path, n).stat().st_ino for n in ENCODINGS} == inodes


def test_unwritable_cache_dir_falls_back_to_private_tempdir(
    no_network, fresh_registry, tmp_path, monkeypatch
):
    (tmp_path / "a-file").write_text("blocks mkdir")
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp_root))

    counter = TokenCounter.load(cache_dir=tmp_path / "a-file" / "cache")

    assert counter.approximate is False
    [used] = temp_root.iterdir()
    for name in ENCODINGS:
        assert _sha256(_cache_file(used, name)) == encodings.ENCODING_SHA256[name]


def test_cache_miss_inside_tiktoken_never_becomes_a_fetch(
    no_network, fresh_registry, tmp_path, monkeypatch
):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    original_reader = tiktoken.load.read_file

    with pytest.raises(encodings.OfflineDataError):
        encodings._get_encoding_offline("cl100k_base")
    assert tiktoken.load.read_file is original_reader


def test_missing_data_falls_back_to_approximation_with_warning(
    no_network, fresh_registry, no_bundled_data, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="proxy.encodings")
    start = time.monotonic()
    counter = TokenCounter.load(cache_dir=tmp_path)

    assert time.monotonic() - start < 1.0
    assert counter.approximate is True
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ENCODINGS:
        assert any(name in message for message in warned)
    assert counter.count("hello world", "gpt-4o") == 3  # ceil(11 bytes / 4)
    assert counter.count(JAPANESE, "gpt-4") == math.ceil(len(JAPANESE.encode()) / 4) == 6
    assert counter.count("", "gpt-4o") == 0


def test_bundled_data_with_wrong_hash_is_rejected(
    no_network, fresh_registry, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(encodings, "_bundled_data", lambda name: b"tampered 0\n")
    caplog.set_level(logging.WARNING, logger="proxy.encodings")

    counter = TokenCounter.load(cache_dir=tmp_path)

    assert counter.approximate is True
    assert any("sha256" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.iterdir()) == []


def test_one_missing_encoding_only_affects_its_models(
    no_network, fresh_registry, tmp_path, monkeypatch
):
    real = encodings._bundled_data

    def only_cl100k(name: str) -> bytes:
        if name == "o200k_base":
            raise FileNotFoundError(name)
        return real(name)

    monkeypatch.setattr(encodings, "_bundled_data", only_cl100k)
    counter = TokenCounter.load(cache_dir=tmp_path)

    assert counter.approximate is True
    assert counter.count(JAPANESE, "gpt-3.5-turbo") == 8  # exact cl100k_base
    assert counter.count("hello world", "gpt-4o") == 3  # approximation


def test_bundled_data_matches_official_digests():
    for name in ENCODINGS:
        data = encodings._bundled_data(name)
        assert hashlib.sha256(data).hexdigest() == encodings.ENCODING_SHA256[name]


# --- model mapping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1-preview", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-3.5-turbo-instruct", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:acme::abc123", "cl100k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::xyz", "o200k_base"),
        ("some-local-llama", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_name_for_model(model, encoding):
    assert tokens.encoding_name_for_model(model) == encoding


# --- chat ------------------------------------------------------------------------------


def _cookbook_count(enc: tiktoken.Encoding, messages: list[dict]) -> int:
    total = 3  # reply priming
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(enc.encode_ordinary(value))
            if key == "name":
                total += 1
    return total


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant that answers tersely."},
    {"role": "user", "name": "example_user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? " + JAPANESE},
]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "gpt-3.5-turbo"])
def test_chat_matches_cookbook_formula(counter, loaded, model):
    enc = loaded[1][tokens.encoding_name_for_model(model)]
    assert counter.chat_prompt({"messages": CONVERSATION}, model) == _cookbook_count(
        enc, CONVERSATION
    )


def test_chat_multimodal_counts_text_parts_and_image_constants(counter, o200k, no_network):
    parts = [
        {"type": "text", "text": "What is in these images?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
        {"type": "text", "text": "Answer briefly."},
    ]
    body = {"messages": [{"role": "user", "content": parts}]}

    text = len(o200k.encode_ordinary("What is in these images?"))
    text += len(o200k.encode_ordinary("Answer briefly."))
    expected = 3 + 3 + len(o200k.encode_ordinary("user")) + text + 85 + 765
    assert counter.chat_prompt(body, "gpt-4o") == expected


def test_chat_tools_increase_count_with_their_size(counter):
    base = {"messages": [{"role": "user", "content": "What's the weather in Paris?"}]}
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    bigger = {**tool, "function": {**tool["function"], "description": "Weather. " * 50}}

    plain = counter.chat_prompt(base, "gpt-4o")
    with_tool = counter.chat_prompt({**base, "tools": [tool]}, "gpt-4o")
    with_two = counter.chat_prompt({**base, "tools": [tool, bigger]}, "gpt-4o")
    legacy = counter.chat_prompt({**base, "functions": [tool["function"]]}, "gpt-4o")

    assert plain < with_tool < with_two
    assert with_two - with_tool > 50
    assert legacy > plain


def test_chat_counts_tool_calls_and_tool_results(counter, o200k):
    def conversation(arguments: str, result: str) -> dict:
        call = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": arguments}}
        return {"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ]}

    short = counter.chat_prompt(conversation('{"city":"Paris"}', "sunny"), "gpt-4o")
    long_args = counter.chat_prompt(
        conversation('{"city":"Paris","units":"celsius","days":7}', "sunny"), "gpt-4o"
    )
    long_result = counter.chat_prompt(
        conversation('{"city":"Paris"}', "sunny with a light breeze all afternoon"), "gpt-4o"
    )

    assert long_args - short == len(
        o200k.encode_ordinary('{"city":"Paris","units":"celsius","days":7}')
    ) - len(o200k.encode_ordinary('{"city":"Paris"}'))
    assert long_result - short == len(
        o200k.encode_ordinary("sunny with a light breeze all afternoon")
    ) - len(o200k.encode_ordinary("sunny"))


def test_chat_special_token_text_is_plain_text(counter, cl100k):
    body = {"messages": [{"role": "user", "content": "end it <|endoftext|> here"}]}
    expected = 3 + 3 + len(cl100k.encode_ordinary("user"))
    expected += len(cl100k.encode_ordinary("end it <|endoftext|> here"))
    assert counter.chat_prompt(body, "gpt-4") == expected
    assert counter.count("<|endoftext|><|fim_prefix|>", "gpt-4o") > 2


def test_chat_never_raises_on_odd_shapes(counter):
    odd_bodies = [
        {},
        {"messages": "not a list"},
        {"messages": [None, 5, "x", {"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [None, 3, {"type": "image_url",
                                                            "image_url": "str"}]}]},
        {"messages": [{"role": "assistant", "tool_calls": [None, {"function": "x"}]}]},
        {"messages": [], "tools": "nope", "functions": [object()]},
    ]
    for body in odd_bodies:
        assert counter.chat_prompt(body, "gpt-4o") >= 3
    assert counter.chat_prompt("not a dict", "gpt-4o") == 0  # type: ignore[arg-type]


# --- completions and embeddings --------------------------------------------------------


@pytest.mark.parametrize("method", ["completion_prompt", "embedding_input"])
def test_prompt_shapes(counter, cl100k, method):
    field = "prompt" if method == "completion_prompt" else "input"
    model = "gpt-3.5-turbo-instruct" if method == "completion_prompt" else "text-embedding-3-small"
    count = getattr(counter, method)

    def n(text: str) -> int:
        return len(cl100k.encode_ordinary(text))

    assert count({field: JAPANESE}, model) == n(JAPANESE) == 8
    assert count({field: ["hello world", JAPANESE]}, model) == n("hello world") + n(JAPANESE)
    assert count({field: [101, 102, 103]}, model) == 3
    assert count({field: [[1, 2], [3, 4, 5], []]}, model) == 5
    assert count({field: [None, {"a": 1}, True, 1.5]}, model) == 0
    assert count({field: None}, model) == 0
    assert count({}, model) == 0
    assert count("not a dict", model) == 0  # type: ignore[arg-type]


def test_completion_suffix_is_counted(counter, o200k):
    body = {"prompt": "def add(a, b):", "suffix": "    return result"}
    expected = len(o200k.encode_ordinary("def add(a, b):"))
    expected += len(o200k.encode_ordinary("    return result"))
    assert counter.completion_prompt(body, "some-new-model") == expected


# --- estimate --------------------------------------------------------------------------


async def test_estimate_dispatches_by_kind(counter):
    chat = {"messages": CONVERSATION}
    assert await counter.estimate("chat", chat, "gpt-4o") == counter.chat_prompt(chat, "gpt-4o")
    assert await counter.estimate("completion", {"prompt": "hi"}, "gpt-4o") == 1
    assert await counter.estimate("embedding", {"input": [1, 2]}, "gpt-4o") == 2
    with pytest.raises(ValueError):
        await counter.estimate("images", {}, "gpt-4o")


async def test_estimate_runs_large_bodies_in_a_thread(counter, monkeypatch):
    seen: list[int] = []
    original = counter.completion_prompt

    def recording(body, model):
        seen.append(threading.get_ident())
        return original(body, model)

    monkeypatch.setattr(counter, "completion_prompt", recording)
    small = {"prompt": "x" * 100}
    large = {"prompt": ["x" * 10_000, "y" * 10_000]}

    await counter.estimate("completion", small, "gpt-4o")
    await counter.estimate("completion", large, "gpt-4o")

    assert seen[0] == threading.get_ident()
    assert seen[1] != threading.get_ident()


async def test_event_loop_keeps_running_while_a_huge_prompt_is_counted(counter, o200k):
    prompt = "word " * 400_000  # 2 MB
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    result = await counter.estimate("completion", {"prompt": prompt}, "gpt-4o")
    ticks_during_count = ticks
    done = True
    await task

    # Counted inline, the await would complete without ever yielding: zero ticks.
    assert ticks_during_count > 0
    assert result == len(o200k.encode_ordinary(prompt))


# --- Responses API --------------------------------------------------------------------------


@pytest.fixture
def tokens_counter(loaded):
    return loaded[0]


def test_responses_input_string_with_instructions(tokens_counter):
    n = lambda t: tokens_counter.count(t, "gpt-4.1")
    body = {"model": "gpt-4.1", "instructions": "Answer in French.", "input": "Where is the library?"}
    assert tokens_counter.responses_input(body, "gpt-4.1") == \
        tokens.REPLY_PRIMING_TOKENS + 2 * tokens.TOKENS_PER_MESSAGE + n("Answer in French.") + n("Where is the library?")


def test_responses_input_items_parts_tools_and_schema(tokens_counter):
    n = lambda t: tokens_counter.count(t, "gpt-4o")
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                     {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                                     {"type": "input_image", "image_url": "https://x/z.png"},
                                     {"type": "input_file", "file_data": "A" * 400}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18C, sunny"},
        {"type": "reasoning", "id": "rs_1", "summary": []}],
        "tools": [tool], "text": {"format": {"type": "json_schema", "name": "w", "schema": schema}}}
    expected = (tokens.REPLY_PRIMING_TOKENS
                + tokens.TOKENS_PER_MESSAGE + n("What is this?") + tokens.IMAGE_TOKENS_LOW
                + tokens.IMAGE_TOKENS_DEFAULT + 300 // tokens.FILE_BYTES_PER_TOKEN
                + tokens.TOKENS_PER_MESSAGE + n("A cat.")
                + tokens.TOKENS_PER_TOOL_CALL + n("get_weather") + n('{"city":"Paris"}')
                + tokens.TOKENS_PER_MESSAGE + n("18C, sunny")
                + n('{"type":"reasoning","id":"rs_1","summary":[]}')          # unknown: its JSON
                + tokens.TOOLS_BLOCK_TOKENS + tokens.TOKENS_PER_TOOL
                + n('{"type":"function","name":"get_weather","parameters":{"type":"object"}}')
                + n('{"type":"object","properties":{"city":{"type":"string"}}}'))
    assert tokens_counter.responses_input(body, "gpt-4o") == expected


async def test_responses_and_messages_are_estimate_kinds(tokens_counter):
    body = {"input": "hi", "messages": [{"role": "user", "content": "hi"}]}
    assert await tokens_counter.estimate("responses", body, "gpt-4o") == tokens_counter.responses_input(body, "gpt-4o")
    assert await tokens_counter.estimate("messages", body, "claude-haiku-4-5") == tokens_counter.messages_prompt(body, "x")
    assert tokens_counter.responses_input({"input": 5, "tools": "x"}, "gpt-4o") == tokens.REPLY_PRIMING_TOKENS


async def test_the_json_size_of_a_body_bounds_its_text_so_a_small_one_is_never_walked(counter, monkeypatch):
    from proxy import tokens
    # Every unit the size walk counts takes at least a byte of JSON: a body's JSON length bounds it.
    for body in ({"prompt": ["", "", "é" * 30]}, {"input": [[1, 2], [3], []]}, {"messages": [{"content": "\U0001F600" * 9}]},
                 {"input": [1, 22, 333, True, None, {"a": ["b"]}]}):
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        assert not tokens._text_size_exceeds(body, len(text))
    walked: list = []
    monkeypatch.setattr(tokens, "_text_size_exceeds", lambda body, limit: walked.append(body) or False)
    small = {"prompt": "x" * 100}
    assert await counter.estimate("completion", small, "gpt-4o", json_bytes=len(json.dumps(small))) == \
        counter.completion_prompt(small, "gpt-4o")
    assert walked == []
    await counter.estimate("completion", small, "gpt-4o", json_bytes=tokens.INLINE_THRESHOLD_CHARS + 1)
    await counter.estimate("completion", small, "gpt-4o")
    assert walked == [small, small]


def test_short_strings_counts_are_remembered_per_encoding_and_bounded(monkeypatch):
    counter = TokenCounter.load()
    o200k, cl100k = counter._encoding_for("gpt-4o"), counter._encoding_for("gpt-4")
    calls = []
    monkeypatch.setattr(tokens, "SHORT_COUNTS", 3)
    exact = {enc: enc.encode_ordinary for enc in (o200k, cl100k)}
    for enc, real in exact.items():
        monkeypatch.setattr(enc, "encode_ordinary", lambda text, real=real: calls.append(text) or real(text))
    text = "Say hello in one word. \u00e9\u00e8 <|endoftext|>"
    assert counter.count(text, "gpt-4o") == len(exact[o200k](text))
    assert counter.count(text, "gpt-4o") == len(exact[o200k](text))
    assert calls.count(text) == 1                          # the second count was remembered
    counter.count(text, "gpt-4")                           # another encoding: its own count
    assert calls.count(text) == 2
    long = "word " * 20                                    # over SHORT_CHARS: never remembered
    counter.count(long, "gpt-4o")
    counter.count(long, "gpt-4o")
    assert calls.count(long) == 2
    for word in ("a", "b", "c", "d"):                      # past SHORT_COUNTS: emptied, not grown
        counter.count(word, "gpt-4o")
    assert len(counter._short[o200k]) <= 3
    assert counter.count(text, "gpt-4o") == len(exact[o200k](text))
