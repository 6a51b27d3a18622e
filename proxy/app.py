"""The aiohttp application: routes, the one place errors become responses, and lifetimes.

Resources with a lifetime (the task tracker, the upstream sessions, the store, the ledger, the
observer, the gateway, the background jobs) are each opened and closed in their own
`cleanup_ctx`, in that order, under their own AppKey.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import threading
from typing import AsyncIterator, Optional

from aiohttp import web

from . import admin_routes, alerts, auth, health, metrics, passthrough, server
from .admin import AdminGate
from . import config as config_mod
from . import policy as policy_mod
from . import watch
from .errors import ApiError, BudgetProxyError, ConfigError, NotFound
from .endpoints import ENDPOINTS
from .gateway import Gateway
from .ledger import Ledger
from .loopback import loopback_host
from .observer import Observer
from .stores import Store, open_store
from .tasks import Tasks
from .tokens import TokenCounter
from .upstream import Upstreams

log = logging.getLogger("proxy")

TASKS = web.AppKey("tasks", Tasks)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
STORE = web.AppKey("store", Optional[Store])         # None when enforcement is disabled
LEDGER = web.AppKey("ledger", Optional[Ledger])
OBSERVER = web.AppKey("observer", Observer)
GATEWAY = web.AppKey("gateway", Gateway)
_POST_ONLY = frozenset("/v1" + e.path for e in ENDPOINTS.values())
_ANTHROPIC_PATHS = tuple("/v1" + e.path for e in ENDPOINTS.values() if e.api == "anthropic")
SWEEP_SECONDS = 5.0
GC_YOUNG = 10_000                   # new objects before a young collection (see _freeze_gc)
SHUTDOWN_GRACE_SECONDS = 10.0


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), headers=headers,
                        content_type="application/json")


def _error(request: web.Request, err: ApiError, headers: dict | None = None) -> web.Response:
    """In the shape of the API the client speaks: Anthropic's below /v1/messages, else OpenAI's."""
    body = err.anthropic_body() if request.path.startswith(_ANTHROPIC_PATHS) else err.body()
    return _json(err.status, body, headers)


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    """The one place an error becomes a response, in the shape of the API the client speaks
    (called from an `except` block: an unexpected error is logged with its traceback)."""
    if isinstance(exc, ApiError):
        return _error(request, exc, exc.headers)
    if isinstance(exc, web.HTTPException):          # 4xx/5xx; the callers re-raise the rest
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        err = ApiError(exc.reason or "error", status=exc.status, code=code)
        return _error(request, err, {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
    # The last line of defence: a bug, not the client's fault.
    log.exception("unhandled error on %s %s", request.method, request.path)
    err = ApiError("The proxy failed to process the request.", status=500, type="api_error",
                   code="internal_error")
    return _error(request, err)


@web.middleware
async def errors(request: web.Request, handler) -> web.StreamResponse:
    """Errors as responses, alone (apps built around one handler in tests); the proxy's own app
    does this in `fronted`, around each route's handler."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(request, exc)
    except Exception as exc:  # noqa: BLE001 - ApiError, or a bug: see _error_response
        return _error_response(request, exc)


def _check_open_auth_host(request: web.Request) -> None:
    """With open auth allowed only because the proxy listens on loopback (no keys, no
    `allow_open_auth`), /v1 answers only requests addressed to a loopback Host: a page in the
    operator's browser that rebinds its domain to 127.0.0.1 must not spend the upstream key."""
    config = request.app[GATEWAY].config
    if not config.keys and not config.allow_open_auth and not loopback_host(request.headers.get("Host")):
        raise ApiError("With no API keys configured the proxy answers only requests addressed to "
                       "localhost (the Host header must be localhost, 127.0.0.1 or [::1]).",
                       status=403, type="permission_error", code="host_not_allowed")


def fronted(handler, label: str | None = None, v1: bool = False):
    """`handler` with what every answer of the app goes through, in this order: the open-auth
    Host check (on the /v1 routes: `v1`), errors turned into responses (`_error_response`), and
    the answer counted once, errors included (a redirect or a client gone too:
    `metrics.answered`), under `label` (the route's path; by default looked up on the request).

    Wrapped around each route's handler when it is added (`build_app`'s `route`), not an aiohttp
    middleware: an app with a middleware runs every request through two more layers (aiohttp's
    `_fix_request_current_app` and the middleware, a partial, a coroutine and an await each),
    3.5 % of the proxy's instructions per request (bench/instructions.py). The router's own 404 and
    405 come here too, from a last catch-all route (`unmatched`)."""
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            if v1:
                _check_open_auth_host(request)
            resp = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:                        # redirects and the like pass through
                metrics.answered(request, exc.status, label)
                raise
            resp = _error_response(request, exc)
        except asyncio.CancelledError:                  # the client went away: nginx's "client closed request"
            metrics.answered(request, 499, label)
            raise
        except Exception as exc:  # noqa: BLE001 - ApiError, or a bug: see _error_response
            resp = _error_response(request, exc)
        metrics.answered(request, resp.status, label)
        return resp
    return answer


async def unmatched(request: web.Request) -> web.StreamResponse:
    """What aiohttp's router answers for a URL no route takes, as the same exceptions: a 405 naming
    the methods of the routes that match the path, else a 404 (the last route, `/{tail}`). A
    request target that is not a path (`OPTIONS *`, `CONNECT host:port`) reaches no route, this
    one included: aiohttp answers it a text/plain 404 itself, not counted."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != "/{tail}":
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


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
    app = web.Application(client_max_size=cfg.max_body_bytes)
    tokens = tokens or TokenCounter.load()          # blocking, once, before serving
    models = {"for": None, "body": b""}             # /v1/models, rendered once per config

    async def upstreams(app: web.Application) -> AsyncIterator[None]:
        app[UPSTREAMS] = Upstreams(cfg)
        await app[UPSTREAMS].open()
        yield
        await app[UPSTREAMS].close()

    async def tasks(app: web.Application) -> AsyncIterator[None]:
        """The one owner of background work: settlements, lost-reserve undos, lease extensions,
        batched store calls, alert deliveries. Drained (bounded) before the store closes."""
        app[TASKS] = Tasks()
        yield
        await app[TASKS].drain(SHUTDOWN_GRACE_SECONDS)      # a no-op after the store's drain

    async def store(app: web.Application) -> AsyncIterator[None]:
        """The budget store; before it closes, the work that may still need it is drained."""
        app[STORE] = None if cfg.enforcement == "disabled" else \
            open_store(cfg.store_url, cfg.namespace, tasks=app[TASKS], log_length=cfg.log_records)
        yield
        if app[STORE] is not None:
            await app[TASKS].drain(SHUTDOWN_GRACE_SECONDS)
            await app[STORE].close()

    async def ledger(app: web.Application) -> AsyncIterator[None]:
        """None when enforcement is disabled: the store is never contacted."""
        kwargs = {"clock": clock} if clock else {}
        app[LEDGER] = None if app[STORE] is None else \
            Ledger(app[STORE], policy, namespace=cfg.namespace, tasks=app[TASKS], **kwargs)
        yield

    async def observer(app: web.Application) -> AsyncIterator[None]:
        """Metrics, the recent-refusal ring and alerts (whose sender has its own tasks and session)."""
        if app[LEDGER] is None:
            app[OBSERVER] = Observer()
            yield
            return
        sender = alerts.Sender()
        await sender.open()
        app[OBSERVER] = Observer(alerts.Alerts(app[LEDGER], app[TASKS], sender))
        yield
        await sender.close()

    async def gateway(app: web.Application) -> AsyncIterator[None]:
        app[GATEWAY] = Gateway(cfg, app[LEDGER], tokens, app[UPSTREAMS], app[TASKS], app[OBSERVER])
        yield

    def route(method: str, path: str, handler, label: str | None = None) -> None:
        """Every route is added here, its handler wrapped by `fronted` (GET answers HEAD too)."""
        v1 = path.startswith("/v1/")
        app.router.add_route(method, path, fronted(handler, label, v1))
        if method == "GET":
            app.router.add_route("HEAD", path, fronted(handler, label, v1))

    def endpoint(kind: str):
        # A function returning the gateway's coroutine, not a coroutine of its own: one layer less.
        return lambda request: request.app[GATEWAY].handle(request, kind)

    async def list_models(request: web.Request) -> web.Response:
        config = request.app[GATEWAY].config
        auth.authenticate(request.headers.get("Authorization"), config.keys)
        if models["for"] is not config:
            models["for"], models["body"] = config, _models_body(config)
        return web.Response(body=models["body"], content_type="application/json")

    async def not_found(request: web.Request) -> web.Response:
        if request.path in _POST_ONLY:
            raise ApiError(f"Method {request.method} is not allowed for {request.path}; use POST.",
                           status=405, code="method_not_allowed", headers={"Allow": "POST"})
        raise NotFound(f"Invalid URL ({request.method} {request.path})", code="unknown_url")

    async def healthz(request: web.Request) -> web.Response:
        # pid: with --workers N each worker answers for itself (its own stats)
        return _json(200, {"status": "ok", "enforcement": cfg.enforcement, "pid": os.getpid(),
                           "stats": _stats(request.app[GATEWAY]),
                           "reload_failures": dict(watch.failures)})

    async def readyz(request: web.Request) -> web.Response:
        return await health.readyz(request.app[LEDGER], cfg.namespace)

    async def scrape(request: web.Request) -> web.Response:
        return await metrics.scrape(request.app[GATEWAY].config, request.app[LEDGER])

    for kind, e in ENDPOINTS.items():
        route("POST", "/v1" + e.path, endpoint(kind), "/v1" + e.path)

    def relayed(handler):
        """A pass-through handler (never charged) with the live config and upstream sessions."""
        async def relay(request: web.Request) -> web.StreamResponse:
            return await handler(request, request.app[GATEWAY].config, request.app[UPSTREAMS])
        return relay

    stored = relayed(passthrough.stored_response)
    route("GET", "/v1/responses/{id}", stored)
    route("DELETE", "/v1/responses/{id}", stored)
    route("GET", "/v1/responses/{id}/input_items", stored)
    route("POST", "/v1/messages/count_tokens", relayed(passthrough.count_tokens))
    route("GET", "/v1/models", list_models)
    route("GET", "/healthz", healthz)
    route("GET", "/readyz", readyz)
    route("GET", "/metrics", scrape)
    # The catch-alls take any path, newlines (%0A) included: `.*` stops at one, which would leave
    # such a URL to aiohttp's own text/plain 404, uncounted.
    route("*", r"/v1/{tail:[\s\S]*}", not_found)
    # Admin keys follow config reloads; in prod the admin endpoints answer 404 while none is set.
    admin_routes.add(route, AdminGate(lambda: app[GATEWAY].config.admin_keys, cfg.environment), LEDGER, OBSERVER)
    route("*", r"/{tail:[\s\S]*}", unmatched, "unmatched")     # last: what no other route takes
    app.cleanup_ctx.extend([tasks, upstreams, store, ledger, observer, gateway, _background])
    app.on_startup.append(_freeze_gc)
    app.on_cleanup.append(_last_counts)        # after every cleanup_ctx: settlements drained
    return app


def _stats(gateway: Gateway) -> dict[str, int]:
    """The gateway's counters; `job_failures` counts failed rounds of every background job (lease
    sweeps here, file reloads in watch.failures): a job that fails logs it and carries on."""
    stats = dict(gateway.stats)
    stats["job_failures"] = stats.get("job_failures", 0) + sum(watch.failures.values())
    return stats


async def _freeze_gc(app: web.Application) -> None:
    """Move everything built at start-up (config, tokenizer tables, modules) out of the
    collector's reach: full collections over it stalled the loop 13-34 ms under load; after
    this they take 1.5-3 ms (bench/profile_proxy.py).

    Then a young collection waits for GC_YOUNG net new objects instead of CPython's 700. A
    request makes a few hundred objects that nearly all die with it, by reference count: at 700
    the collector ran every request or two and walked the open requests' objects each time
    (about 20 µs of CPU per request under wrk, timed by gc callbacks, memory and Redis stores
    alike); at 10,000 it runs about 50 times less often, ~2 µs a request. End to end that was
    x0.87 CPU per request on the memory store, no change visible on Redis
    (bench/results/hotpath-2.md). Cyclic garbage waits longer for it: a few MB at most."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


async def _last_counts(app: web.Application) -> None:
    """The metric tallies of a stopping worker, to its files: the settlements drained at shutdown
    counted after the flusher's last round (a forked worker ends with os._exit: no atexit)."""
    metrics.flush()


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Periodic jobs of a live proxy: settling dead processes' leases, reloading the policy and
    config.yaml (at once on SIGHUP), and with several workers writing the metric tallies to the
    shared files."""
    ledger, gateway = app[LEDGER], app[GATEWAY]
    stop, hup = asyncio.Event(), asyncio.Event()
    jobs = [asyncio.create_task(_watch_config(gateway, stop, hup)), asyncio.create_task(metrics.flusher(stop))]
    if ledger is not None:
        jobs.append(asyncio.create_task(_sweep(ledger, stop, gateway.stats)))
        jobs.append(asyncio.create_task(_watch_policy(ledger, stop)))
    hup_handled = _on_sighup(hup.set)
    yield
    if hup_handled:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    # Ask, then insist, then stop waiting: shutdown must not hang on a job stuck in a store call.
    stop.set()
    for job in jobs:
        job.cancel()
    await asyncio.wait(jobs, timeout=SHUTDOWN_GRACE_SECONDS)


def _on_sighup(callback) -> bool:
    """SIGHUP re-reads config.yaml at once (where the platform has it and we own the signals)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError):
        return False
    return True


async def _sweep(ledger: Ledger, stop: asyncio.Event, stats) -> None:
    """Settle reservations whose process died; any live proxy does it for all. A failed round
    (the store away, or a bug) is logged and counted, and the next one runs."""
    while not stop.is_set():
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            while await ledger.sweep() == 100:
                pass
        except BudgetProxyError as exc:
            stats["job_failures"] += 1
            metrics.JOB_FAILURES.labels("sweep").inc()
            log.warning("lease sweep failed: %s", exc)
        except Exception:  # noqa: BLE001 - the sweeper must outlive any one bad round
            stats["job_failures"] += 1
            metrics.JOB_FAILURES.labels("sweep").inc()
            log.exception("lease sweep failed")


async def _watch_policy(ledger: Ledger, stop: asyncio.Event) -> None:
    """Reload the policy file when it changes; an invalid edit keeps the running policy."""
    def apply(policy: policy_mod.Policy) -> None:
        ledger.policy = policy
    await watch.watch("policy", ledger.policy.source, policy_mod.load, apply, stop)


async def _watch_config(gateway: Gateway, stop: asyncio.Event, hup: asyncio.Event) -> None:
    """Reload config.yaml when it changes or on SIGHUP: keys, models, prices, routes and
    providers are swapped whole; what needs a restart is logged and left as it runs."""
    def apply(fresh: config_mod.Config) -> None:
        running = gateway.config
        later = config_mod.restart_needed(running, fresh)
        if later:
            log.warning("config.yaml: %s changed; that takes a restart (the rest applies now)", ", ".join(later))
            fresh = dataclasses.replace(fresh, **{f: getattr(running, f) for f in later})
        gateway.reconfigure(fresh)
    await watch.watch("config", gateway.config.source, config_mod.load, apply, stop, hup)


def load(config_path: str) -> tuple[config_mod.Config, policy_mod.Policy]:
    cfg = config_mod.load(config_path)
    pol = policy_mod.load_for(cfg.environment, cfg.policies_dir, cfg.policy_path)
    if not cfg.keys:
        log.warning("no API keys configured: auth is OPEN (any bearer is accepted as org 'default'); "
                    "configure `keys` before exposing the proxy")
    if not cfg.admin_keys:
        log.warning("no admin_keys configured: %s", "the admin endpoints are off (prod)" if cfg.environment == "prod"
                    else "/admin/ answers only on loopback, without authentication")
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
        host, port = host or cfg.host, port or cfg.port
        config_mod.check_exposure(cfg, host)
    except ConfigError as exc:
        print(f"budget-proxy: {exc}", file=sys.stderr)
        return 2
    refusal = workers_mod.refusal(cfg.store_url if cfg.enforcement != "disabled" else None, workers, loop)
    if refusal:
        print(f"budget-proxy: {refusal}", file=sys.stderr)
        return 2
    log.info("environment %s, enforcement %s, store %s, policy %s, %d worker(s)", cfg.environment,
             cfg.enforcement, cfg.store_url.split("://")[0] + "://…", pol.source, workers)

    def run(sockets=None) -> None:
        server.run(build_app(cfg, pol), host, port, cfg.shutdown_grace_seconds, lambda: log.info(
            "listening on http://%s:%s/v1 (event loop: %s)", host, port,
            type(asyncio.get_running_loop()).__module__.split(".")[0]), sockets=sockets, loop=loop)

    if workers == 1:
        run()
        return 0
    try:
        sockets = workers_mod.listen(host, port, workers)
    except OSError as exc:
        print(f"budget-proxy: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return workers_mod.supervise(sockets, run)
