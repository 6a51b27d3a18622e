"""A bare aiohttp pass-through: the floor any aiohttp-based proxy pays, for bench/proxy_bench.py.

    python bench/passthrough.py --port 8790 --upstream http://127.0.0.1:9100 [--host 127.0.0.1] [--loop uvloop]

POST /v1/chat/completions: read the request body, POST it unchanged to
<upstream>/v1/chat/completions with one shared aiohttp.ClientSession (TCPConnector limit=0,
auto_decompress=False), and answer with the upstream's status, body and Content-Type. A
`text/event-stream` answer is streamed through with web.StreamResponse, one write per
`iter_any()` read. No auth, no budget, no JSON parsing, no header copying beyond Content-Type.
The server runs as the proxy's does (`web.run_app`, no access log, handler cancellation on), on
asyncio's event loop or uvloop's (`--loop`), so the proxy is compared with a pass-through on the
same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
TARGET = web.AppKey("target", str)


async def chat(request: web.Request) -> web.StreamResponse:
    data = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    accept = request.headers.get("Accept")
    if accept:
        headers["Accept"] = accept
    async with request.app[SESSION].post(request.app[TARGET], data=data, headers=headers) as up:
        ctype = up.headers.get("Content-Type", "application/octet-stream")
        if up.content_type == "text/event-stream":
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        body = await up.read()
        return web.Response(status=up.status, body=body, headers={"Content-Type": ctype})


async def _session(app: web.Application):
    connector = aiohttp.TCPConnector(limit=0)
    app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    yield
    await app[SESSION].close()


def build_app(upstream: str) -> web.Application:
    app = web.Application()
    app[TARGET] = upstream.rstrip("/") + "/v1/chat/completions"
    app.router.add_post("/v1/chat/completions", chat)
    app.cleanup_ctx.append(_session)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:9100")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(build_app(args.upstream), host=args.host, port=args.port, access_log=None,
                handler_cancellation=True, print=None, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
