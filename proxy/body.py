"""Parsing and checking request bodies before anything is estimated or reserved.

Only what the proxy relies on is checked (the upstream checks the rest): a bad field gets a 400
naming it in `param`, the way OpenAI names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .endpoints import ENDPOINTS, Endpoint
from .errors import BadRequest

MAX_OUTPUT_TOKENS = 1_000_000      # far above any model's output limit, far below float trouble
MAX_USER_CHARS = 256


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _loads(raw: bytes) -> Any:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:     # bad UTF-8, bad JSON, NaN, 5000-digit ints, deep nesting
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BadRequest(f"We could not parse the JSON body of your request: {reason}.",
                         code="invalid_json") from None
    # Only a \uD800-\uDFFF escape can smuggle in a lone surrogate, which no UTF-8 upstream (nor
    # tiktoken) accepts; look closer only when one is there.
    if b"\\ud" in raw or b"\\uD" in raw:
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise BadRequest("The request body contains an unpaired UTF-16 surrogate (\\uD800-\\uDFFF).",
                             code="invalid_json") from None
    return body


@dataclass(frozen=True, slots=True)
class ApiCall:
    """What the client asked for, checked: the parsed JSON body and the fields the proxy uses."""
    endpoint: Endpoint
    body: dict                # the parsed JSON object, forwarded with `model` (and caps) rewritten
    model: str
    stream: bool
    client_wants_usage: bool  # the client set stream_options.include_usage itself
    max_output: int | None    # max_completion_tokens / max_tokens, if the client set one
    choices: int              # n
    end_user: str | None


def _int_field(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise BadRequest(f"Invalid value for '{name}': expected an integer {bound}.", param=name,
                         code="invalid_value")
    return v


def _texts_or_tokens(body: dict, name: str) -> None:
    """`prompt` / `input`: a string, strings, token ids, or lists of token ids."""
    v = body.get(name)
    if isinstance(v, str):
        return
    if isinstance(v, list) and v and (
            all(isinstance(x, str) for x in v)
            or all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            or all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
                   for x in v)):
        return
    raise BadRequest(f"Invalid value for '{name}': expected a string, a list of strings, a list of "
                     f"token ids, or a list of lists of token ids.", param=name, code="invalid_value")


def _messages(body: dict) -> None:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty array.", param="messages", code="invalid_value")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"Invalid message: 'messages[{i}]' must be an object with a string 'role'.",
                             param=f"messages[{i}]", code="invalid_value")
        content = m.get("content")
        if content is not None and not isinstance(content, str) and not (
                isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            raise BadRequest(f"Invalid value for 'messages[{i}].content': expected a string or an "
                             f"array of content parts.", param=f"messages[{i}].content", code="invalid_value")
    if body.get("tools") is not None and not isinstance(body["tools"], list):
        raise BadRequest("Invalid value for 'tools': expected an array.", param="tools", code="invalid_value")


def parse(raw: bytes, kind: str) -> ApiCall:
    body = _loads(raw)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model",
                         code=None if model is None else "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("Invalid value for 'stream': expected a boolean.", param="stream", code="invalid_value")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and isinstance(opts.get("include_usage", False), bool)):
        raise BadRequest("Invalid value for 'stream_options': expected an object with a boolean "
                         "'include_usage'.", param="stream_options", code="invalid_value")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS
                             or not user.isprintable()):
        raise BadRequest(f"Invalid value for 'user': expected a string of at most {MAX_USER_CHARS} "
                         f"printable characters.", param="user", code="invalid_value")
    if kind == "chat":
        _messages(body)
    else:
        _texts_or_tokens(body, "prompt" if kind == "completion" else "input")
    if kind == "embedding" and stream:
        raise BadRequest("Embeddings cannot be streamed.", param="stream", code="invalid_value")
    max_out = _int_field(body, "max_completion_tokens", 1, MAX_OUTPUT_TOKENS)
    legacy = _int_field(body, "max_tokens", 1, MAX_OUTPUT_TOKENS)
    return ApiCall(ENDPOINTS[kind], body, model, bool(stream), bool(opts and opts.get("include_usage")),
                   max_out if max_out is not None else legacy, _int_field(body, "n", 1, 128) or 1, user)
