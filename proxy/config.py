"""config.yaml: listen address, store, environment, providers, the model registry, routes, keys.

Read into frozen dataclasses at start-up and again whenever the file changes or the proxy gets
SIGHUP (proxy/watch.py): keys, models, prices, routes and providers are swapped whole; changes to
the fields in RESTART_FIELDS are logged as needing a restart and otherwise ignored.
Values may use `${VAR}` and `${VAR:-default}`, expanded from the environment at load; a value
that is exactly one reference is then typed as YAML would type it (`port: ${PORT:-8787}` is an int).
Environment overrides: APP_ENV, BUDGET_ENFORCEMENT_MODE, BUDGET_POLICY_PATH, REDIS_URL (or
REDIS_HOST / REDIS_PORT / REDIS_DB / REDIS_PASSWORD).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import quote

import yaml

from . import pricing, schema
from .errors import ConfigError
from .stores.base import LOG_LENGTH
from .loopback import loopback_host
from .policy import check_environment
from .stores import url_problem

log = logging.getLogger(__name__)

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str                 # without a trailing slash, e.g. https://api.openai.com/v1
    api_key_env: str | None       # the *name* of the variable holding the upstream key
    connect_timeout: float
    read_timeout: float
    api_key: str | None = field(default=None, repr=False)   # read from api_key_env at load; never logged
    kind: str = "openai"          # the API it speaks: openai | anthropic
    anthropic_version: str = "2023-06-01"   # sent as `anthropic-version` to an anthropic provider
    # The chat field that carries a completion cap the proxy adds: OpenAI's current
    # `max_completion_tokens`, or `max_tokens` for servers that read only that (Ollama, older vLLM).
    chat_max_tokens_field: str = "max_completion_tokens"


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    provider: str
    upstream: str                 # the model name sent upstream
    input_per_million: float      # USD per million tokens == micro-USD per token
    output_per_million: float
    downgrade_to: tuple[str, ...]
    # Prompt-cache prices; None: the provider kind's default (see pricing.DEFAULT_MULTIPLIERS).
    cached_input_per_million: float | None = None
    cache_write_per_million: float | None = None       # short retention (Anthropic 5 min)
    cache_write_1h_per_million: float | None = None    # long retention (Anthropic 1 h, OpenAI 12 h)
    kind: str = "openai"          # its provider's kind, which decides the defaults above
    rates: pricing.Rates = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Fixed once, at load: requests only multiply integers.
        object.__setattr__(self, "rates", pricing.rates(
            self.kind, self.input_per_million, self.output_per_million, self.cached_input_per_million,
            self.cache_write_per_million, self.cache_write_1h_per_million))

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-dollars, rounded up, for uncached prompt and completion tokens (an estimate)."""
        return pricing.estimate_cost(prompt_tokens, completion_tokens, self.rates)

    def charge(self, usage: pricing.Usage) -> int:
        """Micro-dollars, rounded up, for real usage (cache reads and writes at their own rates)."""
        return pricing.cost(usage, self.rates)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str                     # safe to log; the key itself never is
    org: str
    user: str | None
    allow_end_user: bool          # may the body's `user` field name the end user?


@dataclass(frozen=True, slots=True)
class AdminKey:
    name: str                     # safe to log
    sha256: str                   # hex digest of the key; the key itself is never held


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    host: str
    port: int
    max_body_bytes: int
    shutdown_grace_seconds: float  # how long open requests may run on after SIGTERM
    allow_open_auth: bool         # no keys, yet listening beyond loopback: the operator said yes
    environment: str
    enforcement: str              # strict | advisory | disabled
    store_url: str
    namespace: str
    log_records: int              # settlement log records the store keeps (settlement_log.max_records)
    policy_path: str | None       # None: <policies_dir>/<environment>.yaml
    policies_dir: str
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    routes: Mapping[str, tuple[str, ...]]
    keys: Mapping[str, ApiKey]    # sha256 hex of the key -> who it is
    admin_keys: tuple[AdminKey, ...] = ()   # open /admin/; never the proxy

    def candidates(self, name: str) -> tuple[str, ...]:
        """Models to try for a requested name, best first: a route's list, or the model and
        its `downgrade_to`. Empty when the name is neither."""
        if name in self.routes:
            return self.routes[name]
        model = self.models.get(name)
        return (name, *model.downgrade_to) if model else ()


# What a running proxy cannot take from a reloaded config.yaml: the socket it listens on, the store
# it holds, and what decides the store's and the policy's lifetime.
RESTART_FIELDS = ("host", "port", "max_body_bytes", "shutdown_grace_seconds", "allow_open_auth",
                  "environment", "enforcement", "store_url", "namespace", "policy_path", "log_records")


def restart_needed(old: Config, new: Config) -> list[str]:
    """The fields of `new` that differ from `old` and only take effect after a restart.
    Removing every key does too: it opens auth, which `serve` allows only after checking the
    listen address (check_exposure), at start-up."""
    later = [f for f in RESTART_FIELDS if getattr(old, f) != getattr(new, f)]
    return later + ["keys"] if old.keys and not new.keys else later


def expand(value: Any, env: Mapping[str, str], source: str, path: str = "") -> Any:
    """Expand ${VAR} / ${VAR:-default} in every string of `value`."""
    if isinstance(value, dict):
        return {k: expand(v, env, source, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, env, source, f"{path}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {path}: environment variable {name} is not set")

    out = _REF.sub(sub, value)
    if _REF.fullmatch(value):
        try:
            typed = yaml.safe_load(out)
        except yaml.YAMLError:
            return out
        return typed if isinstance(typed, (int, float, bool)) else out
    return out


def parse(data: Any, source: str, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    data = expand(data, env, source)
    schema.validate("config", data, source)
    environment = check_environment(env.get("APP_ENV") or data.get("environment", "dev"))
    enforcement = env.get("BUDGET_ENFORCEMENT_MODE") or data.get("enforcement", "strict")
    if enforcement not in ("strict", "advisory", "disabled"):
        raise ConfigError(f"BUDGET_ENFORCEMENT_MODE: expected one of strict, advisory, disabled; "
                          f"got {enforcement!r}")
    providers = {n: _provider(n, p, env) for n, p in data["providers"].items()}
    models = {n: _model(n, m, providers, source) for n, m in data["models"].items()}
    prod = environment == "prod"
    models = {n: _checked_downgrades(m, models, source, prod) for n, m in models.items()}
    routes = {n: _checked_route(n, r, models, source, prod) for n, r in (data.get("routes") or {}).items()}
    keys = _keys(data.get("keys") or {}, source, prod)
    admin_keys = _admin_keys(data.get("admin_keys") or {}, keys, source)
    listen = data.get("listen") or {}
    base = os.path.dirname(os.path.abspath(source))
    # BUDGET_POLICY_PATH is relative to where the proxy runs; `policy:` to the config file.
    policy_path = os.path.abspath(env["BUDGET_POLICY_PATH"]) if env.get("BUDGET_POLICY_PATH") \
        else data.get("policy")
    return Config(
        source=source, host=listen.get("host", "127.0.0.1"), port=listen.get("port", 8787),
        max_body_bytes=listen.get("max_body_bytes", 8 * 1024 * 1024),
        shutdown_grace_seconds=float(listen.get("shutdown_grace_seconds", 30)),
        allow_open_auth=bool(listen.get("allow_open_auth", False)),
        environment=environment, enforcement=enforcement,
        store_url=_store_url(data.get("store", "memory://"), env, source),
        namespace=data.get("namespace", "bp"),
        log_records=(data.get("settlement_log") or {}).get("max_records", LOG_LENGTH),
        policy_path=os.path.join(base, policy_path) if policy_path else None,
        policies_dir=os.path.join(base, "policies"),
        providers=MappingProxyType(providers), models=MappingProxyType(models),
        routes=MappingProxyType(routes), keys=MappingProxyType(keys), admin_keys=admin_keys)


def check_exposure(cfg: Config, host: str) -> None:
    """Refuse open auth (no keys) on an address other machines can reach, unless
    `listen.allow_open_auth: true`: such a proxy spends the operator's upstream key for anyone."""
    if cfg.keys or cfg.allow_open_auth or _loopback(host):
        return
    raise ConfigError(f"{cfg.source}: keys: no API keys are configured, so auth is open, and the proxy "
                      f"would listen on {host!r}, which other machines can reach; configure `keys`, "
                      f"listen on 127.0.0.1, or set listen.allow_open_auth: true to serve anyone")


def _loopback(host: str) -> bool:
    return bool(host) and loopback_host(host)


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    return parse(schema.load_yaml(path), path, env)


def _provider(name: str, raw: dict, env: Mapping[str, str]) -> Provider:
    key_env = raw.get("api_key_env")
    return Provider(name, raw["base_url"].rstrip("/"), key_env, float(raw.get("connect_timeout", 10)),
                    float(raw.get("read_timeout", 600)), env.get(key_env) or None if key_env else None,
                    raw.get("kind", "openai"), raw.get("anthropic_version", "2023-06-01"),
                    raw.get("chat_max_tokens_field", "max_completion_tokens"))


def _price(raw: dict, key: str) -> float | None:
    return None if raw.get(key) is None else float(raw[key])


def _model(name: str, raw: dict, providers: Mapping[str, Provider], source: str) -> Model:
    if raw["provider"] not in providers:
        raise ConfigError(f"{source}: models.{name}.provider: expected one of "
                          f"{', '.join(sorted(providers))}; got {raw['provider']!r}")
    return Model(name, raw["provider"], raw.get("upstream", name), float(raw["input_per_million"]),
                 float(raw["output_per_million"]), tuple(raw.get("downgrade_to", ())),
                 _price(raw, "cached_input_per_million"), _price(raw, "cache_write_per_million"),
                 _price(raw, "cache_write_1h_per_million"), providers[raw["provider"]].kind)


def _unknown(where: str, names, models, source: str, prod: bool) -> tuple[str, ...]:
    """Keep the names that are registry models; an unknown one is fatal in prod, dropped elsewhere."""
    kept = []
    for name in names:
        if name in models:
            kept.append(name)
            continue
        msg = f"{source}: {where}: {name!r} is not a model in the registry"
        if prod:
            raise ConfigError(msg)
        log.warning("%s (ignored outside prod)", msg)
    return tuple(kept)


def _same_kind(where: str, names, models, source: str) -> None:
    """A request is forwarded as it came (no translation between APIs), so every candidate for
    one name must speak the same API as the first."""
    kinds = {models[n].kind for n in names}
    if len(kinds) > 1:
        first = models[names[0]]
        odd = next(n for n in names if models[n].kind != first.kind)
        raise ConfigError(f"{source}: {where}: {odd!r} speaks the {models[odd].kind} API; expected "
                          f"every candidate to speak {first.kind}, like {first.name!r}")


def _checked_downgrades(m: Model, models, source: str, prod: bool) -> Model:
    kept = _unknown(f"models.{m.name}.downgrade_to", m.downgrade_to, models, source, prod)
    _same_kind(f"models.{m.name}.downgrade_to", (m.name, *kept), models, source)
    return m if kept == m.downgrade_to else dataclasses.replace(m, downgrade_to=kept)


def _checked_route(name: str, route: list, models, source: str, prod: bool) -> tuple[str, ...]:
    if name in models:
        raise ConfigError(f"{source}: routes.{name}: a route cannot share its name with a model")
    kept = _unknown(f"routes.{name}", route, models, source, prod)
    if not kept:
        raise ConfigError(f"{source}: routes.{name}: expected at least one registry model")
    _same_kind(f"routes.{name}", kept, models, source)
    return kept


def _keys(raw: dict, source: str, prod: bool) -> dict[str, ApiKey]:
    if not raw and prod:
        raise ConfigError(f"{source}: keys: expected at least one key in prod (auth cannot be open)")
    keys: dict[str, ApiKey] = {}
    for name, k in raw.items():
        if k["sha256"] in keys:
            raise ConfigError(f"{source}: keys.{name}.sha256: the same key hash is listed twice")
        keys[k["sha256"]] = ApiKey(str(name), k["org"], k.get("user"), bool(k.get("allow_end_user", False)))
    return keys


def _admin_keys(raw: dict, keys: Mapping[str, ApiKey], source: str) -> tuple[AdminKey, ...]:
    """A proxy key must never open /admin/, so the same hash in both lists is an error."""
    out: list[AdminKey] = []
    for name, k in raw.items():
        digest = k["sha256"]
        if digest in keys:
            raise ConfigError(f"{source}: admin_keys.{name}.sha256: expected a key that is not also "
                              f"a proxy key (it is keys.{keys[digest].name})")
        if any(a.sha256 == digest for a in out):
            raise ConfigError(f"{source}: admin_keys.{name}.sha256: the same key hash is listed twice")
        out.append(AdminKey(str(name), digest))
    return tuple(out)


def _store_url(configured: str, env: Mapping[str, str], source: str) -> str:
    """The store URL: REDIS_URL, else one built from REDIS_HOST & co., else the file's `store`;
    checked here whichever it is, so a bad one stops start-up as a config error."""
    if env.get("REDIS_URL"):
        url, where = env["REDIS_URL"], "REDIS_URL"
    elif env.get("REDIS_HOST"):
        password = env.get("REDIS_PASSWORD")
        auth = f":{quote(password, safe='')}@" if password else ""
        url = f"redis://{auth}{env['REDIS_HOST']}:{env.get('REDIS_PORT', '6379')}/{env.get('REDIS_DB', '0')}"
        where = "REDIS_HOST, REDIS_PORT, REDIS_DB"
    else:
        url, where = configured, f"{source}: store"
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}, got {schema.shown(url)}")
    return url
