"""The endpoints the proxy meters, as data: one row per endpoint, read by the handler, the
planner, the upstream client and settlement instead of `if kind == ...` branches. A new surface
is a new row (plus its body parser and its token estimate)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable

from . import pricing
from .config import Config, Model
from .errors import BadRequest, NotFound
from .sse import UsageTap
from .taps import MessagesTap, ResponsesTap


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: str                 # chat | completion | embedding | responses | messages: the log's `endpoint`
    path: str                 # below /v1 for clients; below the provider's API root upstream
    api: str                  # the provider kind that serves it (no translation): openai | anthropic
    output: bool              # does it generate completion tokens?
    cap_field: str | None     # the body field that caps the completion upstream
    read_usage: Callable[[Any], pricing.Usage | None]    # the response's `usage`, normalized
    output_texts: Callable[[dict], Iterable[Any]]        # generated text of a whole response
    tap: Callable[[bool], Any]     # a stream tap; its flag: drop what the proxy added to the stream
    usage_opt_in: bool = False     # streams report usage only if asked (stream_options.include_usage)
    min_output: int = 1            # the smallest completion cap the upstream accepts


def _choice_texts(field: str | None) -> Callable[[dict], list[Any]]:
    def texts(obj: dict) -> list[Any]:
        out = []
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict):
                msg = choice.get(field) if field else None
                out.append(msg.get("content") if isinstance(msg, dict) else choice.get("text"))
        return out
    return texts


def _response_texts(obj: dict) -> list[Any]:
    """Responses `output`: message parts' text, refusals and function-call arguments."""
    out: list[Any] = []
    for item in obj.get("output") or ():
        if not isinstance(item, dict):
            continue
        out.append(item.get("arguments"))
        for part in item.get("content") or () if isinstance(item.get("content"), list) else ():
            if isinstance(part, dict):
                out += [part.get("text"), part.get("refusal")]
    return out


def _message_texts(obj: dict) -> list[Any]:
    """Messages `content` blocks: text, thinking, and tool inputs (as JSON-ish text)."""
    out: list[Any] = []
    for block in obj.get("content") or ():
        if isinstance(block, dict):
            out += [block.get("text"), block.get("thinking")]
            if isinstance(block.get("input"), dict):
                out.append(str(block["input"]))
    return out


def _no_texts(obj: dict) -> list[Any]:
    return []


ENDPOINTS = MappingProxyType({e.kind: e for e in (
    Endpoint("chat", "/chat/completions", "openai", True, "max_completion_tokens", pricing.from_openai,
             _choice_texts("message"), UsageTap, usage_opt_in=True),
    Endpoint("completion", "/completions", "openai", True, "max_tokens", pricing.from_openai,
             _choice_texts(None), UsageTap, usage_opt_in=True),
    Endpoint("embedding", "/embeddings", "openai", False, None, pricing.from_openai, _no_texts, UsageTap),
    # OpenAI rejects max_output_tokens below 16.
    Endpoint("responses", "/responses", "openai", True, "max_output_tokens", pricing.from_responses,
             _response_texts, lambda drop: ResponsesTap(), min_output=16),
    # Anthropic requires max_tokens, so the client always sets the cap itself.
    Endpoint("messages", "/messages", "anthropic", True, "max_tokens", pricing.from_anthropic,
             _message_texts, lambda drop: MessagesTap()),
)})


def models_for(config: Config, name: str, endpoint: Endpoint) -> list[Model]:
    """The candidate models for a requested name, on an endpoint their API serves (a model's
    provider kind decides its endpoints: requests are never translated between APIs)."""
    models = [config.models[n] for n in config.candidates(name)]
    if not models:
        raise NotFound(f"The model `{name}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    if models[0].kind != endpoint.api:
        paths = ", ".join("/v1" + e.path for e in ENDPOINTS.values() if e.api == models[0].kind)
        raise BadRequest(f"The model `{name}` is served by an {models[0].kind} provider and cannot be used "
                         f"on /v1{endpoint.path} (the proxy does not translate between APIs); use {paths}.",
                         param="model", code="model_not_supported_on_endpoint")
    return models
