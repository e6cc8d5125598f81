"""Beat schedule arithmetic: intervals, cron with time zones across DST, Celery's own
schedule objects, solar events, one-offs, and the errors for schedules that cannot fire."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from celery import Celery
from celery.schedules import crontab, schedule, solar

from pgbroker.beat import Schedule, at, cron, every, schedule_from
from pgbroker.errors import InvalidSchedule

UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires_between(s: Schedule, start: datetime, end: datetime) -> list[datetime]:
    out, t = [], start
    while (t := s.next_after(t, start)) is not None and t <= end:
        out.append(t)
    return out


def test_intervals_count_from_the_anchor_so_every_beat_computes_the_same_times():
    anchor = utc(2026, 1, 1, 12, 0, 0)
    s = every(timedelta(seconds=90))
    assert s.next_after(anchor, anchor) == utc(2026, 1, 1, 12, 1, 30)
    assert s.next_after(utc(2026, 1, 1, 12, 1, 30), anchor) == utc(2026, 1, 1, 12, 3, 0)
    assert s.next_after(utc(2026, 1, 1, 12, 2, 59, 999999), anchor) == utc(2026, 1, 1, 12, 3, 0)
    # the last `limit` fires of a long gap, without walking it
    got = s.fires(utc(2026, 1, 1, 12, 1, 30), utc(2027, 1, 1), anchor, limit=3)
    assert len(got) == 3 and got[-1] <= utc(2027, 1, 1) and got[-1] - got[0] == timedelta(seconds=180)


def test_a_daily_cron_in_the_spring_gap_fires_once_right_after_it():
    # Europe/Berlin skips 02:00-03:00 on 2026-03-29: a 02:30 job runs at 03:00 that day.
    s = cron("30 2 * * *", tz="Europe/Berlin")
    got = fires_between(s, utc(2026, 3, 27, 12), utc(2026, 3, 31, 12))
    local = [t.astimezone(ZoneInfo("Europe/Berlin")).strftime("%m-%d %H:%M") for t in got]
    assert local == ["03-28 02:30", "03-29 03:00", "03-30 02:30", "03-31 02:30"]


def test_a_daily_cron_in_the_repeated_autumn_hour_fires_once():
    # America/New_York repeats 01:00-02:00 on 2026-11-01: a 01:30 job runs at the first 01:30 only.
    s = cron("30 1 * * *", tz="America/New_York")
    got = fires_between(s, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12))
    assert got == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_an_hourly_cron_follows_real_time_through_the_repeated_hour():
    s = cron("0 * * * *", tz="America/New_York")
    got = fires_between(s, utc(2026, 11, 1, 4, 30), utc(2026, 11, 1, 8, 30))
    assert got == [utc(2026, 11, 1, h) for h in (5, 6, 7, 8)]  # 01:00 EDT, 01:00 EST, 02:00, 03:00


def test_celery_schedules_convert_with_the_app_time_zone():
    app = Celery(set_as_current=False)
    app.conf.timezone = "Asia/Tokyo"
    s = schedule_from(crontab(minute=0, hour=8, day_of_week="mon-fri"), app)
    assert s.spec == {"cron": "0 8 * * mon-fri", "tz": "Asia/Tokyo"}
    assert s.next_after(utc(2026, 11, 20, 0), utc(2026, 1, 1)) == utc(2026, 11, 22, 23)  # Monday 08:00 JST
    assert schedule_from(schedule(timedelta(minutes=5)), app).spec == {"every": 300.0}
    assert schedule_from(30, app).spec == {"every": 30}
    assert schedule_from("*/5 * * * *", app).spec == {"cron": "*/5 * * * *", "tz": "UTC"}


@pytest.mark.parametrize("entry", [
    crontab(minute=[0, 30]), crontab(minute=0, hour={8, 20}), crontab(minute=0, hour=range(8, 18)),
    crontab(minute=0, hour=9, day_of_month="1-7", day_of_week="mon"),  # the first Monday: both days match
    crontab(minute=0, hour=9, day_of_week="mon-fri"), crontab(minute=15, hour=9, day_of_month=[1, 15]),
])
def test_celery_crontabs_fire_when_celery_would(entry):
    """Sets, lists and ranges in crontab fields convert, and a crontab restricting both
    days needs both to match, as Celery computes it (cron itself takes either)."""
    app = Celery(set_as_current=False)
    app.conf.timezone = "UTC"
    now = utc(2026, 11, 24, 6)
    entry.app, entry.nowfun = app, lambda: now
    assert schedule_from(entry, app).next_after(now, now) == now + entry.remaining_estimate(now)


def test_a_cron_string_restricting_both_days_takes_either_as_cron_does():
    assert cron("0 9 1-7 * mon").next_after(utc(2026, 11, 24, 6), utc(2026, 1, 1)) == utc(2026, 11, 30, 9)


def test_solar_events_are_computed_by_celery_and_the_same_for_every_beat():
    s = schedule_from(solar("sunrise", 48.85, 2.35))
    t = utc(2026, 6, 21, 0)
    first, again = s.next_after(t, t), s.next_after(t, t)
    assert first == again and utc(2026, 6, 21, 3) < first < utc(2026, 6, 21, 4)  # Paris, 05:47 CEST


def test_a_one_off_fires_at_its_time_and_never_again():
    when = utc(2026, 12, 24, 18)
    s = at(when)
    assert s.first(utc(2026, 12, 25), utc(2026, 1, 1)) == when  # even when already past
    assert s.next_after(utc(2026, 12, 24), when) == when
    assert s.next_after(when, when) is None


@pytest.mark.parametrize("spec, message", [
    ({"cron": "61 * * * *"}, "invalid cron expression"),
    ({"cron": "* * * * *", "tz": "Europe/Atlantis"}, "unknown time zone"),
    ({"every": -1}, "positive number of seconds"),
    ({"every": float("nan")}, "positive number of seconds"),
    ({"at": "next tuesday"}, "ISO-8601"),
    ({"at": "2026-01-01T00:00:00"}, "UTC offset"),
    ({"solar": "moonrise", "lat": 0, "lon": 0}, "invalid solar schedule"),
    ({"every": 5, "cron": "* * * * *"}, "one of"),
])
def test_schedules_that_cannot_fire_are_refused(spec, message):
    with pytest.raises(InvalidSchedule, match=message):
        Schedule(spec)
