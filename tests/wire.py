"""The wire formats of OpenAI's Responses API and Anthropic's Messages API, as the providers
send them (field for field after their API references), for the fake upstream and the tap tests.
"""

from __future__ import annotations

import json
from typing import Any


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One typed SSE event as both providers frame it: an `event:` line, then one `data:` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# --- OpenAI Responses ----------------------------------------------------------------------


def responses_usage(input_tokens: int, output_tokens: int, cached: int = 0, reasoning: int = 0,
                    cache_write: tuple[int, int] | None = None) -> dict[str, Any]:
    """A Responses `usage`; cache_write is (30-minute, 12-hour) written tokens."""
    details: dict[str, Any] = {"cached_tokens": cached}
    if cache_write is not None:
        details["cache_write_tokens"] = sum(cache_write)
        details["cache_write_tokens_details"] = {"ttl_30m_tokens": cache_write[0],
                                                 "ttl_12h_tokens": cache_write[1]}
    return {"input_tokens": input_tokens, "input_tokens_details": details,
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": input_tokens + output_tokens}


def response_object(rid: str, model: str, text: str, usage: dict | None, status: str = "completed",
                    **extra: Any) -> dict[str, Any]:
    message = {"id": f"msg_{rid}", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}
    return {"id": rid, "object": "response", "created_at": 1_764_000_000, "status": status,
            "background": False, "error": None, "incomplete_details": None, "instructions": None,
            "max_output_tokens": None, "model": model, "output": [message] if usage else [],
            "parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None},
            "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
            "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None,
            "metadata": {}, **extra}


def responses_stream(rid: str, model: str, pieces: list[str], usage: dict | None,
                     final: str = "response.completed") -> list[bytes]:
    """The events of a streamed response whose text arrives in `pieces`; usage rides on `final`
    (response.completed / response.incomplete / response.failed); None: the stream is cut there."""
    text = "".join(pieces)
    start = response_object(rid, model, "", None, status="in_progress")
    item = {"id": f"msg_{rid}", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    seq = iter(range(1_000_000))
    out = [sse("response.created", {"type": "response.created", "sequence_number": next(seq), "response": start}),
           sse("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq),
                                        "response": start}),
           sse("response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(seq),
                                              "output_index": 0, "item": item}),
           sse("response.content_part.added", {"type": "response.content_part.added", "sequence_number": next(seq),
                                               "item_id": item["id"], "output_index": 0, "content_index": 0,
                                               "part": part})]
    for p in pieces:
        out.append(sse("response.output_text.delta", {"type": "response.output_text.delta",
                                                      "sequence_number": next(seq), "item_id": item["id"],
                                                      "output_index": 0, "content_index": 0, "delta": p,
                                                      "logprobs": []}))
    if usage is None:
        return out
    out.append(sse("response.output_text.done", {"type": "response.output_text.done", "sequence_number": next(seq),
                                                 "item_id": item["id"], "output_index": 0, "content_index": 0,
                                                 "text": text, "logprobs": []}))
    status = final.removeprefix("response.")
    done = response_object(rid, model, text, usage, status=status)
    out.append(sse(final, {"type": final, "sequence_number": next(seq), "response": done}))
    return out


# --- Anthropic Messages --------------------------------------------------------------------


def anthropic_usage(input_tokens: int, output_tokens: int, cache_read: int = 0, write_5m: int = 0,
                    write_1h: int = 0, thinking: int | None = None) -> dict[str, Any]:
    """A Messages `usage`: input_tokens EXCLUDES the cache fields."""
    usage: dict[str, Any] = {
        "input_tokens": input_tokens, "cache_creation_input_tokens": write_5m + write_1h,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
        "output_tokens": output_tokens, "service_tier": "standard"}
    if thinking is not None:
        usage["output_tokens_details"] = {"thinking_tokens": thinking}
    return usage


def message_object(mid: str, model: str, text: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": usage}


def messages_stream(mid: str, model: str, pieces: list[str], usage: dict[str, Any] | None,
                    deltas: int = 1) -> list[bytes]:
    """The events of a streamed message: `message_start` with the input usage (and 1 output
    token, as Anthropic sends), the text in `pieces`, then `deltas` message_delta events carrying
    cumulative usage (the last one is `usage`). usage None: the stream is cut after the text."""
    start_usage = {k: v for k, v in (usage or anthropic_usage(0, 0)).items() if k != "output_tokens_details"}
    start_usage["output_tokens"] = 1
    start = {**message_object(mid, model, "", start_usage), "content": [], "stop_reason": None}
    out = [sse("message_start", {"type": "message_start", "message": start}),
           sse("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
           sse("ping", {"type": "ping"})]
    for p in pieces:
        out.append(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": p}}))
    if usage is None:
        return out
    out.append(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    for i in range(deltas, 0, -1):
        shown = {"output_tokens": max(1, usage["output_tokens"] - i + 1)}
        if i == 1:
            shown = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens",
                                           "cache_read_input_tokens", "output_tokens") if k in usage}
            if "output_tokens_details" in usage:
                shown["output_tokens_details"] = usage["output_tokens_details"]
        out.append(sse("message_delta", {"type": "message_delta", "usage": shown,
                                         "delta": {"stop_reason": "end_turn", "stop_sequence": None}}))
    out.append(sse("message_stop", {"type": "message_stop"}))
    return out


def anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}
