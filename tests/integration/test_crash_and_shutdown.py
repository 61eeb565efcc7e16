"""Invariant 3 and graceful shutdown, on a real `authpool serve` process.

A stream of calls runs against the server while it is killed with SIGKILL
(or stopped with SIGTERM); after a restart, every lease, release and usage
report that was answered OK must be there.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from tests.integration.server_process import ServerProcess, write_config

pytestmark = pytest.mark.slow


@dataclass
class Ledger:
    """What the server acknowledged, and what was in flight when it died."""

    granted: dict[str, str] = field(default_factory=dict)  # lease id -> client id
    released: set[str] = field(default_factory=set)
    release_in_flight: set[str] = field(default_factory=set)
    usage_acked: dict[str, int] = field(default_factory=dict)  # request id -> cost
    usage_in_flight: dict[str, int] = field(default_factory=dict)
    # When the server was told to stop (monotonic clock): calls started after it may time out.
    stopping_at: float | None = None
    calls_ok: int = 0
    calls_failed: int = 0


async def _worker(port: int, worker: int, ledger: Ledger, stop: asyncio.Event) -> None:
    rng = random.Random(worker)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        while not stop.is_set():
            client_id = f"w{worker}-{uuid.uuid4().hex[:8]}"
            started = time.monotonic()
            try:
                lease = (await stub.Allocate(pb.AllocateRequest(client_id=client_id), timeout=5)).lease
                ledger.granted[lease.lease_id] = client_id
                for _ in range(rng.randint(1, 3)):
                    request_id, cost = uuid.uuid4().hex, rng.randint(1, 5000)
                    ledger.usage_in_flight[request_id] = cost
                    started = time.monotonic()
                    await stub.ReportUsage(
                        pb.ReportUsageRequest(
                            request_id=request_id,
                            lease_id=lease.lease_id,
                            fencing_token=lease.fencing_token,
                            cost_micros=cost,
                        ),
                        timeout=5,
                    )
                    ledger.usage_acked[request_id] = ledger.usage_in_flight.pop(request_id)
                if rng.random() < 0.7:
                    ledger.release_in_flight.add(lease.lease_id)
                    started = time.monotonic()
                    await stub.Release(
                        pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token), timeout=5
                    )
                    ledger.release_in_flight.discard(lease.lease_id)
                    ledger.released.add(lease.lease_id)
                ledger.calls_ok += 1
            except grpc.aio.AioRpcError as error:
                # The server is gone (killed or stopping): a call in flight may only
                # fail as UNAVAILABLE; one started after the stop began may also
                # time out while the draining server accepts nothing new.
                late = ledger.stopping_at is not None and started >= ledger.stopping_at
                gone = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                if not (gone or (late and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED)):
                    raise
                ledger.calls_failed += 1
                return


async def _run_load(server: ServerProcess, ledger: Ledger, interrupt, *, workers: int = 8) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_worker(server.port, w, ledger, stop)) for w in range(workers)]
    try:
        await interrupt()
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def _check_durable(server: ServerProcess, ledger: Ledger) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        status = await stub.Status(pb.StatusRequest(include_clients=True), timeout=10)
    live = {lease.lease_id for lease in status.clients}
    # A release that was in flight when the server died may or may not have landed.
    for lease_id in ledger.granted.keys() - ledger.released - ledger.release_in_flight:
        assert lease_id in live, f"acknowledged lease {lease_id} was lost"
    assert not (live & ledger.released), "an acknowledged release was lost"
    total = status.totals.weekly_usage_micros + status.totals.fallback_usage_micros
    acked = sum(ledger.usage_acked.values())
    assert acked <= total <= acked + sum(ledger.usage_in_flight.values()), (
        f"usage {total} is not the acknowledged {acked} plus some of what was in flight"
    )


async def test_sigkill_loses_nothing_acknowledged(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    server = ServerProcess(config, tmp_path / "data")
    ledger = Ledger()
    rng = random.Random(7)
    try:
        for _ in range(3):
            server.start()
            ledger.stopping_at = None

            async def kill_soon() -> None:
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                ledger.stopping_at = time.monotonic()
                server.kill()

            await _run_load(server, ledger, kill_soon)
        server.start()
        assert ledger.calls_ok > 0, "the load made no progress before the kills"
        assert ledger.usage_acked
        await _check_durable(server, ledger)
    finally:
        server.stop()


async def test_sigterm_finishes_in_flight_calls_and_exits_zero(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    server = ServerProcess(config, tmp_path / "data")
    ledger = Ledger()
    exit_codes: list[int] = []
    try:
        server.start()

        async def terminate_soon() -> None:
            await asyncio.sleep(1.0)
            ledger.stopping_at = time.monotonic()
            exit_codes.append(await asyncio.to_thread(server.terminate))

        await _run_load(server, ledger, terminate_soon)
        assert exit_codes == [0]
        assert "shutdown requested" in server.log.read_text()
        server.start()
        await _check_durable(server, ledger)
    finally:
        server.stop()
