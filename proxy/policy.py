"""Budget policies: who may spend what, per window and unit.

A policy file gives limits per scope type (`defaults`) and per scope id (`overrides`); an override
replaces the default only for the (window, unit) pairs it names, and `null` removes a default.
A missing limit is unlimited. Dollars are held as integer micro-dollars from here on.

Selection (`select_path`): `BUDGET_POLICY_PATH` wins; otherwise `<policies>/<env>.yaml`. A missing
or invalid staging policy falls back to dev with a warning; prod has no fallback, and a missing or
invalid dev or prod policy stops start-up.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timezone, tzinfo
from types import MappingProxyType
from typing import Any, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from . import schema
from .errors import ConfigError
from .windows import WINDOWS

log = logging.getLogger(__name__)

SCOPE_TYPES = ("global", "org", "user", "provider", "model")
ENVIRONMENTS = ("dev", "staging", "prod")
UNLIMITED = -1
MICRO = 1_000_000
DEFAULT_THRESHOLDS = (0.8, 0.95, 1.0)


def usd_to_micro(usd: float) -> int:
    return int(round(usd * MICRO))


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one scope: `table[i]` is (tokens, micro_usd) for WINDOWS[i]; UNLIMITED = none."""

    table: tuple[tuple[int, int], ...] = ((UNLIMITED, UNLIMITED),) * len(WINDOWS)

    def merged(self, raw: Mapping[str, Any]) -> "Limits":
        rows = [list(r) for r in self.table]
        for i, window in enumerate(WINDOWS):
            units = raw.get(window) or {}
            if "tokens" in units:
                rows[i][0] = UNLIMITED if units["tokens"] is None else int(units["tokens"])
            if "usd" in units:
                rows[i][1] = UNLIMITED if units["usd"] is None else usd_to_micro(units["usd"])
        return Limits(tuple((t, d) for t, d in rows))


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str = field(repr=False)            # often a secret (Slack, Teams): never logged
    scopes: frozenset[str] | None = None    # scope types it is told about; None: all

    def wants(self, scope_type: str) -> bool:
        return self.scopes is None or scope_type in self.scopes


@dataclass(frozen=True, slots=True)
class Alerts:
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS   # fractions of a limit, ascending
    webhooks: tuple[Webhook, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    timezone: tzinfo = timezone.utc
    shadow: bool = False
    downgrade_below: float = 0.2
    default_max_tokens: int = 1024
    lease_seconds: int = 900
    on_expiry: str = "commit"          # what an expired lease does: "commit" or "release"
    # A call that sets no completion limit, where a limit applies, is sent upstream with the
    # completion it reserved as its limit, so the answer cannot outgrow the reservation.
    send_cap_upstream: bool = True
    # Fewer completion tokens than this left in the tightest scope: refuse rather than cut an
    # answer to almost nothing.
    min_completion_tokens: int = 16
    defaults: Mapping[str, Limits] = field(default_factory=dict)
    overrides: Mapping[tuple[str, str], Limits] = field(default_factory=dict)
    alerts: Alerts = Alerts()

    def limits_for(self, scope_type: str, scope_id: str) -> Limits:
        found = self.overrides.get((scope_type, scope_id))
        return found if found is not None else self.defaults[scope_type]


def parse(data: Any, source: str) -> Policy:
    """Validate raw YAML data and build the frozen Policy."""
    schema.validate("policy", data, source)
    defaults = {t: Limits().merged((data.get("defaults") or {}).get(t) or {}) for t in SCOPE_TYPES}
    overrides = {}
    for scope_type, by_id in (data.get("overrides") or {}).items():
        for scope_id, raw in (by_id or {}).items():
            overrides[(scope_type, str(scope_id))] = defaults[scope_type].merged(raw or {})
    router = data.get("router") or {}
    res = data.get("reservation") or {}
    return Policy(
        source=source,
        timezone=_zone(data.get("timezone", "UTC"), source),
        shadow=bool(data.get("shadow", False)),
        downgrade_below=float(router.get("downgrade_below", 0.2)),
        default_max_tokens=int(res.get("default_max_tokens", 1024)),
        lease_seconds=int(res.get("lease_seconds", 900)),
        on_expiry=res.get("on_expiry", "commit"),
        send_cap_upstream=bool(res.get("send_cap_upstream", True)),
        min_completion_tokens=int(res.get("min_completion_tokens", 16)),
        defaults=MappingProxyType(defaults),
        overrides=MappingProxyType(overrides),
        alerts=_alerts(data.get("alerts") or {}, source),
    )


def _alerts(raw: Mapping[str, Any], source: str) -> Alerts:
    """Webhook URLs may use ${VAR}, expanded now (at every reload); a URL is never shown in an
    error, since it usually carries a secret token."""
    from .config import expand
    hooks = []
    for i, hook in enumerate(raw.get("webhooks") or ()):
        url = expand(hook["url"], os.environ, source, f"alerts.webhooks.{i}.url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{source}: alerts.webhooks.{i}.url: expected an http:// or https:// URL")
        scopes = hook.get("scopes")
        hooks.append(Webhook(url, frozenset(scopes) if scopes else None))
    thresholds = tuple(sorted(set(raw.get("thresholds") or DEFAULT_THRESHOLDS)))
    return Alerts(tuple(float(t) for t in thresholds), tuple(hooks))


def _zone(name: str, source: str) -> tzinfo:
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{source}: timezone: expected an IANA time zone name, got {name!r}") from None


def load(path: str) -> Policy:
    return parse(schema.load_yaml(path), path)


def check_environment(env: str) -> str:
    """The one check of an environment name (APP_ENV, config.yaml's `environment`): each
    environment has its own policy file."""
    if env not in ENVIRONMENTS:
        raise ConfigError(f"APP_ENV: expected one of {', '.join(ENVIRONMENTS)}; got {env!r}")
    return env


def select_path(env: str, policies_dir: str, override: str | None = None) -> str:
    """The policy file for `env`, before validation (see module docstring)."""
    if override:
        return override
    return os.path.join(policies_dir, f"{check_environment(env)}.yaml")


def load_for(env: str, policies_dir: str, override: str | None = None) -> Policy:
    """Select and load the policy for `env`, applying the fallback rules."""
    path = select_path(env, policies_dir, override)
    try:
        return load(path)
    except ConfigError as exc:
        if override or env != "staging":
            if env == "prod":
                raise ConfigError(f"{exc} (prod has no fallback policy)") from None
            raise
        log.warning("staging policy unusable (%s); falling back to dev", exc)
        return load(os.path.join(policies_dir, "dev.yaml"))
