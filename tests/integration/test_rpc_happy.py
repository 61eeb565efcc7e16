"""Every AuthPool RPC used the way a client uses it, over a real channel to a real server.

The server runs in-process with a real SQLite store and a FakeClock; background
work is off, so expiry happens only when a test calls `server.pool.reap()` (or
when a call touches an expired lease). The pool is three `claude-pro`
subscriptions (sub1..sub3) of 100 units a week, two clients each, a 30 s lease
TTL, an 85 % threshold, and rebalancing at a 5-unit cost gap for clients idle
60 s (see `make_spec` in tests/conftest.py). A test that needs another pool
parametrises `spec`, which overrides the conftest fixture the server is built from.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.rpc import error_details_pb2

from authpool_server.domain import PoolSpec
from authpool_server.server import Server
from tests.conftest import NO_AUTH, FakeClock, make_spec
from tests.integration.rich_errors import error_details

UNIT = 1_000_000  # micro-units per budget unit
TTL = 30.0
DOMAIN = "authpool.v1"

Stub = authpool_pb2_grpc.AuthPoolStub

_request_ids = itertools.count(1)


# -- helpers -------------------------------------------------------------------


async def allocate(stub: Stub, client_id: str, **fields: object) -> pb.AllocateResponse:
    return await stub.Allocate(pb.AllocateRequest(client_id=client_id, **fields))  # type: ignore[arg-type]


async def renew(stub: Stub, lease: pb.Lease, token: int | None = None) -> pb.RenewResponse:
    return await stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, fencing_token=token or lease.fencing_token))


async def release(stub: Stub, lease: pb.Lease, token: int | None = None) -> bool:
    response = await stub.Release(
        pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=token or lease.fencing_token)
    )
    return response.released


async def report(
    stub: Stub, lease: pb.Lease, cost_micros: int, *, request_id: str = "", token: int | None = None
) -> pb.ReportUsageResponse:
    return await stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id=request_id or f"req-{next(_request_ids)}",
            lease_id=lease.lease_id,
            fencing_token=token or lease.fencing_token,
            cost_micros=cost_micros,
            input_tokens=1200,
            output_tokens=340,
            model="claude-sonnet-4",
            outcome=pb.USAGE_OUTCOME_OK,
        )
    )


async def status(stub: Stub, *, include_clients: bool = True) -> pb.StatusResponse:
    return await stub.Status(pb.StatusRequest(include_clients=include_clients))


def without_as_of(response: pb.StatusResponse) -> pb.StatusResponse:
    copy = pb.StatusResponse()
    copy.CopyFrom(response)
    copy.ClearField("as_of")
    return copy


def sub(response: pb.StatusResponse, subscription_id: str) -> pb.SubscriptionState:
    (state,) = [s for s in response.subscriptions if s.subscription_id == subscription_id]
    return state


def live_by_sub(response: pb.StatusResponse) -> dict[str, int]:
    return {s.subscription_id: s.live_clients for s in response.subscriptions}


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = error_details(error).get(error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo), f"no ErrorInfo on {error.code()}"
    assert info.domain == DOMAIN
    return info


async def next_event(call: grpc.aio.UnaryStreamCall) -> pb.Event:
    message = await asyncio.wait_for(call.read(), timeout=5)
    assert message is not grpc.aio.EOF, "the event stream ended"
    return message.event


async def keep_alive(stub: Stub, clock: FakeClock, leases: list[pb.Lease], seconds: float) -> None:
    """Let `seconds` pass, renewing every lease (without using it) well inside its TTL."""
    while seconds > 0:
        step = min(seconds, TTL / 2)
        clock.advance(step)
        seconds -= step
        for lease in leases:
            assert not (await renew(stub, lease)).moved


# -- Allocate --------------------------------------------------------------------


async def test_allocate_grants_a_new_lease_then_returns_it_sticky(stub: Stub, clock: FakeClock) -> None:
    first = await allocate(stub, "worker-1", session_id="sess-42", labels={"team": "search"})

    assert first.decision == pb.DECISION_KIND_NEW
    assert first.reason
    lease = first.lease
    assert lease.lease_id
    assert lease.client_id == "worker-1"
    assert lease.session_id == "sess-42"
    assert dict(lease.labels) == {"team": "search"}
    assert lease.subscription_id == "sub1"  # every subscription equal: the id breaks the tie
    assert lease.subscription_type == "claude-pro"
    assert lease.credential_ref == "/creds/.claude-sub1"
    assert not lease.fallback
    assert lease.fencing_token > 0
    assert lease.granted_at.ToNanoseconds() == round(clock.now * 1e9)
    assert lease.expires_at.ToNanoseconds() == round((clock.now + TTL) * 1e9)

    clock.advance(5)
    again = await allocate(stub, "worker-1", session_id="another-session")

    assert again.decision == pb.DECISION_KIND_STICKY
    assert again.lease.lease_id == lease.lease_id
    assert again.lease.fencing_token == lease.fencing_token
    assert again.lease.subscription_id == lease.subscription_id
    assert again.lease.session_id == "sess-42"  # the lease is returned unchanged
    state = await status(stub)
    assert state.totals.live_clients == 1
    assert [c.lease_id for c in state.clients] == [lease.lease_id]


async def test_lease_carries_a_credential_reference_but_never_an_email(stub: Stub) -> None:
    leases = [(await allocate(stub, f"worker-{i}")).lease for i in range(3)]

    assert {(lease.subscription_id, lease.credential_ref) for lease in leases} == {
        ("sub1", "/creds/.claude-sub1"),
        ("sub2", "/creds/.claude-sub2"),
        ("sub3", "/creds/.claude-sub3"),
    }
    for lease in leases:
        assert lease.subscription_type == "claude-pro"
        wire = lease.SerializeToString()
        assert b"@company.com" not in wire
        assert b"team+sub" not in wire


async def test_clients_spread_over_the_pool_up_to_each_subscription_limit_then_fall_back(stub: Stub) -> None:
    granted = [await allocate(stub, f"worker-{i}") for i in range(6)]

    assert all(g.decision == pb.DECISION_KIND_NEW for g in granted)
    assert live_by_sub(await status(stub)) == {"sub1": 2, "sub2": 2, "sub3": 2}
    # Spread, not packed: the first three clients land on three different subscriptions.
    assert {g.lease.subscription_id for g in granted[:3]} == {"sub1", "sub2", "sub3"}

    overflow = await allocate(stub, "worker-6")

    assert overflow.decision == pb.DECISION_KIND_FALLBACK
    assert overflow.lease.fallback
    assert overflow.lease.subscription_id == "fallback"
    assert overflow.lease.subscription_type == "pay-as-you-go"
    state = await status(stub)
    assert live_by_sub(state) == {"sub1": 2, "sub2": 2, "sub3": 2}
    assert state.totals.live_clients == 6
    assert state.totals.fallback_clients == 1
    assert len(state.clients) == 7

    # A freed slot takes the next new client again.
    freed = granted[4].lease
    assert await release(stub, freed)
    after = await allocate(stub, "worker-7")
    assert after.decision == pb.DECISION_KIND_NEW
    assert after.lease.subscription_id == freed.subscription_id


@pytest.mark.parametrize("spec", [make_spec(fallback=False)], ids=["fallback-off"])
async def test_full_pool_without_fallback_is_resource_exhausted_with_retry_info(stub: Stub) -> None:
    granted = [(await allocate(stub, f"worker-{i}")).lease for i in range(6)]
    before = await status(stub)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await allocate(stub, "worker-6")

    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error).reason == "POOL_EXHAUSTED"
    retry = error_details(error).get(error_details_pb2.RetryInfo)
    assert isinstance(retry, error_details_pb2.RetryInfo), "RESOURCE_EXHAUSTED must carry a RetryInfo"
    assert 1 <= retry.retry_delay.seconds <= TTL
    assert without_as_of(await status(stub)) == without_as_of(before)

    # Retrying after a slot frees succeeds.
    assert await release(stub, granted[0])
    assert (await allocate(stub, "worker-6")).decision == pb.DECISION_KIND_NEW


# -- Renew, expiry, reaping ------------------------------------------------------


async def test_renew_extends_the_lease_past_its_original_expiry(server: Server, stub: Stub, clock: FakeClock) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    original_expiry = lease.expires_at.ToSeconds()

    clock.advance(20)
    renewed = await renew(stub, lease)

    assert not renewed.moved
    assert renewed.lease.lease_id == lease.lease_id
    assert renewed.lease.fencing_token == lease.fencing_token
    assert renewed.lease.subscription_id == lease.subscription_id
    assert renewed.lease.expires_at.ToNanoseconds() == round((clock.now + TTL) * 1e9)
    assert renewed.lease.expires_at.ToSeconds() == original_expiry + 20

    clock.advance(20)  # past the original expiry, inside the renewed one
    assert clock.now > original_expiry
    assert await server.pool.reap() == 0  # the reaper sees a live lease
    again = await renew(stub, lease)
    assert again.lease.expires_at.ToSeconds() == original_expiry + 40
    assert (await status(stub)).totals.live_clients == 1


async def test_lease_not_renewed_expires_is_reaped_and_frees_its_slot(
    server: Server, stub: Stub, clock: FakeClock
) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    assert live_by_sub(await status(stub))["sub1"] == 1

    clock.advance(TTL + 1)
    assert await server.pool.reap() == 1

    state = await status(stub)
    assert state.totals.live_clients == 0
    assert list(state.clients) == []
    assert sub(state, "sub1").health_score == 100
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await renew(stub, lease)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info.reason == "LEASE_NOT_FOUND"
    assert info.metadata["lease_id"] == lease.lease_id
    # Releasing an expired lease is still a success, just not a release.
    assert not await release(stub, lease)
    # The same client comes back with a fresh lease, not the dead one.
    back = await allocate(stub, "worker-1")
    assert back.decision == pb.DECISION_KIND_NEW
    assert back.lease.lease_id != lease.lease_id
    assert back.lease.fencing_token > lease.fencing_token


@pytest.mark.parametrize("spec", [make_spec(1, max_clients=1, fallback=False)], ids=["one-slot"])
async def test_reaping_an_expired_lease_lets_a_waiting_client_in(server: Server, stub: Stub, clock: FakeClock) -> None:
    await allocate(stub, "worker-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await allocate(stub, "worker-2")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    clock.advance(TTL - 1)
    assert await server.pool.reap() == 0  # not yet expired
    with pytest.raises(grpc.aio.AioRpcError):
        await allocate(stub, "worker-2")

    clock.advance(2)
    assert await server.pool.reap() == 1
    second = await allocate(stub, "worker-2")
    assert second.decision == pb.DECISION_KIND_NEW
    assert second.lease.subscription_id == "sub1"


async def test_expired_lease_is_not_found_on_renew_even_before_the_reaper_runs(stub: Stub, clock: FakeClock) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    clock.advance(TTL)  # expires_at <= now: expired

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await renew(stub, lease)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "LEASE_NOT_FOUND"
    assert (await status(stub)).totals.live_clients == 0


# -- Release ---------------------------------------------------------------------


async def test_release_frees_the_slot_and_a_second_release_is_a_harmless_no_op(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    other = (await allocate(stub, "worker-2")).lease

    assert await release(stub, lease) is True
    state = await status(stub)
    assert state.totals.live_clients == 1
    assert [c.lease_id for c in state.clients] == [other.lease_id]

    assert await release(stub, lease) is False
    assert await release(stub, pb.Lease(lease_id="never-granted", fencing_token=7)) is False
    assert without_as_of(await status(stub)) == without_as_of(state)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await renew(stub, lease)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "LEASE_NOT_FOUND"
    assert (await allocate(stub, "worker-1")).lease.lease_id != lease.lease_id


# -- ReportUsage -----------------------------------------------------------------


async def test_report_usage_counts_a_request_once_however_often_it_is_retried(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease

    first = await report(stub, lease, 2 * UNIT, request_id="req-abc")
    before_retry = await status(stub)
    retry = await report(stub, lease, 2 * UNIT, request_id="req-abc")

    assert first.duplicate is False
    assert first.subscription_id == "sub1"
    assert retry.duplicate is True
    state = await status(stub)
    assert sub(state, "sub1").weekly_usage_micros == 2 * UNIT
    assert state.totals.weekly_usage_micros == 2 * UNIT
    assert without_as_of(state) == without_as_of(before_retry)  # the retry changed nothing

    await report(stub, lease, 3 * UNIT, request_id="req-def")
    assert sub(await status(stub), "sub1").weekly_usage_micros == 5 * UNIT


async def test_a_retried_usage_report_is_acknowledged_like_the_original(stub: Stub) -> None:
    """The ack of a retry names the subscription the cost was counted against, like the first ack.

    A client whose first ReportUsage timed out only ever sees the retry's answer.
    """
    lease = (await allocate(stub, "worker-1")).lease

    first = await report(stub, lease, UNIT, request_id="req-timeout")
    retry = await report(stub, lease, UNIT, request_id="req-timeout")

    assert retry.duplicate
    assert retry.subscription_id == first.subscription_id == "sub1"


async def test_usage_reported_after_release_still_counts_within_the_hour(
    server: Server, stub: Stub, clock: FakeClock
) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    assert await release(stub, lease)

    clock.advance(60)
    late = await report(stub, lease, 4 * UNIT)

    assert late.subscription_id == "sub1"
    assert sub(await status(stub), "sub1").weekly_usage_micros == 4 * UNIT

    clock.advance(3_600)
    await server.pool.reap()  # forgets leases ended more than an hour ago
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await report(stub, lease, UNIT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "LEASE_NOT_FOUND"
    assert sub(await status(stub), "sub1").weekly_usage_micros == 4 * UNIT


async def test_fallback_usage_is_counted_apart_from_the_pool(stub: Stub) -> None:
    for i in range(6):
        await allocate(stub, f"worker-{i}")
    fallback = (await allocate(stub, "worker-6")).lease
    assert fallback.fallback

    ack = await report(stub, fallback, 7 * UNIT)

    assert ack.subscription_id == "fallback"
    state = await status(stub)
    assert state.totals.fallback_usage_micros == 7 * UNIT
    assert state.totals.weekly_usage_micros == 0
    assert all(s.weekly_usage_micros == 0 for s in state.subscriptions)


# -- Status ----------------------------------------------------------------------


async def test_status_reports_usage_utilization_health_and_totals(stub: Stub, clock: FakeClock) -> None:
    leases = [(await allocate(stub, f"worker-{i}")).lease for i in range(4)]
    assert [lease.subscription_id for lease in leases] == ["sub1", "sub2", "sub3", "sub1"]
    await report(stub, leases[0], 17 * UNIT)
    await report(stub, leases[1], 8_500_000)

    state = await status(stub)

    assert [s.subscription_id for s in state.subscriptions] == ["sub1", "sub2", "sub3"]  # config order
    s1, s2, s3 = state.subscriptions
    assert (s1.live_clients, s2.live_clients, s3.live_clients) == (2, 1, 1)
    assert (s1.weekly_usage_micros, s2.weekly_usage_micros, s3.weekly_usage_micros) == (17 * UNIT, 8_500_000, 0)
    assert s1.utilization == pytest.approx(0.17)
    assert s2.utilization == pytest.approx(0.085)
    assert s3.utilization == 0.0
    # health = round(100 * (0.35 budget + 0.20 projected + 0.30 capacity + 0.15 reliability)).
    # Both reports came in the last 6 hours, so at that rate sub1 and sub2 are on
    # course to far beyond their limits: their projected headroom is 0.
    #   sub1: 0.35 * (1 - 17/85) + 0 + 0.30 * 0 + 0.15 = 0.43
    #   sub2: 0.35 * (1 - 8.5/85) + 0 + 0.30 * 0.5 + 0.15 = 0.615
    #   sub3: 0.35 + 0.20 + 0.30 * 0.5 + 0.15 = 0.85
    assert (s1.health_score, s2.health_score, s3.health_score) == (43, 62, 85)
    for s in state.subscriptions:
        assert s.type == "claude-pro"
        assert s.masked_email == "t***@company.com"
        assert s.status == pb.SUBSCRIPTION_STATUS_ACTIVE
        assert s.max_clients == 2
        assert s.weekly_budget_micros == 100 * UNIT
        start = s.window_start.ToDatetime(tzinfo=dt.UTC)
        end = s.window_end.ToDatetime(tzinfo=dt.UTC)
        assert end - start == dt.timedelta(days=7)
        assert (start.weekday(), start.hour, start.minute) == (0, 0, 0)  # Monday 00:00 UTC
        assert start.timestamp() <= clock.now < end.timestamp()

    totals = state.totals
    assert totals.subscriptions == 3
    assert totals.active_subscriptions == 3
    assert totals.live_clients == 4
    assert totals.fallback_clients == 0
    assert totals.weekly_usage_micros == 25_500_000
    assert totals.weekly_budget_micros == 300 * UNIT
    assert totals.fallback_usage_micros == 0
    assert totals.average_health == pytest.approx((43 + 62 + 85) / 3)
    assert totals.last_sequence == 6  # four grants, two usage reports
    assert state.as_of.ToNanoseconds() == round(clock.now * 1e9)

    assert sorted(c.lease_id for c in state.clients) == sorted(lease.lease_id for lease in leases)
    assert b"team+sub" not in state.SerializeToString()

    brief = await status(stub, include_clients=False)
    assert list(brief.clients) == []
    assert brief.totals == state.totals


async def test_status_of_an_idle_pool(stub: Stub) -> None:
    state = await status(stub)

    assert [s.health_score for s in state.subscriptions] == [100, 100, 100]
    assert state.totals.average_health == 100.0
    assert state.totals.live_clients == 0
    assert state.totals.last_sequence == 0
    assert list(state.clients) == []


# -- budget threshold and exhaustion -------------------------------------------------


async def test_subscription_past_the_threshold_is_limited_and_takes_no_new_clients(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    assert lease.subscription_id == "sub1"

    await report(stub, lease, 85 * UNIT - 1)
    assert sub(await status(stub), "sub1").status == pb.SUBSCRIPTION_STATUS_ACTIVE
    await report(stub, lease, 1)  # exactly 85 %

    state = await status(stub)
    assert sub(state, "sub1").status == pb.SUBSCRIPTION_STATUS_LIMITED
    assert sub(state, "sub1").health_score <= 40
    assert state.totals.active_subscriptions == 2

    # sub1 still has a free slot, but new clients go elsewhere, then to the fallback.
    others = [await allocate(stub, f"worker-{i}") for i in range(2, 6)]
    assert {o.lease.subscription_id for o in others} == {"sub2", "sub3"}
    sixth = await allocate(stub, "worker-6")
    assert sixth.decision == pb.DECISION_KIND_FALLBACK
    assert live_by_sub(await status(stub)) == {"sub1": 1, "sub2": 2, "sub3": 2}

    # ...while the client it has keeps it.
    sticky = await allocate(stub, "worker-1")
    assert sticky.decision == pb.DECISION_KIND_STICKY
    assert sticky.lease.subscription_id == "sub1"
    assert not (await renew(stub, lease)).moved


async def test_exhausted_subscription_moves_its_client_on_the_next_renew(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    neighbours = [(await allocate(stub, f"worker-{i}")).lease for i in range(2, 6)]
    assert live_by_sub(await status(stub)) == {"sub1": 2, "sub2": 2, "sub3": 1}
    await report(stub, lease, 99 * UNIT)
    assert sub(await status(stub), "sub1").status == pb.SUBSCRIPTION_STATUS_LIMITED
    await report(stub, lease, UNIT)

    state = await status(stub)
    assert sub(state, "sub1").status == pb.SUBSCRIPTION_STATUS_EXHAUSTED
    assert sub(state, "sub1").health_score == 0
    assert sub(state, "sub1").utilization == pytest.approx(1.0)
    assert state.totals.active_subscriptions == 2

    watch = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=state.totals.last_sequence))
    try:
        moved = await renew(stub, lease)

        assert moved.moved
        assert moved.lease.lease_id == lease.lease_id
        assert moved.lease.subscription_id == "sub3"  # the only subscription with room
        assert moved.lease.credential_ref == "/creds/.claude-sub3"
        assert moved.lease.fencing_token > lease.fencing_token
        assert not moved.lease.fallback
        event = await next_event(watch)
        assert event.type == pb.EVENT_TYPE_LEASE_MOVED
        assert event.lease_id == lease.lease_id
        assert event.fencing_token == moved.lease.fencing_token
        assert event.attributes["from_subscription_id"] == "sub1"
        assert event.attributes["kind"] == "failover"
    finally:
        watch.cancel()
    assert live_by_sub(await status(stub)) == {"sub1": 1, "sub2": 2, "sub3": 2}

    # The holder now renews with the new token; nothing moves again.
    steady = await renew(stub, moved.lease)
    assert not steady.moved
    assert steady.lease.fencing_token == moved.lease.fencing_token

    # The other client on sub1 learns of it through Allocate instead.
    stranded = next(n for n in neighbours if n.subscription_id == "sub1")
    via_allocate = await allocate(stub, stranded.client_id)
    assert via_allocate.decision == pb.DECISION_KIND_FALLBACK
    assert via_allocate.lease.lease_id == stranded.lease_id
    assert via_allocate.lease.fallback
    assert via_allocate.lease.fencing_token > stranded.fencing_token


async def test_allocate_for_a_client_on_an_exhausted_subscription_fails_over(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    await report(stub, lease, 100 * UNIT)

    answer = await allocate(stub, "worker-1")

    assert answer.decision == pb.DECISION_KIND_FAILOVER
    assert answer.lease.lease_id == lease.lease_id
    assert answer.lease.subscription_id in {"sub2", "sub3"}
    assert answer.lease.fencing_token > lease.fencing_token
    # Allocate told the holder of the new token, so a Renew with it is no move.
    assert not (await renew(stub, answer.lease)).moved


@pytest.mark.parametrize("spec", [make_spec(1)], ids=["single-subscription"])
async def test_exhausted_last_subscription_moves_its_client_to_the_fallback(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    await report(stub, lease, 100 * UNIT)

    moved = await renew(stub, lease)

    assert moved.moved
    assert moved.lease.fallback
    assert moved.lease.subscription_id == "fallback"
    assert moved.lease.subscription_type == "pay-as-you-go"
    assert moved.lease.fencing_token > lease.fencing_token
    state = await status(stub)
    assert state.totals.live_clients == 0
    assert state.totals.fallback_clients == 1


@pytest.mark.parametrize("spec", [make_spec(1, fallback=False)], ids=["single-subscription-fallback-off"])
async def test_exhausted_last_subscription_without_fallback_refuses_the_renew(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    await report(stub, lease, 100 * UNIT)
    before = await status(stub)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await renew(stub, lease)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "POOL_EXHAUSTED"
    assert error_details_pb2.RetryInfo in error_details(caught.value)
    assert without_as_of(await status(stub)) == without_as_of(before)


# -- Rebalance -------------------------------------------------------------------


async def test_rebalance_dry_run_plans_and_a_real_run_moves_idle_clients(stub: Stub, clock: FakeClock) -> None:
    leases = [(await allocate(stub, f"worker-{i}")).lease for i in range(3)]
    expensive = leases[0]
    assert [lease.subscription_id for lease in leases] == ["sub1", "sub2", "sub3"]
    await report(stub, expensive, 10 * UNIT)  # a 10-unit gap, over the 5-unit threshold

    busy = await stub.Rebalance(pb.RebalanceRequest(dry_run=True))
    assert list(busy.moves) == []  # nobody has been idle for 60 s yet

    await keep_alive(stub, clock, leases, 61)
    before = await status(stub)
    plan = await stub.Rebalance(pb.RebalanceRequest(dry_run=True))

    assert plan.dry_run
    assert plan.reason
    assert [(m.lease_id, m.client_id, m.from_subscription_id, m.to_subscription_id) for m in plan.moves] == [
        (expensive.lease_id, "worker-0", "sub1", "sub2")
    ]
    assert plan.moves[0].fencing_token == 0
    assert without_as_of(await status(stub)) == without_as_of(before)
    assert not (await renew(stub, expensive)).moved

    done = await stub.Rebalance(pb.RebalanceRequest(dry_run=False))

    assert not done.dry_run
    assert [(m.lease_id, m.from_subscription_id, m.to_subscription_id) for m in done.moves] == [
        (expensive.lease_id, "sub1", "sub2")
    ]
    new_token = done.moves[0].fencing_token
    assert new_token > expensive.fencing_token
    state = await status(stub)
    assert live_by_sub(state) == {"sub1": 0, "sub2": 2, "sub3": 1}
    assert state.totals.last_sequence > before.totals.last_sequence

    learned = await renew(stub, expensive)
    assert learned.moved
    assert learned.lease.subscription_id == "sub2"
    assert learned.lease.credential_ref == "/creds/.claude-sub2"
    assert learned.lease.fencing_token == new_token
    # Clients that were not moved hear nothing new.
    assert not (await renew(stub, leases[1])).moved
    assert not (await renew(stub, leases[2])).moved


async def test_rebalance_leaves_a_pool_within_the_cost_gap_alone(stub: Stub, clock: FakeClock) -> None:
    leases = [(await allocate(stub, f"worker-{i}")).lease for i in range(3)]
    await report(stub, leases[0], 5 * UNIT)  # exactly the threshold: not over it
    await keep_alive(stub, clock, leases, 61)

    outcome = await stub.Rebalance(pb.RebalanceRequest())

    assert list(outcome.moves) == []
    assert "5000000" in outcome.reason
    assert live_by_sub(await status(stub)) == {"sub1": 1, "sub2": 1, "sub3": 1}
    assert not (await renew(stub, leases[0])).moved


# -- WatchEvents -----------------------------------------------------------------


async def test_watch_events_replays_history_then_follows_live_events(stub: Stub) -> None:
    first = (await allocate(stub, "worker-1")).lease
    await report(stub, first, 3 * UNIT)
    assert await release(stub, first)

    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0))
    try:
        replayed = [await next_event(call) for _ in range(3)]
        second = (await allocate(stub, "worker-2")).lease  # after the stream is open
        live = await next_event(call)
        third = (await allocate(stub, "worker-3")).lease
        live_too = await next_event(call)
    finally:
        call.cancel()

    events = [*replayed, live, live_too]
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert [(e.type, e.lease_id, e.client_id) for e in events] == [
        (pb.EVENT_TYPE_LEASE_GRANTED, first.lease_id, "worker-1"),
        (pb.EVENT_TYPE_USAGE_RECORDED, first.lease_id, "worker-1"),
        (pb.EVENT_TYPE_LEASE_RELEASED, first.lease_id, "worker-1"),
        (pb.EVENT_TYPE_LEASE_GRANTED, second.lease_id, "worker-2"),
        (pb.EVENT_TYPE_LEASE_GRANTED, third.lease_id, "worker-3"),
    ]
    assert events[0].fencing_token == first.fencing_token
    assert events[0].subscription_id == "sub1"
    assert events[1].attributes["cost_micros"] == str(3 * UNIT)
    assert events[3].subscription_id == second.subscription_id
    assert all(b"@company.com" not in e.SerializeToString() for e in events)
    assert (await status(stub)).totals.last_sequence == 5


async def test_watch_events_resumes_after_a_sequence_with_exactly_the_later_events(stub: Stub) -> None:
    leases = [(await allocate(stub, f"worker-{i}")).lease for i in range(4)]  # sequences 1..4

    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=2))
    try:
        resumed = [await next_event(call) for _ in range(2)]
        fifth = (await allocate(stub, "worker-5")).lease
        following = await next_event(call)
    finally:
        call.cancel()

    assert [(e.sequence, e.lease_id) for e in resumed] == [(3, leases[2].lease_id), (4, leases[3].lease_id)]
    # Nothing replayed twice and nothing skipped: the next event is the new one.
    assert (following.sequence, following.lease_id) == (5, fifth.lease_id)


async def test_watch_events_reports_expiry_and_status_changes(server: Server, stub: Stub, clock: FakeClock) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=1))
    try:
        await report(stub, lease, 90 * UNIT)
        usage = await next_event(call)
        changed = await next_event(call)
        clock.advance(TTL + 1)
        assert await server.pool.reap() == 1
        expired = await next_event(call)
    finally:
        call.cancel()

    assert usage.type == pb.EVENT_TYPE_USAGE_RECORDED
    assert changed.type == pb.EVENT_TYPE_SUBSCRIPTION_STATUS_CHANGED
    assert changed.subscription_id == "sub1"
    assert changed.attributes["to"] == "limited"
    assert expired.type == pb.EVENT_TYPE_LEASE_EXPIRED
    assert expired.lease_id == lease.lease_id
    assert [usage.sequence, changed.sequence, expired.sequence] == [2, 3, 4]


async def test_watch_events_stay_gapless_and_ordered_under_concurrent_calls(stub: Stub) -> None:
    call = stub.WatchEvents(pb.WatchEventsRequest())
    try:
        grants = await asyncio.gather(*(allocate(stub, f"worker-{i}") for i in range(12)))
        await asyncio.gather(*(report(stub, g.lease, UNIT) for g in grants))
        events = [await next_event(call) for _ in range(24)]
    finally:
        call.cancel()

    assert [e.sequence for e in events] == list(range(1, 25))
    position = {(e.type, e.lease_id): i for i, e in enumerate(events)}
    for g in grants:
        assert (
            position[(pb.EVENT_TYPE_LEASE_GRANTED, g.lease.lease_id)]
            < position[(pb.EVENT_TYPE_USAGE_RECORDED, g.lease.lease_id)]
        )


# -- concurrency -------------------------------------------------------------------


async def test_concurrent_allocates_for_one_client_share_one_lease(stub: Stub) -> None:
    answers = await asyncio.gather(*(allocate(stub, "worker-1") for _ in range(10)))

    assert len({a.lease.lease_id for a in answers}) == 1
    assert len({a.lease.fencing_token for a in answers}) == 1
    assert sorted(a.decision for a in answers) == [pb.DECISION_KIND_NEW] + [pb.DECISION_KIND_STICKY] * 9
    assert (await status(stub)).totals.live_clients == 1


async def test_concurrent_allocates_never_overfill_a_subscription(stub: Stub) -> None:
    answers = await asyncio.gather(*(allocate(stub, f"worker-{i}") for i in range(20)))

    decisions = [a.decision for a in answers]
    assert decisions.count(pb.DECISION_KIND_NEW) == 6
    assert decisions.count(pb.DECISION_KIND_FALLBACK) == 14
    state = await status(stub)
    assert live_by_sub(state) == {"sub1": 2, "sub2": 2, "sub3": 2}
    assert state.totals.fallback_clients == 14
    assert len({a.lease.fencing_token for a in answers}) == 20  # every grant its own token


async def test_concurrent_retries_of_one_usage_report_count_once(stub: Stub) -> None:
    lease = (await allocate(stub, "worker-1")).lease

    acks = await asyncio.gather(*(report(stub, lease, 2 * UNIT, request_id="req-same") for _ in range(8)))

    assert sorted(a.duplicate for a in acks) == [False] + [True] * 7
    assert {a.subscription_id for a in acks} == {"sub1"}
    assert sub(await status(stub), "sub1").weekly_usage_micros == 2 * UNIT


# -- the weekly window -----------------------------------------------------------------


async def test_status_after_the_weekly_window_ends_shows_the_new_window(stub: Stub, clock: FakeClock) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    await report(stub, lease, 100 * UNIT)
    old = await status(stub)
    assert sub(old, "sub1").status == pb.SUBSCRIPTION_STATUS_EXHAUSTED

    clock.now = sub(old, "sub1").window_end.ToSeconds() + 60  # Monday 00:01 UTC: the budget has reset

    state = await status(stub)
    s1 = sub(state, "sub1")
    assert s1.window_start.ToSeconds() == sub(old, "sub1").window_end.ToSeconds()
    assert s1.window_start.ToSeconds() <= state.as_of.ToSeconds() < s1.window_end.ToSeconds()
    assert s1.weekly_usage_micros == 0
    assert s1.status == pb.SUBSCRIPTION_STATUS_ACTIVE
    assert state.totals.active_subscriptions == 3


async def test_a_new_window_restores_an_exhausted_subscription(stub: Stub, clock: FakeClock) -> None:
    lease = (await allocate(stub, "worker-1")).lease
    await report(stub, lease, 100 * UNIT)
    window_end = sub(await status(stub), "sub1").window_end.ToSeconds()
    assert await release(stub, lease)

    clock.now = window_end + 60
    fresh = await allocate(stub, "worker-2")  # any write rolls the window

    assert fresh.lease.subscription_id == "sub1"
    s1 = sub(await status(stub), "sub1")
    assert s1.status == pb.SUBSCRIPTION_STATUS_ACTIVE
    assert s1.weekly_usage_micros == 0


# -- restart with a changed config ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(spec: PoolSpec, data_dir: Path, clock: FakeClock) -> AsyncIterator[Stub]:
    """A server like conftest's `server` fixture, for tests that restart it on the same data."""
    server = Server(
        spec, data_dir=data_dir, security=NO_AUTH, listen="127.0.0.1:0", background=False, clock=clock, grace_seconds=1
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield authpool_pb2_grpc.AuthPoolStub(channel)
    finally:
        await server.stop()


async def test_after_a_restart_without_a_subscription_its_clients_move_and_rebalance_still_runs(
    tmp_path: Path, clock: FakeClock
) -> None:
    async with serving(make_spec(3, ttl=3_600), tmp_path, clock) as stub:
        leases = [(await allocate(stub, f"worker-{i}")).lease for i in range(3)]
        assert [lease.subscription_id for lease in leases] == ["sub1", "sub2", "sub3"]
        await report(stub, leases[0], 20 * UNIT)
    clock.advance(120)  # every client is idle now

    async with serving(make_spec(2, ttl=3_600), tmp_path, clock) as stub:  # sub3 taken out of the config
        state = await status(stub)
        assert [s.subscription_id for s in state.subscriptions] == ["sub1", "sub2"]
        assert sub(state, "sub1").weekly_usage_micros == 20 * UNIT  # usage survived the restart

        plan = await stub.Rebalance(pb.RebalanceRequest(dry_run=True))
        done = await stub.Rebalance(pb.RebalanceRequest())

        assert {m.to_subscription_id for m in [*plan.moves, *done.moves]} <= {"sub1", "sub2"}
        orphan = await renew(stub, leases[2])
        assert orphan.moved
        assert orphan.lease.subscription_id in {"sub1", "sub2", "fallback"}
        assert orphan.lease.credential_ref != "/creds/.claude-sub3"
