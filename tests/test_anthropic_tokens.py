"""The Anthropic input estimate, measured against the one tokenizer Anthropic published.

REFERENCE holds, for each text of the corpus, its token count under Claude's published (legacy,
Claude 1/2) tokenizer, NFKC-normalized as that tokenizer does. `python bench/claude_reference.py`
recomputes them (it fetches that tokenizer from the `anthropic` 0.38.0 wheel on PyPI, where it
shipped, and encodes it with tiktoken). Current Claude tokenizers are unpublished: see
proxy/anthropic_tokens.py for why the margin also covers them.
"""

from __future__ import annotations

import statistics

import pytest

from proxy import anthropic_tokens

from .claude_corpus import CORPUS

REFERENCE = {
    "english_prose": 64, "english_dialogue": 45, "python_code": 108, "javascript_code": 72, "json": 96,
    "numbers": 73, "chinese": 50, "japanese": 64, "korean": 68, "russian": 50, "arabic": 77,
    "emoji_and_symbols": 41, "markdown": 64, "url_and_paths": 68, "whitespace_heavy": 54,
    "repeated_letters": 63,
}


def estimate(tokens, text: str) -> int:
    """The estimate for one text, framing left out (what the factor has to cover)."""
    return tokens.messages_prompt({"messages": [{"role": "user", "content": text}]}, "claude-x") \
        - anthropic_tokens.MESSAGE_OVERHEAD


def test_the_reference_covers_the_corpus():
    assert sorted(REFERENCE) == sorted(CORPUS)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_estimate_is_never_under_the_published_claude_tokenizer(tokens, name):
    assert estimate(tokens, CORPUS[name]) >= REFERENCE[name]


def test_measured_error_on_the_corpus(tokens):
    """Over by 3-66 % per text, 36 % on average: the stated safety margin."""
    over = [estimate(tokens, CORPUS[n]) / REFERENCE[n] - 1 for n in CORPUS]
    assert 0.0 <= min(over) and max(over) <= 0.66
    assert 0.25 <= statistics.mean(over) <= 0.45


def test_structure_images_tools_and_documents(tokens):
    count = lambda t: tokens.count(t, "gpt-4")          # cl100k_base
    body = {"system": "Be brief.",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "look",
                                                   "input": {"q": "cat"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                              "content": [{"type": "text", "text": "a cat"}]}]}],
            "tools": [{"name": "look", "description": "Look closer", "input_schema": {"type": "object"}}]}
    text = (count("Be brief.") + count("What is in this picture?") + count("look") + count('{"q":"cat"}')
            + count("a cat") + count('{"name":"look","description":"Look closer","input_schema":{"type":"object"}}'))
    expected = -(-text * 14 // 10) + 4 * anthropic_tokens.MESSAGE_OVERHEAD \
        + anthropic_tokens.TOOL_SYSTEM_PROMPT_TOKENS + anthropic_tokens.IMAGE_TOKENS
    assert tokens.messages_prompt(body, "claude-sonnet-4-5") == expected
    pdf = {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "A" * 4000}}]}]}
    assert tokens.messages_prompt(pdf, "c") == -(-3000 // 2 * 14 // 10) + anthropic_tokens.MESSAGE_OVERHEAD
    assert tokens.messages_prompt({"messages": "nope", "system": 5, "tools": {}}, "c") == 0
