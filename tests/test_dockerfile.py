"""The Dockerfile, as far as it can be checked without a Docker daemon: its health check really
asks a running proxy, and its tokenizer cache is made once, at build time, where the proxy reads it."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import sys

from .redis_server import free_port
from .rawhttp import ROOT


def instructions() -> list[tuple[str, str]]:
    text = pathlib.Path(ROOT, "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n\s*", "", text)                 # join continued lines
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def healthcheck_command() -> list[str]:
    [check] = [args for op, args in instructions() if op == "HEALTHCHECK"]
    return json.loads(check[check.index("CMD") + 3:].strip())


async def run_check(port: int) -> int:
    cmd = healthcheck_command()
    assert cmd[0] == "python"                          # python-slim has no curl
    proc = await asyncio.create_subprocess_exec(sys.executable, *cmd[1:], env={**os.environ,
                                                "BUDGET_PROXY_PORT": str(port)},
                                                stderr=asyncio.subprocess.DEVNULL)
    return await asyncio.wait_for(proc.wait(), 30)


async def test_the_healthcheck_passes_on_a_live_proxy_and_fails_without_one(start_proxy):
    h = await start_proxy("memory://")
    assert await run_check(h.proxy.port) == 0
    assert await run_check(free_port()) != 0


def test_the_tokenizer_cache_is_one_directory_filled_at_build_time():
    steps = instructions()
    envs = [i for i, (op, args) in enumerate(steps) if op == "ENV" and args.startswith("TIKTOKEN_CACHE_DIR=")]
    warm = [i for i, (op, args) in enumerate(steps) if op == "RUN" and "TokenCounter.load()" in args]
    user = [i for i, (op, args) in enumerate(steps) if op == "USER"]
    assert envs and warm and user and envs[0] < warm[0] < user[0]     # set, filled as root, then read
    cache = steps[envs[0]][1].split("=", 1)[1].split()[0]
    assert f"chmod -R a+rX {os.path.dirname(cache)}" in steps[warm[0]][1]


def test_the_image_listens_beyond_loopback_and_leaves_open_auth_refused():
    envs = " ".join(args for op, args in instructions() if op == "ENV")
    assert "BUDGET_PROXY_HOST=0.0.0.0" in envs and "BUDGET_PROXY_ALLOW_OPEN_AUTH" not in envs
