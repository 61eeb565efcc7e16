"""Several `authpool serve` processes on one PostgreSQL schema, as the `ha` deployment runs them.

Each test starts real server processes (tests/integration/server_process.py)
sharing a schema of their own on the machine's PostgreSQL, drives them over
real gRPC channels, and checks the design notes' invariants on what the
database holds: they must hold for the deployment as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.server_process import ServerProcess, write_config
from tests.integration.storm import database_facts, invariant_violations, storm

pytestmark = pytest.mark.slow

MAX_CLIENTS = 6  # per subscription: a storm of more clients than 3 x 6 keeps every limit under pressure


def replica_config(tmp_path: Path, schema: str, *, ttl: int = 60) -> Path:
    path = write_config(tmp_path / "auth-pool.json", max_clients=MAX_CLIENTS, ttl=ttl)
    config = json.loads(path.read_text())
    config["store"] = {"kind": "postgres", "schema": schema}
    path.write_text(json.dumps(config))
    return path


@contextlib.contextmanager
def replicas(count: int, config: Path, tmp_path: Path, dsn: str) -> Iterator[list[ServerProcess]]:
    servers = [
        ServerProcess(config, tmp_path / f"replica-{i}", env={"AUTHPOOL_DATABASE_URL": dsn}) for i in range(count)
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def is_leader(server: ServerProcess) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=5) as reply:
        metrics = reply.read().decode()
    return any(line.startswith("authpool_replica_leader") and line.endswith(" 1.0") for line in metrics.splitlines())


def wait_for(condition, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


async def settled_status(port: int, last_sequence: int) -> pb.StatusResponse:
    """The replica's Status once it has caught up to `last_sequence` (its memory follows the others')."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        async with asyncio.timeout(10):
            while True:
                status = await stub.Status(pb.StatusRequest(include_clients=True), timeout=5)
                if status.totals.last_sequence >= last_sequence:
                    return status
                await asyncio.sleep(0.05)


@pytest.mark.parametrize("count", [2, 3])
async def test_a_storm_on_several_replicas_keeps_every_invariant(
    count: int, tmp_path: Path, postgres_dsn: str, pg_schema: str
) -> None:
    with replicas(count, replica_config(tmp_path, pg_schema), tmp_path, postgres_dsn) as servers:
        ports = [server.port for server in servers]
        watch = asyncio.create_task(_sample_invariants(postgres_dsn, pg_schema))
        result = await storm(ports, clients=8 * count, seconds=4.0)
        samples = await _stop(watch)
        assert result.failures == []
        assert result.unavailable == 0
        assert result.calls["Allocate"] > 50 * count
        facts = await database_facts(postgres_dsn, pg_schema)
        assert invariant_violations(facts, max_clients=MAX_CLIENTS, acknowledged=result.acknowledged) == []
        assert all(sample == [] for sample in samples), samples  # and at every moment sampled during the storm
        # Every replica, once caught up, reports the same state: the database's.
        live = sum(facts["live_per_subscription"].values())
        for port in ports:
            status = await settled_status(port, facts["last_sequence"])
            spent = sum(s.weekly_usage_micros for s in status.subscriptions) + status.totals.fallback_usage_micros
            assert spent == sum(result.acknowledged.values())
            assert sum(s.live_clients for s in status.subscriptions) == live


async def _sample_invariants(dsn: str, schema: str) -> list[list[str]]:
    """Check the invariants that must hold at every commit, over and over, until cancelled."""
    samples: list[list[str]] = []
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            facts = await database_facts(dsn, schema)
            samples.append(invariant_violations(facts, max_clients=MAX_CLIENTS, acknowledged=facts["usage"]))
            await asyncio.sleep(0.1)
    return samples


async def _stop(task: asyncio.Task[list[list[str]]]) -> list[list[str]]:
    task.cancel()
    return await task


async def test_watch_on_one_replica_sees_events_made_on_another_in_order(
    tmp_path: Path, postgres_dsn: str, pg_schema: str
) -> None:
    with replicas(2, replica_config(tmp_path, pg_schema), tmp_path, postgres_dsn) as (a, b):
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as on_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as on_b,
        ):
            watched = authpool_pb2_grpc.AuthPoolStub(on_a).WatchEvents(pb.WatchEventsRequest(after_sequence=0))
            stub_b = authpool_pb2_grpc.AuthPoolStub(on_b)
            granted = [
                (await stub_b.Allocate(pb.AllocateRequest(client_id=f"w{i}"), timeout=10)).lease for i in range(5)
            ]
            await stub_b.Release(
                pb.ReleaseRequest(lease_id=granted[0].lease_id, fencing_token=granted[0].fencing_token)
            )
            seen: list[pb.Event] = []
            async with asyncio.timeout(5):
                async for message in watched:
                    if message.HasField("event"):
                        seen.append(message.event)
                    if any(e.type == pb.EVENT_TYPE_LEASE_RELEASED for e in seen):
                        break
            watched.cancel()
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
    grants = [e.lease_id for e in seen if e.type == pb.EVENT_TYPE_LEASE_GRANTED]
    assert grants == [lease.lease_id for lease in granted]


async def test_background_work_moves_to_a_surviving_replica_when_its_leader_is_killed(
    tmp_path: Path, postgres_dsn: str, pg_schema: str
) -> None:
    with replicas(2, replica_config(tmp_path, pg_schema, ttl=2), tmp_path, postgres_dsn) as servers:
        wait_for(lambda: any(is_leader(s) for s in servers), 5, "a replica leads")
        leader = next(s for s in servers if is_leader(s))
        survivor = next(s for s in servers if s is not leader)
        assert not is_leader(survivor)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{survivor.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            # Work acknowledged by the leader just before it dies must survive it.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{leader.port}") as to_leader:
                on_leader = authpool_pb2_grpc.AuthPoolStub(to_leader)
                kept = (await on_leader.Allocate(pb.AllocateRequest(client_id="kept"), timeout=10)).lease
                await on_leader.ReportUsage(
                    pb.ReportUsageRequest(
                        request_id="before-kill",
                        lease_id=kept.lease_id,
                        fencing_token=kept.fencing_token,
                        cost_micros=7,
                    ),
                    timeout=10,
                )
            leader.kill()
            killed_at = time.monotonic()
            wait_for(lambda: is_leader(survivor), 5, "the survivor takes the lead")
            took_over = time.monotonic() - killed_at
            # The new leader's reaper expires a lease nobody renews (TTL 2 s)...
            orphan = (await stub.Allocate(pb.AllocateRequest(client_id="orphan"), timeout=10)).lease
            async with asyncio.timeout(10):
                while True:
                    status = await stub.Status(pb.StatusRequest(include_clients=True), timeout=5)
                    if orphan.lease_id not in {c.lease_id for c in status.clients}:
                        break
                    await asyncio.sleep(0.2)
            # ...and nothing the dead leader acknowledged was lost.
            again = await stub.ReportUsage(
                pb.ReportUsageRequest(
                    request_id="before-kill", lease_id=kept.lease_id, fencing_token=kept.fencing_token, cost_micros=7
                ),
                timeout=10,
            )
            assert again.duplicate
    assert took_over < 5


def _restart_postgres() -> None:
    versions = os.listdir("/etc/postgresql")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[0], "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _can_restart_postgres(dsn: str) -> str:
    """Why this machine's PostgreSQL cannot be restarted by the test, or '' when it can."""
    if "127.0.0.1" not in dsn and "localhost" not in dsn:
        return "the test database is not on this machine"
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        return "pg_ctlcluster (Debian's postgresql-common) is not installed"
    if os.geteuid() != 0:
        return "restarting PostgreSQL needs root"
    return ""


async def test_a_postgres_restart_during_load_fails_calls_cleanly_then_recovers(
    tmp_path: Path, postgres_dsn: str, pg_schema: str
) -> None:
    reason = _can_restart_postgres(postgres_dsn)
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL restart test: {reason}")
        pytest.skip(reason)
    with replicas(2, replica_config(tmp_path, pg_schema), tmp_path, postgres_dsn) as servers:
        ports = [server.port for server in servers]
        load = asyncio.create_task(storm(ports, clients=12, seconds=8.0, retry_for=60.0))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(_restart_postgres)
        result = await load
        # Only UNAVAILABLE while the database was away (retried, as callers do); nothing else failed.
        assert result.failures == []
        assert result.unavailable > 0, "the restart went unnoticed: was the database really restarted?"
        for server in servers:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        facts = await database_facts(postgres_dsn, pg_schema)
        assert invariant_violations(facts, max_clients=MAX_CLIENTS, acknowledged=result.acknowledged) == []


async def test_a_cursor_from_one_replica_resumes_on_another_at_once(
    tmp_path: Path, postgres_dsn: str, pg_schema: str
) -> None:
    with replicas(2, replica_config(tmp_path, pg_schema), tmp_path, postgres_dsn) as (a, b):
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as to_a,
            grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as to_b,
        ):
            stub_a, stub_b = authpool_pb2_grpc.AuthPoolStub(to_a), authpool_pb2_grpc.AuthPoolStub(to_b)
            for i in range(10):
                await stub_a.Allocate(pb.AllocateRequest(client_id=f"first-{i}"), timeout=10)
                # A watcher saw this on A a moment ago; B may not have it yet, and must not refuse it.
                cursor = (await stub_a.Status(pb.StatusRequest(), timeout=5)).totals.last_sequence
                resumed = stub_b.WatchEvents(pb.WatchEventsRequest(after_sequence=cursor))
                try:
                    granted = (await stub_a.Allocate(pb.AllocateRequest(client_id=f"next-{i}"), timeout=10)).lease
                    message = await asyncio.wait_for(resumed.read(), timeout=5)
                    assert message.event.sequence == cursor + 1
                    assert message.event.lease_id == granted.lease_id
                finally:
                    resumed.cancel()
