"""Typed errors with the server's `google.rpc` details, bearer tokens and TLS, against real servers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import trustme
from authpool_client import (
    AuthPoolClient,
    AuthPoolError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PoolExhausted,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
)

from authpool_server.security.ratelimit import Bucket
from authpool_server.security.settings import RateLimits, TlsFiles
from tests.client.observe import live_leases
from tests.client.server_thread import ADMIN_TOKEN, CLIENT_TOKEN, ServerThread, client_spec, token_security
from tests.conftest import secret

Start = Callable[..., ServerThread]


def test_a_malformed_request_is_invalid_argument_naming_the_field(client: AuthPoolClient) -> None:
    with pytest.raises(InvalidArgument) as raised, client.lease("not a client id!"):
        pass
    error = raised.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.reason, error.domain) == ("INVALID_ARGUMENT", "authpool.v1")
    assert [v.field for v in error.field_violations] == ["client_id"]
    assert isinstance(error.field_violations[0], FieldViolation)
    assert error.field_violations[0].description
    assert live_leases(client) == {}


def test_an_unknown_lease_is_not_found_with_its_reason(client: AuthPoolClient) -> None:
    with pytest.raises(NotFound) as raised:
        client.renew("no-such-lease", 1)
    assert raised.value.reason == "LEASE_NOT_FOUND"
    assert raised.value.metadata == {"lease_id": "no-such-lease"}


def test_a_spent_pool_without_fallback_is_pool_exhausted_with_a_retry_delay(start_server: Start) -> None:
    server = start_server(client_spec(subscriptions=1, max_clients=1, fallback=False))
    with AuthPoolClient(server.target, insecure=True) as client, client.lease("worker-1"):
        with pytest.raises(PoolExhausted) as raised, client.lease("worker-2"):
            pass
        error = raised.value
        assert isinstance(error, ResourceExhausted)
        assert error.reason == "POOL_EXHAUSTED"
        assert error.retry_delay is not None
        assert error.retry_delay > 0


def test_a_caller_over_its_rate_limit_is_rate_limited_with_a_sub_second_delay(start_server: Start) -> None:
    limits = RateLimits(default=Bucket(rate=2.0, burst=2), principals={})
    server = start_server(security=replace(token_security(), rate_limits=limits))
    with AuthPoolClient(server.target, insecure=True, token=CLIENT_TOKEN) as client:
        for _ in range(2):  # the burst
            client.release("no-such-lease", 1)
        with pytest.raises(RateLimited) as raised:
            client.release("no-such-lease", 1)
    assert raised.value.reason == "RATE_LIMITED"
    assert raised.value.retry_delay is not None
    assert 0 < raised.value.retry_delay <= 0.5


def test_a_client_with_its_token_holds_a_lease(start_server: Start) -> None:
    server = start_server(security=token_security())
    with AuthPoolClient(server.target, insecure=True, token=CLIENT_TOKEN) as client:
        assert CLIENT_TOKEN not in repr(client)
        with client.lease("worker-7") as lease:
            assert lease.report_usage(5_000).subscription_id == lease.subscription_id
        assert lease.released is True


def test_no_token_or_an_unknown_one_is_unauthenticated(start_server: Start) -> None:
    server = start_server(security=token_security())
    wrong = secret("client-lib-wrong-token-0d9c8b7a")
    for token in (None, wrong):
        with AuthPoolClient(server.target, insecure=True, token=token) as client:
            with pytest.raises(Unauthenticated) as raised:
                client.allocate("worker-7")
            assert raised.value.reason == "UNAUTHENTICATED"
            assert wrong not in str(raised.value)


def test_a_role_without_the_method_is_permission_denied_saying_which_role_may(start_server: Start) -> None:
    server = start_server(security=token_security())
    with (
        AuthPoolClient(server.target, insecure=True, token=CLIENT_TOKEN) as client,
        pytest.raises(PermissionDenied) as raised,
    ):
        client.status()
    assert raised.value.metadata["required_role"] == "operator"
    with AuthPoolClient(server.target, insecure=True, token=ADMIN_TOKEN) as admin:
        assert len(admin.status().subscriptions) == 3


def test_every_error_is_an_authpool_error_keeping_the_rpc_error_as_its_cause(client: AuthPoolClient) -> None:
    with pytest.raises(AuthPoolError) as raised:
        client.drain_subscription("no-such-sub")
    assert raised.value.reason == "SUBSCRIPTION_NOT_FOUND"
    assert isinstance(raised.value.__cause__, grpc.RpcError)
    assert raised.value.status is not None
    assert raised.value.status.message == raised.value.message


def test_settings_that_cannot_work_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        AuthPoolClient("127.0.0.1:1", insecure=True, root_ca=b"pem")
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        AuthPoolClient("127.0.0.1:1", client_cert=b"pem")
    with pytest.raises(ValueError, match="token is empty"):
        AuthPoolClient("127.0.0.1:1", insecure=True, token=" ")


# -- TLS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def test_tls_with_a_private_ca_file_and_a_token(start_server: Start, ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("localhost")
    tls = TlsFiles(
        cert_chain=b"".join(blob.bytes() for blob in cert.cert_chain_pems),
        private_key=cert.private_key_pem.bytes(),
        client_ca=None,
        require_client_cert=False,
    )
    server = start_server(security=replace(token_security(), tls=tls))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with AuthPoolClient(f"localhost:{server.port}", root_ca=ca_file, token=CLIENT_TOKEN) as client:
        with client.lease("worker-7") as lease:
            assert lease.credential_ref
        assert lease.released is True
    # Without the CA the server's certificate is not trusted: the call fails, typed.
    with (
        AuthPoolClient(f"localhost:{server.port}", token=CLIENT_TOKEN, timeout=3) as untrusting,
        pytest.raises(AuthPoolError) as raised,
    ):
        untrusting.allocate("worker-8")
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE
