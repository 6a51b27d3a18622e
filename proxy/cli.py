"""The `budget-proxy` command: serve, validate, hash-key."""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import sys

from . import policy, schema
from .errors import ConfigError
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
