"""config.yaml and the policy reload while the proxy runs (proxy/watch.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal

import openai
import pytest
import yaml

from proxy import watch
from proxy.ledger import Scope

from .fake_upstream import UPSTREAM_KEY
from .harness import MSGS

NEW_KEY = "bp-added-while-running"


def edit(path, change) -> None:
    with open(path) as fh:
        data = yaml.safe_load(fh)
    change(data)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:                  # as editors do: write aside, rename over
        yaml.safe_dump(data, fh)
    os.replace(tmp, path)


async def until(predicate, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the reload never happened")


@pytest.fixture
async def live(tmp_path, monkeypatch, start_proxy):
    monkeypatch.setenv("BP_TEST_UPSTREAM_KEY", UPSTREAM_KEY)    # what a reload reads from the environment
    monkeypatch.setattr(watch, "POLL_SECONDS", 0.02)
    path = tmp_path / "config.yaml"
    h = await start_proxy("memory://", {}, config_file=str(path))
    return h, path


async def test_a_key_added_to_config_yaml_works_without_a_restart(live):
    h, path = live
    with pytest.raises(openai.AuthenticationError):
        await h.client(NEW_KEY).chat.completions.create(model="gpt-4o", messages=MSGS)
    edit(path, lambda d: d["keys"].update(
        {"added": {"sha256": hashlib.sha256(NEW_KEY.encode()).hexdigest(), "org": "initech"}}))
    await until(lambda: len(h.gateway.config.keys) == 3)
    await h.client(NEW_KEY).chat.completions.create(model="gpt-4o", messages=MSGS)
    await h.settled()
    assert (await h.balances(Scope("org", "initech")))[("day", "tokens")].used > 0


async def test_a_new_price_applies_to_the_next_request_and_none_is_lost(live):
    h, path = live
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    await h.settled()
    before = (await h.balances(Scope("org", "acme")))[("day", "usd")].used
    edit(path, lambda d: d["models"]["gpt-4o"].update(input_per_million=250.0, output_per_million=1000.0))
    await until(lambda: h.gateway.config.models["gpt-4o"].input_per_million == 250.0)
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    await h.settled()
    after = (await h.balances(Scope("org", "acme")))[("day", "usd")].used
    assert after - before == 100 * before                         # the same call at 100x the price


async def test_an_invalid_edit_keeps_the_running_config(live, caplog):
    h, path = live
    running = h.gateway.config
    failures = watch.failures["config"]
    with caplog.at_level(logging.ERROR):
        edit(path, lambda d: d["models"]["gpt-4o"].update(input_per_million="cheap"))
        await until(lambda: watch.failures["config"] > failures)
    assert h.gateway.config is running
    assert any("config change rejected" in r.getMessage() for r in caplog.records)
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)


async def test_listen_and_store_changes_are_logged_as_needing_a_restart(live, caplog):
    h, path = live
    port = h.gateway.config.port
    with caplog.at_level(logging.WARNING):
        edit(path, lambda d: d.update(listen={"port": port + 1}, routes={"smart": ["gpt-4o-mini"]}))
        await until(lambda: h.gateway.config.routes["smart"] == ("gpt-4o-mini",))
    assert h.gateway.config.port == port                            # kept as it runs
    assert any("port changed; that takes a restart" in r.getMessage() for r in caplog.records)


async def test_sighup_reloads_at_once(live, monkeypatch):
    h, path = live
    monkeypatch.setattr(watch, "POLL_SECONDS", 3600)
    await asyncio.sleep(0.05)                   # the watcher is now in its hour-long wait
    edit(path, lambda d: d["routes"].update(fast=["gpt-4o-mini"]))
    os.kill(os.getpid(), signal.SIGHUP)
    await until(lambda: "fast" in h.gateway.config.routes, seconds=2)
