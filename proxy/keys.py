"""Every store key name is built here.

Layout (Redis; the memory store mirrors it):
  {ns}:w:<window label>  hash, one per window (e.g. d20261129): field "<scope type>:<scope id>"
                         -> tokens used, tokens reserved, micro-USD used, micro-USD reserved
                         (four little-endian doubles, see proxy/stores/lua/reserve.lua); field
                         "_" (WINDOW_MARKER) says the hash's expiry is set
                         The hash is also the window's index of the scopes seen in it, and expires
                         as a whole with its window (plus a margin), so old fields never pile up.
  {ns}:r:<reservation>   string, one reservation's state, amounts, lease deadline and counters
  {ns}:leases            sorted set of open reservation ids scored by lease deadline (epoch ms),
                         and LEASE_ANCHOR (score +inf, never due)
  {ns}:log               stream, the settlement log (capped)
  {ns}:claim:<name>      string, a once-only claim (alert deduplication)

One hash per window rather than one key per scope and window: a request reads and writes each
window it touches with one HMGET and one HSET, whatever the number of scopes (a 5-scope request
over 3 windows costs 6 counter commands a call, not 5 x 3 x 3).

On `redis://` all keys of one deployment share one hash tag, `{<namespace>}`: a reservation
checks and changes the global, org, user, provider and model counters in one script, and a
multi-key script needs all its keys in one slot. On `redis+cluster://` each org's keys carry
their own tag, `{<namespace>:<org>}`, and the scopes shared by orgs (global, provider, model)
are lent to each org's slot in chunks from `{<namespace>}:a:<window label>` (see tenant_tag,
lend_key and docs/cluster.md). The single-Redis store keeps the one tag: with one server there is
nothing to spread, and the lending costs round trips that only buy capacity on a cluster.

Scope ids come from clients (the OpenAI `user` field), so they are escaped: `%`, `:`, `{`, `}`,
whitespace and control characters become %XX, which keeps fields unambiguous (the first `:`
separates type from id; no whitespace, so the scripts can split lists on it) and the hash tag intact.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import quote, unquote

_UNSAFE = re.compile(r"[%:{}\s\x00-\x1f\x7f]")


@lru_cache(maxsize=65536)
def _escape(part: str) -> str:
    # UTF-8 percent-encoding, so non-ASCII whitespace (U+2003) decodes back unambiguously.
    return _UNSAFE.sub(lambda m: quote(m.group(), safe=""), part)


def window_key(ns: str, window_label: str) -> str:
    """The hash of every scope's usage in one window (see the module docstring)."""
    return f"{{{ns}}}:w:{window_label}"


def scope_field(scope_type: str, scope_id: str) -> str:
    """A scope's field in a window hash."""
    return f"{scope_type}:{_escape(scope_id)}"


def parse_scope_field(field: str) -> tuple[str, str]:
    """(scope type, scope id) from a window hash field."""
    scope_type, _, escaped = field.partition(":")
    return scope_type, unquote(escaped)


def record_key(ns: str, reservation_id: str) -> str:
    """A string describing one reservation (its state, amounts, lease deadline and counters)."""
    return f"{{{ns}}}:r:{_escape(reservation_id)}"


def leases_key(ns: str) -> str:
    """A sorted set of open reservation ids scored by lease deadline (epoch ms), plus LEASE_ANCHOR."""
    return f"{{{ns}}}:leases"


#: A member of every lease index, scored +inf (never due, so the sweeper never reads it), added by
#: every ZADD of a reserve (one Redis: the scripts; proxy/stores/redis.py gives them this text).
#: Why: a sorted set of up to 128 members, each of up to 64 bytes (Redis's defaults), is a
#: listpack, where ZADD and ZREM scan and shift the whole set: 15k Redis instructions a request
#: (6 %) at the proxy bench's ~40 open reservations (bench/results/redis-encodings.md). A member longer
#: than zset-max-listpack-value makes Redis create the set as a skiplist (or convert it), and Redis
#: 7.0 never turns one back: a member's add or remove is then a dict look-up and a skiplist step.
#: Its text cannot be a reservation id (the gateway's are hexadecimal, and ids are never spaced).
LEASE_ANCHOR = ("~ never due: this member (score +inf) keeps the lease index a skiplist, where an "
                "add or a remove costs O(log n), not O(n) as in a listpack")

#: The value of a window hash's marker field "_" (its presence says the hash's expiry is set; the
#: scripts write it with every HSET of the hash). The same device as LEASE_ANCHOR: a hash of up to
#: 128 fields with values of up to 64 bytes is a listpack, where HMGET scans the whole hash for
#: each field asked and HSET again for each field written; a day hash holds a field per org,
#: user, provider and model seen that day: with 60 other scopes' fields before a request's own,
#: a lone request cost Redis 1.0M instructions instead of 0.69M, +44 %
#: (bench/results/redis-encodings.md). A value longer than
#: hash-max-listpack-value makes the first HSET create the hash as a hashtable (or convert it),
#: never turned back.
WINDOW_MARKER = ("expiry set; this value, longer than a listpack value may be, keeps the window hash a "
                 "hashtable, where a field is found by a dict look-up, not by a scan")


def log_key(ns: str) -> str:
    """The settlement log: a stream capped at the configured length."""
    return f"{{{ns}}}:log"


def tenant_tag(ns: str, tenant: str) -> str:
    """The hash tag body of one tenant's keys on a Redis Cluster (`tenant`: an escaped org id).
    Pass it as `ns` to the builders above for that tenant's window hashes, records, lease index
    and log: an org's org, user and end-user counters and its reservations share one slot, and
    orgs spread over the shards (see docs/cluster.md)."""
    return f"{ns}:{tenant}"


def in_tenant(key: str, ns: str, tenant: str) -> str:
    """`key` (built with `ns`) moved into `tenant`'s slot; a key already there is kept."""
    head = f"{{{ns}}}"
    return f"{{{tenant_tag(ns, tenant)}}}{key[len(head):]}" if key.startswith(head) else key


def home_key(key: str, ns: str) -> str:
    """A tenant's key (see in_tenant) as built with `ns` alone: how the ledger names it."""
    return f"{{{ns}}}{key[key.index('}') + 1:]}" if key.startswith(f"{{{ns}:") else key


def window_label(key: str) -> str:
    """The window label of a window hash key, whatever its tag."""
    return key.rpartition(":w:")[2]


def lend_key(ns: str, window_label: str) -> str:
    """Cluster store: the hash lending the limits of scopes shared by tenants (global, provider,
    model) to the tenants' allowances, one per window, in the deployment's own slot."""
    return f"{{{ns}}}:a:{window_label}"


def tenants_key(ns: str) -> str:
    """Cluster store: the set of tenants (escaped org ids) that ever reserved, for the sweeper
    and the usage read, which visit every tenant's slot."""
    return f"{{{ns}}}:tenants"


def claim_key(ns: str, name: str) -> str:
    """A once-only claim (e.g. an alert already sent for a scope, window and threshold)."""
    return f"{{{ns}}}:claim:{_escape(name)}"
