"""How the Redis store's data looks on the wire: script arguments, records, values, log entries.

Counters go to the scripts as plain ARGV entries, grouped by window (hiredis packs arguments in C,
see redis.py `_CPacked`, so the client pays little per argument, and Lua parses nothing). reserve.lua takes, per window,
`<expire-at> <n> <n fields> <m> <m x (position, token limit, usd limit)>`: limits only for the
limited counters, the only ones it checks. settle.lua takes `<expire-at> <n> <n fields>`; the
reservation record keeps that form, so the sweeper can settle a reservation whose process died.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Sequence

from .base import EMPTY, Counter, LogEntry, ReserveOutcome, Seen, Status, Totals

_VALUE = struct.Struct("<dddd")
_new = tuple.__new__
_STATUS = {int(s): s for s in Status}     # Status(n) costs 0.45 µs: an Enum call


class Wire(NamedTuple):
    keys: tuple[str, ...]              # the window hashes, in order
    reserve: tuple[str, ...]           # reserve.lua's counter arguments
    settle: tuple[str, ...]            # settle.lua's counter arguments
    record: str                        # `settle`, space-joined, for the reservation record
    reserve_tail: tuple[str, ...]      # reserve.lua's ARGV from 8 on: record, then `reserve`
    settle_tail: tuple[str, ...]       # settle.lua's ARGV from 13 on: record, then `settle`
    limited: tuple[tuple[int, int], ...]   # the limited counters, in order: (position, units),
    #                                    units 1 tokens, 2 micro-USD, 3 both: what reserve's reply
    #                                    reports values for (its "seen": 2 per unit)


def wire(counters: Sequence[Counter]) -> Wire:
    groups: dict[str, list[Counter]] = {}
    for c in counters:
        groups.setdefault(c.window, []).append(c)
    reserve: list[str] = []
    settle: list[str] = []
    positions: list[int] = []
    base = 0
    for group in groups.values():
        head = (str(group[0].expire_at), str(len(group)), *(c.scope for c in group))
        settle += head
        # -1 is unlimited; below -1 an allowance (cluster store), checked like a limit
        limited = [(j, c) for j, c in enumerate(group, 1) if c.token_limit != -1 or c.usd_limit != -1]
        reserve += (*head, str(len(limited)))
        for j, c in limited:
            reserve += (str(j), str(c.token_limit), str(c.usd_limit))
            positions.append((base + j - 1, (c.token_limit != -1) + 2 * (c.usd_limit != -1)))
        base += len(group)
    record = " ".join(settle)
    return Wire(tuple(groups), tuple(reserve), tuple(settle), record, (record, *reserve), (record, *settle),
                tuple(positions))


def outcome(reply: list, limited: tuple[tuple[int, int], ...]) -> ReserveOutcome:
    """reserve.lua's reply: the status; refused or forced, the first counter over (its index
    and four values); admitted or forced, per limited counter (Wire.limited) its used and
    reserved amounts in each unit it limits: tokens, micro-USD, or both (4 values); a unit it
    does not limit reads 0."""
    st = reply[0]
    if st == 1:
        over, x = None, 1
    elif len(reply) > 1:
        over, x = Seen(reply[1], Totals(*reply[2:6])), 6
    else:
        over, x = None, 1                                # a duplicate
    # Built as NamedTuple._make builds them (no generator, no Python-level __new__): one Seen
    # and one Totals per limited counter, every reserve.
    seen = []
    if len(reply) > x:
        for i, units in limited:
            if units == 3:
                totals = reply[x:x + 4]
                x += 4
            else:
                totals = (reply[x], reply[x + 1], 0, 0) if units == 1 else (0, 0, reply[x], reply[x + 1])
                x += 2
            seen.append(_new(Seen, (i, _new(Totals, totals))))
    status = _STATUS.get(st)
    return _new(ReserveOutcome, (Status(st) if status is None else status, over, tuple(seen)))


def counters(keys: Sequence[str], settle: Sequence[str]) -> tuple[Counter, ...]:
    """The counters of settle.lua's arguments (as kept in a record); limits unknown (-1)."""
    out: list[Counter] = []
    a = 0
    for key in keys:
        expire, n = int(settle[a]), int(settle[a + 1])
        out += (Counter(key, f, -1, -1, expire) for f in settle[a + 2:a + 2 + n])
        a += 2 + n
    return tuple(out)


def record_counters(record: bytes | None) -> tuple[Counter, ...]:
    """An open reservation's counters from its record (see reserve.lua: "r <deadline> <tokens>
    <usd>", the request, the window keys, the settle arguments; one a line); none for a vanished
    or settled record."""
    parts = record.decode().split("\n", 3) if record else []
    return counters(parts[2].split(" "), parts[3].split(" ")) if len(parts) == 4 else ()


def totals(value: bytes | None) -> Totals:
    """A counter's value in a window hash: four little-endian doubles (see reserve.lua)."""
    return Totals(*map(int, _VALUE.unpack(value))) if value else EMPTY


def log_entry(seq: str, f: dict[bytes, bytes]) -> LogEntry:
    """A settlement log entry from its stream fields (see settle.lua)."""
    text = {k.decode(): v.decode() for k, v in f.items()}
    keys = text["w"].split(" ") if text.get("w") else []
    windows: dict[str, list[str]] = {}
    for c in counters(keys, text["c"].split(" ")) if keys else ():
        windows.setdefault(c.window, []).append(c.scope)
    return LogEntry(seq, int(seq.partition("-")[0]), text.get("id", ""), text.get("o", ""),
                    int(text.get("ct") or 0), int(text.get("cd") or 0), text.get("u", ""), text.get("l", ""),
                    text.get("i", ""), tuple((k, tuple(v)) for k, v in windows.items()))
