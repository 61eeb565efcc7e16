"""A store outage as Kubernetes sees it: readiness drops, liveness stays, everything recovers alone.

The outage is simulated by a SQLite store whose every operation fails while
`down` is set (the PostgreSQL version of this test cuts a real connection);
what is checked is the server's behaviour around it, over real channels.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authpool_server.errors import StoreUnavailable
from authpool_server.server import DATABASE_FILE, Server
from authpool_server.store.sqlite import SQLiteStore
from authpool_server.store.usage import everything
from tests.conftest import NO_AUTH, make_spec

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class OutageStore(SQLiteStore):
    """Fails every call while `down`, as a store behind a cut network would."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the store is unreachable (simulated outage)")

    async def ping(self) -> None:
        self._check()
        await super().ping()

    async def load(self, plan: Any = everything) -> Any:
        self._check()
        return await super().load(plan)

    async def charged(self, request_id: str) -> str | None:
        self._check()
        return await super().charged(request_id)

    def write(self, batch: Any) -> Any:
        if self.down:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(StoreUnavailable("the store is unreachable (simulated outage)"))
            return future
        return super().write(batch)


@pytest.fixture
async def outage(tmp_path: Path) -> AsyncIterator[tuple[OutageStore, grpc.aio.Channel]]:
    store = OutageStore(tmp_path / DATABASE_FILE)
    server = Server(make_spec(), data_dir=tmp_path, security=NO_AUTH, listen="127.0.0.1:0", store=store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield store, channel
    finally:
        store.down = False
        await server.stop()


async def health(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def wait_for(channel: grpc.aio.Channel, service: str, status: int) -> None:
    async with asyncio.timeout(10):
        while await health(channel, service) != status:  # noqa: ASYNC110 - polls the server's health over RPC
            await asyncio.sleep(0.1)


async def test_an_outage_takes_the_server_out_of_rotation_without_killing_it(
    outage: tuple[OutageStore, grpc.aio.Channel],
) -> None:
    store, channel = outage
    stub = authpool_pb2_grpc.AuthPoolStub(channel)
    before = (await stub.Allocate(pb.AllocateRequest(client_id="before"))).lease
    assert await health(channel, "readiness") == SERVING

    store.down = True
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(pb.AllocateRequest(client_id="during"))
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE  # retryable, and nothing was acknowledged
    await wait_for(channel, "readiness", NOT_SERVING)
    assert await health(channel, "authpool.v1.AuthPool") == NOT_SERVING
    assert await health(channel, "liveness") == SERVING  # no restart
    assert await health(channel, "") == SERVING

    store.down = False  # the database is back: nobody has to do anything
    await wait_for(channel, "readiness", SERVING)
    after = (await stub.Allocate(pb.AllocateRequest(client_id="after"))).lease
    status = await stub.Status(pb.StatusRequest(include_clients=True))
    assert sorted(c.client_id for c in status.clients) == ["after", "before"]  # "during" was never granted
    assert after.fencing_token > before.fencing_token
