"""Offline prompt-token estimation for OpenAI requests.

The proxy reserves budget *before* forwarding a request, so it needs a prompt-token count
up front. tiktoken gives exact counts; its encodings are loaded with no network by
:mod:`proxy.encodings`.

If an encoding cannot be had offline, counts for its models fall back to
:func:`approximate_tokens` (``ceil(utf8_bytes / 4)``) and a WARNING is logged.

Model to encoding mapping (see :func:`encoding_name_for_model`):

* ``o200k_base``: gpt-4o*, chatgpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, o1*, o3*, o4*;
* ``cl100k_base``: other gpt-4*, gpt-3.5*, text-embedding-*, davinci-002, babbage-002;
* anything else (unknown or future models): ``o200k_base``, the encoding of every model
  OpenAI has released since gpt-4o, so it is the best guess for a name we do not know yet.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import tiktoken

from . import anthropic_tokens, encodings

DEFAULT_ENCODING = "o200k_base"

# Longest matching prefix wins, so "gpt-4o" beats "gpt-4".
_MODEL_PREFIXES: dict[str, str] = {
    "gpt-4o": "o200k_base",
    "chatgpt-4o": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4.5": "o200k_base",
    "gpt-5": "o200k_base",
    "o1": "o200k_base",
    "o3": "o200k_base",
    "o4": "o200k_base",
    "gpt-4": "cl100k_base",
    "gpt-3.5": "cl100k_base",
    "text-embedding-": "cl100k_base",
    "davinci-002": "cl100k_base",
    "babbage-002": "cl100k_base",
}
_PREFIXES_LONGEST_FIRST = sorted(_MODEL_PREFIXES, key=len, reverse=True)

# Chat accounting, after OpenAI's cookbook "How to count tokens with tiktoken".
TOKENS_PER_MESSAGE = 3  # <|start|>{role}<|message|>...<|end|> framing of every message
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3  # every reply is primed with <|start|>assistant<|message|>

# Images are never fetched, so their size is unknown: "low" detail is a flat 85 tokens;
# otherwise assume a 1024x1024 image at high detail (85 + 4 tiles * 170 = 765). Larger
# images can cost more, and some models (e.g. gpt-4o-mini) bill images at a multiple.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_DEFAULT = 765

# The API renders tool definitions into the prompt in an undocumented format; we count
# each definition's compact JSON plus these overheads (the cookbook's gpt-4o function
# framing figures: about 7 per function and 12 once for the block).
TOKENS_PER_TOOL = 7
TOOLS_BLOCK_TOKENS = 12
TOKENS_PER_TOOL_CALL = 3

#: Bodies holding more text than this (characters of strings, plus one per other list or
#: scalar item) are counted in a worker thread. 16k characters of ordinary text encode in
#: about a third of a millisecond (a few ms for pathological input such as one repeated
#: letter), so below it a thread hop would cost about as much as it saves.
INLINE_THRESHOLD_CHARS = 16_000

#: Strings up to this many characters have their counts remembered, per encoding (up to
#: SHORT_COUNTS of them): roles, names and short turns recur in nearly every request, and a
#: look-up costs 0.05 µs where tiktoken costs 0.4-1 µs. Longer texts (system prompts, history)
#: would gain more but are not cached: a hit's speed would tell a caller that another tenant
#: sent that exact text recently; for a string this short the difference is under a µs.
SHORT_CHARS = 64
SHORT_COUNTS = 8192

_ESTIMATE_KINDS = ("chat", "completion", "embedding", "responses", "messages")
# A base64 file in a Responses input (a PDF, say) is reserved at its decoded bytes / this: its
# pages' text and images are both billed, and no count is possible without parsing it.
FILE_BYTES_PER_TOKEN = 2

def _file_tokens(data: Any) -> int:
    """A base64 file's reservation: its decoded bytes / FILE_BYTES_PER_TOKEN."""
    return len(data) * 3 // 4 // FILE_BYTES_PER_TOKEN if isinstance(data, str) else 0


def approximate_tokens(text: str) -> int:
    """Approximate token count used when an encoding is unavailable: ``ceil(utf8_bytes / 4)``.

    Bytes rather than characters because it stays closer for non-Latin scripts (CJK text
    is ~3 bytes but roughly one token per character); for English it overestimates by
    around a quarter, which errs on the safe side for budgets.
    """
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 4)


@functools.lru_cache(maxsize=1024)
def encoding_name_for_model(model: str) -> str:
    """Name of the tiktoken encoding used for ``model`` (``o200k_base`` if unknown).

    Fine-tuned names (``ft:gpt-4o-mini:org::id``) map like their base model.
    """
    name = model.lower().removeprefix("ft:")
    for prefix in _PREFIXES_LONGEST_FIRST:
        if name.startswith(prefix):
            return _MODEL_PREFIXES[prefix]
    return DEFAULT_ENCODING


# --- Walking request bodies -----------------------------------------------------------


def _compact_json(value: Any) -> str | None:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _text_size_exceeds(body: Any, limit: int) -> bool:
    """Whether ``body`` holds more than ``limit`` units of text; stops as soon as it does.

    Iterative, so absurdly nested JSON cannot hit the recursion limit on the event loop.
    """
    size = 0
    stack = [body]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            size += len(item)
            stack.extend(x for x in item if isinstance(x, (str, dict, list)))
        if size > limit:
            return True
    return False


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TokenCounter:
    """Counts prompt tokens of OpenAI requests with encodings loaded once, offline.

    Build it with :meth:`load` at start-up; every method after that is pure computation.
    """

    def __init__(self, encodings: dict[str, tiktoken.Encoding | None]) -> None:
        """Use :meth:`load`; ``encodings`` maps encoding name to Encoding, or None if unavailable."""
        self._encodings = dict(encodings)
        # Encoding -> {short string: its count}; cleared whole when full. Safe across the
        # threads large bodies are counted in: dict reads and writes are atomic.
        self._short: dict[tiktoken.Encoding, dict[str, int]] = {
            enc: {} for enc in self._encodings.values() if enc is not None}
        # Model name -> its encoding, as `_encoding_for` finds it (a dozen prefix tests): the names
        # come from config.yaml's models, so few; bounded all the same.
        self._by_model: dict[str, tiktoken.Encoding | None] = {}

    @classmethod
    def load(cls, cache_dir: str | os.PathLike[str] | None = None) -> TokenCounter:
        """Load cl100k_base and o200k_base from bundled data; never touches the network.

        See :func:`proxy.encodings.load_all`. Never raises for missing data: such encodings use
        the approximation.
        """
        return cls(encodings.load_all(cache_dir))

    @property
    def approximate(self) -> bool:
        """True if any encoding fell back to :func:`approximate_tokens`."""
        return any(enc is None for enc in self._encodings.values())

    def count(self, text: str, model: str) -> int:
        """Tokens of plain ``text`` for ``model``; special-token text counts as plain text."""
        return self._count_with(self._encoding_for(model), text)

    def chat_prompt(self, body: dict, model: str) -> int:
        """Prompt tokens of a ``POST /v1/chat/completions`` body."""
        if not isinstance(body, dict):
            return 0
        enc = self._encoding_for(model)
        total = REPLY_PRIMING_TOKENS
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict):
                total += self._message_tokens(enc, message)
        tools, functions, fmt = body.get("tools"), body.get("functions"), body.get("response_format")
        if tools:
            total += self._tool_definition_tokens(enc, tools)
        if functions:
            total += self._tool_definition_tokens(enc, functions)
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":     # billed as input, as in Responses
            total += self._count_with(enc, _compact_json(fmt.get("json_schema")) or "")
        return total

    def completion_prompt(self, body: dict, model: str) -> int:
        """Prompt tokens of a ``POST /v1/completions`` body (``prompt`` plus ``suffix``)."""
        if not isinstance(body, dict):
            return 0
        enc = self._encoding_for(model)
        total = self._input_tokens(enc, body.get("prompt"))
        suffix = body.get("suffix")
        if isinstance(suffix, str):
            total += self._count_with(enc, suffix)
        return total

    def embedding_input(self, body: dict, model: str) -> int:
        """Input tokens of a ``POST /v1/embeddings`` body."""
        if not isinstance(body, dict):
            return 0
        return self._input_tokens(self._encoding_for(model), body.get("input"))

    def responses_input(self, body: dict, model: str) -> int:
        """Input tokens of a ``POST /v1/responses`` body: ``instructions``, ``input`` (a string
        or a list of items: messages with text, image and file parts, function calls and their
        outputs), tool definitions and a ``text.format`` JSON schema. An item of a type not
        known here is counted as its compact JSON, which errs high."""
        if not isinstance(body, dict):
            return 0
        enc = self._encoding_for(model)
        total = REPLY_PRIMING_TOKENS
        for text in (body.get("instructions"), body.get("input")):
            if isinstance(text, str):
                total += TOKENS_PER_MESSAGE + self._count_with(enc, text)
        items = body.get("input")
        for item in items if isinstance(items, list) else ():
            total += self._item_tokens(enc, item)
        total += self._tool_definition_tokens(enc, body.get("tools"))
        text_opts = body.get("text")
        fmt = text_opts.get("format") if isinstance(text_opts, dict) else None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            total += self._count_with(enc, _compact_json(fmt.get("schema")) or "")
        return total

    def messages_prompt(self, body: dict, model: str) -> int:
        """Estimated input tokens of an Anthropic ``POST /v1/messages`` body (see
        :mod:`proxy.anthropic_tokens`: cl100k_base x 1.4, plus framing; an approximation)."""
        enc = self._encodings.get("cl100k_base")
        return anthropic_tokens.messages_prompt(body, functools.partial(self._count_with, enc))

    async def estimate(self, kind: str, body: dict, model: str, json_bytes: int | None = None) -> int:
        """Prompt tokens of a request body; ``kind`` is an endpoint kind (see _ESTIMATE_KINDS).

        Bodies above :data:`INLINE_THRESHOLD_CHARS` are counted in a worker thread so a huge
        prompt does not stall the event loop (tiktoken releases the GIL while encoding).
        ``json_bytes``, the length of the JSON text the body was parsed from, spares the walk
        that sizes it when it is at most the threshold: every unit the walk counts (a string's
        character, a list's item) takes a byte of its own in the JSON text, or more.
        """
        counter = self._counter_for(kind)
        if (json_bytes is None or json_bytes > INLINE_THRESHOLD_CHARS) \
                and _text_size_exceeds(body, INLINE_THRESHOLD_CHARS):
            return await asyncio.to_thread(counter, body, model)
        return counter(body, model)

    # -- internals ----------------------------------------------------------------------

    def _counter_for(self, kind: str) -> Callable[[dict, str], int]:
        if kind == "chat":
            return self.chat_prompt
        if kind == "completion":
            return self.completion_prompt
        if kind == "embedding":
            return self.embedding_input
        if kind == "responses":
            return self.responses_input
        if kind == "messages":
            return self.messages_prompt
        raise ValueError(f"unknown estimate kind {kind!r}; expected one of {_ESTIMATE_KINDS}")

    def _encoding_for(self, model: str) -> tiktoken.Encoding | None:
        if not isinstance(model, str):
            return self._encodings.get(DEFAULT_ENCODING)
        known = self._by_model
        if model in known:
            return known[model]
        if len(known) >= 1024:
            known.clear()
        enc = known[model] = self._encodings.get(encoding_name_for_model(model))
        return enc

    def _count_with(self, enc: tiktoken.Encoding | None, text: str) -> int:
        if enc is None:
            return approximate_tokens(text)
        if len(text) > SHORT_CHARS:
            # encode_ordinary: user text containing "<|endoftext|>" is just text, never an error.
            return len(enc.encode_ordinary(text))
        known = self._short[enc]
        n = known.get(text)
        if n is None:
            if len(known) >= SHORT_COUNTS:
                known.clear()
            n = known[text] = len(enc.encode_ordinary(text))
        return n

    def _message_tokens(self, enc: tiktoken.Encoding | None, message: dict) -> int:
        total = TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                total += self._count_with(enc, value)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif key == "content" and isinstance(value, list):
                total += sum(self._part_tokens(enc, part) for part in value)
            elif key == "tool_calls" and isinstance(value, list):
                total += sum(self._tool_call_tokens(enc, call) for call in value)
            elif key == "function_call" and isinstance(value, dict):
                total += self._function_tokens(enc, value)
        return total

    def _part_tokens(self, enc: tiktoken.Encoding | None, part: Any) -> int:
        if not isinstance(part, dict):
            return 0
        kind = part.get("type")
        if kind == "image_url":
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else None
            return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_DEFAULT
        if kind == "file":                  # a base64 file (a PDF): as a Responses input_file
            file = part.get("file")
            return _file_tokens(file.get("file_data") if isinstance(file, dict) else None)
        # Text-like parts ("text", "refusal"); audio parts carry no countable text.
        text = part.get("refusal" if kind == "refusal" else "text")
        return self._count_with(enc, text) if isinstance(text, str) else 0

    def _item_tokens(self, enc: tiktoken.Encoding | None, item: Any) -> int:
        """One Responses input item."""
        if not isinstance(item, dict):
            return 0
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, str):
                return TOKENS_PER_MESSAGE + self._count_with(enc, content)
            parts = content if isinstance(content, list) else ()
            return TOKENS_PER_MESSAGE + sum(self._response_part_tokens(enc, p) for p in parts)
        if kind == "function_call":
            return TOKENS_PER_TOOL_CALL + self._function_tokens(enc, item)
        if kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                return TOKENS_PER_MESSAGE + sum(self._response_part_tokens(enc, p) for p in output)
            return TOKENS_PER_MESSAGE + (self._count_with(enc, output) if isinstance(output, str) else 0)
        return self._count_with(enc, _compact_json(item) or "")

    def _response_part_tokens(self, enc: tiktoken.Encoding | None, part: Any) -> int:
        if not isinstance(part, dict):
            return 0
        kind = part.get("type")
        if kind == "input_image":
            return IMAGE_TOKENS_LOW if part.get("detail") == "low" else IMAGE_TOKENS_DEFAULT
        if kind == "input_file":
            return _file_tokens(part.get("file_data"))
        text = part.get("refusal" if kind == "refusal" else "text")
        if isinstance(text, str):
            return self._count_with(enc, text)
        return self._count_with(enc, _compact_json(part) or "")

    def _tool_call_tokens(self, enc: tiktoken.Encoding | None, call: Any) -> int:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            return 0
        return TOKENS_PER_TOOL_CALL + self._function_tokens(enc, call["function"])

    def _function_tokens(self, enc: tiktoken.Encoding | None, function: dict) -> int:
        strings = (function.get("name"), function.get("arguments"))
        return sum(self._count_with(enc, s) for s in strings if isinstance(s, str))

    def _tool_definition_tokens(self, enc: tiktoken.Encoding | None, tools: Any) -> int:
        if not isinstance(tools, list) or not tools:
            return 0
        total = TOOLS_BLOCK_TOKENS
        for tool in tools:
            text = _compact_json(tool)
            if text is not None:
                total += TOKENS_PER_TOOL + self._count_with(enc, text)
        return total

    def _input_tokens(self, enc: tiktoken.Encoding | None, value: Any) -> int:
        """Tokens of a completions ``prompt`` / embeddings ``input`` in any accepted shape."""
        if isinstance(value, str):
            return self._count_with(enc, value)
        if not isinstance(value, list):
            return 0
        return sum(self._input_item_tokens(enc, item) for item in value)

    def _input_item_tokens(self, enc: tiktoken.Encoding | None, item: Any) -> int:
        if isinstance(item, str):
            return self._count_with(enc, item)
        if _is_token_id(item):
            return 1  # an element of a flat list of token ids
        if isinstance(item, list):
            return sum(1 for token in item if _is_token_id(token))
        return 0
