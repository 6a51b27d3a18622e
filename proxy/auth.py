"""Who is calling: the proxy's own API keys, looked up by their sha256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping

from .config import ApiKey
from .errors import Unauthorized

OPEN_ORG = "default"
ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Caller:
    org: str
    user: str
    key_name: str          # for logs; never the key itself


def bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized("Missing API key. Send it as 'Authorization: Bearer <key>'.")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Malformed Authorization header. Expected 'Bearer <key>'.")
    return token


def presented(headers: Mapping[str, str], api: str) -> str | None:
    """The Authorization header to check. Anthropic's SDK sends its key as `x-api-key`, accepted
    on the Anthropic surface; `Authorization: Bearer` works everywhere (and wins if both come)."""
    if api == "anthropic" and "Authorization" not in headers and "x-api-key" in headers:
        return f"Bearer {headers['x-api-key']}"
    return headers.get("Authorization")


def authenticate(header: str | None, keys: Mapping[str, ApiKey]) -> ApiKey | None:
    """The key behind an Authorization header; None when auth is open (no keys configured,
    allowed outside prod only: any bearer is accepted)."""
    token = bearer(header)
    if not keys:
        return None
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives the exact bytes back
    # (a Latin-1 or other non-UTF-8 key then simply matches no configured key).
    key = keys.get(hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest())
    if key is None:
        raise Unauthorized("Incorrect API key provided.")
    return key


def caller(key: ApiKey | None, end_user: str | None) -> Caller:
    """Org and user: the key's, or with open auth org `default` and the body's `user` field.
    A key with `allow_end_user` lets the body's `user` name the end user.

    An end user named by the body lives inside the caller's org: its user id is `<org>/<user>`
    (and policy overrides name it so), so one org can neither spend nor claim another org's
    user budgets by sending their names. Users configured on keys keep their plain names."""
    if key is None:
        return Caller(OPEN_ORG, f"{OPEN_ORG}/{end_user}" if end_user else ANONYMOUS, "open")
    if key.allow_end_user and end_user:
        return Caller(key.org, f"{key.org}/{end_user}", key.name)
    return Caller(key.org, key.user or key.name, key.name)
