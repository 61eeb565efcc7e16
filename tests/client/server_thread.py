"""A real AuthPool server on its own thread and event loop, for tests that call it from blocking code.

The blocking client blocks the thread that calls it, so a server on the
test's own event loop could never answer it. Each server here runs the real
`Server` (interceptor chain, SQLite store in `tmp_path`, background reaper)
on a loop of its own thread, on an ephemeral port, with the real clock: a
lease that is not renewed really expires after its TTL of one second.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from authpool_server.domain import PoolSpec
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from tests.conftest import NO_AUTH, make_spec, secret

_T = TypeVar("_T")

TTL = 1.0
CLIENT_TOKEN = secret("client-lib-client-token-4f2a9d")
OPERATOR_TOKEN = secret("client-lib-operator-token-2b6d0e")
ADMIN_TOKEN = secret("client-lib-admin-token-8c1e7b")


def client_spec(*, ttl: float = TTL, **overrides: Any) -> PoolSpec:
    """Three subscriptions of two clients each, a 1 s TTL, and every client idle at once (movable)."""
    spec = make_spec(ttl=ttl, **overrides)
    return replace(spec, rebalancing=replace(spec.rebalancing, idle_seconds=0.0))


def token_security() -> SecuritySettings:
    return SecuritySettings(
        tokens=TokenDirectory(
            [
                (CLIENT_TOKEN, Principal("worker", Role.CLIENT)),
                (OPERATOR_TOKEN, Principal("oncall", Role.OPERATOR)),
                (ADMIN_TOKEN, Principal("ops", Role.ADMIN)),
            ]
        )
    )


class ServerThread:
    """An AuthPool server on a loop of its own thread; `stop()` and `start()` again keep its port and data."""

    def __init__(self, spec: PoolSpec, data_dir: Path, security: SecuritySettings = NO_AUTH) -> None:
        self.spec = spec
        self.data_dir = data_dir
        self.security = security
        self.port = 0
        self.server: Server | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="authpool-test-server", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        async def start() -> Server:
            # The same port after a restart (0 the first time): clients reconnect to where they were.
            server = Server(
                self.spec,
                data_dir=self.data_dir,
                security=self.security,
                listen=f"127.0.0.1:{self.port}",
                grace_seconds=1,
            )
            await server.start()
            return server

        self.server = self.run(start())
        self.port = self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop())
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
