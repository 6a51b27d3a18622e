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


def authenticate(header: str | None, keys: Mapping[str, ApiKey]) -> ApiKey | None:
    """The key behind an Authorization header; None when auth is open (no keys configured,
    allowed outside prod only: any bearer is accepted)."""
    token = bearer(header)
    if not keys:
        return None
    key = keys.get(hashlib.sha256(token.encode()).hexdigest())
    if key is None:
        raise Unauthorized("Incorrect API key provided.")
    return key


def caller(key: ApiKey | None, end_user: str | None) -> Caller:
    """Org and user: the key's, or with open auth org `default` and the body's `user` field.
    A key with `allow_end_user` lets the body's `user` name the end user."""
    if key is None:
        return Caller(OPEN_ORG, end_user or ANONYMOUS, "open")
    user = end_user if (key.allow_end_user and end_user) else (key.user or key.name)
    return Caller(key.org, user, key.name)
