"""Fixtures shared by every tier: a pool spec, a real server on an ephemeral port, a real channel."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2_grpc

from authpool_server.domain import MICROS_PER_UNIT, PoolSpec, RebalancePolicy, SubscriptionSpec
from authpool_server.logs import JsonFormatter
from authpool_server.security.settings import SecuritySettings
from authpool_server.server import Server

# Tests about the pool talk to it without credentials; tests/integration/test_auth*.py are about auth.
NO_AUTH = SecuritySettings().without_auth()

# Every token a test uses, so that the session can check none reached a log line.
SECRETS: set[str] = set()


def secret(value: str) -> str:
    """Register a test token (or other secret) and return it."""
    SECRETS.add(value)
    return value


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_line() -> Iterator[None]:
    """Every log record of the whole run, formatted as production writes it, holds no registered secret."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # access-log lines are INFO, health checks DEBUG
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = output.getvalue()
    leaked = sorted(token for token in SECRETS if token in text)
    assert not leaked, f"{len(leaked)} test tokens reached a log line"


class FakeClock:
    """A clock the test moves by hand; the pool reads time only through it."""

    def __init__(self, start: float = 1_764_000_000.0) -> None:  # a Tuesday, mid-window
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_spec(
    subscriptions: int = 3,
    *,
    budget_units: int = 100,
    max_clients: int = 2,
    fallback: bool = True,
    ttl: float = 30.0,
    cost_gap_units: int = 5,
) -> PoolSpec:
    return PoolSpec(
        subscriptions=tuple(
            SubscriptionSpec(
                id=f"sub{i}",
                email=f"team+sub{i}@company.com",
                type="claude-pro",
                credential_ref=f"/creds/.claude-sub{i}",
                weekly_budget_micros=budget_units * MICROS_PER_UNIT,
                max_clients=max_clients,
            )
            for i in range(1, subscriptions + 1)
        ),
        threshold_ppm=850_000,
        fallback_when_exhausted=fallback,
        lease_ttl_seconds=ttl,
        rebalancing=RebalancePolicy(cost_gap_micros=cost_gap_units * MICROS_PER_UNIT, idle_seconds=60.0),
    )


async def eventually(condition: Callable[[], object], *, seconds: float = 20.0) -> None:
    """Wait until `condition()` holds: at most `seconds`, or less if the caller's `asyncio.timeout` says so."""
    try:
        async with asyncio.timeout(seconds):
            while not condition():  # noqa: ASYNC110 - polls state that another task, thread or process changes
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"still not true after {seconds} s: {condition.__doc__ or condition}") from None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spec() -> PoolSpec:
    return make_spec()


@pytest.fixture
async def server(tmp_path: Path, spec: PoolSpec, clock: FakeClock) -> AsyncIterator[Server]:
    server = Server(
        spec, data_dir=tmp_path, security=NO_AUTH, listen="127.0.0.1:0", background=False, clock=clock, grace_seconds=1
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> authpool_pb2_grpc.AuthPoolStub:
    return authpool_pb2_grpc.AuthPoolStub(channel)
