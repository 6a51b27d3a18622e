"""Parsing and checking request bodies before anything is estimated or reserved.

Only what the proxy relies on is checked (the upstream checks the rest): a bad field gets a 400
naming it in `param`, the way OpenAI names it.
"""

from __future__ import annotations

import json
import math
from codecs import BOM_UTF8
from typing import Any, NamedTuple

from aiohttp import web

from .endpoints import ENDPOINTS, Endpoint
from .errors import BadRequest, PayloadTooLarge

MAX_OUTPUT_TOKENS = 1_000_000      # far above any model's output limit, far below float trouble
MAX_USER_CHARS = 256


_CLOSE = {"Connection": "close"}


async def read(request: web.Request, limit: int) -> bytes:
    """The request body, decoded as its Content-Encoding says, at most `limit` bytes; a body that
    cannot be read is a 400 and one too large a 413 (every route that reads a body uses this)."""
    length = request.content_length         # parsed from the header on every access
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body of {length} bytes is over the {limit}-byte limit.")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body is over the {limit}-byte limit.") from None
    except web.RequestPayloadError:     # in practice: gzip/deflate on a body that is not
        # The rest of the body cannot be read either, so the connection cannot serve another
        # request: the answer says so, and the client does not reuse it (server._Protocol keeps
        # aiohttp's failed drain of the rest out of the error log).
        encoding = request.headers.get("Content-Encoding")
        if encoding:
            raise BadRequest(f"The request body could not be read as its Content-Encoding "
                             f"({encoding}) says.", code="invalid_content_encoding", headers=_CLOSE) from None
        raise BadRequest("The request body could not be read.", code="invalid_request_body", headers=_CLOSE) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):                   # 1e400: valid JSON syntax, no finite number (NaN's twin)
        raise ValueError(f"the number {text[:40]} is too large")
    return value


# Built once: json.loads with any keyword builds a decoder (and its scanner) on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_SCAN = _DECODER.scan_once


def _decode(text: str) -> Any:
    """`_DECODER.decode(text)`. A compact object (no blanks before its `{` or after its `}`, as
    SDKs send) goes to the scanner directly, as decode() would after finding no blanks to skip:
    its two regex matches cost more than the scan (`_loads` of the bench's body 3.0 -> 2.35 µs). Anything
    else, or any error, is decode()'s, so its errors and their messages stay the same."""
    if text[:1] == "{" and text[-1:] == "}":
        try:
            obj, end = _SCAN(text, 0)
        except StopIteration:
            return _DECODER.decode(text)
        if end == len(text):
            return obj
    return _DECODER.decode(text)


def _loads(raw: bytes) -> Any:
    # Decoded here, strictly: json.loads(bytes) would decode with 'surrogatepass' and let the
    # UTF-8 of a lone surrogate (ED A0 80) through, to fail later at tiktoken or on the way
    # upstream. A UTF-8 BOM is accepted, as json.loads(bytes) did.
    bom = 3 if raw[:3] == BOM_UTF8 else 0
    try:
        # What raw.decode("utf-8-sig") does, without its codec lookup and Python-level wrapper:
        # 0.6 -> 0.1 µs for a small body.
        text = raw[3:].decode() if bom else raw.decode()
    except UnicodeDecodeError as exc:
        at = exc.start + bom                # in the body as sent (utf-8-sig counts after the BOM)
        raise BadRequest(f"We could not parse the JSON body of your request: it is not valid UTF-8 "
                         f"(byte 0x{raw[at]:02x} at offset {at}).", code="invalid_json") from None
    try:
        if text.startswith("\ufeff"):         # a second BOM: refused as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        body = _decode(text)
    except (ValueError, RecursionError) as exc:     # bad JSON, NaN, 5000-digit ints, deep nesting
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


class ApiCall(NamedTuple):
    """What the client asked for, checked: the parsed JSON body and the fields the proxy uses.
    (A NamedTuple, not a frozen dataclass: built per request, 0.9 -> 0.2 µs.)"""
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


def _model_and_stream(body: dict) -> tuple[str, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model",
                         code=None if model is None else "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("Invalid value for 'stream': expected a boolean.", param="stream", code="invalid_value")
    return model, bool(stream)


def _end_user(user: Any, param: str) -> str | None:
    if user is not None and (not isinstance(user, str) or len(user) > MAX_USER_CHARS
                             or not user.isprintable()):
        raise BadRequest(f"Invalid value for '{param}': expected a string of at most {MAX_USER_CHARS} "
                         f"printable characters.", param=param, code="invalid_value")
    return user


def json_object(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400."""
    body = _loads(raw)
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def parse(raw: bytes, kind: str) -> ApiCall:
    body = json_object(raw)
    if kind in _TYPED_API_PARSERS:
        return _TYPED_API_PARSERS[kind](body)
    model, stream = _model_and_stream(body)
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and isinstance(opts.get("include_usage", False), bool)):
        raise BadRequest("Invalid value for 'stream_options': expected an object with a boolean "
                         "'include_usage'.", param="stream_options", code="invalid_value")
    user = _end_user(body.get("user"), "user")
    if kind == "chat":
        _messages(body)
    else:
        _texts_or_tokens(body, "prompt" if kind == "completion" else "input")
    if kind == "embedding" and stream:
        raise BadRequest("Embeddings cannot be streamed.", param="stream", code="invalid_value")
    # Both limits set: the larger is reserved. OpenAI prefers `max_completion_tokens`, but an
    # OpenAI-compatible server that reads only `max_tokens` could answer up to that much.
    limits = [v for v in (_int_field(body, "max_completion_tokens", 1, MAX_OUTPUT_TOKENS),
                          _int_field(body, "max_tokens", 1, MAX_OUTPUT_TOKENS)) if v is not None]
    choices = _int_field(body, "n", 1, 128) or 1
    if kind == "completion":
        # `best_of` completions are generated (and billed) server-side, `n` of them returned.
        choices = max(choices, _int_field(body, "best_of", 1, 128) or 1)
    return ApiCall(ENDPOINTS[kind], body, model, stream, bool(opts and opts.get("include_usage")),
                   max(limits) if limits else None, choices, user)


# --- the Responses and Messages APIs ----------------------------------------------------------

# Responses parameters whose input the proxy cannot see, so it cannot reserve for it: refused
# with a 400 naming the field rather than admitted with a budget that does not hold.
# `background`: the response is billed when it finishes, after the request that started it
# ended (the proxy would have to poll for it). `previous_response_id` / `conversation`: the
# upstream bills the whole stored conversation again as input, which the proxy never saw.
# `prompt`: a stored prompt template, whose text the proxy never sees either.
_RESPONSES_REFUSED = {
    "background": "Background responses are not supported by this budget proxy: their cost is only "
                  "known after the request that started them has ended. Send the request without "
                  "'background' (stream it if it is long).",
    "previous_response_id": "Chained responses are not supported by this budget proxy: the upstream "
                            "bills the whole earlier conversation again as input, which the proxy cannot "
                            "see to reserve for. Send the conversation in 'input' instead.",
    "conversation": "Stored conversations are not supported by this budget proxy: the upstream bills "
                    "them again as input, which the proxy cannot see to reserve for. Send the "
                    "conversation in 'input' instead.",
    "prompt": "Stored prompt templates are not supported by this budget proxy: it cannot see their "
              "text to reserve for it. Send the prompt in 'instructions' and 'input' instead.",
}
_MAX_OUTPUT_FIELD = "max_output_tokens"


def _refuse_hidden_input(body: dict) -> None:
    for name, why in _RESPONSES_REFUSED.items():
        value = body.get(name)
        if value is not None and value is not False:
            raise BadRequest(why, param=name, code="unsupported_parameter")


def _responses_input(body: dict) -> None:
    v = body.get("input")
    if isinstance(v, str):
        return
    if not isinstance(v, list):
        raise BadRequest("Invalid value for 'input': expected a string or an array of input items.",
                         param="input", code="invalid_value" if v is not None else "missing_required_parameter")
    for i, item in enumerate(v):
        if not isinstance(item, dict):
            raise BadRequest(f"Invalid value for 'input[{i}]': expected an object.", param=f"input[{i}]",
                             code="invalid_value")
        if item.get("type") == "item_reference":
            raise BadRequest("Item references are not supported by this budget proxy: it cannot see the "
                             "referenced item to reserve for it. Send the item itself.",
                             param=f"input[{i}]", code="unsupported_parameter")


def _optional(body: dict, name: str, kinds: tuple[type, ...], expected: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], kinds):
        raise BadRequest(f"Invalid value for '{name}': expected {expected}.", param=name, code="invalid_value")


def parse_responses(body: dict) -> ApiCall:
    """A `POST /v1/responses` body. The cap the proxy may send upstream is `max_output_tokens`,
    which OpenAI accepts from 16."""
    model, stream = _model_and_stream(body)
    _refuse_hidden_input(body)
    _responses_input(body)
    _optional(body, "instructions", (str,), "a string")
    _optional(body, "tools", (list,), "an array")
    cap = _int_field(body, _MAX_OUTPUT_FIELD, ENDPOINTS["responses"].min_output, MAX_OUTPUT_TOKENS)
    # A Responses stream always ends with its usage: nothing to ask for, nothing to cut out.
    return ApiCall(ENDPOINTS["responses"], body, model, stream, True, cap, 1,
                   _end_user(body.get("user"), "user"))


def _anthropic_messages(body: dict) -> None:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages: expected a non-empty array of messages.", param="messages",
                         code="invalid_value")
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(content, str) or (isinstance(content, list) and all(isinstance(b, dict) for b in content))):
            raise BadRequest(f"messages.{i}: expected an object with a string 'role' and a 'content' that "
                             f"is a string or an array of content blocks.", param=f"messages.{i}",
                             code="invalid_value")


def parse_messages(body: dict) -> ApiCall:
    """A `POST /v1/messages` body (Anthropic). `max_tokens` is required, as Anthropic requires it;
    `metadata.user_id` names the end user, as the OpenAI `user` field does elsewhere. Messages
    say what a bad field is in the message, Anthropic's way ("max_tokens: Field required")."""
    model, stream = _model_and_stream(body)
    _anthropic_messages(body)
    if body.get("max_tokens") is None:
        raise BadRequest("max_tokens: Field required", param="max_tokens", code="missing_required_parameter")
    cap = _int_field(body, "max_tokens", 1, MAX_OUTPUT_TOKENS)
    system = body.get("system")
    if system is not None and not (isinstance(system, str) or (
            isinstance(system, list) and all(isinstance(b, dict) for b in system))):
        raise BadRequest("system: expected a string or an array of text blocks.", param="system",
                         code="invalid_value")
    _optional(body, "tools", (list,), "an array")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("metadata: expected an object.", param="metadata", code="invalid_value")
    user = _end_user((metadata or {}).get("user_id"), "metadata.user_id")
    return ApiCall(ENDPOINTS["messages"], body, model, stream, True, cap, 1, user)


_TYPED_API_PARSERS = {"responses": parse_responses, "messages": parse_messages}
