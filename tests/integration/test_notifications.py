"""Notification rules through the real server: usage thresholds once per window, the pool running dry.

The `log` channel is checked here (records of `authpool.notifications`); the
webhook channel end to end is in test_webhook_delivery.py.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
from authpool_client.api import authpool_pb2 as pb

from authpool_server.domain import NotificationRuleSpec, PoolSpec
from tests.conftest import FakeClock, make_spec
from tests.integration.test_rpc_policy import UNIT, Stub, allocate, events, report

RULES = (
    NotificationRuleSpec("usage_threshold", ("log",), threshold_ppm=800_000),
    NotificationRuleSpec("usage_threshold", ("log",), threshold_ppm=900_000),
    NotificationRuleSpec("all_exhausted", ("log",)),
)
WEEK = 7 * 86_400


@pytest.fixture
def spec() -> PoolSpec:
    # Two subscriptions of 100 units; 0.8 and 0.9 thresholds; long leases.
    return dataclasses.replace(make_spec(2, ttl=30 * 86_400), notification_rules=RULES)


def notes(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    return [
        (r.levelname, r.context["rule"], r.context.get("subscription_id", ""))  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "authpool.notifications"
    ]


async def test_a_usage_threshold_fires_once_per_subscription_window_and_threshold(
    stub: Stub, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authpool.notifications")
    lease = await allocate(stub, "worker-1")
    sub = lease.subscription_id
    for cost in (50, 29, 1, 5, 4, 1, 1):  # 50, 79, 80 (0.8 crossed), 85, 89, 90 (0.9 crossed), 91
        await report(stub, lease, cost * UNIT)
    crossed = await events(stub, pb.EVENT_TYPE_USAGE_THRESHOLD_CROSSED)
    assert [(e.subscription_id, e.attributes["threshold_ppm"]) for e in crossed] == [
        (sub, "800000"),
        (sub, "900000"),
    ]
    assert crossed[0].attributes["window_usage_micros"] == str(80 * UNIT)
    assert notes(caplog) == [("INFO", "usage_threshold", sub), ("WARNING", "usage_threshold", sub)]

    clock.advance(WEEK)  # the next weekly window: the same thresholds may fire again, once each
    await stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token))
    await report(stub, lease, 95 * UNIT)
    crossed = await events(stub, pb.EVENT_TYPE_USAGE_THRESHOLD_CROSSED)
    assert [e.attributes["threshold_ppm"] for e in crossed] == ["800000", "900000", "800000", "900000"]


async def test_running_out_of_subscriptions_is_critical_once(stub: Stub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="authpool.notifications")
    first = await allocate(stub, "worker-1")
    second = await allocate(stub, "worker-2")
    assert first.subscription_id != second.subscription_id
    await report(stub, first, 100 * UNIT)
    assert await events(stub, pb.EVENT_TYPE_POOL_EXHAUSTED) == []  # one subscription still takes clients
    await report(stub, second, 100 * UNIT)
    [exhausted] = await events(stub, pb.EVENT_TYPE_POOL_EXHAUSTED)
    await report(stub, second, 1 * UNIT)  # still exhausted: no second alert
    assert len(await events(stub, pb.EVENT_TYPE_POOL_EXHAUSTED)) == 1
    assert ("CRITICAL", "all_exhausted", "") in notes(caplog)
    fallback = await allocate(stub, "worker-3")
    assert fallback.fallback
    assert exhausted.sequence > 0
