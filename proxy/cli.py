"""The `budget-proxy` command: serve, validate, hash-key."""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys

from . import policy, schema
from .errors import ApiError, ConfigError, StoreUnavailable


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
    from .app import serve
    return serve(args.config, host=args.host, port=args.port)


def cmd_usage(args: argparse.Namespace) -> int:
    """Read usage straight from the store (works while the proxy is down)."""
    import asyncio
    import json

    from . import config as config_mod, usage
    from .ledger import Ledger
    from .stores import open_store
    try:
        cfg = config_mod.load(args.config)
        pol = policy.load_for(cfg.environment, cfg.policies_dir, cfg.policy_path)
        query = usage.usage_query({"type": args.type, "id": args.id, "window": args.window})
    except ConfigError as exc:
        print(f"usage: {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"usage: --{exc.param}: {exc.message}", file=sys.stderr)
        return 2

    async def read() -> dict:
        ledger = Ledger(open_store(cfg.store_url, cfg.namespace), pol, namespace=cfg.namespace)
        try:
            return usage.document(await ledger.usage(**query))
        finally:
            await ledger.store.close()

    try:
        doc = asyncio.run(read())
    except StoreUnavailable as exc:
        print(f"usage: the budget store is unavailable: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else usage.table(doc))
    return 0


def _usage_parser(sub) -> None:
    p = sub.add_parser("usage", help="print budget usage, closest to a limit first (reads the store)")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--type", help="scope type: global, org, user, provider or model")
    p.add_argument("--id", help="scope id")
    p.add_argument("--window", help="minute, hour, day or month (default: all current windows)")
    p.add_argument("--json", action="store_true", help="print the same document as GET /admin/v1/usage")
    p.set_defaults(func=cmd_usage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="budget-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("validate", help="check policy and config files")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("hash-key", help="print the sha256 of a proxy API key, for config.yaml")
    p.add_argument("key", nargs="?")
    p.set_defaults(func=cmd_hash_key)
    _usage_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
