"""Attacks on a server with authentication on, and on the config: tokens, roles, metadata, paths, webhook targets.

tests/integration/test_auth.py has the role matrix and the fixed bad-token
cases; this module adds generated near-miss tokens, tokens in the wrong
kind of header, a token replayed after rotation, escalation through
undecodable bytes, oversize metadata, generated `configDir` traversals
through symlinks, and webhook URLs aimed at link-local and cloud-metadata
addresses (refused when the config loads, and again after DNS before
every delivery).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.rpc import error_details_pb2
from hypothesis import given
from hypothesis import strategies as st

from authpool_server.config import ConfigError, load_config
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from authpool_server.webhooks.sender import WebhookSender
from authpool_server.webhooks.signing import WebhookSecret, generate_secret
from authpool_server.webhooks.urls import check_webhook_url
from tests.conftest import FakeClock, make_spec, secret
from tests.fuzz.support import check_invariants, fuzz_settings
from tests.integration.rich_errors import error_details
from tests.unit.test_config import GUIDE_TEMPLATE

CLIENT = secret("fuzz-client-token-5b1e0c7d9a2f4e68")
OPERATOR = secret("fuzz-operator-token-8c3d2b1a0f9e8d7c")
ADMIN = secret("fuzz-admin-token-4f5e6d7c8b9a0b1c2d")
NEXT_ADMIN = secret("fuzz-admin-token-rotated-7y6x5w4v3u")
TOKENS = (CLIENT, OPERATOR, ADMIN)


def settings_with(*entries: tuple[str, Role]) -> SecuritySettings:
    return SecuritySettings(
        tokens=TokenDirectory([(token, Principal(f"{role}-principal", role)) for token, role in entries]),
        open_services=frozenset({"grpc.health.v1.Health"}),
    )


SECURED = settings_with((CLIENT, Role.CLIENT), (OPERATOR, Role.OPERATOR), (ADMIN, Role.ADMIN))


@pytest.fixture
async def secured(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Server]:
    server = Server(
        make_spec(), data_dir=tmp_path, security=SECURED, listen="127.0.0.1:0", background=False, clock=clock
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


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> authpool_pb2_grpc.AuthPoolStub:
    return authpool_pb2_grpc.AuthPoolStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def snapshot(stub: authpool_pb2_grpc.AuthPoolStub) -> pb.StatusResponse:
    state = await stub.Status(pb.StatusRequest(include_clients=True), metadata=bearer(OPERATOR))
    state.ClearField("as_of")
    check_invariants(state)
    return state


def assert_unauthenticated(error: grpc.aio.AioRpcError) -> None:
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    assert error_details(error)[error_details_pb2.ErrorInfo].reason == "UNAUTHENTICATED"
    for token in TOKENS:
        assert token not in (error.details() or "")


# -- tokens ------------------------------------------------------------------------------------


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    """An authorization value that is almost, but not, a valid one (printable ASCII: what HTTP/2 carries)."""
    token = draw(st.sampled_from(TOKENS))
    visible = st.characters(min_codepoint=33, max_codepoint=126)
    kind = draw(st.sampled_from(["cut", "extend", "flip", "case", "scheme", "random", "two", "inner-space"]))
    if kind == "cut":
        value = f"Bearer {token[: draw(st.integers(0, len(token) - 1))]}"
    elif kind == "extend":
        value = f"Bearer {token}{draw(st.text(alphabet=visible, min_size=1, max_size=3))}"
    elif kind == "flip":
        i = draw(st.integers(0, len(token) - 1))
        other = draw(visible.filter(lambda c: c != token[i]))
        value = f"Bearer {token[:i]}{other}{token[i + 1 :]}"
    elif kind == "case":
        value = f"Bearer {token.upper()}"
    elif kind == "scheme":
        value = f"{draw(st.sampled_from(['Basic', 'Token', 'Bearer:', 'Bearer=', '', 'Bear']))} {token}"
    elif kind == "two":
        value = f"Bearer {token} {token}"
    elif kind == "inner-space":
        i = draw(st.integers(1, len(token) - 1))
        value = f"Bearer {token[:i]} {token[i:]}"
    else:
        value = draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
    return value


@fuzz_settings(40)
@given(value=near_misses())
async def test_a_near_miss_token_is_unauthenticated_and_changes_nothing(
    stub: authpool_pb2_grpc.AuthPoolStub, value: str
) -> None:
    before = await snapshot(stub)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(pb.AllocateRequest(client_id="intruder"), metadata=(("authorization", value),))
    assert_unauthenticated(raised.value)
    assert await snapshot(stub) == before


@fuzz_settings(25)
@given(
    extra=st.lists(
        st.tuples(st.sampled_from(["x-junk-bin", "trace-bin", "authorization-bin"]), st.binary(max_size=300)),
        max_size=3,
    )
)
async def test_binary_headers_never_authenticate_nor_break_a_call(
    stub: authpool_pb2_grpc.AuthPoolStub, extra: list[tuple[str, bytes]]
) -> None:
    """`-bin` metadata is never read as a token, and random bytes in it do not disturb a valid call."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Status(pb.StatusRequest(), metadata=(("authorization-bin", ADMIN.encode()), *extra))
    assert_unauthenticated(raised.value)

    state = await stub.Status(pb.StatusRequest(), metadata=(*bearer(OPERATOR), *extra))
    assert state.totals.subscriptions == 3


async def test_a_second_authorization_header_never_upgrades_the_first(stub: authpool_pb2_grpc.AuthPoolStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.DrainSubscription(
            pb.DrainSubscriptionRequest(subscription_id="sub1"), metadata=(*bearer(CLIENT), *bearer(ADMIN))
        )
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Status(pb.StatusRequest(), metadata=(("authorization", "Bearer nobody-123456789"), *bearer(ADMIN)))
    assert_unauthenticated(raised.value)
    assert all(s.status == pb.SUBSCRIPTION_STATUS_ACTIVE for s in (await snapshot(stub)).subscriptions)


@pytest.mark.parametrize(
    ("metadata", "method"),
    [((), "DrainSubscription"), (bearer(CLIENT), "DrainSubscription"), (bearer(OPERATOR), "ResumeSubscription")],
    ids=["no-token", "client", "operator"],
)
async def test_undecodable_bytes_do_not_get_past_auth(
    channel: grpc.aio.Channel, stub: authpool_pb2_grpc.AuthPoolStub, metadata: Any, method: str
) -> None:
    """Auth decides before the request is decoded: garbage from the wrong caller is refused as that caller."""
    call = channel.unary_unary(f"/authpool.v1.AuthPool/{method}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"\xff\xff\xff", metadata=metadata)
    expected = grpc.StatusCode.UNAUTHENTICATED if not metadata else grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.code() is expected
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"\xff\xff\xff", metadata=bearer(ADMIN))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_token_rotated_out_is_refused_when_replayed(tmp_path: Path, clock: FakeClock) -> None:
    """A restart with the admin token rotated: the old one, replayed, is refused; the state survived."""
    first = Server(
        make_spec(), data_dir=tmp_path, security=settings_with((ADMIN, Role.ADMIN)), listen="127.0.0.1:0", clock=clock
    )
    await first.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            lease = (await stub.Allocate(pb.AllocateRequest(client_id="worker-1"), metadata=bearer(ADMIN))).lease
    finally:
        await first.stop()

    rotated = settings_with((NEXT_ADMIN, Role.ADMIN))
    second = Server(make_spec(), data_dir=tmp_path, security=rotated, listen="127.0.0.1:0", clock=clock)
    await second.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Release(
                    pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token),
                    metadata=bearer(ADMIN),
                )
            assert_unauthenticated(raised.value)
            state = await stub.Status(pb.StatusRequest(include_clients=True), metadata=bearer(NEXT_ADMIN))
            assert [c.lease_id for c in state.clients] == [lease.lease_id]
    finally:
        await second.stop()


@pytest.mark.parametrize(
    "metadata",
    [(("x-padding", "p" * 20_000),), (("authorization", f"Bearer {ADMIN}{'p' * 100_000}"),)],
    ids=["20k-header", "100k-authorization"],
)
async def test_oversize_metadata_is_refused_and_the_server_keeps_serving(
    stub: authpool_pb2_grpc.AuthPoolStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    before = await snapshot(stub)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Allocate(pb.AllocateRequest(client_id="big"), metadata=(*bearer(ADMIN), *metadata), timeout=10)
    assert raised.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED)
    assert ADMIN not in (raised.value.details() or "")
    assert await snapshot(stub) == before
    assert (await stub.Allocate(pb.AllocateRequest(client_id="small"), metadata=bearer(CLIENT))).lease.lease_id


# -- configDir: traversal and symlinks ----------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """creds/ (the root) with real/, inside -> real/, escape -> ../outside/; outside/ beside it."""
    root = tmp_path / "creds"
    (root / "real").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "inside").symlink_to(root / "real")
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "loop").symlink_to(root / "loop")
    return Path(os.path.realpath(root))


segments = st.sampled_from(
    ["..", ".", "", "real", "inside", "escape", "loop", "~", "x", "%2e%2e", "..\\..", "\x00", " "]
)


@fuzz_settings(80)
@given(parts=st.lists(segments, min_size=1, max_size=5), lead=st.sampled_from(["", "~/", "/", "{root}/", "{outside}/"]))
def test_a_config_dir_never_resolves_outside_the_credentials_root(tree: Path, parts: list[str], lead: str) -> None:
    outside = tree.parent / "outside"
    config_dir = lead.format(root=tree, outside=outside) + "/".join(parts)
    doc = json.loads(GUIDE_TEMPLATE)
    doc["credentialsRoot"] = str(tree)
    doc["subscriptions"][0]["configDir"] = config_dir
    path = tree.parent / "auth-pool.json"
    path.write_text(json.dumps(doc))
    try:
        settings = load_config(path, env={})
    except ConfigError as error:
        problems = error.problems
    else:
        problems = []
        resolved = Path(settings.pool.subscriptions[0].credential_ref)
        assert Path(os.path.realpath(resolved)).is_relative_to(tree), (config_dir, resolved)
    assert all(p.startswith("subscriptions[0].configDir: ") for p in problems), problems


# -- webhook targets ---------------------------------------------------------------------------

BLOCKED_URLS = [
    "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "https://169.254.170.2/v2/credentials",  # ECS task credentials
    "https://[fd00:ec2::254]/latest/meta-data/",
    "https://metadata.google.internal/computeMetadata/v1/",
    "https://METADATA.GOOGLE.INTERNAL./computeMetadata/v1/",
    "https://metadata.goog/",
    "https://100.100.100.200/latest/meta-data/",
    "https://[fe80::1%25eth0]/hook",
    "https://[::ffff:169.254.169.254]/",
    "https://2852039166/",  # 169.254.169.254 as one number
    "https://0xa9.0xfe.0xa9.0xfe/",
    "https://0251.0376.0251.0376/",
    "https://169.254.1/",
    "https://0.0.0.0:8443/hook",
]


@pytest.mark.parametrize("url", BLOCKED_URLS)
def test_link_local_and_metadata_webhook_targets_are_refused_by_the_config(tmp_path: Path, url: str) -> None:
    doc = json.loads(GUIDE_TEMPLATE)
    root = tmp_path / "creds"
    root.mkdir()
    doc["credentialsRoot"] = str(root)
    doc["notifications"]["webhookUrl"] = url
    path = tmp_path / "auth-pool.json"
    path.write_text(json.dumps(doc))

    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})

    [problem] = raised.value.problems
    assert problem.startswith("notifications.webhookUrl: must not point at a link-local or cloud-metadata address")
    assert "meta-data" not in problem, "the URL is echoed"
    assert check_webhook_url(url, allow_insecure_loopback=True) is not None  # the development flag changes nothing


@pytest.mark.parametrize(
    "url",
    ["https://hooks.company.com/notify", "https://10.0.0.5/hook", "https://[fd00::5]/hook", "https://169.255.0.1/x"],
)
def test_ordinary_https_targets_are_still_accepted(url: str) -> None:
    assert check_webhook_url(url, allow_insecure_loopback=False) is None


@pytest.mark.parametrize("url", ["http://hooks.company.com/notify", "http://10.0.0.5/hook", "http://[fd00::5]/"])
def test_plain_http_to_another_machine_is_refused_even_with_the_development_flag(url: str) -> None:
    problem = check_webhook_url(url, allow_insecure_loopback=True)
    assert problem is not None
    assert "loopback" in problem


async def test_a_name_that_resolves_to_the_metadata_service_is_refused_before_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The config saw an ordinary name; the resolver is the seam that says where it points today."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def resolver(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.rebinding.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("169.254.169.254", port))]
        return await real(host, port, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", resolver)
    key = WebhookSecret.parse(generate_secret())
    async with WebhookSender("https://hooks.rebinding.example/hook?token=t0k3n", key, timeout_seconds=2) as sender:
        result = await sender.deliver("n-1", "{}")

    assert not result.delivered
    assert result.status_code is None
    assert "link-local or cloud-metadata" in result.error
    assert "t0k3n" not in result.error
