"""TLS and mutual TLS with certificates from a throwaway CA (trustme)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import CertificateRole, SecuritySettings, TlsFiles
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from tests.conftest import FakeClock, make_spec, secret

CLIENT_TOKEN = secret("tls-client-token-5e4d3c2b1a09")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(ca: trustme.CA, *, client_ca: bool, require: bool) -> TlsFiles:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    return TlsFiles(
        cert_chain=b"".join(blob.bytes() for blob in cert.cert_chain_pems),
        private_key=cert.private_key_pem.bytes(),
        client_ca=ca.cert_pem.bytes() if client_ca else None,
        require_client_cert=require,
    )


async def start(tmp_path: Path, clock: FakeClock, security: SecuritySettings) -> Server:
    server = Server(make_spec(), data_dir=tmp_path, security=security, listen="127.0.0.1:0", background=False)
    await server.start()
    return server


def client_credentials(ca: trustme.CA, common_name: str | None = None) -> grpc.ChannelCredentials:
    if common_name is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    cert = ca.issue_cert(f"{common_name}.clients.test", common_name=common_name)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=cert.private_key_pem.bytes(),
        certificate_chain=b"".join(blob.bytes() for blob in cert.cert_chain_pems),
    )


@pytest.fixture
async def tls_server(tmp_path: Path, clock: FakeClock, ca: trustme.CA) -> AsyncIterator[Server]:
    security = SecuritySettings(
        tokens=TokenDirectory([(CLIENT_TOKEN, Principal("worker", Role.CLIENT))]),
        tls=tls_files(ca, client_ca=False, require=False),
    )
    server = await start(tmp_path, clock, security)
    try:
        yield server
    finally:
        await server.stop()


async def test_tls_with_a_token(tls_server: Server, ca: trustme.CA) -> None:
    async with grpc.aio.secure_channel(f"localhost:{tls_server.port}", client_credentials(ca)) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        reply = await stub.Allocate(
            pb.AllocateRequest(client_id="w1"), metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),)
        )
        assert reply.lease.client_id == "w1"


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Allocate(
                pb.AllocateRequest(client_id="w1"), metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),), timeout=5
            )
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_server_certificate_from_another_ca_is_rejected(tls_server: Server) -> None:
    stranger = trustme.CA()
    async with grpc.aio.secure_channel(f"localhost:{tls_server.port}", client_credentials(stranger)) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Status(pb.StatusRequest(), timeout=5)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.fixture
async def mtls_server(tmp_path: Path, clock: FakeClock, ca: trustme.CA) -> AsyncIterator[Server]:
    security = SecuritySettings(
        tokens=TokenDirectory([(CLIENT_TOKEN, Principal("worker", Role.CLIENT))]),
        certificates=(
            CertificateRole(Principal("oncall", Role.OPERATOR), common_name="oncall"),
            CertificateRole(Principal("deployer", Role.ADMIN), common_name="deployer"),
        ),
        tls=tls_files(ca, client_ca=True, require=True),
    )
    server = await start(tmp_path, clock, security)
    try:
        yield server
    finally:
        await server.stop()


async def test_a_client_certificate_is_mapped_to_its_role(mtls_server: Server, ca: trustme.CA) -> None:
    address = f"localhost:{mtls_server.port}"
    async with grpc.aio.secure_channel(address, client_credentials(ca, "oncall")) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        status = await stub.Status(pb.StatusRequest())  # operator: allowed, no token needed
        assert status.totals.subscriptions == 3
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.DrainSubscription(pb.DrainSubscriptionRequest(subscription_id="sub1"))
        assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    async with grpc.aio.secure_channel(address, client_credentials(ca, "deployer")) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        await stub.DrainSubscription(pb.DrainSubscriptionRequest(subscription_id="sub1"))


async def test_an_unmapped_client_certificate_is_unauthenticated(mtls_server: Server, ca: trustme.CA) -> None:
    async with grpc.aio.secure_channel(f"localhost:{mtls_server.port}", client_credentials(ca, "stranger")) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Status(pb.StatusRequest())
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # A token still identifies its holder over a certificate nobody mapped.
        await stub.Allocate(pb.AllocateRequest(client_id="w1"), metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),))


async def test_a_token_decides_over_a_certificate(mtls_server: Server, ca: trustme.CA) -> None:
    async with grpc.aio.secure_channel(f"localhost:{mtls_server.port}", client_credentials(ca, "deployer")) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Status(pb.StatusRequest(), metadata=(("authorization", "Bearer wrong-wrong-wrong-wrong"),))
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_without_a_client_certificate_the_handshake_fails(mtls_server: Server, ca: trustme.CA) -> None:
    async with grpc.aio.secure_channel(f"localhost:{mtls_server.port}", client_credentials(ca)) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Allocate(
                pb.AllocateRequest(client_id="w1"), metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),), timeout=5
            )
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
