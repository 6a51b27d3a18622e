from __future__ import annotations

import dataclasses
import os

import pytest

from proxy import config, pricing
from proxy.cli import main
from proxy.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "configs")

BAD = {
    "admin_key_not_sha256.yaml": "admin_keys.ops.sha256: expected 64 lowercase hex characters "
                                 "(budget-proxy hash-key prints them), got 'ABCDEF'",
    "admin_key_is_proxy_key.yaml": "admin_keys.ops.sha256: expected a key that is not also a proxy key "
                                   "(it is keys.app)",
    "admin_key_twice.yaml": "admin_keys.oncall.sha256: the same key hash is listed twice",
    "admin_key_unknown_field.yaml": "admin_keys.ops: unknown key 'org'",
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
    "bad_provider_kind.yaml": "providers.openai.kind: expected one of openai, anthropic; got 'gemini'",
    "bad_anthropic_version.yaml": "providers.anthropic.anthropic_version: expected a date like 2023-06-01, "
                                  "got 'v1'",
    "negative_cached_price.yaml": "models.gpt-4o.cached_input_per_million: expected a number >= 0, got -1.25",
    "cache_write_price_not_a_number.yaml": "models.claude-haiku-4-5.cache_write_1h_per_million: expected a "
                                           "number, got '2x'",
    "route_mixes_provider_kinds.yaml": "routes.smart: 'claude-haiku-4-5' speaks the anthropic API; expected "
                                       "every candidate to speak openai, like 'gpt-4o'",
    "downgrade_mixes_provider_kinds.yaml": "models.claude-haiku-4-5.downgrade_to: 'gpt-4o-mini' speaks the "
                                           "openai API; expected every candidate to speak anthropic, like "
                                           "'claude-haiku-4-5'",
    "store_url_with_password.yaml": "store: expected memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL, "
                                     "got 'postgres://***@db:5432/0'",       # the password is masked
    "nonfinite_timeout.yaml": "providers.openai.connect_timeout: expected a finite number, got .nan",
    "duplicate_model.yaml": "line 5, column 3: duplicate key 'gpt-4o' (first given on line 4)",
    "not_utf8.yaml": "line 6: not valid UTF-8 (byte 0xe9); save the file as UTF-8",
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
    claude = cfg.providers["anthropic"]
    assert (claude.kind, claude.base_url, claude.api_key_env, claude.anthropic_version) == \
        ("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY", "2023-06-01")
    assert cfg.providers["openai"].kind == "openai"
    assert cfg.models["claude-sonnet-4-6"].kind == "anthropic" and cfg.models["gpt-4o"].kind == "openai"


# Shipped list prices, USD per million tokens: (input, cached input, output), and Anthropic's
# 5-minute and 1-hour cache writes.
SHIPPED_PRICES = {
    "gpt-4o": (2.50, 1.25, 10.00), "gpt-4o-mini": (0.15, 0.075, 0.60), "gpt-4.1": (2.00, 0.50, 8.00),
    "gpt-4.1-mini": (0.40, 0.10, 1.60), "gpt-4.1-nano": (0.10, 0.025, 0.40),
    "claude-sonnet-4-6": (3.00, 0.30, 15.00), "claude-haiku-4-5": (1.00, 0.10, 5.00),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_PRICES))
def test_shipped_models_carry_list_prices_with_cached_rates(name):
    m = config.load(os.path.join(ROOT, "config.yaml"), env={}).models[name]
    assert (m.input_per_million, m.cached_input_per_million, m.output_per_million) == SHIPPED_PRICES[name]
    if m.kind == "anthropic":
        assert (m.cache_write_per_million, m.cache_write_1h_per_million) == \
            (m.input_per_million * 1.25, m.input_per_million * 2)


def test_cache_prices_default_by_provider_kind(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("providers:\n  o: {base_url: 'http://o'}\n  a: {base_url: 'http://a', kind: anthropic}\n"
                    "models:\n  g: {provider: o, input_per_million: 2, output_per_million: 8}\n"
                    "  c: {provider: a, input_per_million: 3, output_per_million: 15, cache_write_per_million: 4}\n")
    cfg = config.load(str(path), env={})
    # pico-dollars per token: input, cache read, short write, long write, output
    assert tuple(cfg.models["g"].rates) == (2_000_000, 2_000_000, 2_000_000, 2_000_000, 8_000_000)
    assert tuple(cfg.models["c"].rates) == (3_000_000, 300_000, 4_000_000, 6_000_000, 15_000_000)
    assert cfg.providers["a"].anthropic_version == "2023-06-01"


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
    cached = config.Model("m", "p", "m", 2.5, 10.0, (), cached_input_per_million=1.25)
    assert cached.charge(pricing.Usage(input=1000, cached_input=1000, output=3)) == 2500 + 1250 + 30


SHIPPED = os.path.join(ROOT, "config.yaml")


@pytest.mark.parametrize("env, message", [
    ({"REDIS_URL": "postgres://x"},
     "REDIS_URL: expected memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL, got 'postgres://x'"),
    ({"REDIS_URL": "redis://:hunter2@cache:port/0"},
     "REDIS_URL: expected memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL (Port could not be cast to "
     "integer value as 'port'), got 'redis://***@cache:port/0'"),
    ({"REDIS_HOST": "cache", "REDIS_PORT": "six"},
     "REDIS_HOST, REDIS_PORT, REDIS_DB: expected memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL (Port "
     "could not be cast to integer value as 'six'), got 'redis://cache:six/0'"),
    ({"APP_ENV": "qa"}, "APP_ENV: expected one of dev, staging, prod; got 'qa'"),
])
def test_bad_environment_overrides_are_config_errors(env, message):
    with pytest.raises(ConfigError) as exc:
        config.load(SHIPPED, env=env)
    assert str(exc.value) == message


def test_open_store_applies_the_same_url_check():
    from proxy.stores import open_store
    with pytest.raises(ConfigError, match=r"^store: expected memory:// or a redis://, rediss://, unix:// or redis\+cluster:// URL"):
        open_store("postgres://x")


def test_serve_reports_a_bad_redis_url_as_a_config_error(capsys, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "postgres://x")
    assert main(["serve", "--config", SHIPPED]) == 2
    err = capsys.readouterr().err
    assert err == ("budget-proxy: REDIS_URL: expected memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL, "
                   "got 'postgres://x'\n")


@pytest.mark.parametrize("host, allowed, keys, refused", [
    ("0.0.0.0", False, False, True), ("::", False, False, True), ("10.1.2.3", False, False, True),
    ("proxy.internal", False, False, True), ("0.0.0.0", True, False, False), ("0.0.0.0", False, True, False),
    ("127.0.0.1", False, False, False), ("127.8.0.1", False, False, False), ("::1", False, False, False),
    ("localhost", False, False, False)])
def test_open_auth_is_refused_beyond_loopback_unless_allowed(host, allowed, keys, refused):
    env = {"BUDGET_PROXY_ALLOW_OPEN_AUTH": "true"} if allowed else {}
    cfg = config.load(SHIPPED, env=env)
    if keys:
        cfg = dataclasses.replace(cfg, keys={"0" * 64: config.ApiKey("k", "o", None, False)})
    if not refused:
        config.check_exposure(cfg, host)
        return
    with pytest.raises(ConfigError) as exc:
        config.check_exposure(cfg, host)
    assert str(exc.value) == (
        f"{SHIPPED}: keys: no API keys are configured, so auth is open, and the proxy would listen on "
        f"{host!r}, which other machines can reach; configure `keys`, listen on 127.0.0.1, or set "
        f"listen.allow_open_auth: true to serve anyone")


def test_shutdown_grace_defaults_to_30_seconds_and_is_configurable(tmp_path):
    assert config.load(SHIPPED, env={}).shutdown_grace_seconds == 30
    assert config.load(SHIPPED, env={"BUDGET_PROXY_SHUTDOWN_GRACE_SECONDS": "2.5"}).shutdown_grace_seconds == 2.5


def test_a_reload_cannot_open_auth_or_change_what_serve_read_at_start():
    shipped = config.load(SHIPPED, env={})
    keyed = dataclasses.replace(shipped, keys={"0" * 64: config.ApiKey("k", "o", None, False)})
    assert config.restart_needed(keyed, shipped) == ["keys"]
    assert config.restart_needed(shipped, keyed) == []
    later = config.load(SHIPPED, env={"BUDGET_PROXY_SHUTDOWN_GRACE_SECONDS": "5",
                                      "BUDGET_PROXY_ALLOW_OPEN_AUTH": "true"})
    assert config.restart_needed(shipped, later) == ["shutdown_grace_seconds", "allow_open_auth"]
