"""Budget stores: the narrow interface of atomic operations the ledger is built on.

Two implementations pass one contract suite (tests/stores): `memory://` (the embedded default, one
process) and `redis://` (many processes and machines share one Redis).
"""

from __future__ import annotations

from .base import Counter, Expired, ReserveOutcome, Seen, Status, Store, Totals

__all__ = ["Counter", "Expired", "ReserveOutcome", "Seen", "Status", "Store", "Totals", "open_store"]


def open_store(url: str, namespace: str = "bp") -> Store:
    """A store for `url`: `memory://` or `redis://…` / `rediss://…` / `unix://…`."""
    if url.startswith("memory://"):
        from .memory import MemoryStore
        return MemoryStore()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore
        return RedisStore(url, namespace=namespace)
    from ..errors import ConfigError
    raise ConfigError(f"store: expected memory:// or a redis:// URL, got {url.split('://')[0]!r}://…")
