"""The OpenAI endpoints the proxy meters, as data: one row per endpoint, read by the handler,
the planner and the upstream client instead of `if kind == ...` branches."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class Endpoint:
    kind: str                 # chat | completion | embedding: the settlement log's `endpoint`
    path: str                 # below the base URL (/v1), the same for clients and upstream
    output: bool              # does it generate completion tokens?
    cap_field: str | None     # the body field that caps the completion upstream


ENDPOINTS = MappingProxyType({e.kind: e for e in (
    Endpoint("chat", "/chat/completions", True, "max_completion_tokens"),
    Endpoint("completion", "/completions", True, "max_tokens"),
    Endpoint("embedding", "/embeddings", False, None),
)})
