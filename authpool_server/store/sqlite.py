"""The embedded store: one SQLite file in WAL mode with `synchronous=FULL`.

A batch is durable when `write` returns: SQLite fsyncs the write-ahead log on
every commit. The pool merges whatever decisions queue up while a commit is
in flight into the next batch (group commit), so one fsync covers many
decisions and durability does not cost throughput.

All writes go through one connection on one thread; event replays read
through a second connection on another thread, which WAL lets run beside
the writer. A third, on the event loop's own thread, looks usage records up
by request id: one primary-key probe, a few microseconds, where handing it
to a thread and back cost more CPU than the rest of a usage report.

One server per data directory: `open()` takes an exclusive lock on
`authpool.sqlite3.lock` beside the database for as long as the store is
open (the kernel drops it if the process dies), so a second server, or a
restore, started on the same directory by mistake is refused instead of
interleaving writes with the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from authpool_server.domain import (
    DeliveryState,
    EndedLease,
    Event,
    EventType,
    Lease,
    Outcome,
    UsageRecord,
)
from authpool_server.errors import StartupRefused
from authpool_server.ledger import SubscriptionFlags
from authpool_server.store.base import Snapshot, WriteBatch, outbox_from_row, outbox_row, usage_row
from authpool_server.store.sqlite_usage import USAGE_INDEXES, early_usage, spend_before
from authpool_server.store.usage import UsagePlanner, everything

__all__ = ["SQLiteStore", "data_dir_lock"]

SCHEMA_VERSION = 4
# What each version adds to the one before; applied in order at start.
_MIGRATIONS = {
    2: (
        "ALTER TABLE usage ADD COLUMN provider_remaining_ppm INTEGER",
        "ALTER TABLE usage ADD COLUMN provider_reset_at REAL NOT NULL DEFAULT 0",
    ),
    3: (),  # the outbox table, new in _SCHEMA (CREATE TABLE IF NOT EXISTS)
    # The indexes the usage summary reads at start (a few seconds on a million rows, once).
    4: USAGE_INDEXES,
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    lease_id        TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL,
    session_id      TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    fallback        INTEGER NOT NULL,
    granted_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,
    fencing_token   INTEGER NOT NULL,
    acked_token     INTEGER NOT NULL,
    last_used_at    REAL NOT NULL,
    wanted_type     TEXT NOT NULL,
    labels          TEXT NOT NULL,
    history         TEXT NOT NULL,
    ended_at        REAL
);
CREATE INDEX IF NOT EXISTS leases_ended_at ON leases (ended_at);
CREATE TABLE IF NOT EXISTS usage (
    request_id      TEXT PRIMARY KEY,
    lease_id        TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    fallback        INTEGER NOT NULL,
    at              REAL NOT NULL,
    cost_micros     INTEGER NOT NULL,
    input_tokens    INTEGER NOT NULL,
    output_tokens   INTEGER NOT NULL,
    model           TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    provider_remaining_ppm INTEGER,
    provider_reset_at      REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
CREATE TABLE IF NOT EXISTS subscription_flags (
    subscription_id TEXT PRIMARY KEY,
    draining        INTEGER NOT NULL,
    resumed_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    sequence INTEGER PRIMARY KEY,
    at       REAL NOT NULL,
    payload  TEXT NOT NULL
);
-- Pruning deletes by time: without this every prune scans the whole log (about a million rows a week).
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS outbox (
    notification_id TEXT PRIMARY KEY,
    event_sequence  INTEGER NOT NULL,
    rule            TEXT NOT NULL,
    severity        TEXT NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state);
"""

_UPSERT_OUTBOX = """
INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (notification_id) DO UPDATE SET
    state = excluded.state, attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at,
    last_error = excluded.last_error, updated_at = excluded.updated_at
"""

_UPSERT_LEASE = """
INSERT INTO leases (lease_id, client_id, session_id, subscription_id, fallback, granted_at,
                    expires_at, fencing_token, acked_token, last_used_at, wanted_type, labels,
                    history, ended_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (lease_id) DO UPDATE SET
    subscription_id = excluded.subscription_id, fallback = excluded.fallback,
    expires_at = excluded.expires_at, fencing_token = excluded.fencing_token,
    acked_token = excluded.acked_token, last_used_at = excluded.last_used_at,
    history = excluded.history, ended_at = excluded.ended_at
"""


_CHARGED = "SELECT subscription_id FROM usage WHERE request_id = ?"
_SET_META = "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"


def _lease_row(lease: Lease, ended_at: float | None = None) -> tuple[object, ...]:
    return (
        lease.lease_id,
        lease.client_id,
        lease.session_id,
        lease.subscription_id,
        int(lease.fallback),
        lease.granted_at,
        lease.expires_at,
        lease.fencing_token,
        lease.acked_token,
        lease.last_used_at,
        lease.wanted_type,
        json.dumps(lease.labels),
        json.dumps(lease.history),
        ended_at,
    )


# The columns of `leases` in `Lease`'s field order, then `ended_at`.
_SELECT_LEASES = (
    "SELECT lease_id, client_id, session_id, subscription_id, fallback, granted_at, expires_at, fencing_token, "
    "acked_token, last_used_at, wanted_type, labels, history, ended_at FROM leases WHERE ended_at IS "
)


def _pairs(text: str) -> tuple[tuple[Any, Any], ...]:
    # Most leases have no labels and no history: skip the JSON parser for them (15,000 leases at scale).
    return () if text == "[]" else tuple((a, b) for a, b in json.loads(text))


def _lease_from_row(row: tuple[Any, ...]) -> Lease:
    """A lease from a plain row of `_SELECT_LEASES` (positionally: a third of the time of a `Row` by name)."""
    *head, wanted_type, labels, history, _ = row
    head[4] = bool(head[4])
    return Lease(*head, wanted_type, _pairs(labels), _pairs(history))  # type: ignore[arg-type]


def _event_payload(event: Event) -> str:
    return json.dumps(
        {
            "type": event.type.value,
            "subscription_id": event.subscription_id,
            "client_id": event.client_id,
            "lease_id": event.lease_id,
            "fencing_token": event.fencing_token,
            "attributes": event.attributes,
        },
        separators=(",", ":"),
    )


def _event_from_row(sequence: int, at: float, payload: str) -> Event:
    data = json.loads(payload)
    return Event(
        sequence=sequence,
        at=at,
        type=EventType(data["type"]),
        subscription_id=data["subscription_id"],
        client_id=data["client_id"],
        lease_id=data["lease_id"],
        fencing_token=data["fencing_token"],
        attributes=tuple((k, v) for k, v in data["attributes"]),
    )


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _lock(database: Path, purpose: str) -> int:
    """Take the data directory's lock (a file descriptor, released when closed) or refuse."""
    path = database.with_name(database.name + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupRefused(
            f"{database} is in use by a running AuthPool server (it holds {path.name}): "
            f"stop that server before {purpose}"
        ) from None
    return fd


@contextlib.contextmanager
def data_dir_lock(database: Path, *, purpose: str) -> Iterator[None]:
    """Hold the data directory's lock while the block runs (what a restore does)."""
    fd = _lock(database, purpose)
    try:
        yield
    finally:
        os.close(fd)


class SQLiteStore:
    """The embedded store. `path` is the database file; its folder is created."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._reader_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lookup: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def _on_writer(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, fn, *args)

    async def open(self, plan: UsagePlanner = everything) -> Snapshot:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.path, "starting another on the same data directory")
        try:
            return await self._on_writer(self._open, plan)
        except BaseException:
            await self.close()
            raise

    def _open(self, plan: UsagePlanner) -> Snapshot:
        self._writer = self._connect()
        self._reader = self._connect()
        self._lookup = self._connect()
        self._lookup.execute("PRAGMA busy_timeout=20")  # never hold the event loop up: see `charged`
        self._writer.executescript(_SCHEMA)
        version = self._meta("schema_version")
        if version is None:
            for statement in USAGE_INDEXES:  # what migration 4 adds to an older database
                self._writer.execute(statement)
            self._writer.execute(_SET_META, ("schema_version", str(SCHEMA_VERSION)))
        elif int(version) > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema version {version}, newer than this server's {SCHEMA_VERSION}")
        else:
            self._migrate(int(version))
        return self._load(plan)

    async def load(self, plan: UsagePlanner = everything) -> Snapshot:
        return await self._on_writer(self._load, plan)

    def _load(self, plan: UsagePlanner) -> Snapshot:
        conn = self._writer
        assert conn is not None
        # One read transaction: the usage summary agrees with the rest, whatever a backup or tool does meanwhile.
        conn.execute("BEGIN")
        try:
            return self._read(conn, plan)
        finally:
            conn.execute("COMMIT")

    def _read(self, conn: sqlite3.Connection, plan: UsagePlanner) -> Snapshot:
        rows = conn.cursor()
        rows.row_factory = None
        live = [_lease_from_row(r) for r in rows.execute(_SELECT_LEASES + "NULL")]
        ended = [EndedLease(_lease_from_row(r), r[13]) for r in rows.execute(_SELECT_LEASES + "NOT NULL")]
        last_sequence = max(
            int(self._meta("last_sequence") or 0),
            conn.execute("SELECT COALESCE(MAX(sequence), 0) FROM events").fetchone()[0],
        )
        newest = conn.execute("SELECT at FROM events WHERE sequence = ?", (last_sequence,)).fetchone()
        usage_plan = plan(None if newest is None else newest[0])
        usage = self._load_usage(conn, usage_plan.recent_since)
        early = early_usage(conn, usage_plan)
        token = int(self._meta("fencing_token") or 0)
        flags = [
            SubscriptionFlags(r["subscription_id"], bool(r["draining"]), r["resumed_at"])
            for r in conn.execute("SELECT * FROM subscription_flags")
        ]
        outbox = [
            outbox_from_row(tuple(r))
            for r in conn.execute("SELECT * FROM outbox WHERE state != ?", (DeliveryState.DELIVERED.value,))
        ]
        delivered = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE state = ?", (DeliveryState.DELIVERED.value,)
        ).fetchone()[0]
        return Snapshot(live, ended, usage, last_sequence, token, flags, outbox, delivered, early=early)

    @staticmethod
    def _load_usage(conn: sqlite3.Connection, since: float) -> list[UsageRecord]:
        """The usage records from `since` on, in time order (then insertion order, as `sqlite_usage` breaks ties).

        Plain tuples rather than `sqlite3.Row`, positional arguments, and each
        repeated string (model, subscription, lease and client ids) held once:
        about half the time and a third less memory than building each record
        from a `Row` by column name.
        """
        strings: dict[str, str] = {}
        share = strings.setdefault
        outcomes = {outcome.value: outcome for outcome in Outcome}
        cursor = conn.cursor()
        cursor.row_factory = None
        rows = cursor.execute(
            "SELECT request_id, lease_id, client_id, subscription_id, fallback, at, cost_micros, input_tokens, "
            "output_tokens, model, outcome, provider_remaining_ppm, provider_reset_at FROM usage WHERE at >= ? "
            "ORDER BY at, rowid",
            (since,),
        )
        return [
            UsageRecord(
                request_id,
                share(lease_id, lease_id),
                share(client_id, client_id),
                share(subscription_id, subscription_id),
                bool(fallback),
                at,
                cost_micros,
                input_tokens,
                output_tokens,
                share(model, model),
                outcomes[outcome],
                provider_remaining_ppm,
                provider_reset_at,
            )
            for (
                request_id,
                lease_id,
                client_id,
                subscription_id,
                fallback,
                at,
                cost_micros,
                input_tokens,
                output_tokens,
                model,
                outcome,
                provider_remaining_ppm,
                provider_reset_at,
            ) in rows
        ]

    def _migrate(self, version: int) -> None:
        assert self._writer is not None
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._writer.execute("BEGIN IMMEDIATE")
            for statement in _MIGRATIONS[target]:
                self._writer.execute(statement)
            self._writer.execute(_SET_META, ("schema_version", str(target)))
            self._writer.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        assert self._writer is not None
        row = self._writer.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def write(self, batch: WriteBatch) -> asyncio.Future[None]:
        # Resolved straight from the writer thread with one call_soon_threadsafe,
        # rather than through run_in_executor's wrapped future: one event-loop
        # pass less between a durable commit and the answers waiting for it.
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def write_and_report() -> None:
            try:
                self._write(batch)
            except BaseException as error:  # handed to the awaiting committer
                loop.call_soon_threadsafe(_settle, done, error)
            else:
                loop.call_soon_threadsafe(_settle, done, None)

        self._writer_thread.submit(write_and_report)
        return done

    def _write(self, batch: WriteBatch) -> None:
        conn = self._writer
        if conn is None:
            raise RuntimeError("the store is closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if batch.leases:
                conn.executemany(_UPSERT_LEASE, [_lease_row(lease) for lease in batch.leases])
            if batch.ended:
                conn.executemany(_UPSERT_LEASE, [_lease_row(e.lease, e.ended_at) for e in batch.ended])
            if batch.usage:
                conn.executemany(
                    "INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [usage_row(u) for u in batch.usage],
                )
            if batch.flags:
                conn.executemany(
                    "INSERT INTO subscription_flags VALUES (?, ?, ?) ON CONFLICT (subscription_id) "
                    "DO UPDATE SET draining = excluded.draining, resumed_at = excluded.resumed_at",
                    [(f.subscription_id, int(f.draining), f.resumed_at) for f in batch.flags],
                )
            if batch.outbox:
                conn.executemany(
                    _UPSERT_OUTBOX,
                    [outbox_row(e) for e in batch.outbox],
                )
            if batch.events:
                conn.executemany(
                    "INSERT INTO events VALUES (?, ?, ?)",
                    [(e.sequence, e.at, _event_payload(e)) for e in batch.events],
                )
            # Counters live in `meta` too, so pruning old rows never lets a
            # fencing token or an event sequence number be handed out twice.
            if batch.fencing_token:
                conn.execute(_SET_META, ("fencing_token", str(batch.fencing_token)))
            if batch.events:
                conn.execute(_SET_META, ("last_sequence", str(batch.events[-1].sequence)))
            if batch.prune is not None:
                conn.execute("DELETE FROM usage WHERE at < ?", (batch.prune.usage_before,))
                conn.execute(
                    "DELETE FROM leases WHERE ended_at IS NOT NULL AND ended_at < ?",
                    (batch.prune.ended_leases_before,),
                )
                conn.execute("DELETE FROM events WHERE at < ?", (batch.prune.events_before,))
                conn.execute(
                    "DELETE FROM outbox WHERE state != ? AND updated_at < ?",
                    (DeliveryState.PENDING.value, batch.prune.events_before),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def charged(self, request_id: str) -> str | None:
        if self._lookup is None:
            raise RuntimeError("the store is closed")
        try:
            row = self._lookup.execute(_CHARGED, (request_id,)).fetchone()
        except sqlite3.OperationalError:
            # Busy (WAL readers rarely are): wait on the reader thread, not on the event loop.
            row = await asyncio.get_running_loop().run_in_executor(self._reader_thread, self._charged, request_id)
        return None if row is None else str(row[0])

    def _charged(self, request_id: str) -> tuple[str] | None:
        if self._reader is None:
            raise RuntimeError("the store is closed")
        row: tuple[str] | None = self._reader.execute(_CHARGED, (request_id,)).fetchone()
        return row

    async def spend_before(self, before: float, starts: Mapping[str, Sequence[float]]) -> dict[str, tuple[int, ...]]:
        def read() -> dict[str, tuple[int, ...]]:
            if self._reader is None:
                raise RuntimeError("the store is closed")
            return spend_before(self._reader, before, starts)

        return await asyncio.get_running_loop().run_in_executor(self._reader_thread, read)

    async def events_after(self, sequence: int, limit: int) -> list[Event]:
        return await asyncio.get_running_loop().run_in_executor(
            self._reader_thread, self._events_after, sequence, limit
        )

    def _events_after(self, sequence: int, limit: int) -> list[Event]:
        if self._reader is None:
            raise RuntimeError("the store is closed")
        rows = self._reader.execute(
            "SELECT sequence, at, payload FROM events WHERE sequence > ? ORDER BY sequence LIMIT ?",
            (sequence, limit),
        )
        return [_event_from_row(*row) for row in rows]

    async def first_sequence(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._reader_thread, self._first_sequence)

    def _first_sequence(self) -> int:
        if self._reader is None:
            raise RuntimeError("the store is closed")
        return self._reader.execute("SELECT COALESCE(MIN(sequence), 0) FROM events").fetchone()[0]

    async def ping(self) -> None:
        await self._on_writer(self._ping)

    def _ping(self) -> None:
        if self._writer is None:
            raise RuntimeError("the store is closed")
        self._writer.execute("SELECT 1").fetchone()

    async def close(self) -> None:
        def close_all() -> None:
            for conn in (self._writer, self._reader, self._lookup):
                if conn is not None:
                    conn.close()
            self._writer = self._reader = self._lookup = None

        try:
            await self._on_writer(close_all)
            self._writer_thread.shutdown(wait=True)
            self._reader_thread.shutdown(wait=True)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # last, whatever happened: another server may open the directory now
                self._lock_fd = None
