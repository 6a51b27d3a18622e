"""`budget-proxy serve --workers N`: real processes on one port, one Redis store, clean stops."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from proxy import workers
from proxy.cli import main
from proxy.ledger import Ledger, Scope
from proxy.policy import parse as parse_policy
from proxy.stores import open_store

from .fake_upstream import UPSTREAM_KEY, FakeOpenAI
from .harness import CLIENT_KEY, MSGS, config_data
from .redis_server import free_port
from .rawhttp import wait_for_port as _wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY = {"version": 1, "defaults": {"global": {"day": {"tokens": 10_000_000}}}}
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def children(pid: int) -> set[int]:
    """Live child processes of `pid`, read from /proc."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Served:
    def __init__(self, proc, port: int, fake: FakeOpenAI, log_path: str) -> None:
        self.proc, self.port, self.fake, self.log_path = proc, port, fake, log_path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    async def workers(self, n: int, seconds: float = 30) -> set[int]:
        for _ in range(int(seconds / 0.05)):
            pids = children(self.proc.pid)
            if len(pids) == n:
                return pids
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {n} workers, found {children(self.proc.pid)}:\n{self.log()}")

    async def healthz_by_pid(self, want: set[int]) -> dict[int, dict]:
        """/healthz of each worker in `want`: each call is a new connection, which the kernel
        hands to one worker's socket by a hash of its addresses; ask until every one answered."""
        seen: dict[int, dict] = {}
        for _ in range(200):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.get(self.url("/healthz")) as r:
                    body = await r.json()
            seen[body["pid"]] = body["stats"]
            if want <= set(seen):
                return seen
        raise AssertionError(f"workers {want - set(seen)} never answered; saw {sorted(seen)}")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 60)


@pytest.fixture
async def serve_workers(tmp_path, redis_url):
    """A factory: `await serve_workers(n, fake)` runs `budget-proxy serve --workers n` on the Redis
    store in a subprocess; stopped (and its workers checked gone) after the test."""
    started: list[tuple[Served, TestServer]] = []

    async def start(n: int, fake: FakeOpenAI | None = None, loop: str = "auto") -> Served:
        fake = fake or FakeOpenAI()
        upstream = TestServer(fake.app())
        await upstream.start_server()
        policy_path, cfg_path = tmp_path / "policy.yaml", tmp_path / "config.yaml"
        policy_path.write_text(yaml.safe_dump(POLICY))
        cfg_path.write_text(yaml.safe_dump({**config_data(str(upstream.make_url("/v1")), redis_url),
                                            "policy": str(policy_path)}))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "BUDGET_", "APP_ENV"))}
        env.update(BP_TEST_UPSTREAM_KEY=UPSTREAM_KEY, LOG_LEVEL="INFO")
        log_path = tmp_path / "serve.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg_path), "--port", str(port),
                "--workers", str(n), "--loop", loop, env=env, cwd=ROOT, stdout=log, stderr=log)
        served = Served(proc, port, fake, str(log_path))
        started.append((served, upstream))
        await _wait_for_port(port, proc)
        return served

    yield start
    for served, upstream in started:
        if served.proc.returncode is None:
            pids = children(served.proc.pid)
            served.proc.kill()
            await served.proc.wait()
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        await upstream.close()


async def global_day(redis_url: str) -> tuple[int, int]:
    """(tokens used, tokens reserved) on the global day counter, through the store's public API."""
    ledger = Ledger(open_store(redis_url), parse_policy(POLICY, "policy.yaml"))
    try:
        b = {(x.window, x.unit): x for x in await ledger.snapshot([Scope("global", "*")])}[("day", "tokens")]
        return b.used, b.reserved
    finally:
        await ledger.store.close()


async def chat(served: Served, stream: bool = False) -> str:
    """One chat call on its own connection (so the kernel picks a worker for it); the answer."""
    body = {"model": "gpt-4o-mini", "messages": MSGS, "stream": stream}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.post(served.url("/v1/chat/completions"), json=body, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            return await r.text()


async def test_two_workers_serve_one_port_and_charge_one_redis_store(serve_workers, redis_url):
    served = await serve_workers(2)
    pids = await served.workers(2)
    for _ in range(24):
        await chat(served)
    stats = await served.healthz_by_pid(pids)
    assert set(stats) == pids
    assert all(stats[pid]["requests"] > 0 for pid in pids), stats       # both served some
    assert sum(stats[pid]["requests"] for pid in pids) == 24
    used, reserved = await global_day(redis_url)                         # one store, all 24 charged
    assert (used, reserved) == (sum(u["total_tokens"] for u in served.fake.reported), 0)
    assert await served.stop() == 0
    assert not any(alive(pid) for pid in pids)                          # no orphan
    assert "2 worker(s)" in served.log() and "Traceback" not in served.log()
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"      # auto: uvloop when installed
    assert served.log().count(f"(event loop: {loop})") == 2


async def test_a_scrape_of_any_worker_counts_every_worker_s_requests_and_spend(serve_workers):
    # Each worker tallies per request and writes its files every metrics.FLUSH_SECONDS: within a
    # few periods, whichever worker answers the scrape reports all workers' requests and tokens.
    from prometheus_client.parser import text_string_to_metric_families
    served = await serve_workers(2)
    pids = await served.workers(2)
    for _ in range(24):
        await chat(served)
    stats = await served.healthz_by_pid(pids)
    assert all(stats[pid]["requests"] > 0 for pid in pids), stats       # both counted some
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in served.fake.reported)
    got: dict = {}
    # One kept-alive connection: one worker answers every scrape (and flushes only its own
    # tallies); the other's counts can only come from its own flusher.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as scraper:
        for _ in range(50):
            async with scraper.get(served.url("/metrics")) as r:
                text = await r.text()
            got = {(x.name, tuple(sorted(x.labels.items()))): x.value
                   for fam in text_string_to_metric_families(text) for x in fam.samples}
            requests = got.get(("budget_proxy_requests_total", (("endpoint", "/v1/chat/completions"),
                                                                ("status", "200"))))
            spent = sum(v for (name, labels), v in got.items() if name == "budget_proxy_spend_tokens_total"
                        and dict(labels)["kind"] in ("prompt", "completion"))
            if requests == 24 and spent == tokens:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the scrapes never showed 24 requests and {tokens} tokens: {got}")
    assert await served.stop() == 0


async def test_sigterm_lets_every_worker_finish_its_streams_and_settle(serve_workers, redis_url):
    served = await serve_workers(2, FakeOpenAI(chunk_delay=0.2), loop="asyncio")     # the fallback loop
    pids = await served.workers(2)
    await served.healthz_by_pid(pids)            # both serving (connections still in a backlog at
                                                 # shutdown are reset, by any server)
    streams = [asyncio.create_task(chat(served, stream=True)) for _ in range(6)]
    await asyncio.sleep(0.5)                     # every stream is under way (its first chunks sent)
    assert not any(s.done() for s in streams)
    assert await served.stop() == 0
    for text in await asyncio.gather(*streams):
        assert "upstream" in text and text.rstrip().endswith("data: [DONE]")
    used, reserved = await global_day(redis_url)
    assert (used, reserved) == (sum(u["total_tokens"] for u in served.fake.reported), 0)
    assert len(served.fake.reported) == 6
    assert not any(alive(pid) for pid in pids)
    assert served.log().count("(event loop: asyncio)") == 2


async def test_every_worker_reloads_an_edited_policy(serve_workers, tmp_path):
    served = await serve_workers(2)
    pids = await served.workers(2)
    await served.healthz_by_pid(pids)
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(
        {"version": 1, "defaults": {"global": {"day": {"tokens": 1}}}}))      # nothing fits any more
    body = {"model": "gpt-4o-mini", "messages": MSGS}
    for _ in range(100):                         # each worker polls the file on its own
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.post(served.url("/v1/chat/completions"), json=body, headers=AUTH) as r:
                assert r.status in (200, 429)
        stats = await served.healthz_by_pid(pids)
        if all(stats[pid].get("refused") for pid in pids):
            break
        await asyncio.sleep(0.1)
    assert all(stats[pid].get("refused") for pid in pids), stats
    assert served.log().count("policy reloaded from") == 2
    assert await served.stop(signal.SIGINT) == 0                         # Ctrl-C stops it as SIGTERM does
    assert not any(alive(pid) for pid in pids)


async def test_a_worker_that_dies_is_reported_and_replaced(serve_workers):
    served = await serve_workers(2)
    pids = await served.workers(2)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    for _ in range(200):
        now = children(served.proc.pid)
        if len(now) == 2 and victim not in now:
            break
        await asyncio.sleep(0.05)
    assert victim not in now and len(now) == 2
    assert f"(pid {victim}) was killed by signal 9 (SIGKILL); starting a new one" in served.log()
    await served.healthz_by_pid(now)             # the replacement serves
    await chat(served)
    assert await served.stop() == 0
    assert not any(alive(pid) for pid in now)


async def test_workers_that_keep_dying_stop_the_server_with_status_1(serve_workers):
    served = await serve_workers(2)
    await served.workers(2)
    killed: set[int] = set()
    for _ in range(500):                         # each worker the parent starts dies at once
        if served.proc.returncode is not None:
            break
        for pid in children(served.proc.pid) - killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        await asyncio.sleep(0.02)
    assert await asyncio.wait_for(served.proc.wait(), 60) == 1
    assert (f"more than {workers.RESTART_LIMIT} worker deaths within {workers.RESTART_WINDOW_SECONDS:.0f} s; "
            f"stopping the server") in served.log()
    assert children(served.proc.pid) == set()


def memory_config(tmp_path) -> str:
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({**config_data("http://127.0.0.1:9/v1", "memory://"),
                                   "policy": str(tmp_path / "policy.yaml")}))
    return str(cfg)


def test_the_memory_store_refuses_more_than_one_worker(tmp_path, capsys):
    cfg = memory_config(tmp_path)
    assert main(["serve", "--config", str(cfg), "--workers", "2"]) == 2
    assert capsys.readouterr().err.endswith(
        "budget-proxy: --workers 2: the memory store cannot be shared between workers; "
        "use a redis:// store or --workers 1\n")


def test_without_enforcement_there_is_no_store_to_share():
    assert workers.refusal(None, 4, "asyncio") is None
    assert workers.refusal("redis://127.0.0.1:6379/0", 4, "asyncio") is None
    assert workers.refusal("memory://", 1, "asyncio") is None
    assert "cannot be shared" in workers.refusal("memory://", 2, "asyncio")


AGGREGATE = """
import os
from proxy.workers import metrics_dir
with metrics_dir(2):                      # as `serve` does, before prometheus_client is imported
    from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
    requests = Counter("bp_requests", "requests")
    pids = []
    for n in (5, 6):                      # two forked workers count on their own
        pid = os.fork()
        if pid == 0:
            requests.inc(n)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    print(generate_latest(registry).decode())
"""


def test_metrics_of_forked_workers_aggregate_in_the_metrics_dir():
    pytest.importorskip("prometheus_client")
    env = {k: v for k, v in os.environ.items() if k != workers.METRICS_ENV}
    out = subprocess.run([sys.executable, "-c", AGGREGATE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "bp_requests_total 11.0" in out.stdout.splitlines()


def test_metrics_dir_warns_when_prometheus_client_was_imported_first(monkeypatch, caplog):
    monkeypatch.delenv(workers.METRICS_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "prometheus_client", sys)          # any module: "already imported"
    with workers.metrics_dir(2):
        pass
    assert "each worker will report only its own metrics" in caplog.text


@pytest.mark.parametrize("given", ["0", "-1", "two", ""])
def test_workers_must_be_a_positive_count_or_auto(given, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--workers", given])
    assert exc.value.code == 2
    assert f"argument --workers: expected a positive integer or 'auto', got {given!r}" in capsys.readouterr().err


def test_auto_is_one_worker_per_usable_core(tmp_path):
    assert workers.worker_count("auto") == workers.cores()
    assert workers.worker_count("3") == 3
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    assert workers.cores(str(tmp_path / "absent")) == affinity
    quota.write_text("max 100000\n")
    assert workers.cores(str(quota)) == affinity                          # no limit
    quota.write_text("50000 100000\n")
    assert workers.cores(str(quota)) == 1                                 # half a core: one worker
    quota.write_text(f"{(affinity + 8) * 100000} 100000\n")
    assert workers.cores(str(quota)) == affinity                          # never above the affinity
    if affinity >= 2:
        quota.write_text("150000 100000\n")
        assert workers.cores(str(quota)) == 2                             # 1.5 cores round up


def test_the_loop_is_uvloop_when_installed_and_asyncio_without_it(monkeypatch):
    uvloop = pytest.importorskip("uvloop")
    for kind, expected in (("auto", uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        loop = workers.event_loop(kind)
        assert isinstance(loop, expected) and (kind != "asyncio" or not isinstance(loop, uvloop.Loop))
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)            # as if not installed
    loop = workers.event_loop("auto")
    assert not isinstance(loop, uvloop.Loop)
    loop.close()
    with pytest.raises(ImportError):
        workers.event_loop("uvloop")


def test_serve_refuses_uvloop_when_it_is_not_installed(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    cfg = memory_config(tmp_path)
    assert main(["serve", "--config", str(cfg), "--loop", "uvloop"]) == 2
    assert capsys.readouterr().err.endswith(
        "budget-proxy: --loop uvloop: uvloop is not installed (pip install 'budget-proxy[fast]')\n")


def test_metrics_dir_is_fresh_per_server_and_removed_after(monkeypatch):
    monkeypatch.delenv(workers.METRICS_ENV, raising=False)
    with workers.metrics_dir(1):
        assert workers.METRICS_ENV not in os.environ             # one process: nothing to aggregate
    with workers.metrics_dir(2):
        path = os.environ[workers.METRICS_ENV]
        assert os.path.isdir(path) and os.listdir(path) == []
    assert workers.METRICS_ENV not in os.environ and not os.path.exists(path)
    monkeypatch.setenv(workers.METRICS_ENV, "/operator/chosen")
    with workers.metrics_dir(2):
        assert os.environ[workers.METRICS_ENV] == "/operator/chosen"
    assert os.environ[workers.METRICS_ENV] == "/operator/chosen"


def test_a_port_held_by_another_server_is_refused_even_one_with_reuse_port():
    groups = workers.listen("127.0.0.1", 0, 2)               # another `serve --workers 2`
    port = groups[0][0].getsockname()[1]
    try:
        with pytest.raises(OSError) as exc:
            workers.listen("127.0.0.1", port, 2)
        assert exc.value.errno == errno.EADDRINUSE
    finally:
        for group in groups:
            for s in group:
                s.close()
    workers.listen("127.0.0.1", port, 1)[0][0].close()       # free again once it is gone


def test_serve_with_workers_on_a_busy_port_exits_1_saying_why(tmp_path, capsys):
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({**config_data("http://127.0.0.1:9/v1", "memory://", enforcement="disabled"),
                                   "policy": str(tmp_path / "policy.yaml")}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--config", str(cfg), "--port", str(port), "--workers", "2"]) == 1
    assert capsys.readouterr().err.endswith(
        f"budget-proxy: cannot listen on 127.0.0.1:{port}: Address already in use\n")


def test_port_zero_gives_every_worker_the_same_port():
    groups = workers.listen("127.0.0.1", 0, 3)
    try:
        ports = {s.getsockname()[1] for group in groups for s in group}
        assert len(groups) == 3 and len(ports) == 1 and ports != {0}
    finally:
        for group in groups:
            for s in group:
                s.close()
