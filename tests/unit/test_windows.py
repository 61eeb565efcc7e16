"""Budget windows: the weekday/hour/time-zone and anchor forms, and per-subscription rolls."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from authpool_server.balancer import WEEK_SECONDS, window_bounds
from authpool_server.config import ConfigError, load_config
from authpool_server.domain import MICROS_PER_UNIT, BudgetReset, EventType, ExtraWindow, Outcome
from authpool_server.pool import Pool, UsageReport
from authpool_server.store.memory import MemoryStore
from tests.conftest import FakeClock, make_spec

BERLIN = ZoneInfo("Europe/Berlin")
WEDNESDAY_9_BERLIN = BudgetReset(weekday=2, hour=9, timezone="Europe/Berlin")


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@pytest.mark.parametrize(
    ("now", "start"),
    [
        ("2026-03-11T09:00:00+01:00", "2026-03-11T09:00:00+01:00"),  # exactly at the reset
        ("2026-03-11T08:59:59+01:00", "2026-03-04T09:00:00+01:00"),  # a second before: last week's
        ("2026-03-15T12:00:00+01:00", "2026-03-11T09:00:00+01:00"),
    ],
)
def test_a_weekday_and_hour_in_a_time_zone(now: str, start: str) -> None:
    assert window_bounds(at(now), WEDNESDAY_9_BERLIN)[0] == at(start)


def test_a_window_across_daylight_saving_keeps_the_wall_clock_time() -> None:
    # Berlin moves to summer time on 2026-03-29: that window is an hour short.
    start, end = window_bounds(at("2026-03-27T12:00:00+01:00"), WEDNESDAY_9_BERLIN)
    assert datetime.fromtimestamp(start, BERLIN).hour == datetime.fromtimestamp(end, BERLIN).hour == 9
    assert end - start == WEEK_SECONDS - 3600


def test_an_anchor_repeats_every_seven_days_from_that_moment() -> None:
    anchor = at("2026-01-07T09:30:00+01:00")
    reset = BudgetReset(anchor=anchor)
    now = anchor + 10 * WEEK_SECONDS + 5
    assert window_bounds(now, reset) == (anchor + 10 * WEEK_SECONDS, anchor + 11 * WEEK_SECONDS)
    assert window_bounds(anchor - 1, reset) == (anchor - WEEK_SECONDS, anchor)


def test_the_default_is_monday_midnight_utc() -> None:
    start, end = window_bounds(at("2026-11-25T18:00:00+00:00"))
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 11, 23, tzinfo=UTC)
    assert end - start == WEEK_SECONDS


def _write(tmp_path: Path, reset: str, sub_reset: str = "") -> Path:
    sub_extra = f', "budgetReset": {sub_reset}' if sub_reset else ""
    path = tmp_path / "auth-pool.json"
    path.write_text(
        '{"subscriptions": [{"id": "a", "email": "t@company.com", "type": "claude-pro", "configDir": "~/.a",'
        f' "weeklyBudget": 10{sub_extra}}},'
        ' {"id": "b", "email": "u@company.com", "type": "claude-pro", "configDir": "~/.b", "weeklyBudget": 10}],'
        f' "credentialsRoot": "{tmp_path}", "budgetReset": {reset}}}'
    )
    return path


def test_config_sets_the_pool_reset_and_a_subscription_overrides_it(tmp_path: Path) -> None:
    settings = load_config(
        _write(
            tmp_path,
            '{"weekday": "wednesday", "hour": 9, "timezone": "Europe/Berlin"}',
            '{"anchor": "2026-01-07T09:30:00+01:00"}',
        ),
        env={},
    )
    a, b = settings.pool.subscriptions
    assert a.reset == BudgetReset(anchor=at("2026-01-07T09:30:00+01:00"))
    assert b.reset == WEDNESDAY_9_BERLIN


@pytest.mark.parametrize(
    ("reset", "problem"),
    [
        ('{"timezone": "Mars/Base"}', "budgetReset.timezone: unknown time zone"),
        ('{"anchor": "2026-01-07T09:30:00"}', "budgetReset.anchor: must carry its UTC offset"),
        ('{"anchor": "next tuesday"}', "budgetReset.anchor: must be an ISO 8601 time"),
        ('{"hour": 24}', "budgetReset.hour: must be at most 23"),
        ('{"weekday": "funday"}', "budgetReset.weekday: must be 'monday'"),
    ],
)
def test_a_bad_reset_is_named_by_field(tmp_path: Path, reset: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(_write(tmp_path, reset), env={})
    assert any(line.startswith(problem) for line in raised.value.problems), raised.value.problems


async def test_each_subscription_rolls_at_its_own_reset() -> None:
    base = make_spec(2, budget_units=10)
    early = replace(base.subscriptions[0], reset=BudgetReset(weekday=0, hour=0))
    late = replace(base.subscriptions[1], reset=BudgetReset(weekday=0, hour=12))
    spec = replace(base, subscriptions=(early, late))
    monday = at("2026-11-23T00:00:00+00:00")
    clock = FakeClock(monday - 3600)  # Sunday 23:00
    store = MemoryStore()
    pool = Pool(spec, store, clock=clock)
    await pool.start(background=False)
    try:
        for client, cost in (("c1", 10), ("c2", 10)):
            lease = (await pool.allocate(client)).lease
            report = UsageReport(
                f"r-{client}", lease.lease_id, lease.fencing_token, cost * MICROS_PER_UNIT, 0, 0, "", Outcome.OK
            )
            await pool.report_usage(report)
        assert {v.spec.id: v.status.value for v in pool.status().subscriptions} == {
            "sub1": "exhausted",
            "sub2": "exhausted",
        }

        clock.now = monday + 6 * 3600  # Monday 06:00: only sub1's window has reset
        await pool.reap()
        assert {v.spec.id: v.status.value for v in pool.status().subscriptions} == {
            "sub1": "active",
            "sub2": "exhausted",
        }
        clock.now = monday + 12 * 3600
        await pool.reap()
        assert {v.spec.id: v.status.value for v in pool.status().subscriptions} == {"sub1": "active", "sub2": "active"}
        back_to_active = [
            (e.subscription_id, e.at)
            for e in store.events
            if e.type is EventType.SUBSCRIPTION_STATUS_CHANGED and dict(e.attributes)["to"] == "active"
        ]
        assert back_to_active == [("sub1", monday + 6 * 3600), ("sub2", monday + 12 * 3600)]
    finally:
        await pool.close()


def test_one_more_week_is_a_week_later() -> None:
    start, end = window_bounds(at("2026-06-10T10:00:00+02:00"), WEDNESDAY_9_BERLIN)
    assert datetime.fromtimestamp(end, BERLIN) - datetime.fromtimestamp(start, BERLIN) == timedelta(days=7)


async def test_a_five_hour_session_limit_is_respected_beside_the_weekly_budget() -> None:
    base = make_spec(2, budget_units=100)
    session = ExtraWindow(name="session", length_seconds=5 * 3600, budget_micros=20 * MICROS_PER_UNIT)
    spec = replace(
        base, subscriptions=(replace(base.subscriptions[0], extra_windows=(session,)), base.subscriptions[1])
    )
    start = at("2026-11-25T10:00:00+00:00")  # a session boundary (a multiple of 5 h since the epoch)
    clock = FakeClock(start + 60)
    store = MemoryStore()
    pool = Pool(spec, store, clock=clock)
    await pool.start(background=False)
    try:
        lease = (await pool.allocate("c1")).lease
        assert lease.subscription_id == "sub1"

        async def spend(units: int, request_id: str) -> None:
            cost = units * MICROS_PER_UNIT
            await pool.report_usage(
                UsageReport(request_id, lease.lease_id, lease.fencing_token, cost, 0, 0, "", Outcome.OK)
            )

        await spend(17, "r1")  # 85 % of the session: limited, though the week is barely touched
        assert pool.status().subscriptions[0].status.value == "limited"
        assert (await pool.allocate("c2")).lease.subscription_id == "sub2"
        await spend(3, "r2")  # the session is spent
        assert pool.status().subscriptions[0].status.value == "exhausted"
        renewal = await pool.renew(lease.lease_id, lease.fencing_token)
        assert renewal.moved

        clock.now = start + 5 * 3600  # the next session
        await pool.reap()
        view = pool.status().subscriptions[0]
        assert view.status.value == "active"
        assert view.window_usage_micros == 20 * MICROS_PER_UNIT  # the week still remembers
        changes = [
            dict(e.attributes)["to"]
            for e in store.events
            if e.type is EventType.SUBSCRIPTION_STATUS_CHANGED and e.subscription_id == "sub1"
        ]
        assert changes == ["limited", "exhausted", "active"]
    finally:
        await pool.close()


def test_config_reads_extra_windows(tmp_path: Path) -> None:
    path = tmp_path / "auth-pool.json"
    path.write_text(
        '{"subscriptions": [{"id": "a", "email": "t@company.com", "type": "claude-pro", "configDir": "~/.a",'
        ' "weeklyBudget": 100, "windows": [{"name": "session", "lengthHours": 5, "budget": 20}]}],'
        f' "credentialsRoot": "{tmp_path}"}}'
    )
    (subscription,) = load_config(path, env={}).pool.subscriptions
    assert subscription.extra_windows == (ExtraWindow("session", 5 * 3600.0, 20 * MICROS_PER_UNIT),)
