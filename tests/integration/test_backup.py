"""`authpool backup` while a real server is under load, and `authpool restore` into a stopped one.

The recovery point of a backup is the moment it began: everything
acknowledged before then must be in it, and the restored server must serve
exactly that state.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from authpool_server.errors import StartupRefused
from authpool_server.store import DATABASE_FILE
from authpool_server.store.sqlite import SQLiteStore
from tests.integration.server_process import AUTHPOOL, ServerProcess, write_config
from tests.integration.storm import storm

pytestmark = pytest.mark.slow


def authpool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUTHPOOL, *args], capture_output=True, text=True, timeout=60)


def facts(database: Path) -> dict[str, object]:
    """What a database file holds, read directly."""
    with sqlite3.connect(database) as conn:
        return {
            "usage": dict(conn.execute("SELECT request_id, cost_micros FROM usage").fetchall()),
            "sequences": [r[0] for r in conn.execute("SELECT sequence FROM events ORDER BY sequence")],
            "doubly_leased": conn.execute(
                "SELECT client_id FROM leases WHERE ended_at IS NULL GROUP BY client_id HAVING COUNT(*) > 1"
            ).fetchall(),
        }


async def status(port: int) -> pb.StatusResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await authpool_pb2_grpc.AuthPoolStub(channel).Status(pb.StatusRequest(), timeout=10)


async def test_a_backup_under_load_holds_everything_acknowledged_before_it_and_restores(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    data = tmp_path / "data"
    server = ServerProcess(config, data)
    server.start()
    try:
        before = await storm([server.port], clients=8, seconds=1.5)
        # Load goes on while the backup runs: the backup must neither stall it nor catch half a write.
        during = asyncio.create_task(storm([server.port], clients=8, seconds=3.0))
        await asyncio.sleep(0.5)
        made = await asyncio.to_thread(
            authpool, "backup", str(tmp_path / "backup.db"), "--config", str(config), "--data-dir", str(data)
        )
        after = await during
        assert made.returncode == 0, made.stderr
        assert made.stdout.startswith(f"backed up {data / DATABASE_FILE} to ")
        assert before.failures == after.failures == []
    finally:
        assert server.terminate() == 0

    saved = facts(tmp_path / "backup.db")
    acknowledged = {**before.acknowledged, **after.acknowledged}
    assert set(before.acknowledged) <= set(saved["usage"])  # type: ignore[arg-type]
    assert set(saved["usage"]) <= set(acknowledged)  # type: ignore[arg-type]
    assert saved["sequences"] == list(range(1, len(saved["sequences"]) + 1))  # type: ignore[arg-type]
    assert saved["doubly_leased"] == []
    assert len(saved["usage"]) < len(acknowledged), "the backup should predate the end of the load"  # type: ignore[arg-type]

    restored = authpool("restore", str(tmp_path / "backup.db"), "--config", str(config), "--data-dir", str(data))
    assert restored.returncode == 0, restored.stderr
    kept = next(data.glob(f"{DATABASE_FILE}.before-restore-*Z"))
    assert set(facts(kept)["usage"]) == set(acknowledged)  # type: ignore[arg-type]  # the replaced one, whole

    server = ServerProcess(config, data)
    server.start()
    try:
        now = await status(server.port)
        spent = sum(s.weekly_usage_micros for s in now.subscriptions) + now.totals.fallback_usage_micros
        assert spent == sum(saved["usage"].values())  # type: ignore[union-attr]
        assert now.totals.last_sequence == saved["sequences"][-1]  # type: ignore[index]
    finally:
        server.stop()


def test_restore_refuses_while_a_server_holds_the_data_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    data = tmp_path / "data"
    server = ServerProcess(config, data)
    server.start()
    try:
        made = authpool("backup", str(tmp_path / "backup.db"), "--config", str(config), "--data-dir", str(data))
        assert made.returncode == 0, made.stderr
        before = (data / DATABASE_FILE).read_bytes()
        refused = authpool("restore", str(tmp_path / "backup.db"), "--config", str(config), "--data-dir", str(data))
        assert refused.returncode == 1
        assert "in use by a running AuthPool server" in refused.stderr
        assert "stop that server before restoring" in refused.stderr
        assert (data / DATABASE_FILE).read_bytes() == before
        assert list(data.glob("*.before-restore-*")) == []
    finally:
        server.stop()


def test_a_file_that_is_not_a_sound_backup_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    data = tmp_path / "data"
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"not a database" * 100)
    refused = authpool("restore", str(bogus), "--config", str(config), "--data-dir", str(data))
    assert refused.returncode == 1
    assert "is not an AuthPool database" in refused.stderr
    assert not (data / DATABASE_FILE).exists()
    missing = authpool("backup", str(tmp_path / "x.db"), "--config", str(config), "--data-dir", str(data))
    assert missing.returncode == 1
    assert "no AuthPool database at" in missing.stderr


def test_on_postgresql_backup_points_to_postgresqls_own_tools(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    document = json.loads(config.read_text())
    document["store"] = {"kind": "postgres"}
    config.write_text(json.dumps(document))
    result = subprocess.run(
        [AUTHPOOL, "backup", str(tmp_path / "b.db"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "AUTHPOOL_DATABASE_URL": "postgresql://authpool@db:5432/authpool"},
    )
    assert result.returncode == 2
    assert "pg_dump" in result.stderr


async def test_a_second_server_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / DATABASE_FILE)
    await first.open()
    try:
        with pytest.raises(StartupRefused, match="in use by a running AuthPool server"):
            await SQLiteStore(tmp_path / DATABASE_FILE).open()
    finally:
        await first.close()
    again = SQLiteStore(tmp_path / DATABASE_FILE)  # free once the first has closed
    await again.open()
    await again.close()


def test_restoring_over_a_damaged_database_keeps_the_damaged_files_as_they_were(tmp_path: Path) -> None:
    config = write_config(tmp_path / "auth-pool.json")
    data = tmp_path / "data"
    server = ServerProcess(config, data)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            authpool_pb2_grpc.AuthPoolStub(channel).Allocate(pb.AllocateRequest(client_id="w1"), timeout=10)
        made = authpool("backup", str(tmp_path / "backup.db"), "--config", str(config), "--data-dir", str(data))
        assert made.returncode == 0, made.stderr
    finally:
        server.kill()  # its write-ahead log stays beside the database
    database = data / DATABASE_FILE
    damaged = b"\0" * 4096 + database.read_bytes()[4096:]  # the header page is gone
    database.write_bytes(damaged)
    wal = database.with_name(database.name + "-wal").read_bytes()

    restored = authpool("restore", str(tmp_path / "backup.db"), "--config", str(config), "--data-dir", str(data))
    assert restored.returncode == 0, restored.stderr
    kept = next(data.glob(f"{DATABASE_FILE}.before-restore-*Z"))  # the database, not its -wal or -shm
    assert kept.read_bytes() == damaged
    assert kept.with_name(kept.name + "-wal").read_bytes() == wal  # moved with it, not replayed or dropped
    assert not database.with_name(database.name + "-wal").exists()
    assert facts(database)["doubly_leased"] == []
    assert len(facts(database)["sequences"]) >= 1  # type: ignore[arg-type]
