"""Calendar-aligned budget windows.

A window is identified by the calendar period it covers: minute and hour are always aligned to
UTC (every time zone in use today is offset by whole quarter hours, so minute windows agree
everywhere and hour windows are what operators expect to read in logs); day and month follow the
policy's time zone, so "per day" resets at the customer's midnight.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo

WINDOWS = ("minute", "hour", "day", "month")


@dataclass(frozen=True, slots=True)
class Window:
    name: str          # one of WINDOWS
    label: str         # the period, e.g. "d20261126"; part of the counter key
    start: float       # epoch seconds
    end: float         # epoch seconds; the instant the window resets


def _month_bounds(local: datetime) -> tuple[datetime, datetime]:
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = (start + timedelta(days=32)).replace(day=1)
    return start, nxt


def _day_bounds(local: datetime, tz: tzinfo) -> tuple[datetime, datetime]:
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    nxt = (start + timedelta(days=1)).replace(tzinfo=None)
    # Re-attach the zone after the naive add so a DST change inside the day lands on midnight.
    return start, nxt.replace(tzinfo=tz)


def windows_at(now: float, tz: tzinfo = timezone.utc) -> tuple[Window, ...]:
    """The four windows that contain the instant `now` (epoch seconds)."""
    minute_start = now - now % 60
    hour_start = now - now % 3600
    utc = datetime.fromtimestamp(minute_start, timezone.utc)
    local = datetime.fromtimestamp(now, tz)
    d0, d1 = _day_bounds(local, tz)
    m0, m1 = _month_bounds(local)
    m1 = m1.replace(tzinfo=None).replace(tzinfo=tz)
    return (
        Window("minute", utc.strftime("m%Y%m%d%H%M"), minute_start, minute_start + 60),
        Window("hour", utc.strftime("h%Y%m%d%H"), hour_start, hour_start + 3600),
        Window("day", d0.strftime("d%Y%m%d"), d0.timestamp(), d1.timestamp()),
        Window("month", m0.strftime("M%Y%m"), m0.timestamp(), m1.timestamp()),
    )
