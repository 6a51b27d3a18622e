"""`budget-proxy serve` as a user runs it: the shipped config, a real process, no internet."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import sys
import time

import openai
from aiohttp.test_utils import TestServer

from proxy.cli import main

from .fake_upstream import UPSTREAM_KEY, FakeOpenAI
from .rawhttp import ROOT
from .rawhttp import wait_for_port as _wait_for_port
from .redis_server import free_port

async def test_serve_with_the_shipped_config_proxies_a_real_sdk_call():
    fake = FakeOpenAI()
    upstream = TestServer(fake.app())
    await upstream.start_server()
    port = free_port()
    exe = shutil.which("budget-proxy")
    cmd = [exe] if exe else [sys.executable, "-m", "proxy.cli"]
    env = {**os.environ, "OPENAI_BASE_URL": str(upstream.make_url("/v1")), "OPENAI_API_KEY": UPSTREAM_KEY,
           "APP_ENV": "dev", "LOG_LEVEL": "WARNING"}
    env.pop("REDIS_URL", None)
    proc = await asyncio.create_subprocess_exec(*cmd, "serve", "--config", os.path.join(ROOT, "config.yaml"),
                                                "--port", str(port), env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await _wait_for_port(port, proc)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="anything",
                                      max_retries=0) as client:
            r = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].message.content == "Hello from the fake upstream!"
        assert fake.seen[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        await upstream.close()
    log = err.decode()
    assert "auth is OPEN" in log                         # no keys in the shipped config: it says so
    assert UPSTREAM_KEY not in log and "anything" not in log


def test_serve_refuses_an_invalid_config(tmp_path, capsys):
    bad = tmp_path / "config.yaml"
    bad.write_text("providers: {openai: {base_url: \"https://x\"}}\nmodels: {}\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert f"{bad}: models: expected at least one entry" in capsys.readouterr().err


def test_hash_key_prints_the_sha256(capsys):
    assert main(["hash-key", "abc"]) == 0
    assert capsys.readouterr().out.strip() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- export and audit: read the store named in the config, the proxy down --------------------

def _redis_config(tmp_path, redis_url: str) -> str:
    from .harness import config_data
    from .ledgers import MIXED_POLICY
    (tmp_path / "policy.yaml").write_text(json.dumps({"version": 1, **MIXED_POLICY}))
    data = {**config_data("http://127.0.0.1:9/v1", redis_url), "policy": "policy.yaml"}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(data))
    return str(path)


async def _workload(redis_url: str) -> list:
    from proxy.ledger import Ledger
    from proxy.policy import parse
    from proxy.stores import open_store
    from .ledgers import Clock
    from .ledgers import MIXED_POLICY, mixed_workload
    store = open_store(redis_url)
    clock = Clock(time.time())
    ledger = Ledger(store, parse({"version": 1, **MIXED_POLICY}, "p"), clock=clock)
    await mixed_workload(ledger, clock)
    records = await ledger.settlements(limit=1000)
    await store.close()
    return records


async def test_export_round_trips_the_log_as_json_lines_and_csv(tmp_path, redis_url, capsys):
    from proxy.settlement_log import EXPORT_FIELDS
    records = await _workload(redis_url)
    expected = [r.export() for r in reversed(records)]                     # oldest first
    config = _redis_config(tmp_path, redis_url)
    assert await asyncio.to_thread(main, ["export", "--config", config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == expected and len(lines) == 32
    assert await asyncio.to_thread(main, ["export", "--config", config, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == list(EXPORT_FIELDS)
    assert [r["id"] for r in rows] == [e["id"] for e in expected]
    assert [int(r["usd_micro"]) for r in rows] == [e["usd_micro"] for e in expected]
    assert {r["outcome"] for r in rows} == {"ok", "upstream_error", "expired", "corrected"}
    since = records[0].time                                                # the newest millisecond
    assert await asyncio.to_thread(main, ["export", "--config", config, "--since", since]) == 0
    newest = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert newest == [e for e in expected if e["time"] >= since] and newest[-1]["outcome"] == "corrected"
    future = str(time.time() + 3600)
    assert await asyncio.to_thread(main, ["export", "--config", config, "--since", future]) == 0
    assert capsys.readouterr().out == ""


async def test_audit_exits_zero_when_clean_and_non_zero_on_a_corrupted_counter(tmp_path, redis_url, capsys):
    import struct

    import redis as redis_sync
    await _workload(redis_url)
    config = _redis_config(tmp_path, redis_url)
    assert await asyncio.to_thread(main, ["audit", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "7 scopes, 0 with drift" in out and "org:acme" in out
    r = redis_sync.Redis.from_url(redis_url)
    (key,) = r.keys("{bp}:w:d*")
    t, tr, d, dr = struct.unpack("<dddd", r.hget(key, "user:bob"))
    r.hset(key, "user:bob", struct.pack("<dddd", t, tr, d - 100, dr))     # a lost write of 100 micro-USD
    r.close()
    assert await asyncio.to_thread(main, ["audit", "--config", config, "--window", "day"]) == 1
    out = capsys.readouterr().out
    bob = next(line for line in out.splitlines() if line.startswith("user:bob"))
    assert bob.split()[-1] == "-100" and "7 scopes, 1 with drift" in out


def test_export_refuses_the_memory_store(tmp_path, capsys):
    from .harness import config_data
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config_data("http://127.0.0.1:9/v1", "memory://")))
    assert main(["export", "--config", str(path)]) == 2
    assert f"{path}: store: expected a shared store" in capsys.readouterr().err


def test_usage_table_sorts_by_closeness_and_draws_bars():
    from proxy import usage

    def e(sid, used, reserved, limit):
        return {"scope": {"type": "org", "id": sid}, "window": "day", "start": "", "end": "",
                "used": {"tokens": used, "usd": 0.5}, "reserved": {"tokens": reserved, "usd": 0.0},
                "limit": {"tokens": limit, "usd": None}, "remaining": {"tokens": None, "usd": None}}

    doc = {"data": [e("a", 500, 0, 1000), e("b", 900, 100, 1000), e("c", 10, 0, None)]}
    doc["data"].sort(key=lambda x: -usage.closeness(x))
    lines = usage.table(doc).splitlines()
    assert lines[0].split()[:2] == ["SCOPE", "WINDOW"]
    assert [ln.split()[0] for ln in lines[1:]] == ["org:b", "org:a", "org:c"]
    assert lines[1].endswith("[##################++]") and "100%" in lines[1]
    assert lines[2].endswith("[##########..........]") and "50%" in lines[2]
    assert "[" not in lines[3] and "10" in lines[3]
