"""The status machine through the real server: cooldowns, auth failures, drain and resume, forecasts.

Three subscriptions of 100 units and 2 clients each, 600 s leases, an 85 % threshold, a
300 s cooldown after a rate-limited report, disabled after 3 auth failures in
a row, clients idle after 60 s; the clock is a FakeClock.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from authpool_server.domain import PoolSpec
from authpool_server.server import Server
from tests.conftest import NO_AUTH, FakeClock, make_spec

UNIT = 1_000_000
Stub = authpool_pb2_grpc.AuthPoolStub
_ids = itertools.count()


@pytest.fixture
def spec() -> PoolSpec:
    # Leases outlive the idle time here, so a test can let clients go idle without renewing.
    return make_spec(ttl=600)


async def allocate(stub: Stub, client_id: str) -> pb.Lease:
    return (await stub.Allocate(pb.AllocateRequest(client_id=client_id))).lease


async def report(stub: Stub, lease: pb.Lease, cost_micros: int = UNIT, outcome: int = pb.USAGE_OUTCOME_OK) -> None:
    await stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id=f"r{next(_ids)}",
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
            cost_micros=cost_micros,
            outcome=outcome,
        )
    )


async def state_of(stub: Stub, subscription_id: str) -> pb.SubscriptionState:
    reply = await stub.Status(pb.StatusRequest())
    return next(s for s in reply.subscriptions if s.subscription_id == subscription_id)


async def events(stub: Stub, event_type: int) -> list[pb.Event]:
    last = (await stub.Status(pb.StatusRequest())).totals.last_sequence
    found = []
    async for message in stub.WatchEvents(pb.WatchEventsRequest()):
        if message.event.type == event_type:
            found.append(message.event)
        if message.event.sequence == last:
            return found
    raise AssertionError("the stream ended early")


async def test_a_rate_limited_report_cools_the_subscription_down(stub: Stub, server: Server, clock: FakeClock) -> None:
    lease = await allocate(stub, "w1")
    assert lease.subscription_id == "sub1"
    healthy = (await state_of(stub, "sub1")).health_score
    await report(stub, lease, 0, pb.USAGE_OUTCOME_RATE_LIMITED)

    cooling = await state_of(stub, "sub1")
    assert cooling.status == pb.SUBSCRIPTION_STATUS_LIMITED
    assert cooling.health_score <= healthy // 2 + 1
    assert cooling.recent_error_rate == 1.0
    # sub1 still has the most room by money, but takes no new client while cooling down.
    assert (await allocate(stub, "w2")).subscription_id != "sub1"

    clock.advance(301)
    await server.pool.reap()
    assert (await state_of(stub, "sub1")).status == pb.SUBSCRIPTION_STATUS_ACTIVE
    changes = [
        (e.subscription_id, e.attributes["to"]) for e in await events(stub, pb.EVENT_TYPE_SUBSCRIPTION_STATUS_CHANGED)
    ]
    assert changes == [("sub1", "limited"), ("sub1", "active")]


async def test_repeated_auth_failures_disable_until_an_operator_resumes(stub: Stub, clock: FakeClock) -> None:
    lease = await allocate(stub, "w1")
    await report(stub, lease, 0, pb.USAGE_OUTCOME_AUTH_FAILED)
    await report(stub, lease, 0, pb.USAGE_OUTCOME_OK)  # a success resets the streak
    for _ in range(2):
        await report(stub, lease, 0, pb.USAGE_OUTCOME_AUTH_FAILED)
    assert (await state_of(stub, "sub1")).status == pb.SUBSCRIPTION_STATUS_ACTIVE
    await report(stub, lease, 0, pb.USAGE_OUTCOME_AUTH_FAILED)

    disabled = await state_of(stub, "sub1")
    assert disabled.status == pb.SUBSCRIPTION_STATUS_DISABLED
    assert disabled.health_score == 0
    renewal = await stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token))
    assert renewal.moved
    assert renewal.lease.subscription_id != "sub1"

    clock.advance(3600)  # time alone does not bring it back
    assert (await state_of(stub, "sub1")).status == pb.SUBSCRIPTION_STATUS_DISABLED
    await stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id="sub1"))
    assert (await state_of(stub, "sub1")).status == pb.SUBSCRIPTION_STATUS_ACTIVE
    phases = [e.attributes["phase"] for e in await events(stub, pb.EVENT_TYPE_ROTATION)]
    assert phases == ["resumed"]


async def test_drain_moves_idle_clients_at_once_and_busy_ones_when_idle(
    stub: Stub, server: Server, clock: FakeClock
) -> None:
    idle = await allocate(stub, "idle")
    await allocate(stub, "elsewhere")  # sub2
    await allocate(stub, "elsewhere-2")  # sub3
    busy = await allocate(stub, "busy")  # sub1 again: the healthiest with room
    assert (idle.subscription_id, busy.subscription_id) == ("sub1", "sub1")
    clock.advance(61)
    await report(stub, busy, UNIT // 10)  # busy has used its credential just now

    drained = await stub.DrainSubscription(pb.DrainSubscriptionRequest(subscription_id="sub1"))
    assert drained.clients_moved == 1
    state = await state_of(stub, "sub1")
    assert state.status == pb.SUBSCRIPTION_STATUS_DRAINING
    assert state.live_clients == 1  # the busy one stays for now

    moved = await stub.Renew(pb.RenewRequest(lease_id=idle.lease_id, fencing_token=idle.fencing_token))
    assert moved.moved
    assert moved.lease.subscription_id != "sub1"
    stays = await stub.Renew(pb.RenewRequest(lease_id=busy.lease_id, fencing_token=busy.fencing_token))
    assert not stays.moved

    clock.advance(61)  # now busy is idle too
    later = await stub.Renew(pb.RenewRequest(lease_id=busy.lease_id, fencing_token=busy.fencing_token))
    assert later.moved
    assert (await state_of(stub, "sub1")).live_clients == 0
    assert (await allocate(stub, "newcomer")).subscription_id != "sub1"

    await stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id="sub1"))
    assert (await state_of(stub, "sub1")).status == pb.SUBSCRIPTION_STATUS_ACTIVE
    phases = [(e.subscription_id, e.attributes["phase"]) for e in await events(stub, pb.EVENT_TYPE_ROTATION)]
    assert phases == [("sub1", "draining"), ("sub1", "resumed")]


async def test_draining_an_unknown_subscription_is_not_found_and_changes_nothing(stub: Stub) -> None:
    before = (await stub.Status(pb.StatusRequest())).totals.last_sequence
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.DrainSubscription(pb.DrainSubscriptionRequest(subscription_id="nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "subscription_id" in (raised.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id=""))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stub.Status(pb.StatusRequest())).totals.last_sequence == before


async def test_status_forecasts_spend_to_the_end_of_the_window(stub: Stub, clock: FakeClock) -> None:
    lease = await allocate(stub, "w1")
    clock.advance(3600)
    await report(stub, lease, 6 * UNIT)  # 6 units in the last 6 hours' horizon: 1 unit an hour
    state = await state_of(stub, "sub1")
    assert state.spend_rate_micros_per_hour == UNIT
    hours_left = (state.window_end.ToSeconds() - clock.now) / 3600
    assert state.projected_window_usage_micros == pytest.approx(6 * UNIT + hours_left * UNIT, rel=1e-6)
    # 85 units is the threshold: 79 more at 1 unit an hour.
    assert state.seconds_to_threshold == pytest.approx(79 * 3600)
    assert not (await state_of(stub, "sub2")).HasField("seconds_to_threshold")  # no spend, no forecast


async def test_drain_and_auth_failures_survive_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    spec = make_spec(ttl=600)
    for attempt in range(2):
        server = Server(
            spec,
            data_dir=tmp_path,
            security=NO_AUTH,
            listen="127.0.0.1:0",
            background=False,
            clock=clock,
            grace_seconds=1,
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = authpool_pb2_grpc.AuthPoolStub(channel)
                if attempt == 0:
                    lease = await allocate(stub, "w1")  # sub1
                    for _ in range(3):
                        await report(stub, lease, 0, pb.USAGE_OUTCOME_AUTH_FAILED)
                    await stub.DrainSubscription(pb.DrainSubscriptionRequest(subscription_id="sub2"))
                else:
                    assert (await state_of(stub, "sub1")).status == pb.SUBSCRIPTION_STATUS_DISABLED
                    assert (await state_of(stub, "sub2")).status == pb.SUBSCRIPTION_STATUS_DRAINING
                    assert (await allocate(stub, "w2")).subscription_id == "sub3"
        finally:
            await server.stop()
