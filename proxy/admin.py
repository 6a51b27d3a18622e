"""Who may open /admin/: an admin key (never a proxy key), or, outside prod with none
configured, anyone on loopback.

An admin key is sent as `Authorization: Bearer <key>` (API, CLI tools) or entered once in the
page's login form, which sets an HttpOnly, SameSite=Strict cookie. The cookie never holds the key:
it holds the key's name, an expiry and an HMAC of both keyed by the key's configured sha256, so
every worker process can check it without shared state, removing or changing the key in
config.yaml revokes its cookies, and a stolen cookie dies at its expiry (SESSION_SECONDS).
Anyone who can read config.yaml could mint one: protect that file as you protect the keys.

With no admin keys outside prod, /admin/ answers without authentication, but only to a peer on
a loopback address that did not come through a reverse proxy (a Forwarded / X-Forwarded-For
header means the real client is elsewhere). In prod, the admin endpoints exist only when admin
keys are configured: they answer 404 while none is (admin keys follow config.yaml reloads).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import time
from typing import Awaitable, Callable, Sequence

from aiohttp import web

from .config import AdminKey
from .errors import ApiError, NotFound, Unauthorized

COOKIE = "bp_admin"
SESSION_SECONDS = 12 * 3600
_CONTEXT = b"budget-proxy admin session v1|"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class NotAdmin(Unauthorized):
    code = "invalid_admin_key"


class AdminGate:
    def __init__(self, keys: Sequence[AdminKey] | Callable[[], Sequence[AdminKey]], environment: str,
                 clock=time.time) -> None:
        """`keys`: the admin keys, or a callable returning the current ones (a reloaded config)."""
        self._keys = keys if callable(keys) else (lambda: keys)
        self.environment = environment
        self._clock = clock

    @property
    def keys(self) -> Sequence[AdminKey]:
        return self._keys()

    @property
    def enabled(self) -> bool:
        """In prod the admin endpoints exist only with admin keys configured."""
        return bool(self.keys) or self.environment != "prod"

    @property
    def loopback_only(self) -> bool:
        return not self.keys

    def key_for(self, secret: str) -> AdminKey | None:
        """The admin key `secret` is, compared in constant time against every configured hash."""
        digest = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found

    # --- the page's cookie ----------------------------------------------------------------

    def session(self, key: AdminKey) -> str:
        expires = int(self._clock()) + SESSION_SECONDS
        name = base64.urlsafe_b64encode(key.name.encode()).decode().rstrip("=")
        return f"{name}.{expires}.{_mac(key, name, expires)}"

    def from_cookie(self, value: str) -> AdminKey | None:
        name, _, rest = value.partition(".")
        expires, _, mac = rest.partition(".")
        # A cookie is client input: only ASCII digits are an expiry, only ASCII a MAC
        # (str.isdigit accepts "²", and compare_digest rejects non-ASCII str with a TypeError).
        if not (expires.isascii() and expires.isdigit() and mac.isascii()) or int(expires) < self._clock():
            return None
        for key in self.keys:
            if hmac.compare_digest(_mac(key, name, int(expires)), mac):
                return key
        return None

    # --- the check --------------------------------------------------------------------------

    def admit(self, request: web.Request) -> str:
        """The admin's name (for logs), or raise: 404 in prod without admin keys, 401 without a
        valid admin key, 403 off loopback when admin keys are not configured."""
        if not self.enabled:
            raise NotFound(f"Invalid URL ({request.method} {request.path})", code="unknown_url")
        if self.loopback_only:
            if not _local(request):
                raise ApiError("No admin_keys are configured: the admin endpoints answer only on "
                               "loopback. Configure admin_keys in config.yaml to open them elsewhere.",
                               status=403, type="permission_error", code="admin_loopback_only")
            return "loopback"
        header = request.headers.get("Authorization")
        if header:
            scheme, _, token = header.partition(" ")
            key = self.key_for(token.strip()) if scheme.lower() == "bearer" else None
            if key is None:
                raise NotAdmin("Incorrect admin key provided (proxy keys do not open /admin/).")
            return key.name
        cookie = request.cookies.get(COOKIE)
        key = self.from_cookie(cookie) if cookie else None
        if key is None:
            raise NotAdmin("An admin key is required: send 'Authorization: Bearer <admin key>'.")
        return key.name

    def guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            self.admit(request)
            return await handler(request)
        return guarded


def _mac(key: AdminKey, name: str, expires: int) -> str:
    msg = _CONTEXT + f"{name}|{expires}".encode()
    return hmac.new(bytes.fromhex(key.sha256), msg, hashlib.sha256).hexdigest()


def _local(request: web.Request) -> bool:
    if "Forwarded" in request.headers or "X-Forwarded-For" in request.headers:
        return False
    try:
        ip = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)       # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or ip).is_loopback


def set_session(response: web.StreamResponse, request: web.Request, value: str) -> None:
    response.set_cookie(COOKIE, value, max_age=SESSION_SECONDS, path="/admin/", httponly=True,
                        samesite="Strict", secure=request.secure or None)


def clear_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/admin/")
