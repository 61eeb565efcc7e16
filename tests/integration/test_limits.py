"""Rate limits, message size and keepalive enforcement, over real channels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authpool_server.config_server import KeepaliveConfig
from authpool_server.security.ratelimit import Bucket, RateLimiter
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import RateLimits, SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from tests.conftest import FakeClock, make_spec, secret
from tests.integration.rich_errors import error_details

BUSY = secret("busy-caller-token-1234567890")
QUIET = secret("quiet-caller-token-0987654321")
BURST = 5


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def limited(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Server]:
    security = SecuritySettings(
        tokens=TokenDirectory([(BUSY, Principal("busy", Role.OPERATOR)), (QUIET, Principal("quiet", Role.OPERATOR))]),
        open_services=frozenset({"grpc.health.v1.Health"}),
        # Slow enough that the test never sees a refill between calls.
        rate_limits=RateLimits(default=Bucket(rate=0.5, burst=BURST), principals={}),
        max_message_bytes=4096,
    )
    server = Server(make_spec(), data_dir=tmp_path, security=security, listen="127.0.0.1:0", background=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def stub(limited: Server) -> AsyncIterator[authpool_pb2_grpc.AuthPoolStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        yield authpool_pb2_grpc.AuthPoolStub(channel)


async def test_a_principal_over_its_rate_is_told_when_to_retry(stub: authpool_pb2_grpc.AuthPoolStub) -> None:
    for _ in range(BURST):
        await stub.Status(pb.StatusRequest(), metadata=bearer(BUSY))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(pb.AllocateRequest(client_id="late"), metadata=bearer(BUSY))
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error_details(raised.value)
    assert details[error_details_pb2.ErrorInfo].reason == "RATE_LIMITED"
    assert details[error_details_pb2.ErrorInfo].metadata["principal"] == "busy"
    delay = details[error_details_pb2.RetryInfo].retry_delay.ToNanoseconds() / 1e9
    assert 0 < delay <= 2.0  # one token at 0.5/s
    # Refused calls change nothing, and other principals have their own bucket.
    status = await stub.Status(pb.StatusRequest(include_clients=True), metadata=bearer(QUIET))
    assert not status.clients


async def test_health_checks_are_never_rate_limited(limited: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(BURST * 3):
            await health.Check(health_pb2.HealthCheckRequest())


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    limiter = RateLimiter(Bucket(rate=10, burst=2), {"vip": Bucket(rate=100, burst=5)}, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.1)
    now[0] += 0.1
    assert limiter.acquire("a") == 0.0
    now[0] += 60  # a long pause does not bank more than the burst
    assert [limiter.acquire("a") == 0.0 for _ in range(3)] == [True, True, False]
    assert all(limiter.acquire("vip") == 0.0 for _ in range(5))


async def test_an_oversize_request_is_refused_and_changes_nothing(stub: authpool_pb2_grpc.AuthPoolStub) -> None:
    huge = pb.AllocateRequest(client_id="big", session_id="s" * 8000)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(huge, metadata=bearer(QUIET))
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = await stub.Status(pb.StatusRequest(include_clients=True), metadata=bearer(QUIET))
    assert not status.clients


async def test_an_over_long_field_is_named(stub: authpool_pb2_grpc.AuthPoolStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(pb.AllocateRequest(client_id="c" * 129), metadata=bearer(QUIET))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = error_details(raised.value)[error_details_pb2.BadRequest].field_violations
    assert [v.field for v in violations] == ["client_id"]


async def drain(stream: AsyncIterator[object]) -> None:
    async for _ in stream:
        pass


async def test_a_client_that_pings_too_often_is_disconnected(tmp_path: Path) -> None:
    keepalive = KeepaliveConfig(min_client_ping_interval_seconds=5, max_ping_strikes=1)
    security = SecuritySettings(keepalive=keepalive).without_auth()
    server = Server(make_spec(), data_dir=tmp_path, security=security, listen="127.0.0.1:0", background=False)
    await server.start()
    abusive = [
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=abusive) as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await asyncio.wait_for(drain(stub.WatchEvents(pb.WatchEventsRequest())), timeout=15)
            # The server answers ping floods with GOAWAY (ENHANCE_YOUR_CALM / too_many_pings).
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
            assert raised.value.details() == "Too many pings"
    finally:
        await server.stop()
