"""`budget-proxy serve` as a user runs it: the shipped config, a real process, no internet."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys

import openai
from aiohttp.test_utils import TestServer

from proxy.cli import main

from .fake_upstream import UPSTREAM_KEY, FakeOpenAI
from .redis_server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def _wait_for_port(port: int, proc, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.05)):
        if proc.returncode is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}: {(await proc.stderr.read()).decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("proxy did not start listening")


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
