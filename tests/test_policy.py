from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from proxy import policy
from proxy.cli import main
from proxy.errors import ConfigError
from proxy.policy import UNLIMITED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "policies")
POLICIES = os.path.join(ROOT, "policies")

BAD = {
    "alerts_threshold_zero.yaml": "alerts.thresholds.0: expected a number > 0, got 0",
    "alerts_unknown_scope.yaml": "alerts.webhooks.0.scopes.1: expected one of global, org, user, provider, "
                                 "model; got 'team'",
    "alerts_bad_url.yaml": "alerts.webhooks.0.url: expected an http:// or https:// URL",     # never echoed
    "alerts_unset_variable.yaml": "alerts.webhooks.0.url: environment variable BP_UNSET_ALERT_URL is not set",
    "unknown_top_key.yaml": "(top level): unknown key 'ratelimit'",
    "unknown_scope_type.yaml": "defaults: unknown key 'team'",
    "unknown_window.yaml": "defaults.org: unknown key 'dya'",
    "unknown_unit.yaml": "defaults.user.day: unknown key 'dollars'",
    "unknown_override_window.yaml": "overrides.org.acme: unknown key 'weekly'",
    "negative_limit.yaml": "defaults.org.day.usd: expected a number >= 0, got -5",
    "limit_not_a_number.yaml": "defaults.user.minute.tokens: expected an integer or null, got 'lots'",
    "fractional_tokens.yaml": "defaults.user.minute.tokens: expected an integer or null, got 1.5",
    "missing_version.yaml": "(top level): missing required key 'version'",
    "bad_on_expiry.yaml": "reservation.on_expiry: expected one of commit, release; got 'forget'",
    "threshold_above_one.yaml": "router.downgrade_below: expected a number <= 1, got 1.5",
    "bad_timezone.yaml": "timezone: expected an IANA time zone name, got 'Mars/Olympus'",
    "bad_yaml.yaml": "line 3, column 1: expected ',' or '}', but got '<stream end>'",
    "infinite_usd.yaml": "defaults.org.day.usd: expected a finite number, got .inf",
    "nan_usd.yaml": "defaults.org.day.usd: expected a finite number, got .nan",
    "overflowing_usd.yaml": "defaults.user.month.usd: expected a finite number, got .inf",    # 1e400
    "usd_too_large.yaml": "defaults.org.day.usd: expected a number <= 1000000000, got 1000000000000.0",
    "duplicate_key.yaml": "line 7, column 7: duplicate key 'usd' (first given on line 5)",
    "duplicate_key_one_line.yaml": "line 3, column 23: duplicate key 'usd' (first given on line 3)",
    "not_utf8.yaml": "line 2: not valid UTF-8 (byte 0xe9); save the file as UTF-8",
}


def test_every_bad_fixture_has_its_expected_message():
    assert sorted(BAD) == sorted(os.listdir(FIXTURES))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_policy_is_rejected_naming_file_and_path(name, capsys):
    path = os.path.join(FIXTURES, name)
    with pytest.raises(ConfigError) as exc:
        policy.load(path)
    assert str(exc.value) == f"{path}: {BAD[name]}"
    assert main(["validate", path]) == 1
    assert capsys.readouterr().err == f"error: {path}: {BAD[name]}\n"


def test_validate_accepts_the_shipped_policies(capsys):
    files = [os.path.join(POLICIES, f"{env}.yaml") for env in policy.ENVIRONMENTS]
    assert main(["validate", *files]) == 0
    assert capsys.readouterr().out.count("ok: ") == 3


def test_console_script_exits_non_zero_on_a_bad_file():
    exe = shutil.which("budget-proxy")
    cmd = [exe] if exe else [sys.executable, "-m", "proxy.cli"]
    bad = os.path.join(FIXTURES, "unknown_top_key.yaml")
    done = subprocess.run([*cmd, "validate", bad], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "unknown key 'ratelimit'" in done.stderr


def test_overrides_replace_only_what_they_name_and_null_means_unlimited():
    p = policy.parse({"version": 1,
                      "defaults": {"org": {"day": {"usd": 5, "tokens": 100}, "month": {"usd": 50}}},
                      "overrides": {"org": {"acme": {"day": {"usd": 7.25}, "month": {"usd": None}}}}}, "p")
    day, month = policy.WINDOWS.index("day"), policy.WINDOWS.index("month")
    assert p.limits_for("org", "acme").table[day] == (100, 7_250_000)
    assert p.limits_for("org", "acme").table[month] == (UNLIMITED, UNLIMITED)
    assert p.limits_for("org", "other").table[day] == (100, 5_000_000)
    assert p.limits_for("user", "anyone").table == ((UNLIMITED, UNLIMITED),) * 4


def _write(dirpath, name, text):
    with open(os.path.join(dirpath, name), "w") as fh:
        fh.write(text)


def test_staging_falls_back_to_dev_but_prod_never_does(tmp_path):
    _write(tmp_path, "dev.yaml", "version: 1\nshadow: true\n")
    assert policy.load_for("staging", str(tmp_path)).shadow is True
    _write(tmp_path, "staging.yaml", "version: 1\nbogus: 1\n")
    assert policy.load_for("staging", str(tmp_path)).source.endswith("dev.yaml")
    with pytest.raises(ConfigError, match=r"prod\.yaml: file not found \(prod has no fallback policy\)"):
        policy.load_for("prod", str(tmp_path))
    _write(tmp_path, "prod.yaml", "version: 1\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'bogus' \(prod has no fallback policy\)"):
        policy.load_for("prod", str(tmp_path))


def test_explicit_policy_path_wins(tmp_path):
    _write(tmp_path, "mine.yaml", "version: 1\nreservation: {lease_seconds: 42}\n")
    got = policy.load_for("prod", POLICIES, override=str(tmp_path / "mine.yaml"))
    assert got.lease_seconds == 42


def test_yaml_1_2_exponents_are_numbers_and_merge_keys_may_override(tmp_path):
    _write(tmp_path, "p.yaml", "version: 1\nbase: &b {usd: 1e3, tokens: 5}\n")
    _write(tmp_path, "q.yaml", "version: 1\ndefaults:\n  org:\n    day: {<<: {usd: 1, tokens: 2}, usd: 2e1}\n")
    got = policy.load(str(tmp_path / "q.yaml"))
    assert got.limits_for("org", "x").table[policy.WINDOWS.index("day")] == (2, 20_000_000)


def test_the_schema_names_the_same_environments_as_the_code():
    from proxy import schema
    enum = schema.validator("config").schema["properties"]["environment"]["enum"]
    assert tuple(enum) == policy.ENVIRONMENTS


def test_unknown_environment_is_an_error():
    with pytest.raises(ConfigError, match="APP_ENV: expected one of dev, staging, prod; got 'qa'"):
        policy.load_for("qa", POLICIES)


def test_alerts_parse_with_defaults_and_expand_the_webhook_url(monkeypatch):
    assert policy.parse({"version": 1}, "p.yaml").alerts.thresholds == (0.8, 0.95, 1.0)
    monkeypatch.setenv("BP_ALERT_URL", "https://hooks.example.com/T1/s3cret")
    pol = policy.parse({"version": 1, "alerts": {"thresholds": [0.95, 0.5], "webhooks": [
        {"url": "${BP_ALERT_URL}", "scopes": ["org"]}, {"url": "http://127.0.0.1:9/any"}]}}, "p.yaml")
    assert pol.alerts.thresholds == (0.5, 0.95)
    org_only, every = pol.alerts.webhooks
    assert org_only.url == "https://hooks.example.com/T1/s3cret"
    assert org_only.wants("org") and not org_only.wants("user") and every.wants("user")
    assert "s3cret" not in repr(pol)                       # a webhook URL is a secret: never in logs
