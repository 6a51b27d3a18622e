"""Review finding (money): a chat stream from an OpenAI-compatible server that streams its
reasoning (vLLM, DeepSeek: `delta.reasoning_content`; OpenRouter: `delta.reasoning`) and is cut
before its usage was charged the prompt and no output, however long it had been reasoning:
reasoning deltas were not counted as output."""

from __future__ import annotations

from proxy.sse import UsageTap


def test_streamed_reasoning_counts_as_output_for_a_cut_stream():
    tap = UsageTap(drop_usage_chunk=False)
    thought = "Let me think about this step by step. " * 20
    for field in ("reasoning_content", "reasoning"):
        tap.feed(b'data: {"choices":[{"index":0,"delta":{"' + field.encode() + b'":"' + thought.encode() + b'"}}]}\n\n')
    assert (tap.output_chunks, tap.output_chars) == (2, 2 * len(thought))
