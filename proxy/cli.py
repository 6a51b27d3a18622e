"""The `budget-proxy` command: serve, validate, hash-key, export, audit."""

from __future__ import annotations

import argparse
import asyncio
import glob
import hashlib
import os
import sys

from . import policy, schema
from .errors import ApiError, ConfigError, StoreUnavailable
from .workers import metrics_dir, worker_count


def _kind(path: str, data: object) -> str:
    """A file with any of config.yaml's top-level keys (read from its schema) is a config file;
    anything else a policy."""
    config_keys = set(schema.validator("config").schema["properties"])
    return "config" if isinstance(data, dict) and config_keys & set(data) else "policy"


def validate_file(path: str) -> str:
    """Validate one policy or config file; returns its kind, raises ConfigError."""
    data = schema.load_yaml(path)
    kind = _kind(path, data)
    if kind == "policy":
        policy.parse(data, path)
    else:
        from . import config
        config.parse(data, path)
    return kind


def cmd_validate(args: argparse.Namespace) -> int:
    files = args.files or sorted(glob.glob(os.path.join("policies", "*.yaml"))) + \
        (["config.yaml"] if os.path.exists("config.yaml") else [])
    if not files:
        print("validate: no files given and none found (policies/*.yaml, config.yaml)", file=sys.stderr)
        return 2
    failed = 0
    for path in files:
        try:
            kind = validate_file(path)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
        else:
            print(f"ok: {path} ({kind})")
    return 1 if failed else 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        print("hash-key: give a key as an argument or on standard input", file=sys.stderr)
        return 2
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    with metrics_dir(args.workers):     # before anything can import prometheus_client: see proxy/workers.py
        from .app import serve
        return serve(args.config, host=args.host, port=args.port, workers=args.workers, loop=args.loop)


def _when(text: str) -> int:
    """Epoch ms from ISO 8601 (a zone-less time is UTC; a date alone is its midnight UTC) or
    from epoch seconds."""
    from datetime import datetime, timezone
    try:
        return int(float(text) * 1000)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time or epoch seconds, got {text!r}") from None
    return int((t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp() * 1000)


async def _with_ledger(config_path: str, work):
    """Run `work(ledger)` on the store the config names, read directly: the proxy may be down."""
    from . import config
    from .ledger import Ledger
    from .stores import open_store
    cfg = config.load(config_path)
    if cfg.store_url.startswith("memory://"):
        raise ConfigError(f"{config_path}: store: expected a shared store (redis://…) to read; "
                          "the memory store lives inside the proxy process")
    pol = policy.load_for(cfg.environment, cfg.policies_dir, cfg.policy_path)
    store = open_store(cfg.store_url, cfg.namespace)
    try:
        return await work(Ledger(store, pol, namespace=cfg.namespace))
    finally:
        await store.close()


def cmd_export(args: argparse.Namespace) -> int:
    """The settlement log, oldest first, one record a line (CSV: a header row first)."""
    from .errors import StoreUnavailable
    from .settlement_log import write_csv, write_jsonl

    async def work(ledger):
        return await ledger.settlements(args.since, args.until, limit=2 ** 62)
    try:
        records = asyncio.run(_with_ledger(args.config, work))
    except (ConfigError, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (write_csv if args.format == "csv" else write_jsonl)(reversed(records), sys.stdout)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Per scope: the window's used counters beside the same recomputed from the log; 1 on drift."""
    from .errors import AuditIncomplete, StoreUnavailable

    async def work(ledger):
        return await ledger.audit(args.window)
    try:
        drifts = asyncio.run(_with_ledger(args.config, work))
    except (ConfigError, StoreUnavailable, AuditIncomplete, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'scope':<40} {'tokens':>14} {'logged':>14} {'drift':>8} {'usd_micro':>16} {'logged':>16} {'drift':>10}")
    bad = 0
    for d in drifts:
        bad += bool(d.tokens or d.usd)
        print(f"{d.scope_type + ':' + d.scope_id:<40} {d.counter.tokens_used:>14} {d.logged_tokens:>14} "
              f"{d.tokens:>8} {d.counter.usd_used:>16} {d.logged_usd:>16} {d.usd:>10}")
    window = drifts[0].window_key.rsplit(":", 1)[-1] if drifts else args.window
    print(f"audit {window}: {len(drifts)} scopes, {bad} with drift")
    return 1 if bad else 0


def cmd_usage(args: argparse.Namespace) -> int:
    """Usage read straight from the store (works while the proxy is down)."""
    import json

    from . import usage
    try:
        query = usage.usage_query({"type": args.type, "id": args.id, "window": args.window})
    except ApiError as exc:
        print(f"error: --{exc.param}: {exc.message}", file=sys.stderr)
        return 2

    async def work(ledger):
        return usage.document(await ledger.usage(**query))
    try:
        doc = asyncio.run(_with_ledger(args.config, work))
    except (ConfigError, StoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2) if args.json else usage.table(doc))
    return 0


def _usage_parser(sub) -> None:
    p = sub.add_parser("usage", help="print budget usage, closest to a limit first (reads the store)")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--type", help="scope type: global, org, user, provider or model")
    p.add_argument("--id", help="scope id")
    p.add_argument("--window", help="minute, hour, day or month (default: every current window)")
    p.add_argument("--json", action="store_true", help="print the same document as GET /admin/v1/usage")
    p.set_defaults(func=cmd_usage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="budget-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=worker_count, default=1, metavar="N",
                   help="worker processes serving the port: a number, or 'auto' for one per core "
                        "(default 1; more than 1 needs a redis:// store)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop: uvloop when installed (auto, the default), or the one named")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("validate", help="check policy and config files")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("hash-key", help="print the sha256 of a proxy API key, for config.yaml")
    p.add_argument("key", nargs="?")
    p.set_defaults(func=cmd_hash_key)
    p = sub.add_parser("export", help="write the settlement log (oldest first)")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--since", type=_when, help="ISO 8601 time (UTC unless zoned) or epoch seconds")
    p.add_argument("--until", type=_when)
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("audit", help="recompute a window's counters from the settlement log")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--window", choices=("minute", "hour", "day", "month"), default="day")
    p.set_defaults(func=cmd_audit)
    _usage_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
