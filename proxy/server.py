"""Serving the app: the listening socket, HTTP that aiohttp's parser rejects, signals, and the
shutdown grace period.

aiohttp answers what its HTTP parser rejects itself, before any middleware runs, as text/plain
(echoing the offending bytes): a garbage request line, a header line over 8190 bytes or more than
128 headers, a malformed header or chunk size, a Content-Encoding it cannot decode (`br` without
the Brotli package, `zstd`). aiohttp has no public hook for that answer, so the server here makes
its connections with a `RequestHandler` whose `handle_error` answers in OpenAI's error shape
(400, `invalid_request_error`, code `invalid_http_request`) and logs one line, no traceback.

SIGTERM / SIGINT stop the listener, let open requests run on for `shutdown_grace_seconds`, then
cancel them (a cut stream settles what it streamed), then close the app's lifetimes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from typing import Callable

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, ContentEncodingError, LineTooLong

from .errors import ApiError

log = logging.getLogger(__name__)


def _parser_error(status: int, exc: BaseException | None) -> ApiError:
    """What the client is told; never the bytes it sent (a header may hold a key)."""
    if status >= 500:
        return ApiError("The proxy failed to process the request.", status=status, type="api_error",
                        code="internal_error")
    if isinstance(exc, LineTooLong):
        why = "a request line or header is longer than 8190 bytes"
    elif isinstance(exc, (BadHttpMethod, BadStatusLine)):
        why = "the request line is not valid HTTP"
    elif isinstance(exc, ContentEncodingError):
        why = "the Content-Encoding is not supported; send the body uncompressed, gzip or deflate"
    else:                                   # llhttp's own words, e.g. "Invalid character in chunk size"
        why = str(getattr(exc, "message", "") or "").split("\n", 1)[0].rstrip(": ") or "malformed request"
    return ApiError(f"The HTTP request could not be read: {why}.", status=status, code="invalid_http_request")


class _Protocol(web_protocol.RequestHandler):
    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:      # as aiohttp does: too late for another response
            raise ConnectionError("Response is sent already, cannot send another response")
        if status >= 500:
            log.error("error outside any handler on %s %s", request.method, request.path, exc_info=exc)
        else:
            log.info("unreadable HTTP request from %s: %s", request.remote, type(exc).__name__)
        err = _parser_error(status, exc)
        resp = web.Response(status=status, body=json.dumps(err.body()).encode(), content_type="application/json")
        resp.force_close()
        return resp


    def log_exception(self, *args, **kw) -> None:
        # After a handler answered a body that fails to decode (400, Connection: close), aiohttp
        # drains the rest of it, which fails again and is logged as an unhandled exception with a
        # traceback: the client's bad bytes, not a bug. One line, no traceback.
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):
            log.info("request body could not be read (%s); connection closed", str(exc).split("\n", 1)[0])
            return
        super().log_exception(*args, **kw)


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose connections answer parser errors in OpenAI's shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server          # same state; only the protocol it makes differs
        return server


def runner(app: web.Application, grace_seconds: float) -> Runner:
    # aiohttp waits for an open handler twice at shutdown, each time up to shutdown_timeout: for
    # it to finish, then again after failing its body read. A stream never reads its body again,
    # so it would get twice the grace; half each keeps every request within the grace.
    return Runner(app, access_log=None, handler_cancellation=True, shutdown_timeout=grace_seconds / 2)


async def _serve(app: web.Application, host: str, port: int, grace_seconds: float,
                 listening: Callable[[], None], sockets: list[socket.socket] | None) -> None:
    run = runner(app, grace_seconds)
    await run.setup()
    try:
        sites = [web.SockSite(run, s) for s in sockets] if sockets else [web.TCPSite(run, host, port)]
        for site in sites:
            await site.start()
        listening()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: open requests have %g s to finish", grace_seconds)
    finally:
        await run.cleanup()


def run(app: web.Application, host: str, port: int, grace_seconds: float,
        listening: Callable[[], None] = lambda: None, *, sockets: list[socket.socket] | None = None,
        loop: str = "auto") -> None:
    """Serve until SIGTERM or SIGINT, then shut down within the grace period. `sockets`: already
    listening sockets (a worker's, from workers.listen) instead of binding host:port; `loop`:
    auto (uvloop when installed), uvloop or asyncio."""
    from .workers import event_loop
    ev = event_loop(loop)
    asyncio.set_event_loop(ev)
    try:
        ev.run_until_complete(_serve(app, host, port, grace_seconds, listening, sockets))
    finally:
        ev.run_until_complete(ev.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        ev.close()
