from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from proxy.windows import windows_at


def test_windows_are_calendar_aligned_and_end_at_the_next_period():
    t = datetime(2026, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
    minute, hour, day, month = windows_at(t)
    assert (minute.label, hour.label, day.label, month.label) == \
        ("m202612312359", "h2026123123", "d20261231", "M202612")
    new_year = datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp()
    assert minute.end == hour.end == day.end == month.end == new_year


def test_day_and_month_follow_the_zone_across_a_dst_change():
    ny = ZoneInfo("America/New_York")
    # 2027-03-14 is the spring-forward day in New York: 23 hours long.
    t = datetime(2027, 3, 14, 12, 0, tzinfo=ny).timestamp()
    _, _, day, month = windows_at(t, ny)
    assert day.label == "d20270314"
    assert day.end - day.start == 23 * 3600
    assert datetime.fromtimestamp(month.end, ny) == datetime(2027, 4, 1, tzinfo=ny)
