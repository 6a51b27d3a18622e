"""Every store key name is built here.

All keys of one deployment share one Redis Cluster hash tag, `{<namespace>}`: a reservation must
check and change the global, org, user, provider and model counters in one script, and a
multi-key script needs all its keys in one slot. Since every request touches the global counters,
no finer tag (per org, say) could keep a request's keys together anyway. The cost is that one
deployment's budget keys live on one shard; Cluster still gives replicas and failover, and a
second deployment (another namespace) lands elsewhere.

Scope ids come from clients (the OpenAI `user` field), so they are escaped: `%`, `:`, `{`, `}`,
whitespace and control characters become %XX, which keeps keys unambiguous and the hash tag intact.
"""

from __future__ import annotations

import re
from functools import lru_cache

_UNSAFE = re.compile(r"[%:{}\s\x00-\x1f\x7f]")


@lru_cache(maxsize=65536)
def _escape(part: str) -> str:
    return _UNSAFE.sub(lambda m: "%{:02X}".format(ord(m.group())), part)


def counter_key(ns: str, scope_type: str, scope_id: str, window_label: str) -> str:
    """A hash of one scope's usage in one window: fields t/tr (tokens used/reserved), d/dr (micro-USD)."""
    return f"{{{ns}}}:c:{scope_type}:{_escape(scope_id)}:{window_label}"


def record_key(ns: str, reservation_id: str) -> str:
    """A hash describing one reservation (its state, amounts, lease deadline and counter keys)."""
    return f"{{{ns}}}:r:{_escape(reservation_id)}"


def leases_key(ns: str) -> str:
    """A sorted set of open reservation ids scored by lease deadline (epoch ms)."""
    return f"{{{ns}}}:leases"
