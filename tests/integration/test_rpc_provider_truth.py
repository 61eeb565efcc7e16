"""The provider's own account of a subscription (rate-limit headers) beats AuthPool's estimate."""

from __future__ import annotations

import itertools
import math
import sqlite3
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authpool_server.domain import PoolSpec
from authpool_server.server import DATABASE_FILE, Server
from authpool_server.store.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.conftest import NO_AUTH, FakeClock, make_spec

UNIT = 1_000_000
Stub = authpool_pb2_grpc.AuthPoolStub
_ids = itertools.count()


@pytest.fixture
def spec() -> PoolSpec:
    return make_spec(ttl=86_400)


def limits(remaining: float | None = None, reset_at: float | None = None) -> pb.ProviderLimits:
    message = pb.ProviderLimits()
    if remaining is not None:
        message.remaining_fraction = remaining
    if reset_at is not None:
        stamp = Timestamp()
        stamp.FromNanoseconds(round(reset_at * 1e9))
        message.reset_time.CopyFrom(stamp)
    return message


async def report(stub: Stub, lease: pb.Lease, cost: int, provider: pb.ProviderLimits | None = None) -> None:
    await stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id=f"p{next(_ids)}",
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
            cost_micros=cost,
            provider_limits=provider,
        )
    )


async def sub1(stub: Stub) -> pb.SubscriptionState:
    return (await stub.Status(pb.StatusRequest())).subscriptions[0]


async def test_the_providers_remaining_share_replaces_our_count(stub: Stub) -> None:
    lease = (await stub.Allocate(pb.AllocateRequest(client_id="w1"))).lease
    assert lease.subscription_id == "sub1"
    await report(stub, lease, UNIT, limits(remaining=0.1))  # we counted 1 unit; the provider says 90 are gone

    state = await sub1(stub)
    assert state.weekly_usage_micros == 90 * UNIT
    assert state.status == pb.SUBSCRIPTION_STATUS_LIMITED
    await report(stub, lease, 2 * UNIT)  # later spend adds to the provider's figure
    assert (await sub1(stub)).weekly_usage_micros == 92 * UNIT
    assert (await stub.Allocate(pb.AllocateRequest(client_id="w2"))).lease.subscription_id != "sub1"


async def test_a_provider_reset_time_ends_the_window_then(stub: Stub, server: Server, clock: FakeClock) -> None:
    lease = (await stub.Allocate(pb.AllocateRequest(client_id="w1"))).lease
    reset_at = clock.now + 7_200
    await report(stub, lease, UNIT, limits(remaining=0.0, reset_at=reset_at))
    spent = await sub1(stub)
    assert spent.status == pb.SUBSCRIPTION_STATUS_EXHAUSTED
    assert spent.window_end.ToNanoseconds() == round(reset_at * 1e9)
    moved = await stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token))
    assert moved.moved

    clock.now = reset_at + 1
    await server.pool.reap()
    fresh = await sub1(stub)
    assert fresh.status == pb.SUBSCRIPTION_STATUS_ACTIVE
    assert fresh.weekly_usage_micros == 0
    assert fresh.window_start.ToNanoseconds() == round(reset_at * 1e9)  # the next week runs from the provider's reset
    assert fresh.window_end.ToSeconds() - fresh.window_start.ToSeconds() == 7 * 86_400


@pytest.mark.parametrize("remaining", [1.5, -0.1, math.nan])
async def test_an_impossible_remaining_share_is_rejected_by_field(stub: Stub, remaining: float) -> None:
    lease = (await stub.Allocate(pb.AllocateRequest(client_id="w1"))).lease
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await report(stub, lease, UNIT, limits(remaining=remaining))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "provider_limits.remaining_fraction" in (raised.value.details() or "")
    assert (await sub1(stub)).weekly_usage_micros == 0


async def test_the_providers_word_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    for attempt in range(2):
        server = Server(
            make_spec(ttl=86_400),
            data_dir=tmp_path,
            security=NO_AUTH,
            listen="127.0.0.1:0",
            background=False,
            clock=clock,
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = authpool_pb2_grpc.AuthPoolStub(channel)
                if attempt == 0:
                    lease = (await stub.Allocate(pb.AllocateRequest(client_id="w1"))).lease
                    await report(stub, lease, UNIT, limits(remaining=0.5, reset_at=clock.now + 3_600))
                else:
                    state = await sub1(stub)
                    assert state.weekly_usage_micros == 50 * UNIT
                    assert state.window_end.ToSeconds() == round(clock.now + 3_600)
        finally:
            await server.stop()


async def test_a_version_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / DATABASE_FILE
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE usage (request_id TEXT PRIMARY KEY, lease_id TEXT NOT NULL, client_id TEXT NOT NULL,
            subscription_id TEXT NOT NULL, fallback INTEGER NOT NULL, at REAL NOT NULL,
            cost_micros INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
            model TEXT NOT NULL, outcome TEXT NOT NULL);
        INSERT INTO usage VALUES ('r1', 'l1', 'c1', 'sub1', 0, 1.0, 5, 0, 0, '', 'ok');
        """
    )
    old.close()
    store = SQLiteStore(path)
    snapshot = await store.open()
    await store.close()
    assert [(u.request_id, u.cost_micros, u.provider_remaining_ppm) for u in snapshot.usage] == [("r1", 5, None)]
    check = sqlite3.connect(path)
    assert check.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    # Version 4's indexes, which the usage summary at start reads, were built in place.
    indexes = {name for (name,) in check.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {
        "usage_subscription_at",
        "usage_provider_report",
        "usage_provider_reset",
        "usage_not_ok",
        "usage_fallback",
    } <= indexes
    check.close()
