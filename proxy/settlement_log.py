"""The settlement log as its readers see it: one record per settlement, and the audit over it.

The store appends an entry in the same atomic call that moves the counters (stores/settle.lua,
MemoryStore._append), so the log and the counters cannot disagree. Exported fields are pinned by
issue 6 (other tools read them): EXPORT_FIELDS, in that order, for JSON lines and CSV alike.

Beyond them a record keeps what an audit needs: the tokens and micro-dollars the counters' used
amounts moved by (`usd_micro` is the same as the exported one; `charged_tokens` may differ from
prompt + completion when usage was estimated), and the windows and scopes it was charged to
(those of the reservation: a request is charged to the windows it started in). A late commit
after the sweeper charged an expired lease is logged as outcome "corrected" with the DELTA
(actual minus what the sweeper charged, possibly negative) as its amounts, so summing `usd_micro`
over the log gives the counters' used amounts exactly.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from json.encoder import encode_basestring_ascii
from typing import Iterable, NamedTuple

from .keys import parse_scope_field
from .stores.base import LogEntry, Totals

EXPORT_FIELDS = ("id", "time", "org", "user", "end_user", "endpoint", "model_requested", "model",
                 "provider", "stream", "prompt_tokens", "cached_tokens", "completion_tokens",
                 "reasoning_tokens", "usd_micro", "outcome", "downgraded_from", "latency_ms")
OUTCOMES = ("ok", "cut", "client_gone", "upstream_error", "released", "expired", "corrected")


class RequestInfo(NamedTuple):
    """What is known of a request when it is reserved; kept with the reservation."""
    org: str
    user: str
    end_user: str | None
    endpoint: str              # chat | completion | embedding | responses | messages
    model_requested: str
    model: str
    provider: str
    stream: bool
    downgraded_from: str | None

    def pack(self) -> str:
        """One line, compact (a JSON array, no names): stored with every open reservation.
        Built per reserve, so the usual all-string record is spelt out with the json module's own
        string encoder (what json.dumps writes, byte for byte, without its per-call set-up), and
        kept: a busy caller's requests repeat the same few (a dict look-up instead of seven
        encodings)."""
        packed = _PACKED.get(self)
        if packed is None:
            if len(_PACKED) >= 4096:        # bounded: end users are the client's to name
                _PACKED.clear()
            packed = _PACKED[self] = self._pack()
        return packed

    def _pack(self) -> str:
        org, user, end_user, endpoint, asked, model, provider, stream, down = self
        if type(org) is type(user) is type(endpoint) is type(asked) is type(model) is type(provider) is str \
                and (end_user is None or type(end_user) is str) and (down is None or type(down) is str):
            enc = encode_basestring_ascii
            return (f"[{enc(org)},{enc(user)},{'null' if end_user is None else enc(end_user)},{enc(endpoint)},"
                    f"{enc(asked)},{enc(model)},{enc(provider)},{int(stream)},{'null' if down is None else enc(down)}]")
        return json.dumps([*self[:7], int(self.stream), self.downgraded_from], separators=(",", ":"))

    @classmethod
    def unpack(cls, text: str) -> RequestInfo | None:
        if not text:
            return None
        v = json.loads(text)
        return cls(*v[:7], bool(v[7]), v[8])


_PACKED: dict[RequestInfo, str] = {}


class TokenCounts(NamedTuple):
    """The tokens a settlement's log record holds (pricing.Usage is the finer split it is priced by)."""
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int

    def pack(self) -> str:
        prompt, cached, completion, reasoning = self
        return f"{int(prompt)} {int(cached)} {int(completion)} {int(reasoning)}"

    @classmethod
    def unpack(cls, text: str) -> TokenCounts | None:
        return cls(*map(int, text.split())) if text else None


class SettlementRecord(NamedTuple):
    id: str
    time: str                  # ISO 8601 UTC, milliseconds
    org: str | None
    user: str | None
    end_user: str | None
    endpoint: str | None
    model_requested: str | None
    model: str | None
    provider: str | None
    stream: bool | None
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    reasoning_tokens: int | None
    usd_micro: int
    outcome: str
    downgraded_from: str | None
    latency_ms: int | None
    # Not exported: for audit.
    charged_tokens: int
    windows: tuple[tuple[str, tuple[str, ...]], ...]   # (window key, scope fields charged there)
    seq: str                                           # position in the log

    def export(self) -> dict:
        return {name: getattr(self, name) for name in EXPORT_FIELDS}


def record(entry: LogEntry) -> SettlementRecord:
    info = RequestInfo.unpack(entry.info)
    usage = TokenCounts.unpack(entry.usage)
    when = datetime.fromtimestamp(entry.time_ms / 1000, timezone.utc)
    return SettlementRecord(
        entry.id, when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        *(info[:7] if info else (None,) * 7), info.stream if info else None,
        *(usage if usage else (None,) * 4), entry.usd, entry.outcome,
        info.downgraded_from if info else None, int(entry.latency_ms) if entry.latency_ms else None,
        entry.tokens, entry.windows, entry.seq)


def write_jsonl(records: Iterable[SettlementRecord], out) -> None:
    for r in records:
        out.write(json.dumps(r.export(), separators=(",", ":")) + "\n")


def write_csv(records: Iterable[SettlementRecord], out) -> None:
    """A header row in EXPORT_FIELDS order; None as an empty cell, booleans as true/false."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EXPORT_FIELDS)
    for r in records:
        w.writerow(["" if v is None else ("true" if v is True else "false" if v is False else v)
                    for v in (getattr(r, name) for name in EXPORT_FIELDS)])


class Drift(NamedTuple):
    scope_type: str
    scope_id: str
    window_key: str
    counter: Totals            # the counter as stored
    logged_tokens: int         # the used amounts summed from the log
    logged_usd: int

    @property
    def tokens(self) -> int:
        return self.counter.tokens_used - self.logged_tokens

    @property
    def usd(self) -> int:
        return self.counter.usd_used - self.logged_usd


def audit(window_key: str, counters: dict[str, Totals], records: Iterable[SettlementRecord]) -> list[Drift]:
    """Every scope's used amounts in one window recomputed from the log, beside the counters."""
    logged: dict[str, list[int]] = {}
    for r in records:
        for key, fields in r.windows:
            if key == window_key:
                for f in fields:
                    acc = logged.setdefault(f, [0, 0])
                    acc[0] += r.charged_tokens
                    acc[1] += r.usd_micro
    out = []
    for f in sorted(set(counters) | set(logged)):
        t, d = logged.get(f, (0, 0))
        out.append(Drift(*parse_scope_field(f), window_key, counters.get(f, Totals(0, 0, 0, 0)), t, d))
    return out

