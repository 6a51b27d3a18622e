"""Files people edit while the proxy runs: the policy and config.yaml.

Each is polled (every POLL_SECONDS, by size, mtime and inode, so an editor's atomic rename is
seen) and, for config.yaml, also re-read at once on SIGHUP. A change is loaded off the event loop
and validated whole; only then is it swapped in, in one assignment, so a request sees either the
old file or the new one, never a mix. An invalid edit is logged and the running one kept. A bad
file never stops the watcher: whatever a load raises is logged and counted in `failures`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import Any, Callable

from . import metrics
from .errors import ConfigError

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0
failures: Counter[str] = Counter()      # per watched file kind; exported in /healthz


def stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def watch(what: str, path: str, load: Callable[[str], Any], apply: Callable[[Any], None],
                stop: asyncio.Event, poke: asyncio.Event | None = None) -> None:
    """Reload `path` with `load` when it changes (or when `poke` is set) and hand the result to
    `apply`, until `stop` is set."""
    seen = stamp(path)
    while not stop.is_set():
        poked = await _wait(poke, POLL_SECONDS)
        now = stamp(path)
        if now is None or (now == seen and not poked):
            continue
        seen = now
        try:
            fresh = await asyncio.to_thread(load, path)
            apply(fresh)
        except ConfigError as exc:
            failures[what] += 1
            metrics.JOB_FAILURES.labels(f"{what}_reload").inc()
            log.error("%s change rejected, keeping the running %s: %s", what, what, exc)
        except Exception:  # noqa: BLE001 - a watcher must outlive any one bad file
            failures[what] += 1
            metrics.JOB_FAILURES.labels(f"{what}_reload").inc()
            log.exception("%s reload failed, keeping the running %s", what, what)
        else:
            log.info("%s reloaded from %s", what, path)


async def _wait(poke: asyncio.Event | None, timeout: float) -> bool:
    """Sleep `timeout` seconds or until poked; True if poked (and re-arm it)."""
    if poke is None:
        await asyncio.sleep(timeout)
        return False
    try:
        await asyncio.wait_for(poke.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    poke.clear()
    return True
