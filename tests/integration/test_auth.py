"""Authentication and authorisation over real channels: every role against every method.

The tokens below are the only secrets in the test suite; the `no_token_in_logs`
fixture fails any test of this module whose log output (every logger, every
level, formatted as JSON exactly as production writes it) contains one.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authpool_server.api import authpool_pb2
from authpool_server.logs import JsonFormatter
from authpool_server.security.roles import METHOD_ROLES, Principal, Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import SERVICE_NAME, Server
from tests.conftest import FakeClock, eventually, make_spec, secret
from tests.integration.rich_errors import error_details

TOKENS = {
    Role.CLIENT: secret("client-token-7f3a9c1e5b2d4068"),
    Role.OPERATOR: secret("operator-token-0c9e8d7f6a5b4c3d"),
    Role.ADMIN: secret("admin-token-1a2b3c4d5e6f7a8b9c"),
}
ROTATED_ADMIN = secret("admin-token-next-9z8y7x6w5v4u")

# One request per RPC; each passes validation, so a refusal can only come from auth.
REQUESTS = {
    "Allocate": pb.AllocateRequest(client_id="worker-1"),
    "Renew": pb.RenewRequest(lease_id="no-such-lease", fencing_token=1),
    "Release": pb.ReleaseRequest(lease_id="no-such-lease", fencing_token=1),
    "ReportUsage": pb.ReportUsageRequest(request_id="r1", lease_id="no-such-lease", fencing_token=1, cost_micros=1),
    "Status": pb.StatusRequest(),
    "WatchEvents": pb.WatchEventsRequest(),
    "Rebalance": pb.RebalanceRequest(dry_run=True),
    "DrainSubscription": pb.DrainSubscriptionRequest(subscription_id="no-such-sub"),
    "ResumeSubscription": pb.ResumeSubscriptionRequest(subscription_id="no-such-sub"),
}
ROLE_METHODS = {
    Role.CLIENT: {"Allocate", "Renew", "Release", "ReportUsage"},
    Role.OPERATOR: {"Allocate", "Renew", "Release", "ReportUsage", "Status", "WatchEvents", "Rebalance"},
    Role.ADMIN: set(REQUESTS),
}
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def auth_settings() -> SecuritySettings:
    entries = [(token, Principal(f"{role}-principal", role)) for role, token in TOKENS.items()]
    entries.append((ROTATED_ADMIN, Principal(f"{Role.ADMIN}-principal", Role.ADMIN)))
    return SecuritySettings(
        tokens=TokenDirectory(entries),
        open_services=frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}),
    )


@pytest.fixture(autouse=True)
def no_token_in_logs() -> Iterator[io.StringIO]:
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield output
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = output.getvalue()
    for token in [*TOKENS.values(), ROTATED_ADMIN]:
        assert token not in text, "a token reached the logs"


@pytest.fixture
async def secured(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Server]:
    server = Server(
        make_spec(), data_dir=tmp_path, security=auth_settings(), listen="127.0.0.1:0", background=False, clock=clock
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def channel(secured: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def call(channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    """Call `method` and say how it ended (OK, or the error code)."""
    stub = authpool_pb2_grpc.AuthPoolStub(channel)
    try:
        if method == "WatchEvents":
            stream = stub.WatchEvents(REQUESTS[method], metadata=metadata, timeout=0.5)
            async for _ in stream:
                break
            stream.cancel()
        else:
            await getattr(stub, method)(REQUESTS[method], metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as error:
        if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED and method == "WatchEvents":
            return grpc.StatusCode.OK  # an idle stream that was let in
        return error.code()
    return grpc.StatusCode.OK


def test_every_rpc_of_the_service_has_a_role() -> None:
    service = authpool_pb2.DESCRIPTOR.services_by_name["AuthPool"]
    assert {f"/{SERVICE_NAME}/{m.name}" for m in service.methods} == set(METHOD_ROLES)
    assert set(REQUESTS) == {m.name for m in service.methods}


@pytest.mark.parametrize("role", list(Role), ids=str)
@pytest.mark.parametrize("method", list(REQUESTS))
async def test_each_role_reaches_exactly_its_methods(channel: grpc.aio.Channel, role: Role, method: str) -> None:
    code = await call(channel, method, bearer(TOKENS[role]))
    if method in ROLE_METHODS[role]:
        assert code not in REFUSALS, f"{role} was refused {method}"
    else:
        assert code is grpc.StatusCode.PERMISSION_DENIED


async def test_permission_denied_says_which_role_is_needed(channel: grpc.aio.Channel) -> None:
    stub = authpool_pb2_grpc.AuthPoolStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Status(pb.StatusRequest(), metadata=bearer(TOKENS[Role.CLIENT]))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    info = error_details(raised.value)[error_details_pb2.ErrorInfo]
    assert info.reason == "PERMISSION_DENIED"
    assert dict(info.metadata) == {"method": "Status", "role": "client", "required_role": "operator"}


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer not-a-token-of-ours-123456"),),
        (("authorization", f"Basic {TOKENS[Role.ADMIN]}"),),
        (("authorization", "Bearer "),),
        (("authorization", TOKENS[Role.ADMIN]),),
        (("authorization", f"Bearer {TOKENS[Role.ADMIN]}x"),),
        (("x-api-key", TOKENS[Role.ADMIN]),),
    ],
    ids=["missing", "unknown", "wrong-scheme", "empty", "no-scheme", "extended", "wrong-header"],
)
async def test_bad_or_missing_tokens_are_unauthenticated_and_change_nothing(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    stub = authpool_pb2_grpc.AuthPoolStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(pb.AllocateRequest(client_id="intruder"), metadata=metadata)
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_details(raised.value)[error_details_pb2.ErrorInfo].reason == "UNAUTHENTICATED"
    for token in TOKENS.values():
        assert token not in (raised.value.details() or "")
    status = await stub.Status(pb.StatusRequest(include_clients=True), metadata=bearer(TOKENS[Role.OPERATOR]))
    assert status.totals.live_clients == 0
    assert not status.clients


async def test_of_two_authorization_headers_the_first_decides(channel: grpc.aio.Channel) -> None:
    good, bad = f"Bearer {TOKENS[Role.OPERATOR]}", "Bearer not-a-token-of-ours-123456"
    assert await call(channel, "Status", (("authorization", good), ("authorization", bad))) is grpc.StatusCode.OK
    refused = await call(channel, "Status", (("authorization", bad), ("authorization", good)))
    assert refused is grpc.StatusCode.UNAUTHENTICATED


async def test_a_rotated_token_and_its_predecessor_both_work(channel: grpc.aio.Channel) -> None:
    for token in (TOKENS[Role.ADMIN], ROTATED_ADMIN):
        assert await call(channel, "DrainSubscription", bearer(token)) is grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_stay_open(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def closed_channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server that leaves nothing open: health and reflection want a token too."""
    security = SecuritySettings(tokens=auth_settings().tokens, open_services=frozenset())
    server = Server(
        make_spec(), data_dir=tmp_path / "closed", security=security, listen="127.0.0.1:0", background=False
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        await server.stop()


async def test_a_closed_health_service_needs_a_token(closed_channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(closed_channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest())
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_the_access_log_names_the_principal_never_the_token(
    channel: grpc.aio.Channel, no_token_in_logs: io.StringIO
) -> None:
    await call(channel, "Allocate", bearer(TOKENS[Role.CLIENT]))
    await call(channel, "Status", bearer(TOKENS[Role.CLIENT]))
    await call(channel, "Status", (("authorization", "Bearer wrong-wrong-wrong-wrong"),))

    def access_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in no_token_in_logs.getvalue().splitlines()]
        return [line["context"] for line in lines if line["module"] == "authpool.access"]

    await eventually(lambda: len(access_lines()) == 3)  # written in batches, shortly after the calls
    access = access_lines()
    assert [(a["method"], a["code"], a.get("principal")) for a in access] == [
        ("Allocate", "OK", "client-principal"),
        ("Status", "PERMISSION_DENIED", "client-principal"),
        ("Status", "UNAUTHENTICATED", None),
    ]
    assert access[0]["client_id"] == "worker-1"
    assert access[0]["decision"] == "new"
    assert all(a["duration_ms"] >= 0 for a in access)


async def test_a_server_with_auth_on_and_no_tokens_refuses_to_start(tmp_path: Path) -> None:
    from authpool_server.errors import StartupRefused

    server = Server(make_spec(), data_dir=tmp_path, security=SecuritySettings(), listen="127.0.0.1:0")
    with pytest.raises(StartupRefused, match="AUTHPOOL_ADMIN_TOKEN"):
        await server.start()


async def _served_methods(channel: grpc.aio.Channel) -> list[tuple[str, bool, bool]]:
    """Every method of every service the server lists through reflection: (path, client streams, server streams)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [reflection_pb2.ServerReflectionRequest(list_services="")]
    replies = [reply async for reply in stub.ServerReflectionInfo(iter(asks))]
    names = [service.name for service in replies[0].list_services_response.service]
    asks = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name) for name in names]
    replies = [reply async for reply in stub.ServerReflectionInfo(iter(asks))]
    methods = []
    for name, reply in zip(names, replies, strict=True):
        package, _, service_name = name.rpartition(".")
        for raw in reply.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for service in file.service:
                if file.package == package and service.name == service_name:
                    methods += [(f"/{name}/{m.name}", m.client_streaming, m.server_streaming) for m in service.method]
    return methods


async def _refusal(channel: grpc.aio.Channel, path: str, client_streams: bool, server_streams: bool) -> grpc.StatusCode:
    """How a call of `path` with an empty message and no token ends."""
    request: Any = iter([b""]) if client_streams else b""
    if client_streams:
        call = channel.stream_stream(path)(request, timeout=5)
    elif server_streams:
        call = channel.unary_stream(path)(request, timeout=5)
    else:
        call = channel.unary_unary(path)(request, timeout=5)
    try:
        if client_streams or server_streams:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_every_method_the_server_serves_goes_through_the_chain(
    channel: grpc.aio.Channel, closed_channel: grpc.aio.Channel
) -> None:
    # The chain is wrapped into each handler as services are registered: a service registered
    # around it would serve anyone. With nothing left open, every method must want a token.
    methods = await _served_methods(channel)
    assert {path.rpartition("/")[0] for path, _, _ in methods} == {
        f"/{SERVICE_NAME}",
        "/grpc.health.v1.Health",
        "/grpc.reflection.v1alpha.ServerReflection",
    }
    for method in methods:
        assert await _refusal(closed_channel, *method) is grpc.StatusCode.UNAUTHENTICATED, method[0]


async def test_a_closed_service_is_open_to_no_role_not_even_admin(closed_channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(closed_channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(), metadata=bearer(TOKENS[Role.ADMIN]))
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == "Check is open to no role; this caller has admin"
    info = error_details(raised.value)[error_details_pb2.ErrorInfo]
    assert dict(info.metadata) == {"method": "Check", "role": "admin", "required_role": "none"}
