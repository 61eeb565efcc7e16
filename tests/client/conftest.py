"""Fixtures of the client library's tests: real servers on their own threads (see server_thread.py), clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from authpool_client import AsyncAuthPoolClient, AuthPoolClient

from authpool_server.domain import PoolSpec
from authpool_server.security.settings import SecuritySettings
from tests.client.server_thread import ServerThread, client_spec
from tests.conftest import NO_AUTH


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start servers (`start_server(spec=..., security=...)`); all are stopped after the test."""
    started: list[ServerThread] = []

    def start(spec: PoolSpec | None = None, security: SecuritySettings = NO_AUTH) -> ServerThread:
        server = ServerThread(spec or client_spec(), tmp_path / f"server{len(started)}", security)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def live(start_server: Callable[..., ServerThread]) -> ServerThread:
    """A server without auth, with the client spec."""
    return start_server()


@pytest.fixture
def client(live: ServerThread) -> Iterator[AuthPoolClient]:
    with AuthPoolClient(live.target, insecure=True, timeout=5) as client:
        yield client


@pytest.fixture
async def aclient(live: ServerThread) -> AsyncIterator[AsyncAuthPoolClient]:
    async with AsyncAuthPoolClient(live.target, insecure=True, timeout=5) as client:
        yield client
