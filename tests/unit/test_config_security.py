"""The `security` and `admin` blocks: tokens from the environment or files, never from the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from authpool_server.security.roles import Principal, Role
from tests.conftest import secret
from tests.unit.test_config import guide_doc, load_doc, problems_of

TOKEN = secret("sched-token-3f2e1d0c9b8a7f6e")
NEXT = secret("sched-token-next-aa11bb22cc33")


@pytest.fixture
def doc(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "creds"
    root.mkdir()
    return guide_doc(root.resolve())


def with_security(doc: dict[str, Any], security: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "security": security}


def principal(name: str, role: str, **source: str) -> dict[str, str]:
    return {"name": name, "role": role, **source}


def test_the_guide_template_needs_no_security_block_and_serves_nothing_without_tokens(
    tmp_path: Path, doc: dict[str, Any]
) -> None:
    settings = load_doc(tmp_path, doc)
    assert settings.security.auth_required
    assert not settings.security.has_credentials  # `serve` refuses to start like this
    assert settings.security.rate_limits is not None
    assert settings.admin.listen == "127.0.0.1:9464"


def test_role_shortcut_variables_and_files(tmp_path: Path, doc: dict[str, Any]) -> None:
    (tmp_path / "operator-token").write_text(f"{NEXT}\n")
    env = {"AUTHPOOL_ADMIN_TOKEN": TOKEN, "AUTHPOOL_OPERATOR_TOKEN_FILE": str(tmp_path / "operator-token")}
    tokens = load_doc(tmp_path, doc, env).security.tokens
    assert tokens.principal(TOKEN) == Principal("admin", Role.ADMIN)
    assert tokens.principal(NEXT) == Principal("operator", Role.OPERATOR)
    assert tokens.principal("sched-token-3f2e1d0c9b8a7f6") is None


def test_principals_read_their_tokens_from_env_and_files_with_rotation(tmp_path: Path, doc: dict[str, Any]) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "oncall").write_text("oncall-token-0011223344556677\n")
    security = {
        "auth": {
            "principals": [
                principal("scheduler", "client", tokenEnv="SCHED_TOKENS"),
                principal("oncall", "admin", tokenFile="secrets/oncall"),  # relative to the config file
            ]
        }
    }
    settings = load_doc(tmp_path, with_security(doc, security), {"SCHED_TOKENS": f"{TOKEN}, {NEXT}"})
    tokens = settings.security.tokens
    assert tokens.principal(TOKEN) == tokens.principal(NEXT) == Principal("scheduler", Role.CLIENT)
    assert tokens.principal("oncall-token-0011223344556677") == Principal("oncall", Role.ADMIN)
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("entry", "env", "expected"),
    [
        (
            principal("scheduler", "client", tokenEnv="SCHED_TOKEN"),
            {},
            "security.auth.principals[0].tokenEnv: environment variable SCHED_TOKEN is not set",
        ),
        (
            principal("scheduler", "client", tokenEnv="SCHED_TOKEN"),
            {"SCHED_TOKEN": "tiny1"},
            "security.auth.principals[0].tokenEnv: a token in environment variable SCHED_TOKEN "
            "is shorter than 16 characters",
        ),
        (
            principal("scheduler", "client", tokenFile="/nonexistent/token"),
            {},
            "security.auth.principals[0].tokenFile: cannot read /nonexistent/token (No such file or directory)",
        ),
        (
            principal("scheduler", "client", tokenEnv="A", tokenFile="/x"),
            {},
            "security.auth.principals[0]: give exactly one of tokenEnv or tokenFile "
            "(the token itself never goes in this file)",
        ),
        (
            {"name": "scheduler", "role": "client", "token": TOKEN},
            {},
            "security.auth.principals[0].token: unknown field; did you mean 'tokenEnv'?",
        ),
        (
            principal("scheduler", "root", tokenEnv="SCHED_TOKEN"),
            {"SCHED_TOKEN": TOKEN},
            "security.auth.principals[0].role: must be 'client', 'operator' or 'admin' (got \"root\")",
        ),
        (
            principal("scheduler", "client", tokenEnv="lower-case"),
            {},
            "security.auth.principals[0].tokenEnv: must be an environment variable name such as "
            "AUTHPOOL_TOKEN_SCHEDULER",
        ),
    ],
    ids=["unset", "short", "missing-file", "two-sources", "token-in-config", "unknown-role", "bad-variable"],
)
def test_each_token_problem_is_named_and_no_token_is_echoed(
    tmp_path: Path, doc: dict[str, Any], entry: dict[str, str], env: dict[str, str], expected: str
) -> None:
    problems = problems_of(tmp_path, with_security(doc, {"auth": {"principals": [entry]}}), env)
    assert problems == [expected]
    for value in [TOKEN, *env.values()]:
        assert not any(value in problem for problem in problems)


def test_two_principals_cannot_share_a_token(tmp_path: Path, doc: dict[str, Any]) -> None:
    security = {
        "auth": {
            "principals": [principal("a", "client", tokenEnv="A_TOKEN"), principal("b", "admin", tokenEnv="B_TOKEN")]
        }
    }
    problems = problems_of(tmp_path, with_security(doc, security), {"A_TOKEN": TOKEN, "B_TOKEN": TOKEN})
    assert problems == ["security.auth: principals a, b share a token; each needs its own"]


def test_tls_files_are_read_and_checked(tmp_path: Path, doc: dict[str, Any]) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    security = {
        "tls": {
            "certFile": "server.pem",
            "keyFile": "server.key",
            "clientCaFile": "ca.pem",
            "requireClientCert": True,
            "clientCertificates": [{"commonName": "oncall", "name": "oncall", "role": "operator"}],
        }
    }
    settings = load_doc(tmp_path, with_security(doc, security))
    tls = settings.security.tls
    assert tls is not None
    assert tls.require_client_cert
    assert tls.client_ca == ca.cert_pem.bytes()
    assert settings.security.has_credentials  # a mapped certificate is a credential
    assert "PRIVATE KEY" not in repr(settings)

    security["tls"]["certFile"] = "missing.pem"
    security["tls"]["keyFile"] = "ca.pem.txt"
    (tmp_path / "ca.pem.txt").write_text("not a key")
    assert problems_of(tmp_path, with_security(doc, security)) == [
        f"security.tls.certFile: cannot read {tmp_path / 'missing.pem'} (No such file or directory)",
        f"security.tls.keyFile: {tmp_path / 'ca.pem.txt'} is not PEM",
    ]
    del security["tls"]["clientCaFile"]
    problems = problems_of(tmp_path, with_security(doc, security))
    assert problems == ["security.tls: clientCaFile is required to verify client certificates"]
    security["tls"].update(clientCaFile="ca.pem", requireClientCert=False)
    assert problems_of(tmp_path, with_security(doc, security)) == [
        "security.tls: clientCertificates need requireClientCert: true (gRPC cannot ask for an optional one)"
    ]


def test_rate_limits_for_unknown_principals_are_a_mistake(tmp_path: Path, doc: dict[str, Any]) -> None:
    security = {"rateLimits": {"principals": {"nobody": {"requestsPerSecond": 5, "burst": 10}}}}
    problems = problems_of(tmp_path, with_security(doc, security), {"AUTHPOOL_CLIENT_TOKEN": TOKEN})
    assert problems == ["security.rateLimits.principals.nobody: no principal of that name has credentials"]


def test_limits_become_grpc_options(tmp_path: Path, doc: dict[str, Any]) -> None:
    security = {"limits": {"maxMessageBytes": 65536, "keepalive": {"minClientPingIntervalSeconds": 30}}}
    options = dict(load_doc(tmp_path, with_security(doc, security)).security.grpc_options())
    assert options["grpc.max_receive_message_length"] == 65536
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 30_000
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_admin_listen_is_checked(tmp_path: Path, doc: dict[str, Any]) -> None:
    assert problems_of(tmp_path, {**doc, "admin": {"listen": "9464"}}) == [
        "admin.listen: must be host:port (port 0-65535)"
    ]
