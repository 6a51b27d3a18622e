"""Prometheus metrics, every name prefixed `budget_proxy_`.

Counters and histograms live in prometheus_client's default registry. When several worker
processes serve one port, each process counts into its own files under PROMETHEUS_MULTIPROC_DIR
and a scrape (answered by any worker) sums them all: prometheus_client picks that mode when the
variable is set *before this module is imported*, so `serve --workers N` sets it to a fresh
temporary directory before it builds the app. Without it, one process, the default registry.

Either way the per-request hooks count into plain-number tallies, added to prometheus_client's
metrics by `flush`: at every scrape (the answering process's own), and with several workers also
every FLUSH_SECONDS on each worker's loop (the `flusher` job), at shutdown and at exit. So a
scrape answered by one worker shows another worker's counts as of at most FLUSH_SECONDS ago — far
inside any scrape interval — and writing the files per increment (a lock and an mmap write per
value, 20-40 µs a request: bench/results/hotpath-3.md) is off the request path.

The remaining-budget ratios are not kept in process: each scrape reads them from the store (one
snapshot round trip), so every worker answers the same numbers. Cardinality stays bounded: they
cover the global scope, the orgs named in config.yaml and the policy, the configured providers and
models (never users or end users), and at most MAX_RATIO_SERIES series, closest to the limit first.
Other labels are config-bounded too (org, model, provider, endpoint) or fixed sets.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import time
from bisect import bisect_left
from typing import Iterable

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from .errors import StoreUnavailable

log = logging.getLogger(__name__)

# `*_created` series double every counter's series for a timestamp nobody graphs.
disable_created_metrics()

MAX_RATIO_SERIES = 500
RATIO_SCOPE_TYPES = ("global", "org", "provider", "model")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("budget_proxy_requests", "HTTP requests answered, by endpoint and status code.",
                   ["endpoint", "status"])
RESERVATIONS = Counter("budget_proxy_reservations", "Budget reservation decisions, by outcome: admitted, "
                       "refused, forced (shadow mode, over a limit), store_unavailable.", ["outcome"])
SPEND_USD = Counter("budget_proxy_spend_usd", "US dollars committed, by org and model used.", ["org", "model"])
SPEND_TOKENS = Counter("budget_proxy_spend_tokens", "Tokens committed, by org, model used and kind "
                       "(prompt, cached, completion).", ["org", "model", "kind"])
DOWNGRADES = Counter("budget_proxy_downgrades", "Requests routed to a cheaper model than the first "
                     "candidate, by from and to model.", ["from", "to"])
OVERRUNS = Counter("budget_proxy_overruns", "Commits above their reservation, by severity: warning "
                   "(over), critical (over 5x).", ["severity"])
STORE_SECONDS = Histogram("budget_proxy_store_seconds", "Latency of budget store calls, by operation.",
                          ["operation"], buckets=_LATENCY_BUCKETS)
UPSTREAM_SECONDS = Histogram("budget_proxy_upstream_seconds", "Time from sending a request upstream to "
                             "its response headers, by provider.", ["provider"], buckets=_LATENCY_BUCKETS)
JOB_FAILURES = Counter("budget_proxy_background_failures", "Failures of background jobs, by job "
                       "(sweep, policy_reload, settlement, alert_delivery, alert_check).", ["job"])
ALERTS = Counter("budget_proxy_alerts", "Alert deliveries, by outcome: delivered, failed (after "
                 "every retry), dropped (queue full).", ["outcome"])


def registry() -> CollectorRegistry:
    """What a scrape reads: every worker's files in multiprocess mode, else this process."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return REGISTRY
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=path)
    return reg


class _Fixed:
    """A collector of metric families computed before the scrape (from the store)."""

    def __init__(self, families: Iterable) -> None:
        self._families = list(families)

    def collect(self):
        return self._families


def remaining_ratios(balances) -> GaugeMetricFamily:
    """remaining / limit per limited (scope, window, unit), closest to the limit first, capped."""
    fam = GaugeMetricFamily("budget_proxy_budget_remaining_ratio",
                            "Share of a limit still available (0 = exhausted), for the global scope, "
                            "configured orgs, providers and models.",
                            labels=["scope_type", "scope_id", "window", "unit"])
    rows = sorted((b for b in balances if b.limit), key=lambda b: b.remaining / b.limit)
    for b in rows[:MAX_RATIO_SERIES]:
        fam.add_metric([b.scope.type, b.scope.id, b.window, b.unit], b.remaining / b.limit)
    return fam


def render(balances=()) -> bytes:
    """The exposition text: the process (or multiprocess) metrics plus the store's ratios (the
    tallies flushed first by the caller, on the loop: see `flush`)."""
    reg = registry()
    body = generate_latest(reg)
    if balances:
        extra = CollectorRegistry()
        extra.register(_Fixed([remaining_ratios(balances)]))
        body += generate_latest(extra)
    return body


def response(body: bytes) -> web.Response:
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def endpoint_label(request: web.Request) -> str:
    """The route's path, so unknown URLs cannot mint label values."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def answered(request: web.Request, status: int, label: str | None = None) -> None:
    """Count an answer (proxy/app.py's `fronted` calls it once per request, errors included; 499:
    the client went away first, nginx's "client closed request"), under `label` if given (the
    route's path, known where it was added), else the request's route's."""
    requests(label or endpoint_label(request), str(status)).inc()


class Timer:
    """`with Timer(STORE["reserve"]):` observes the block's wall time into a histogram child."""

    __slots__ = ("_hist", "_t0")

    def __init__(self, child) -> None:
        self._hist = child

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._hist.observe(time.perf_counter() - self._t0)


class Children:
    """A metric's labelled children, memoised: `.labels()` validates and takes a lock (about
    1 µs), and the hooks run several times per request. Bounded like the labels themselves.

    A child is a `_Pending` tally, added to prometheus_client's own by `flush`: a Counter's `inc`
    takes a lock and a Histogram's `observe` a lock per value it touches, about 10 µs a request
    in all in one process (bench/results/hotpath-2.md), and in multiprocess mode each of those
    values is also written to an mmap'ed file (20-40 µs a request)."""

    __slots__ = ("_metric", "_made")

    def __init__(self, metric) -> None:
        self._metric = metric
        self._made: dict[tuple[str, ...], object] = {}

    def __call__(self, *labels: str):
        child = self._made.get(labels)
        if child is None:
            child = self._made[labels] = _pending(self._metric.labels(*labels))
        return child


# Decided once, as prometheus_client decides its own mode: from the environment at import.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
FLUSH_SECONDS = 1.0
_PENDING: list = []


def _pending(child):
    tally = _PendingHistogram(child) if isinstance(child, Histogram) else _PendingCounter(child)
    _PENDING.append(tally)
    return tally


class _PendingCounter:
    """Increments of one Counter child since the last flush."""

    __slots__ = ("_child", "_n")

    def __init__(self, child) -> None:
        self._child = child
        self._n = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._n += amount

    def flush(self) -> None:
        if self._n:
            n, self._n = self._n, 0
            self._child.inc(n)


class _PendingHistogram:
    """Observations of one Histogram child since the last flush: per-bucket counts and the sum,
    bucketed as prometheus_client does (the first bucket whose upper bound is >= the value)."""

    __slots__ = ("_child", "_bounds", "_counts", "_sum")

    def __init__(self, child) -> None:
        self._child = child
        self._bounds = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._sum += amount
        self._counts[bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        counts, total = self._counts, self._sum
        if not any(counts):
            return
        self._counts, self._sum = [0] * len(counts), 0.0
        child = self._child
        child._sum.inc(total)
        for bucket, n in zip(child._buckets, counts):
            if n:
                bucket.inc(n)


def flush() -> None:
    """Add the tallies to prometheus_client's metrics (before a scrape reads them). On the event
    loop's thread, the one that counts (or after it has stopped: at exit)."""
    for tally in _PENDING:
        tally.flush()


async def flusher(stop: asyncio.Event) -> None:
    """With several workers, each one's tallies reach its files every FLUSH_SECONDS, so another
    worker's scrape sees them; once more when the worker stops. A no-op in one process, where
    only this process's scrapes read them (and flush first)."""
    if not MULTIPROCESS:
        return
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), FLUSH_SECONDS)
            except asyncio.TimeoutError:
                pass
            flush()
    finally:
        flush()


if MULTIPROCESS:
    atexit.register(flush)      # a process that counts without serving (or ends without a stop)


STORE = {op: _pending(STORE_SECONDS.labels(op)) for op in ("reserve", "commit", "release", "snapshot")}
requests = Children(REQUESTS)
reservations = Children(RESERVATIONS)
spend_usd = Children(SPEND_USD)
spend_tokens = Children(SPEND_TOKENS)
downgrades = Children(DOWNGRADES)
overruns = Children(OVERRUNS)
upstream = Children(UPSTREAM_SECONDS)


def ratio_scopes(config, policy) -> list:
    """The scopes whose remaining ratios are exported: global, every org named in config.yaml's
    keys or the policy's overrides (`default` too when auth is open), every provider and model."""
    from .auth import OPEN_ORG
    from .ledger import Scope
    orgs = {k.org for k in config.keys.values()} | {i for t, i in policy.overrides if t == "org"}
    if not config.keys:
        orgs.add(OPEN_ORG)
    return [Scope("global", "*"), *(Scope("org", o) for o in sorted(orgs)),
            *(Scope("provider", p) for p in config.providers), *(Scope("model", m) for m in config.models)]


async def scrape(config, ledger) -> web.Response:
    """GET /metrics. If the store is down the ratios are left out (the rest still answers)."""
    balances = []
    if ledger is not None:
        try:
            with Timer(STORE["snapshot"]):
                balances = await ledger.snapshot(ratio_scopes(config, ledger.policy), limited_only=True)
        except StoreUnavailable as exc:
            log.warning("metrics: remaining ratios left out, the store is unavailable: %s", exc)
    flush()
    # Multiprocess mode reads every worker's files: off the event loop.
    return response(await asyncio.to_thread(render, balances))
