"""The project's one error tree.

Every failure the proxy knows about is a `BudgetProxyError`. Backend exceptions (redis-py, OS
errors) are wrapped at the store boundary into `StoreUnavailable`; request problems carry the
HTTP status and the OpenAI error fields they are answered with, so the app turns any of them
into a response in exactly one place.
"""

from __future__ import annotations

import asyncio   # its TimeoutError: the builtin one from Python 3.11, its own on 3.10


class BudgetProxyError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(BudgetProxyError):
    """A policy or config file is missing or invalid. The message reads `file: path: expected`."""


class AuditIncomplete(BudgetProxyError):
    """The settlement log no longer reaches back to the start of the window being audited."""


class StoreUnavailable(BudgetProxyError):
    """The budget store could not be reached or answered with an error."""


class UpstreamIOError(BudgetProxyError):
    """The exchange with an upstream provider broke off (proxy/http1.py). The gateway turns it
    into a 502/504 (`UpstreamFailed`) and decides what is charged by which kind it is."""


class UpstreamUnsent(UpstreamIOError):
    """The request never left: no connection (refused, DNS, TLS handshake). Nothing to charge."""


class UpstreamConnectTimeout(UpstreamUnsent, asyncio.TimeoutError):
    """Connecting took longer than the provider's connect_timeout; the request never left."""


class UpstreamBroken(UpstreamIOError):
    """The request was sent and the answer broke off or cannot be read: the upstream may have
    received the prompt and may bill it."""


class UpstreamTimeout(UpstreamBroken, asyncio.TimeoutError):
    """No byte from the upstream for the provider's read_timeout, after the request was sent."""


class ApiError(BudgetProxyError):
    """An error answered to the client in OpenAI's error shape."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code, **self.extra}}

    def anthropic_body(self) -> dict:
        """The same error in Anthropic's shape, for the Messages API surface: its SDK picks the
        exception class by status (429 -> RateLimitError) and shows `error.message`; our code,
        param and budget scope ride along in the error object."""
        err = {"type": ANTHROPIC_TYPES.get(self.status, "api_error"), "message": self.message}
        if self.code is not None:
            err["code"] = self.code
        if self.param is not None:
            err["param"] = self.param
        return {"type": "error", "error": {**err, **self.extra}}


# Anthropic's error `type` for each status the proxy answers with (any other: api_error).
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error"}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401
    code = "invalid_api_key"


class NotFound(ApiError):
    status = 404


class PayloadTooLarge(ApiError):
    status = 413
    code = "request_too_large"


class BudgetExceeded(ApiError):
    """429 with the refused scope; `x-should-retry: false` for day and month windows."""
    status = 429
    type = "insufficient_quota"
    code = "BUDGET_EXCEEDED"


class ServiceUnavailable(ApiError):
    status = 503
    type = "api_error"


class UpstreamFailed(ApiError):
    """The upstream could not be reached (502) or timed out (504)."""
    status = 502
    type = "api_error"
    code = "upstream_unavailable"
