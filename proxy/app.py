"""The aiohttp application: routes, the one place errors become responses, and lifetimes.

Resources with a lifetime (the upstream sessions, the ledger and its store, the task tracker,
the gateway, the background jobs) are each opened and closed in their own `cleanup_ctx`, in that
order, under their own AppKey.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
from typing import AsyncIterator, Optional

from aiohttp import web

from . import auth
from . import config as config_mod
from . import policy as policy_mod
from .errors import ApiError, BudgetProxyError, ConfigError, NotFound
from .endpoints import ENDPOINTS
from .gateway import Gateway
from .ledger import Ledger
from .stores import open_store
from .tasks import Tasks
from .tokens import TokenCounter
from .upstream import Upstreams

log = logging.getLogger("proxy")

TASKS = web.AppKey("tasks", Tasks)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
LEDGER = web.AppKey("ledger", Optional[Ledger])      # None when enforcement is disabled
GATEWAY = web.AppKey("gateway", Gateway)
_POST_ONLY = frozenset("/v1" + e.path for e in ENDPOINTS.values())
POLICY_POLL_SECONDS = 2.0
SWEEP_SECONDS = 5.0
SHUTDOWN_GRACE_SECONDS = 10.0


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), headers=headers,
                        content_type="application/json")


@web.middleware
async def errors(request: web.Request, handler) -> web.StreamResponse:
    """The one place an error becomes a response, always in OpenAI's shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.status, exc.body(), exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        err = ApiError(exc.reason or "error", status=exc.status, code=code)
        return _json(exc.status, err.body(), {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
    except Exception:  # noqa: BLE001 - the last line of defence: a bug, not the client's fault
        log.exception("unhandled error on %s %s", request.method, request.path)
        err = ApiError("The proxy failed to process the request.", status=500, type="api_error",
                       code="internal_error")
        return _json(500, err.body())


def _models_body(cfg: config_mod.Config) -> bytes:
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "budget-proxy"} for name in cfg.routes]
    data += [{"id": name, "object": "model", "created": 0, "owned_by": m.provider}
             for name, m in cfg.models.items()]
    return json.dumps({"object": "list", "data": data}).encode()


def build_app(cfg: config_mod.Config, policy: policy_mod.Policy, *, tokens: TokenCounter | None = None,
              clock=None) -> web.Application:
    """The app. Each resource with a lifetime is opened before the `yield` of its own cleanup
    context and closed after it, under its own AppKey. Teardown runs in reverse: background jobs
    stop, running settlements drain (they need the store), then the store and the upstream
    sessions close."""
    app = web.Application(middlewares=[errors], client_max_size=cfg.max_body_bytes)
    tokens = tokens or TokenCounter.load()          # blocking, once, before serving
    models = _models_body(cfg)

    async def upstreams(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAMS] = Upstreams(cfg)
        await app[UPSTREAMS].open()
        yield
        await app[UPSTREAMS].close()

    async def ledger(app: web.Application) -> AsyncIterator[None]:
        if cfg.enforcement == "disabled":
            app[LEDGER] = None
            yield
            return
        kwargs = {"clock": clock} if clock else {}
        app[LEDGER] = Ledger(open_store(cfg.store_url, cfg.namespace), policy, namespace=cfg.namespace, **kwargs)
        yield
        await app[LEDGER].store.close()

    async def tasks(app: web.Application) -> AsyncIterator[None]:
        app[TASKS] = Tasks()
        yield
        pending = set(app[LEDGER].pending) if app[LEDGER] is not None else set()
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_GRACE_SECONDS)
        await app[TASKS].drain(SHUTDOWN_GRACE_SECONDS)

    async def gateway(app: web.Application) -> AsyncIterator[None]:
        app[GATEWAY] = Gateway(cfg, app[LEDGER], tokens, app[UPSTREAMS], app[TASKS])
        yield

    def endpoint(kind: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            return await request.app[GATEWAY].handle(request, kind)
        return handler

    async def list_models(request: web.Request) -> web.Response:
        auth.authenticate(request.headers.get("Authorization"), cfg.keys)
        return web.Response(body=models, content_type="application/json")

    async def not_found(request: web.Request) -> web.Response:
        if request.path in _POST_ONLY:
            raise ApiError(f"Method {request.method} is not allowed for {request.path}; use POST.",
                           status=405, code="method_not_allowed", headers={"Allow": "POST"})
        raise NotFound(f"Invalid URL ({request.method} {request.path})", code="unknown_url")

    async def healthz(request: web.Request) -> web.Response:
        # pid: with --workers N each worker answers for itself (its own stats)
        return _json(200, {"status": "ok", "enforcement": cfg.enforcement, "pid": os.getpid(),
                           "stats": dict(request.app[GATEWAY].stats)})

    for kind, e in ENDPOINTS.items():
        app.router.add_post("/v1" + e.path, endpoint(kind))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/v1/{tail:.*}", not_found)
    app.cleanup_ctx.extend([upstreams, ledger, tasks, gateway, _background])
    app.on_startup.append(_freeze_gc)
    return app


async def _freeze_gc(app: web.Application) -> None:
    """Move everything built at start-up (config, tokenizer tables, modules) out of the
    collector's reach: full collections over it stalled the loop 13-34 ms under load; after
    this they take 1.5-3 ms (bench/profile_proxy.py)."""
    gc.collect()
    gc.freeze()


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Periodic jobs of a live proxy: settling dead processes' leases, reloading the policy."""
    ledger = app[LEDGER]
    stop = asyncio.Event()
    jobs = []
    if ledger is not None:
        jobs.append(asyncio.create_task(_sweep(ledger, stop)))
        jobs.append(asyncio.create_task(_watch_policy(ledger, stop)))
    yield
    # Ask, then insist, then stop waiting: shutdown must not hang on a job stuck in a store call.
    stop.set()
    for job in jobs:
        job.cancel()
    if jobs:
        await asyncio.wait(jobs, timeout=SHUTDOWN_GRACE_SECONDS)


async def _sweep(ledger: Ledger, stop: asyncio.Event) -> None:
    """Settle reservations whose process died; any live proxy does it for all."""
    while not stop.is_set():
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            while await ledger.sweep() == 100:
                pass
        except BudgetProxyError as exc:
            log.warning("lease sweep failed: %s", exc)


def _stamp(path: str) -> tuple[float, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size)


async def _watch_policy(ledger: Ledger, stop: asyncio.Event) -> None:
    """Reload the policy file when it changes; an invalid edit keeps the running policy."""
    path = ledger.policy.source
    seen = _stamp(path)
    while not stop.is_set():
        await asyncio.sleep(POLICY_POLL_SECONDS)
        now = _stamp(path)
        if now == seen or now is None:
            continue
        seen = now
        try:
            ledger.policy = await asyncio.to_thread(policy_mod.load, path)
            log.info("policy reloaded from %s", path)
        except ConfigError as exc:
            log.error("policy change rejected, keeping the running policy: %s", exc)


def load(config_path: str) -> tuple[config_mod.Config, policy_mod.Policy]:
    cfg = config_mod.load(config_path)
    pol = policy_mod.load_for(cfg.environment, cfg.policies_dir, cfg.policy_path)
    if not cfg.keys:
        log.warning("no API keys configured: auth is OPEN (any bearer is accepted as org 'default'); "
                    "configure `keys` before exposing the proxy")
    return cfg, pol


def serve(config_path: str, host: str | None = None, port: int | None = None, *, workers: int = 1,
          loop: str = "auto") -> int:
    """Run the proxy until SIGTERM/SIGINT: in this process, or with `workers` > 1 in that many
    forked worker processes sharing the port (proxy/workers.py says how and why). `loop`: `auto`
    (uvloop when installed), `uvloop` or `asyncio`. The exit status: 2 for a config the proxy
    refuses, 1 when workers failed, 0 otherwise."""
    from . import workers as workers_mod
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s" if workers > 1 else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format=fmt)
    try:
        cfg, pol = load(config_path)
    except ConfigError as exc:
        print(f"budget-proxy: {exc}", file=sys.stderr)
        return 2
    refusal = workers_mod.refusal(cfg.store_url if cfg.enforcement != "disabled" else None, workers, loop)
    if refusal:
        print(f"budget-proxy: {refusal}", file=sys.stderr)
        return 2
    host, port = host or cfg.host, port or cfg.port
    log.info("environment %s, enforcement %s, store %s, policy %s, %d worker(s)", cfg.environment,
             cfg.enforcement, cfg.store_url.split("://")[0] + "://…", pol.source, workers)

    def run(**where) -> None:
        web.run_app(build_app(cfg, pol), **where, loop=workers_mod.event_loop(loop), access_log=None,
                    handler_cancellation=True, print=lambda *_: log.info(
                        "listening on http://%s:%s/v1 (event loop: %s)", host, port,
                        type(asyncio.get_running_loop()).__module__.split(".")[0]))

    if workers == 1:
        run(host=host, port=port)
        return 0
    try:
        sockets = workers_mod.listen(host, port, workers)
    except OSError as exc:
        print(f"budget-proxy: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return workers_mod.supervise(sockets, lambda socks: run(sock=socks))
