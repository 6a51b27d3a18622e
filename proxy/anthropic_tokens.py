"""Estimating the input tokens of an Anthropic Messages request, without Anthropic's tokenizer.

Anthropic publishes no tokenizer for its current models, so the proxy cannot count a Claude
prompt exactly before sending it. The reservation uses an approximation; the commit is exact
either way (it reads the `usage` Anthropic reports), so the approximation only decides how much
is held while the request runs, and whether a budget near its end admits the request.

Method: count the text with tiktoken's `cl100k_base` and multiply by CLAUDE_FACTOR (1.4).

- Why cl100k: the one tokenizer Anthropic did publish (Claude 1/2's: byte-level BPE, 65,000
  entries, NFKC; shipped in the `anthropic` Python SDK up to 0.38) tracks cl100k closely: on the
  16-text corpus of tests/test_anthropic_tokens.py (English prose and dialogue, Python, JS,
  JSON, numbers, Chinese, Japanese, Korean, Russian, Arabic, emoji, Markdown, URLs/paths,
  whitespace, repeated letters) its count is 0.85-1.36x cl100k's, but 0.86-3.67x o200k's (o200k
  packs non-Latin scripts far better than Claude's tokenizers do).
- Why 1.4: it covers the worst text of that corpus (URLs and paths, 1.36x) so the estimate was at
  or above the published Claude tokenizer's count on every text, and it leaves room for the
  current Claude tokenizers, reported by third-party measurements to produce 16-30 % more tokens
  than GPT-4o's o200k on English and code (1.4x cl100k is about 1.4x o200k there).
- Measured error (tests/test_anthropic_tokens.py pins it): against the published Claude
  tokenizer the estimate is never under, and over by 3-66 % (mean 36 %). That is the
  safety margin: a held reservation, released at commit.

Structure: every message and the system prompt add MESSAGE_OVERHEAD tokens of role framing; a
request with tools adds TOOL_SYSTEM_PROMPT_TOKENS (the system prompt Anthropic adds for tool use:
its pricing page lists 264-346 tokens by model and tool_choice; the largest is reserved) plus
the tools' JSON; an image is reserved at IMAGE_TOKENS, the most Anthropic bills for one (images
are scaled to at most about 1.15 megapixels, at width x height / 750 tokens); a base64 document
(PDF) at its decoded bytes / 2, since its pages' text and images are both billed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

CLAUDE_FACTOR = 1.4
MESSAGE_OVERHEAD = 4
TOOL_SYSTEM_PROMPT_TOKENS = 346
IMAGE_TOKENS = 1_600
DOCUMENT_BYTES_PER_TOKEN = 2


def _json(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return ""


def _block(count: Callable[[str], int], block: Any) -> int:
    """Tokens of one content block, before the factor (text-like blocks)."""
    if isinstance(block, str):
        return count(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind in ("text", "thinking", "redacted_thinking"):
        text = block.get("text", block.get("thinking", block.get("data")))
        return count(text) if isinstance(text, str) else 0
    if kind == "tool_use":
        return count(str(block.get("name", ""))) + count(_json(block.get("input")))
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return sum(_block(count, b) for b in content)
        return count(content) if isinstance(content, str) else 0
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and isinstance(source.get("data"), str):
            if source.get("type") == "text":
                return count(source["data"])
            return len(source["data"]) * 3 // 4 // DOCUMENT_BYTES_PER_TOKEN
        return 0
    return count(_json(block))            # an unknown block: its JSON, which errs high


def _content_and_images(count: Callable[[str], int], content: Any) -> tuple[int, int]:
    if isinstance(content, str):
        return count(content), 0
    if not isinstance(content, list):
        return 0, 0
    images = sum(1 for b in content if isinstance(b, dict) and b.get("type") == "image")
    text = sum(_block(count, b) for b in content if not (isinstance(b, dict) and b.get("type") == "image"))
    return text, images


def messages_prompt(body: dict, count: Callable[[str], int]) -> int:
    """Estimated input tokens of a `POST /v1/messages` (or count_tokens) body; `count` counts
    text with cl100k_base."""
    if not isinstance(body, dict):
        return 0
    text, images = _content_and_images(count, body.get("system"))
    framing = MESSAGE_OVERHEAD if isinstance(body.get("system"), (str, list)) else 0
    messages = body.get("messages")
    for m in messages if isinstance(messages, list) else ():
        if isinstance(m, dict):
            t, i = _content_and_images(count, m.get("content"))
            text, images, framing = text + t, images + i, framing + MESSAGE_OVERHEAD
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        text += sum(count(_json(t)) for t in tools)
        framing += TOOL_SYSTEM_PROMPT_TOKENS
    return math.ceil(text * CLAUDE_FACTOR) + framing + images * IMAGE_TOKENS
