"""Wiring, start and shutdown: the one module that assembles the server.

`Server.start()` opens the store, rebuilds the pool's state, then starts the
gRPC server with the AuthPool service, the health service and reflection;
health turns SERVING only once the state is loaded. `Server.stop()` is the
graceful path: health NOT_SERVING, no new calls, in-flight calls finish
within the grace period, then everything acknowledged is flushed and the
store closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from authpool_server.api import authpool_pb2, authpool_pb2_grpc
from authpool_server.domain import PoolSpec
from authpool_server.pool import Pool
from authpool_server.service import AuthPoolService
from authpool_server.store.sqlite import SQLiteStore

__all__ = ["SERVICE_NAME", "Server", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = authpool_pb2.DESCRIPTOR.services_by_name["AuthPool"].full_name
DATABASE_FILE = "authpool.sqlite3"
# Below Kubernetes' default 30 s termination grace, so a pod finishes its
# calls and flushes before it is killed.
DEFAULT_GRACE_SECONDS = 10.0
MAX_MESSAGE_BYTES = 1 << 20


class Server:
    """An AuthPool server on `listen` (host:port; port 0 picks a free one)."""

    def __init__(
        self,
        spec: PoolSpec,
        *,
        data_dir: Path,
        listen: str = "127.0.0.1:50051",
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        background: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = Pool(spec, SQLiteStore(data_dir / DATABASE_FILE), clock=clock)
        self.health = health_aio.HealthServicer()
        self._listen = listen
        self._grace = grace_seconds
        self._background = background
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        authpool_pb2_grpc.add_AuthPoolServicer_to_server(AuthPoolService(self.pool), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await server.start()
        self._server = server
        await self.pool.start(background=self._background)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"context": {"listen": self._listen, "port": self.port, "pid": os.getpid()}})

    async def stop(self) -> None:
        """Drain and stop: in-flight calls finish, acknowledged state is flushed."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self._grace)
        await self.pool.close()
        log.info("stopped")


async def serve(spec: PoolSpec, *, data_dir: Path, listen: str) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(spec, data_dir=data_dir, listen=listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    try:
        await stop.wait()
        log.info("shutdown requested; finishing in-flight calls")
    finally:
        await server.stop()
