"""GET /metrics: Prometheus text from prometheus_client, bounded labels, correct across workers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics, pricing
from proxy.app import OBSERVER
from proxy.ledger import Scope

from . import harness

MSGS = [{"role": "user", "content": "Say hello."}]


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(h) -> dict[tuple, float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(h.proxy.make_url("/metrics")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=")
            return samples(await r.text())


def requests_total(got, endpoint: str, status: str) -> float:
    return got.get(("budget_proxy_requests_total", (("endpoint", endpoint), ("status", status))), 0.0)


async def test_requests_are_counted_by_route_and_status_and_ratios_come_from_the_store(store_url, tokens):
    policy = {"defaults": {"org": {"day": {"tokens": 10_000}}, "user": {"day": {"tokens": 5_000}},
                           "global": {"month": {"usd": 50}}}}
    h = await harness.start(store_url, policy, tokens)
    try:
        before = await scrape(h)
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=20)
        async with aiohttp.ClientSession() as s:
            for path in ("/v1/nope/1", "/v1/nope/2"):
                async with s.get(h.proxy.make_url(path)) as r:
                    assert r.status == 404
        await h.settled()
        after = await scrape(h)
        assert requests_total(after, "/v1/chat/completions", "200") - \
            requests_total(before, "/v1/chat/completions", "200") == 1
        # Unknown URLs count under their route's pattern: they cannot mint label values.
        assert requests_total(after, "/v1/{tail}", "404") - requests_total(before, "/v1/{tail}", "404") == 2
        assert not any("/v1/nope" in str(labels) for _, labels in after)

        acme = {(b.window, b.unit): b for b in await h.gateway.ledger.snapshot([Scope("org", "acme")])}
        day = acme[("day", "tokens")]
        assert day.used > 0
        ratio = after[("budget_proxy_budget_remaining_ratio",
                       (("scope_id", "acme"), ("scope_type", "org"), ("unit", "tokens"), ("window", "day")))]
        assert ratio == day.remaining / day.limit
        assert ("budget_proxy_budget_remaining_ratio",
                (("scope_id", "*"), ("scope_type", "global"), ("unit", "usd"), ("window", "month"))) in after
        # Users are limited too, but never exported: unbounded cardinality.
        assert not any(name == "budget_proxy_budget_remaining_ratio" and ("scope_type", "user") in labels
                       for name, labels in after)
    finally:
        await harness.stop(h)


def test_every_metric_is_prefixed_and_documented_in_the_readme():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    names = [fam.name for fam in text_string_to_metric_families(metrics.render().decode())]
    names.append("budget_proxy_budget_remaining_ratio")
    for name in names:
        if not name.startswith("budget_proxy_"):
            continue                                      # python_/process_ collectors of the default registry
        assert f"`{name}" in readme, f"{name} is not documented in README.md"
    assert {n for n in names if n.startswith("budget_proxy_")} >= {
        "budget_proxy_requests", "budget_proxy_reservations", "budget_proxy_spend_usd", "budget_proxy_spend_tokens",
        "budget_proxy_downgrades", "budget_proxy_overruns", "budget_proxy_store_seconds",
        "budget_proxy_upstream_seconds", "budget_proxy_background_failures", "budget_proxy_alerts"}


def counted_by(tmp_path, monkeypatch, code: str, *argvs: tuple[str, ...], says: str | None = None) -> dict:
    """Run `code` as worker processes in multiprocess mode (one per argv, or one), each ending by
    writing `says` when given; then the samples a scrape in this process reads from their files."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for argv in argvs or ((),):
        run = subprocess.run([sys.executable, "-c", code, *argv], env=env, check=True, timeout=120,
                             capture_output=True, text=True)
        if says is not None:
            assert run.stdout == says, run.stderr
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return samples(metrics.render().decode())


WORKER = """
import sys
from proxy import metrics, pricing
from proxy.app import OBSERVER
metrics.REQUESTS.labels("/v1/chat/completions", "200").inc(int(sys.argv[1]))
metrics.SPEND_USD.labels("acme", "gpt-4o").inc(float(sys.argv[1]) / 100)
"""


def test_several_worker_processes_are_summed_in_multiprocess_mode(tmp_path, monkeypatch):
    got = counted_by(tmp_path, monkeypatch, WORKER, ("3",), ("4",))
    assert got[("budget_proxy_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 7
    assert abs(got[("budget_proxy_spend_usd_total", (("model", "gpt-4o"), ("org", "acme")))] - 0.07) < 1e-9


def value(got, name: str, **labels) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_spend_reservations_latencies_downgrades_and_refusals_are_counted(store_url, tokens):
    policy = {"defaults": {"user": {"day": {"tokens": 100_000}}},
              "overrides": {"model": {"gpt-4o": {"day": {"tokens": 5}}},        # smart -> gpt-4o-mini
                            "user": {"acme/capped": {"day": {"tokens": 1}}}}}
    h = await harness.start(store_url, policy, tokens)
    h.fake.cached_prompt = 4
    try:
        before = await scrape(h)
        client = h.client()
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=20)
        raw = await client.chat.completions.with_raw_response.create(model="smart", messages=MSGS, max_tokens=20)
        assert raw.headers["x-budget-downgraded-from"] == "gpt-4o"
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=20, user="capped")
        except Exception as exc:                                    # noqa: BLE001 - asserted below
            assert getattr(exc, "status_code", None) == 429
        else:
            raise AssertionError("the capped user was not refused")
        await h.settled()
        after = await scrape(h)

        prompt = sum(u["prompt_tokens"] for u in h.fake.reported)
        completion = sum(u["completion_tokens"] for u in h.fake.reported)
        mini = "gpt-4o-mini"
        assert delta(before, after, "budget_proxy_spend_tokens_total", org="acme", model=mini, kind="prompt") == prompt
        assert delta(before, after, "budget_proxy_spend_tokens_total", org="acme", model=mini,
                     kind="completion") == completion
        usd = delta(before, after, "budget_proxy_spend_usd_total", org="acme", model=mini)
        cfg_mini = h.gateway.config.models[mini]
        assert abs(usd - sum(cfg_mini.charge(pricing.from_openai(u)) for u in h.fake.reported) / 1e6) < 1e-9
        assert delta(before, after, "budget_proxy_spend_tokens_total", org="acme", model=mini, kind="cached") == \
            sum(u["prompt_tokens_details"]["cached_tokens"] for u in h.fake.reported) > 0
        assert delta(before, after, "budget_proxy_reservations_total", outcome="admitted") == 2
        assert delta(before, after, "budget_proxy_reservations_total", outcome="refused") == 1
        assert delta(before, after, "budget_proxy_downgrades_total", **{"from": "gpt-4o", "to": mini}) == 1
        assert delta(before, after, "budget_proxy_store_seconds_count", operation="reserve") >= 3
        assert delta(before, after, "budget_proxy_store_seconds_count", operation="commit") == 2
        assert delta(before, after, "budget_proxy_upstream_seconds_count", provider="openai") == 2
        seen = h.proxy.app[OBSERVER].refusals[-1]
        assert (seen.user, seen.refusal.scope) == ("acme/capped", Scope("user", "acme/capped"))
    finally:
        await harness.stop(h)


def test_the_cli_does_not_import_prometheus_client_before_serve_can_choose_its_mode():
    # prometheus_client picks multiprocess mode when the first metric is made, from the
    # environment: `serve --workers N` must be able to set PROMETHEUS_MULTIPROC_DIR first.
    code = "import sys, proxy.cli; assert 'prometheus_client' not in sys.modules, 'imported too early'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_tally_reaches_prometheus_client_as_the_same_observations_would():
    # One process tallies per-request counts in plain numbers and adds them at each scrape: the
    # exposition must be the one prometheus_client's own observe/inc would have given.
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    reg = CollectorRegistry()
    direct = Histogram("direct_seconds", "h", ["op"], buckets=metrics._LATENCY_BUCKETS, registry=reg)
    tallied = Histogram("tallied_seconds", "h", ["op"], buckets=metrics._LATENCY_BUCKETS, registry=reg)
    hist = metrics._PendingHistogram(tallied.labels("reserve"))
    for v in (0.0, 0.0005, 0.0007, 0.001, 0.03, 7.5, 60, 61.2):     # on bounds, between, past the last
        direct.labels("reserve").observe(v)
        hist.observe(v)
    count_direct = Counter("direct", "c", ["org"], registry=reg)
    count_tallied = Counter("tallied", "c", ["org"], registry=reg)
    tally = metrics._PendingCounter(count_tallied.labels("acme"))
    for amount in (1, 2.5, 0.125):
        count_direct.labels("acme").inc(amount)
        tally.inc(amount)
    with pytest.raises(ValueError):
        tally.inc(-1)
    assert not [fam for fam in text_string_to_metric_families(generate_latest(reg).decode())
                if fam.name.startswith("tallied") and any(s.value for s in fam.samples)]   # nothing before a flush
    for _ in range(2):                                   # a second flush adds nothing more
        hist.flush()
        tally.flush()
    got = samples(generate_latest(reg).decode())
    direct_samples = {(n, labels): v for (n, labels), v in got.items() if n.startswith("direct")}
    assert direct_samples and all(got[(n.replace("direct", "tallied", 1), labels)] == v
                                  for (n, labels), v in direct_samples.items())


HOOKS = """
from proxy import metrics
metrics.requests("/v1/chat/completions", "200").inc()
metrics.reservations("admitted").inc(2)
with metrics.Timer(metrics.STORE["reserve"]):
    pass
metrics.upstream("openai").observe(0.3)
"""


def test_a_worker_s_hook_counts_reach_the_metrics_dir_without_a_scrape_of_its_own(tmp_path, monkeypatch):
    # With several workers, a scrape answered by one reads the others' files: what the per-request
    # hooks count must get there without a scrape of the counting process (here: at its exit).
    got = counted_by(tmp_path, monkeypatch, HOOKS)
    assert requests_total(got, "/v1/chat/completions", "200") == 1
    assert value(got, "budget_proxy_reservations_total", outcome="admitted") == 2
    assert value(got, "budget_proxy_store_seconds_count", operation="reserve") == 1
    assert value(got, "budget_proxy_upstream_seconds_bucket", provider="openai", le="0.5") == 1
    assert value(got, "budget_proxy_upstream_seconds_sum", provider="openai") == 0.3


LIVE_WORKER = """
import asyncio, os, sys
from proxy import metrics
metrics.FLUSH_SECONDS = 0.05

async def main():
    stop = asyncio.Event()
    job = asyncio.create_task(metrics.flusher(stop))
    metrics.requests("/v1/chat/completions", "200").inc(3)
    metrics.upstream("openai").observe(0.3)
    await asyncio.sleep(0.5)                      # ten flush periods; no scrape, no stop
    sys.stdout.write("counted")
    sys.stdout.flush()
    os._exit(0)                                   # as a forked worker ends: no atexit

asyncio.run(main())
"""


def test_a_live_worker_s_counts_reach_the_metrics_dir_within_a_flush_period(tmp_path, monkeypatch):
    # A running worker never exits between scrapes: its flusher job must write its tallies on its own.
    got = counted_by(tmp_path, monkeypatch, LIVE_WORKER, says="counted")
    assert requests_total(got, "/v1/chat/completions", "200") == 3
    assert value(got, "budget_proxy_upstream_seconds_sum", provider="openai") == 0.3


def test_the_flusher_does_nothing_in_one_process():
    # One process's scrape flushes its own tallies; a timer would only wake the loop for nothing.
    assert not metrics.MULTIPROCESS
    stop = asyncio.Event()
    assert asyncio.run(asyncio.wait_for(metrics.flusher(stop), 1)) is None


STOPPING_WORKER = """
import asyncio, os, sys
from proxy import metrics
from proxy.app import TASKS
from proxy.tokens import TokenCounter
from tests import harness

async def main():
    h = await harness.start("memory://", {"defaults": {"org": {"day": {"tokens": 1000}}}}, TokenCounter.load())
    tasks = h.proxy.app[TASKS]

    async def settling():                # a settlement still running when the worker stops
        await tasks.closing.wait()       # set by the drain, after the background jobs stopped
        metrics.requests("/v1/chat/completions", "200").inc(5)
    tasks.spawn(settling())
    await h.proxy.close()                # cleanup: the flusher's last round, then the drain
    await h.upstream.close()
    sys.stdout.write("stopped")
    sys.stdout.flush()
    os._exit(0)                          # as a forked worker ends: no atexit

asyncio.run(main())
"""


def test_what_the_shutdown_drain_counts_reaches_the_metrics_dir(tmp_path, monkeypatch):
    # A worker's flusher writes its last round when the background jobs stop, before the
    # settlements still running are drained; what those count must still reach the files (the
    # app's last cleanup step), since a forked worker ends with os._exit (no atexit).
    got = counted_by(tmp_path, monkeypatch, STOPPING_WORKER, says="stopped")
    assert requests_total(got, "/v1/chat/completions", "200") == 5
