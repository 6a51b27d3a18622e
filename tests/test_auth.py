"""Who is calling: proxy keys by sha256, open auth, end users scoped inside their org."""

from __future__ import annotations

import hashlib

import pytest

from proxy.auth import Caller, authenticate, caller
from proxy.config import ApiKey
from proxy.errors import Unauthorized

KEY = "bp-secret"
KEYS = {hashlib.sha256(KEY.encode()).hexdigest(): ApiKey("app", "acme", "svc", True),
        hashlib.sha256(b"other").hexdigest(): ApiKey("other", "globex", None, False)}


def test_a_known_key_names_its_org_and_user():
    key = authenticate(f"Bearer {KEY}", KEYS)
    assert caller(key, None) == Caller("acme", "svc", "app")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", f"Token {KEY}", "Bearer wrong"])
def test_missing_malformed_or_unknown_keys_are_401s(header):
    with pytest.raises(Unauthorized) as exc:
        authenticate(header, KEYS)
    assert exc.value.status == 401 and KEY not in exc.value.message


def test_end_users_live_inside_the_keys_org_and_only_when_allowed():
    assert caller(KEYS[hashlib.sha256(KEY.encode()).hexdigest()], "bob").user == "acme/bob"
    other = authenticate("Bearer other", KEYS)
    assert caller(other, "svc") == Caller("globex", "other", "other")      # the body cannot pick a user


def test_open_auth_accepts_any_bearer_as_the_default_org():
    assert authenticate("Bearer anything", {}) is None
    assert caller(None, "zed") == Caller("default", "default/zed", "open")
    assert caller(None, None).user == "anonymous"
