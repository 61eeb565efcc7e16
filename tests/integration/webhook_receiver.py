"""A real local HTTPS webhook receiver (aiohttp, a trustme certificate) and its fixtures.

The receiver's URL carries tokens in its path and query, registered as test
secrets: no failure reason and no log line of the session may show them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from authpool_server.webhooks import generate_secret
from tests.conftest import secret

SECRET_TEXT = secret(generate_secret())
PATH_TOKEN = secret("path-token-3f9a1c7e5b2d4068")
QUERY_TOKEN = secret("query-token-8e2b6d0a4c1f3957")


@dataclass
class Receiver:
    """What the test receiver saw, and how to make it misbehave."""

    port: int = 0
    seen: list[tuple[dict[str, str], str]] = field(default_factory=list)
    failures_left: int = 0  # answer 500 this many times before 204
    elsewhere_hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "https") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def hook(self) -> str:
        return self.url(f"/hooks/{PATH_TOKEN}?token={QUERY_TOKEN}")


def receiver_app(receiver: Receiver) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        assert request.match_info["token"] == PATH_TOKEN
        receiver.seen.append((dict(request.headers), await request.text()))
        if receiver.failures_left > 0:
            receiver.failures_left -= 1
            return web.Response(status=500, text="try later")
        return web.Response(status=204)

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        receiver.elsewhere_hits += 1
        return web.Response(status=204)

    async def slow(request: web.Request) -> web.Response:
        # Held until the test ends (well past the sender's timeout), then answers.
        await asyncio.wait_for(receiver.release.wait(), 10)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks/{token}", hook)
    app.router.add_post("/fail", fail)
    app.router.add_post("/redirect", redirect)
    app.router.add_route("*", "/elsewhere", elsewhere)
    app.router.add_post("/slow", slow)
    return app


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("webhook-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def serve(receiver: Receiver, context: ssl.SSLContext | None) -> web.AppRunner:
    # No access log: it would write the URL, token and all, and the session check would see it.
    runner = web.AppRunner(receiver_app(receiver), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    receiver.port = runner.addresses[0][1]
    return runner


@pytest.fixture
async def receiver(ca: trustme.CA) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    runner = await serve(receiver, server_context(ca))
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # after the socket is closed: nothing listens there any more
