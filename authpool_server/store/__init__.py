"""Durable state behind the pool: the store contract and its implementations."""

from __future__ import annotations

from pathlib import Path

from authpool_server.store.base import Snapshot, Store, WriteBatch

__all__ = ["DATABASE_FILE", "Snapshot", "Store", "WriteBatch", "make_store"]

DATABASE_FILE = "authpool.sqlite3"


def make_store(
    kind: str,
    *,
    data_dir: Path,
    dsn: str = "",
    schema: str = "authpool",
    pool_size: int = 4,
    connect_timeout_seconds: float = 5.0,
) -> Store:
    """The embedded SQLite store in `data_dir`, or the PostgreSQL store at `dsn`."""
    if kind == "postgres":
        from authpool_server.store.postgres import PostgresStore  # psycopg: the `postgres` extra

        return PostgresStore(dsn, schema=schema, pool_max=pool_size, connect_timeout=connect_timeout_seconds)
    from authpool_server.store.sqlite import SQLiteStore

    return SQLiteStore(data_dir / DATABASE_FILE)
