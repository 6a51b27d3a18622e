from __future__ import annotations

import os

import pytest

from proxy import config
from proxy.cli import main
from proxy.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "configs")

BAD = {
    "bad_base_url.yaml": "providers.openai.base_url: expected an http:// or https:// URL, got 'ftp://x'",
    "bad_enforcement.yaml": "enforcement: expected one of strict, advisory, disabled; got 'lenient'",
    "bad_store_url.yaml": "store: expected memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL, got 'postgres://db'",
    "key_not_sha256.yaml": "keys.a.sha256: expected 64 lowercase hex characters (budget-proxy hash-key "
                           "prints them), got 'not-a-hash'",
    "missing_price.yaml": "models.gpt-4o: missing required key 'input_per_million'",
    "negative_price.yaml": "models.gpt-4o.input_per_million: expected a number >= 0, got -1",
    "port_out_of_range.yaml": "listen.port: expected a number <= 65535, got 99999",
    "prod_route_unknown_model.yaml": "routes.smart: 'gpt-5-ultra' is not a model in the registry",
    "prod_without_keys.yaml": "keys: expected at least one key in prod (auth cannot be open)",
    "unknown_provider.yaml": "models.gpt-4o.provider: expected one of openai; got 'azure'",
    "unknown_top_key.yaml": "(top level): unknown key 'enforcment'",
    "unset_variable.yaml": "listen.port: environment variable BP_UNSET_PORT_VAR is not set",
    "store_url_with_password.yaml": "store: expected memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL, "
                                     "got 'postgres://***@db:5432/0'",       # the password is masked
}


def test_every_bad_fixture_has_its_expected_message():
    assert sorted(BAD) == sorted(os.listdir(FIXTURES))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_is_rejected_naming_file_and_path(name):
    path = os.path.join(FIXTURES, name)
    with pytest.raises(ConfigError) as exc:
        config.load(path, env={})
    assert str(exc.value) == f"{path}: {BAD[name]}"


def test_shipped_config_validates_and_uses_its_defaults(capsys):
    assert main(["validate", os.path.join(ROOT, "config.yaml")]) == 0
    cfg = config.load(os.path.join(ROOT, "config.yaml"), env={})
    assert (cfg.host, cfg.port, cfg.store_url, cfg.enforcement) == ("127.0.0.1", 8787, "memory://", "strict")
    assert cfg.providers["openai"].base_url == "https://api.openai.com/v1"
    assert cfg.candidates("smart") == ("gpt-4o", "gpt-4.1", "gpt-4o-mini")
    assert cfg.candidates("gpt-4o") == ("gpt-4o", "gpt-4o-mini")
    assert cfg.candidates("nope") == ()


def test_environment_overrides_and_expansion():
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1", "BUDGET_PROXY_PORT": "9000",
           "APP_ENV": "staging", "BUDGET_ENFORCEMENT_MODE": "advisory", "REDIS_HOST": "cache",
           "REDIS_PORT": "6380", "REDIS_PASSWORD": "p@ss", "OPENAI_API_KEY": "sk-secret"}
    cfg = config.load(os.path.join(ROOT, "config.yaml"), env=env)
    assert cfg.port == 9000 and cfg.environment == "staging" and cfg.enforcement == "advisory"
    assert cfg.providers["openai"].base_url == "http://127.0.0.1:11434/v1"
    assert cfg.store_url == "redis://:p%40ss@cache:6380/0"
    assert config.load(os.path.join(ROOT, "config.yaml"), env={**env, "REDIS_URL": "redis://r/1"}).store_url \
        == "redis://r/1"
    assert "sk-secret" not in repr(cfg)                  # the upstream key never shows in a repr/log


def test_unknown_route_model_is_dropped_with_a_warning_outside_prod(caplog):
    path = os.path.join(FIXTURES, "prod_route_unknown_model.yaml")
    cfg = config.load(path, env={"APP_ENV": "dev"})
    assert cfg.routes["smart"] == ("gpt-4o",)
    assert "'gpt-5-ultra' is not a model in the registry (ignored outside prod)" in caplog.text


def test_price_arithmetic_is_exact_micro_dollars():
    m = config.Model("m", "p", "m", 2.5, 10.0, ())
    assert m.cost(1000, 0) == 2500 and m.cost(0, 3) == 30 and m.cost(1, 0) == 3    # rounded up
