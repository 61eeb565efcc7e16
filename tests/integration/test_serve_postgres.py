"""`authpool serve` and `authpool db migrate` on the real PostgreSQL, as an operator runs them."""

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

PASSWORD = secret("pg-password-never-shown-4d3c2b1a")


def postgres_config(tmp_path: Path, schema: str) -> Path:
    path = write_config(tmp_path / "auth-pool.json")
    config = json.loads(path.read_text())
    config["store"] = {"kind": "postgres", "schema": schema}
    path.write_text(json.dumps(config))
    return path


def authpool(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTHPOOL, *args], capture_output=True, text=True, env=env, timeout=60)


def test_db_migrate_applies_once_then_reports_up_to_date(tmp_path: Path, postgres_dsn: str, pg_schema: str) -> None:
    config = postgres_config(tmp_path, pg_schema)
    env = {"PATH": "/usr/bin:/bin", "AUTHPOOL_DATABASE_URL": postgres_dsn}
    first = authpool("db", "migrate", "--config", str(config), env=env)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_initial" in first.stdout
    again = authpool("db", "migrate", "--config", str(config), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"schema {pg_schema}: up to date"


def test_without_a_database_url_the_config_is_refused_by_name(tmp_path: Path, pg_schema: str) -> None:
    result = authpool("config", "check", str(postgres_config(tmp_path, pg_schema)), env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "store.kind: postgres needs AUTHPOOL_DATABASE_URL" in result.stderr


def test_an_unreachable_database_never_shows_its_password(tmp_path: Path, pg_schema: str) -> None:
    config = postgres_config(tmp_path, pg_schema)
    env = {"PATH": "/usr/bin:/bin", "AUTHPOOL_DATABASE_URL": f"postgresql://authpool:{PASSWORD}@127.0.0.1:1/nowhere"}
    result = authpool("db", "migrate", "--config", str(config), env=env)
    assert result.returncode == 1
    assert PASSWORD not in result.stdout + result.stderr


def test_serve_on_postgres_keeps_what_it_acknowledged_through_sigkill(
    tmp_path: Path, postgres_dsn: str, pg_schema: str
) -> None:
    config = postgres_config(tmp_path, pg_schema)
    env = {"AUTHPOOL_DATABASE_URL": postgres_dsn}
    server = ServerProcess(config, tmp_path / "data", env=env)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            leases = [stub.Allocate(pb.AllocateRequest(client_id=f"w{i}"), timeout=10).lease for i in range(5)]
            stub.ReportUsage(
                pb.ReportUsageRequest(
                    request_id="r-1",
                    lease_id=leases[0].lease_id,
                    fencing_token=leases[0].fencing_token,
                    cost_micros=2_500_000,
                ),
                timeout=10,
            )
            stub.Release(pb.ReleaseRequest(lease_id=leases[4].lease_id, fencing_token=leases[4].fencing_token))
        server.kill()
    finally:
        server.stop()

    restarted = ServerProcess(config, tmp_path / "data", env=env)
    restarted.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            status = stub.Status(pb.StatusRequest(include_clients=True), timeout=10)
            assert sorted(c.client_id for c in status.clients) == ["w0", "w1", "w2", "w3"]
            assert status.totals.weekly_usage_micros == 2_500_000
            again = stub.Allocate(pb.AllocateRequest(client_id="w0"), timeout=10)
            assert again.decision == pb.DECISION_KIND_STICKY
            assert again.lease.lease_id == leases[0].lease_id
    finally:
        restarted.stop()
    assert not (tmp_path / "data" / "authpool.sqlite3").exists()  # the state lived in PostgreSQL only
