"""`authpool serve` as an operator starts it: tokens from the environment, or refusing to start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from tests.conftest import secret
from tests.integration.server_process import AUTHPOOL, ServerProcess, write_config

pytestmark = pytest.mark.slow

ADMIN_TOKEN = secret("serve-admin-token-8e7d6c5b4a39")


def test_serve_with_a_token_from_the_environment_never_logs_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    server = ServerProcess(config, tmp_path / "data", env={"AUTHPOOL_ADMIN_TOKEN": ADMIN_TOKEN})
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Status(pb.StatusRequest(), timeout=5)
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
            metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
            lease = stub.Allocate(pb.AllocateRequest(client_id="ops-check"), metadata=metadata, timeout=5).lease
            assert lease.subscription_id.startswith("sub")
    finally:
        assert server.terminate() == 0
    log = server.log.read_text()
    assert ADMIN_TOKEN not in log
    access = [json.loads(line) for line in log.splitlines() if '"authpool.access"' in line]
    assert [(a["context"]["method"], a["context"]["code"]) for a in access] == [
        ("Status", "UNAUTHENTICATED"),
        ("Allocate", "OK"),
    ]
    assert access[1]["context"]["principal"] == "admin"
    assert all("@" not in line for line in log.splitlines())  # emails are masked everywhere


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    config = write_config(tmp_path / "auth-pool.json")
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(
        [AUTHPOOL, "serve", "--config", str(config), "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        env=clean,
        timeout=30,
    )


def test_serve_without_any_token_refuses_to_start(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "no principal has a token" in result.stderr
    assert "--insecure-no-auth" in result.stderr


def test_insecure_no_auth_is_refused_on_a_public_address(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--insecure-no-auth", "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "local development" in result.stderr


def test_insecure_no_auth_is_refused_with_a_public_admin_port(tmp_path: Path) -> None:
    result = _serve(tmp_path, "--insecure-no-auth", "--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0")
    assert result.returncode == 2
    assert "the admin port must be on 127.0.0.1" in result.stderr
