"""Config hot reload through a real server: a changed file is noticed and applied; a bad one changes nothing.

The server runs in-process with its config file watched every 0.1 s (as
`authpool serve` does every 2 s) and a fake clock for the pool, so that a
client's idleness is the test's to decide. Files are rewritten as an editor,
a deploy tool or Kubernetes (a ConfigMap's symlink swap) would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from authpool_server.config import load_config
from authpool_server.server import Server
from tests.conftest import FakeClock
from tests.integration.server_process import ServerProcess, write_config
from tests.integration.test_rpc_policy import UNIT, Stub, allocate, events, report

IDLE_SECONDS = 300


def document(subscriptions: int = 3, **changes: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "subscriptions": [
            {
                "id": f"sub{i}",
                "email": f"team+sub{i}@company.com",
                "type": "claude-pro",
                "configDir": f"~/.claude-sub{i}",
                "weeklyBudget": 100,
                "maxClientsPerSub": 10,
            }
            for i in range(1, subscriptions + 1)
        ],
        "leaseTtlSeconds": 3600,
        "rebalancing": {"enabled": False, "idleSeconds": IDLE_SECONDS},
        "notifications": {"rules": [{"type": "config_reloaded", "channels": ["log"]}]},
        "security": {"rateLimits": {"enabled": False}},
    }
    config.update(changes)
    return config


def write(path: Path, config: dict[str, Any]) -> None:
    write_text(path, json.dumps(config))


def write_text(path: Path, text: str) -> None:
    # Written whole and renamed into place, as editors and deploy tools do.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth-pool.json"
    config = document()
    config["credentialsRoot"] = str(tmp_path)
    write(path, config)
    return path


async def started(config_file: Path, tmp_path: Path, clock: FakeClock) -> Server:
    settings = load_config(config_file, env={})
    server = Server(
        settings.pool,
        data_dir=tmp_path / "data",
        security=settings.security.without_auth(),
        listen="127.0.0.1:0",
        background=False,
        clock=clock,
        config=settings,
        config_poll_seconds=0.1,
    )
    await server.start()
    return server


@pytest.fixture
async def server(config_file: Path, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Server]:
    server = await started(config_file, tmp_path, clock)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield authpool_pb2_grpc.AuthPoolStub(channel)


def rewrite(config_file: Path, **changes: Any) -> None:
    config = read(config_file)
    config.update(changes)
    write(config_file, config)


async def reloads(stub: Stub, count: int = 1) -> list[pb.Event]:
    """The CONFIG_RELOADED events, once there are `count` of them (the file is polled, so they come soon)."""
    call = stub.WatchEvents(pb.WatchEventsRequest(types=[pb.EVENT_TYPE_CONFIG_RELOADED]))
    try:
        async with asyncio.timeout(5):
            async for message in call:
                count -= message.HasField("event")
                if count == 0:
                    break
    finally:
        call.cancel()
    return await events(stub, pb.EVENT_TYPE_CONFIG_RELOADED)


async def logged(caplog: pytest.LogCaptureFixture, count: int) -> None:
    """Until `count` records were captured: the server logs from its own task."""
    async with asyncio.timeout(5):
        while len(caplog.records) < count:  # noqa: ASYNC110 - nothing to wait on but the log itself
            await asyncio.sleep(0.05)


async def subscriptions(stub: Stub) -> dict[str, pb.SubscriptionState]:
    status = await stub.Status(pb.StatusRequest())
    return {s.subscription_id: s for s in status.subscriptions}


async def test_a_changed_file_is_applied_at_once_and_recorded(
    stub: Stub, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authpool.notifications")
    holder = await allocate(stub, "worker-1")
    config = read(config_file)
    config["subscriptions"][1]["weeklyBudget"] = 250
    config["subscriptions"].append({**config["subscriptions"][0], "id": "sub4", "configDir": "~/.claude-sub4"})
    config["weeklyBudgetThreshold"] = 0.9
    write(config_file, config)

    [reloaded] = await reloads(stub)
    assert dict(reloaded.attributes) == {"added": "sub4", "removed": "", "changed": "sub2", "pool": "changed"}
    # The guide's config_reloaded notification, on the log channel.
    [note] = [r for r in caplog.records if r.name == "authpool.notifications"]
    assert note.context["rule"] == "config_reloaded"  # type: ignore[attr-defined]
    assert note.getMessage() == "configuration reloaded: added sub4; changed sub2"
    now = await subscriptions(stub)
    assert list(now) == ["sub1", "sub2", "sub3", "sub4"]
    assert now["sub2"].weekly_budget_micros == 250 * UNIT
    assert now["sub4"].status == pb.SUBSCRIPTION_STATUS_ACTIVE
    # Leases are untouched by a reload that does not remove their subscription.
    renewed = await stub.Renew(pb.RenewRequest(lease_id=holder.lease_id, fencing_token=holder.fencing_token))
    assert not renewed.moved


async def test_an_invalid_file_is_rejected_the_running_config_stays_and_a_fix_applies(
    server: Server, stub: Stub, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="authpool_server.reload")
    before = await subscriptions(stub)
    config = read(config_file)
    config["subscriptions"][0]["maxClientsPerSub"] = -1
    config["weeklyBudgetThreshold"] = 7
    write(config_file, config)
    await logged(caplog, 1)
    [rejected] = caplog.records
    problems = rejected.context["problems"]  # type: ignore[attr-defined]
    assert any(p.startswith("subscriptions[0].maxClientsPerSub") for p in problems), problems
    assert any(p.startswith("weeklyBudgetThreshold") for p in problems), problems
    assert await subscriptions(stub) == before
    assert await events(stub, pb.EVENT_TYPE_CONFIG_RELOADED) == []
    # A file that is not even JSON is refused the same way.
    write_text(config_file, "{ not json")
    await logged(caplog, 2)
    assert (await allocate(stub, "still-served")).lease_id

    config["subscriptions"][0]["maxClientsPerSub"] = 3
    config["weeklyBudgetThreshold"] = 0.8
    write(config_file, config)
    [applied] = await reloads(stub)
    assert applied.attributes["changed"] == "sub1"
    assert (await subscriptions(stub))["sub1"].max_clients == 3


async def test_a_removed_subscription_drains_its_clients_then_leaves(
    server: Server, stub: Stub, config_file: Path, clock: FakeClock
) -> None:
    leases = [await allocate(stub, f"worker-{i}") for i in range(6)]
    on_sub3 = [lease for lease in leases if lease.subscription_id == "sub3"]
    assert len(on_sub3) >= 2, [lease.subscription_id for lease in leases]
    busy, idle = on_sub3[:2]
    clock.advance(IDLE_SECONDS + 1)
    await report(stub, busy, UNIT)  # busy now; `idle` has done nothing since it was granted

    config = read(config_file)
    config["subscriptions"] = config["subscriptions"][:2]
    write(config_file, config)
    [reloaded] = await reloads(stub)
    assert reloaded.attributes["removed"] == "sub3"

    # The idle client was moved at once; the busy one stays until it is idle too.
    status = await subscriptions(stub)
    assert status["sub3"].status == pb.SUBSCRIPTION_STATUS_DRAINING
    assert status["sub3"].live_clients == len(on_sub3) - 1
    moved = await stub.Renew(pb.RenewRequest(lease_id=idle.lease_id, fencing_token=idle.fencing_token))
    assert moved.moved
    assert moved.lease.subscription_id in ("sub1", "sub2")
    kept = await stub.Renew(pb.RenewRequest(lease_id=busy.lease_id, fencing_token=busy.fencing_token))
    assert not kept.moved
    assert kept.lease.subscription_id == "sub3"
    # Nobody new is placed there meanwhile.
    newcomers = [await allocate(stub, f"new-{i}") for i in range(4)]
    assert "sub3" not in {lease.subscription_id for lease in newcomers}

    clock.advance(IDLE_SECONDS + 1)
    for lease in on_sub3[2:]:
        await stub.Renew(pb.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token))
    last = await stub.Renew(pb.RenewRequest(lease_id=busy.lease_id, fencing_token=kept.lease.fencing_token))
    assert last.moved
    assert last.lease.subscription_id in ("sub1", "sub2")
    await server.pool.reap()  # the reaper (every few seconds) lets the empty subscription go
    assert "sub3" not in await subscriptions(stub)
    # Drain/resume of a subscription no longer configured is refused, by name.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ResumeSubscription(pb.ResumeSubscriptionRequest(subscription_id="sub3"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_configmap_symlink_swap_is_noticed(tmp_path: Path, clock: FakeClock) -> None:
    # Kubernetes mounts a ConfigMap as name -> ..data/name, ..data -> ..<timestamp>; an update
    # writes a new timestamped directory and swaps ..data atomically. The file itself never changes.
    mount = tmp_path / "config"
    mount.mkdir()

    def publish(version: str, config: dict[str, Any]) -> None:
        (mount / version).mkdir()
        (mount / version / "auth-pool.json").write_text(json.dumps(config))
        (mount / "..data_tmp").symlink_to(version)
        os.replace(mount / "..data_tmp", mount / "..data")

    config = {**document(), "credentialsRoot": str(tmp_path)}
    publish("..2026_11_26_01_00_00.1", config)
    (mount / "auth-pool.json").symlink_to("..data/auth-pool.json")
    server = await started(mount / "auth-pool.json", tmp_path, clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            config["subscriptions"][2]["weeklyBudget"] = 300
            publish("..2026_11_26_01_05_00.2", config)
            [reloaded] = await reloads(stub)
            assert reloaded.attributes["changed"] == "sub3"
            assert (await subscriptions(stub))["sub3"].weekly_budget_micros == 300 * UNIT
    finally:
        await server.stop()


async def test_settings_read_at_start_only_are_reported_not_applied(
    server: Server, config_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="authpool_server.reload")
    assert server.reloader is not None
    rewrite(config_file, listen="0.0.0.0:6000")
    result = await server.reloader.reload()
    assert result.applied is not None
    assert result.needs_restart == ("listen",)
    assert [r.context["settings"] for r in caplog.records] == [["listen"]]  # type: ignore[attr-defined]


def test_sighup_reloads_a_running_authpool_serve(tmp_path: Path) -> None:
    config_file = write_config(tmp_path / "auth-pool.json")
    # Polling off: only the signal can make it look at the file.
    server = ServerProcess(config_file, tmp_path / "data", args=("--config-poll-seconds", "0"))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)

            def budget() -> int:
                status = stub.Status(pb.StatusRequest(), timeout=5)
                return {s.subscription_id: s.weekly_budget_micros for s in status.subscriptions}["sub1"]

            before = budget()
            config = read(config_file)
            config["subscriptions"][0]["weeklyBudget"] = 4321
            write(config_file, config)
            time.sleep(0.5)
            assert budget() == before  # not polled
            assert server.process is not None
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while budget() != 4321 * UNIT:
                assert time.monotonic() < deadline, "SIGHUP did not reload the config"
                time.sleep(0.05)
        assert server.terminate() == 0  # and SIGHUP did not stop it
    finally:
        server.stop()
