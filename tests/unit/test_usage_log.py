"""The pool's usage log: spend read back from the newest record, request ids kept as long as the store keeps them."""

from __future__ import annotations

import logging

import pytest

from authpool_server.domain import MICROS_PER_UNIT, Outcome, UsageRecord
from authpool_server.store.usage import EarlyUsage, UsagePlan
from authpool_server.usage_log import FetchedSpend, UsageLog

U = MICROS_PER_UNIT
DAY = 86_400.0
HOUR = 3600.0


def record(request_id: str, at: float, cost: int = U, *, sub: str = "sub1", fallback: bool = False) -> UsageRecord:
    return UsageRecord(request_id, "lease", "client", sub, fallback, at, cost, 100, 50, "claude-sonnet", Outcome.OK)


def test_spend_is_read_back_from_the_newest_record_tolerating_a_clock_step() -> None:
    log = UsageLog()
    for request_id, at, cost in (("a", 1000.0, 1), ("b", 1100.0, 2), ("c", 1070.0, 4)):  # the clock stepped back
        log.add(record(request_id, at, cost * U))
    log.add(record("other", 1080.0, 100 * U, sub="sub2"))
    log.add(record("fb", 1090.0, 100 * U, sub="fallback", fallback=True))
    assert log.spend_since("sub1", 1080.0) == 2 * U
    assert log.spend_since("sub1", 1050.0) == 6 * U
    assert log.spend_since("sub1", 1000.0) == 7 * U
    assert log.spend_since("sub1", 1000.0 - DAY) == 7 * U
    assert log.spend_since("sub1", 1200.0) == 0
    assert log.fallback_spend == 100 * U


def test_a_window_older_than_the_log_is_counted_from_what_was_fetched_for_it() -> None:
    log = UsageLog(EarlyUsage(UsagePlan(now=10 * DAY, recent_since=9 * DAY)))
    log.add(record("recent", 9.5 * DAY, 3 * U))
    fetched = FetchedSpend(before=9 * DAY, spend={("sub1", 2 * DAY): 5 * U})
    assert log.spend_since("sub1", 2 * DAY, fetched) == 8 * U
    with pytest.raises(RuntimeError, match="older than memory holds"):
        log.spend_since("sub1", 3 * DAY, fetched)  # a start the fetch did not cover: a bug, not a race
    stale = FetchedSpend(before=8 * DAY, spend={("sub1", 2 * DAY): 5 * U})  # fetched before the log moved on
    with pytest.raises(RuntimeError, match="older than memory holds"):
        log.spend_since("sub1", 2 * DAY, stale)


def test_a_window_older_than_the_log_without_a_fetch_counts_what_it_holds_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = UsageLog(EarlyUsage(UsagePlan(now=10 * DAY, recent_since=9 * DAY)))
    log.add(record("recent", 9.5 * DAY, 3 * U))
    with caplog.at_level(logging.ERROR, logger="authpool_server.usage_log"):
        assert log.spend_since("sub1", 2 * DAY) == 3 * U
    [logged] = caplog.records
    assert (logged.name, logged.levelname) == ("authpool_server.usage_log", "ERROR")
    assert "older than memory" in logged.getMessage()


def test_eviction_lets_records_go_in_steps_and_with_them_their_request_ids() -> None:
    log = UsageLog()
    for hour in range(10):
        log.add(record(f"r{hour}", hour * HOUR))
    log.evict(4 * HOUR)
    assert (log.kept_since, log.sizes()["usage_records"]) == (4 * HOUR, 6)
    assert log.charged("r3") is None  # the store answers for it now
    assert log.charged("r4") == "sub1"
    log.evict(4 * HOUR + 60.0)  # less than a step later: nothing moves, not even the record at 4 h
    assert (log.kept_since, log.sizes()["usage_records"]) == (4 * HOUR, 6)
    log.evict(5 * HOUR)  # a step later
    assert (log.kept_since, log.sizes()["usage_records"]) == (5 * HOUR, 5)


def test_eviction_counts_its_steps_from_where_the_store_summary_ends() -> None:
    log = UsageLog(EarlyUsage(UsagePlan(now=10 * HOUR, recent_since=5 * HOUR)))
    log.add(record("r", 5 * HOUR + 30.0))
    log.evict(5 * HOUR + 60.0)
    assert (log.kept_since, log.charged("r")) == (5 * HOUR, "sub1")


def test_a_log_that_holds_every_request_id_keeps_them_until_the_store_prunes_them() -> None:
    # As a PostgreSQL replica starts: the older records' ids (and fallback spend) come with the summary.
    early = EarlyUsage(
        UsagePlan(now=10 * HOUR, recent_since=5 * HOUR),
        fallback=[(1 * HOUR, 7 * U)],
        request_ids=[(1 * HOUR, "old-fb", "fallback"), (2 * HOUR, "old", "sub1")],
    )
    log = UsageLog(early)
    assert log.holds_every_request_id
    log.add(record("fb", 6 * HOUR, 2 * U, sub="fallback", fallback=True))
    log.add(record("new", 7 * HOUR))
    assert (log.charged("old"), log.fallback_spend) == ("sub1", 9 * U)

    log.evict(8 * HOUR)
    assert log.sizes() == {
        "usage_records": 0,
        "usage_request_ids": 4,
        "early_fallback_records": 2,
        "early_request_ids": 4,
    }
    assert (log.charged("new"), log.fallback_spend) == ("sub1", 9 * U)  # evicted, not forgotten

    log.forget(6.5 * HOUR)  # the store pruned everything before
    assert (log.charged("old"), log.charged("fb"), log.charged("new")) == (None, None, "sub1")
    assert log.fallback_spend == 0
    log.forget(8 * HOUR)
    assert log.sizes() == dict.fromkeys(log.sizes(), 0)


def test_pruning_reaches_into_the_log_when_retention_is_shorter_than_it() -> None:
    log = UsageLog()
    log.add(record("fb", 1 * HOUR, 2 * U, sub="fallback", fallback=True))
    log.add(record("r", 2 * HOUR))
    log.forget(1.5 * HOUR)
    assert (log.charged("fb"), log.charged("r"), log.fallback_spend) == (None, "sub1", 0)
