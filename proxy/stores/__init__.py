"""Budget stores: the narrow interface of atomic operations the ledger is built on.

Three implementations pass one contract suite (tests/stores): `memory://` (the embedded default,
one process), `redis://` (many processes and machines share one Redis) and `redis+cluster://`
(the same over a Redis Cluster; see docs/cluster.md).
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Counter, Expired, ReserveOutcome, Seen, Status, Store, Totals

__all__ = ["Counter", "Expired", "ReserveOutcome", "Seen", "Status", "Store", "Totals", "URL_EXPECTED",
           "open_store", "url_problem"]

URL_EXPECTED = "memory:// or a redis://, rediss://, unix:// or redis+cluster:// URL"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEME = "redis+cluster://"


def url_problem(url: str) -> str | None:
    """What is wrong with a store URL (for `<where>: <problem>`), or None when a store opens it.

    The one check of store URLs: config.py applies it to `store:` and to REDIS_URL / REDIS_HOST
    at load, so a bad URL is a config error at start-up, never a traceback later."""
    if url.startswith("memory://"):
        return None
    if url.startswith(CLUSTER_SCHEME):
        from .cluster_client import parse_cluster_url
        try:
            parse_cluster_url(url)
        except ValueError as exc:
            return str(exc)
        return None
    if not url.startswith(_REDIS_SCHEMES):
        return f"expected {URL_EXPECTED}"
    from redis.asyncio.connection import parse_url
    try:
        parse_url(url)
    except ValueError as exc:          # a port that is not a number, a bad query argument, ...
        return f"expected {URL_EXPECTED} ({exc})"
    return None


def open_store(url: str, namespace: str = "bp") -> Store:
    """A store for `url` (checked by `url_problem` first): `memory://`, `redis://…` /
    `rediss://…` / `unix://…`, or `redis+cluster://host:port[,host:port…]`."""
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(f"store: {problem}, got {url.split('://')[0]!r}://…")
    if url.startswith("memory://"):
        from .memory import MemoryStore
        return MemoryStore()
    if url.startswith(CLUSTER_SCHEME):
        from .cluster import ClusterStore
        return ClusterStore(url, namespace=namespace)
    from .redis import RedisStore
    return RedisStore(url, namespace=namespace)
