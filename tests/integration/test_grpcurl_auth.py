"""The README's grpcurl commands with a token, against a server with authentication on."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from tests.conftest import FakeClock, make_spec, secret
from tests.integration.test_grpcurl import grpcurl  # noqa: F401 - the fixture, on this module's server

pytestmark = pytest.mark.slow

ADMIN_TOKEN = secret("grpcurl-admin-token-6b5a4c3d2e1f")
WITH_TOKEN = ("-H", f"authorization: Bearer {ADMIN_TOKEN}")


@pytest.fixture
async def server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Server]:
    security = SecuritySettings(
        tokens=TokenDirectory([(ADMIN_TOKEN, Principal("admin", Role.ADMIN))]),
        open_services=frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}),
    )
    server = Server(make_spec(), data_dir=tmp_path, security=security, listen="127.0.0.1:0", background=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_discovery_and_health_need_no_token(grpcurl: Any) -> None:  # noqa: F811
    out, _ = await grpcurl("list")
    assert "authpool.v1.AuthPool" in out.split()
    out, _ = await grpcurl("grpc.health.v1.Health/Check", data="{}")
    assert json.loads(out) == {"status": "SERVING"}


async def test_a_call_without_the_token_is_unauthenticated(grpcurl: Any) -> None:  # noqa: F811
    _, err = await grpcurl("authpool.v1.AuthPool/Status", data="{}", expect_rc=80)  # 64 + UNAUTHENTICATED
    assert "Code: Unauthenticated" in err
    assert "bearer token is required" in err


async def test_every_operator_command_works_with_the_token(grpcurl: Any) -> None:  # noqa: F811
    out, _ = await grpcurl("authpool.v1.AuthPool/Allocate", data='{"client_id":"worker-7"}', flags=WITH_TOKEN)
    lease = json.loads(out)["lease"]
    out, _ = await grpcurl("authpool.v1.AuthPool/Status", data='{"include_clients":true}', flags=WITH_TOKEN)
    assert [c["client_id"] for c in json.loads(out)["clients"]] == ["worker-7"]
    release = json.dumps({"lease_id": lease["lease_id"], "fencing_token": lease["fencing_token"]})
    out, _ = await grpcurl("authpool.v1.AuthPool/Release", data=release, flags=WITH_TOKEN)
    assert json.loads(out) == {"released": True}
    out, _ = await grpcurl(
        "authpool.v1.AuthPool/DrainSubscription", data='{"subscription_id":"sub1"}', flags=WITH_TOKEN
    )
    assert json.loads(out) == {}
