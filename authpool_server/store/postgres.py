"""The PostgreSQL store: the same contract as the embedded SQLite store, on a server.

Each `write` is one transaction, sent in pipeline mode: it first updates the
pool row (`pool_state`: the counters and the single-writer guard), then
upserts the batch, then commits. `write` returns once PostgreSQL has
committed, which with the default `synchronous_commit = on` means the WAL is
flushed. The pool's group commit merges whatever decisions queue up meanwhile
into the next batch, as it does for SQLite.

The schema lives in its own PostgreSQL schema (`authpool` unless told
otherwise) and is created and upgraded by the numbered SQL files in
`migrations/postgres/`, applied in order, each once, under an advisory lock
(so several processes starting together apply them once), and recorded with
their checksums in `schema_migrations`. `open()` migrates; so does
`migrate()`, for `authpool db migrate`.

For now one server process writes a schema: `open()` takes the writer role
by bumping `pool_state.writer_epoch`, and a write from an earlier opener is
refused, so a second process started by mistake (or the new pod of a rolling
update) fences the old one out instead of interleaving with it. Several
replicas will instead take a row lock on `pool_state` per decision; see
docs/postgres.md.

Failures: every call gets a connection within `connect_timeout` and runs
within `command_timeout` (when that passes, the connection's socket is shut
down, so a silent network or a hung server cannot stall a call); an
unreachable database, a lost connection or a timeout surfaces as
`StoreUnavailable` (retryable), and a transaction that did not commit leaves
nothing behind. Error messages name the server as host, port and database,
never the DSN, which may hold a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.resources
import math
import os
import re
import socket
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from time import monotonic
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from authpool_server.domain import (
    DeliveryState,
    EndedLease,
    Event,
    EventType,
    Lease,
    Outcome,
    UsageRecord,
)
from authpool_server.errors import StartupRefused, StoreUnavailable
from authpool_server.ledger import SubscriptionFlags
from authpool_server.store.base import Snapshot, WriteBatch, outbox_from_row, outbox_row

__all__ = ["Migration", "PostgresStore", "lock_key", "migrate", "migrations"]

Connection = psycopg.AsyncConnection[Any]

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # as the config allows
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# A connection used this recently is handed out unchecked; an older one is
# pinged first, so a database restart while the pool sat idle costs no call.
_TRUST_RECENT_SECONDS = 1.0
# What an unreachable, restarting, failed-over or overloaded server raises:
# connection errors, lost connections, timeouts, admin shutdown (57P01),
# "starting up" (57P03), serialization and deadlock failures (class 40), and
# a read-only transaction (25006: we reached a standby after a failover).
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction)


# -- migrations ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    """One file of `migrations/postgres/`: `0001_initial.sql` is version 1, named `0001_initial`."""

    version: int
    name: str
    sql: str
    checksum: str  # sha256 of the file, recorded when applied: an applied file must never change


@cache
def migrations() -> tuple[Migration, ...]:
    """Every migration this server knows, in order (read once from the package data)."""
    folder = importlib.resources.files("authpool_server.store").joinpath("migrations", "postgres")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            continue
        data = entry.read_bytes()
        found.append(
            Migration(int(match[1]), entry.name.removesuffix(".sql"), data.decode(), hashlib.sha256(data).hexdigest())
        )
    found.sort(key=lambda migration: migration.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"PostgreSQL migrations must be numbered 0001, 0002, ... without gaps: {found}")
    return tuple(found)


def lock_key(purpose: str, schema: str) -> int:
    """The advisory lock key AuthPool uses for `purpose` on `schema`: stable across processes and releases.

    "migrate" serialises migrations; later purposes (the replica that runs
    background work) get their own keys the same way.
    """
    digest = hashlib.sha256(f"authpool:{purpose}:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def _migrate(conn: Connection, schema: str) -> list[str]:
    """Bring `schema` up to the newest migration, in one transaction; the names applied."""
    known = migrations()
    quoted = sql.Identifier(schema)
    async with conn.transaction():
        # Waits for any other process migrating this schema; released at commit.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("migrate", schema),))
        cur = await conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
        if not (await cur.fetchone() or (False,))[0]:
            # Only when missing: a role without CREATE on the database can use a schema made for it.
            await conn.execute(sql.SQL("CREATE SCHEMA {}").format(quoted))
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{quoted.as_string()}.schema_migrations",))
        if not (await cur.fetchone() or (False,))[0]:
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE {}.schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(quoted)
            )
        cur = await conn.execute(
            sql.SQL("SELECT version, name, checksum FROM {}.schema_migrations ORDER BY version").format(quoted)
        )
        applied = {version: (name, checksum) for version, name, checksum in await cur.fetchall()}
        newest = max(applied, default=0)
        if newest > len(known):
            raise StartupRefused(
                f"PostgreSQL schema {schema!r} is at migration {newest} ({applied[newest][0]}), newer than this "
                f"server knows (up to {len(known)}): run a release at least as new as the one that migrated it"
            )
        for migration in known:
            if migration.version in applied and applied[migration.version][1] != migration.checksum:
                raise StartupRefused(
                    f"PostgreSQL schema {schema!r}: migration {migration.name} was applied from a different file "
                    "than this server ships; an applied migration must never change"
                )
        pending = [m for m in known if m.version not in applied]
        if pending:
            await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(quoted))
        for migration in pending:
            await conn.execute(migration.sql.encode())  # no parameters: several statements may run at once
            await conn.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)").format(
                    quoted
                ),
                (migration.version, migration.name, migration.checksum),
            )
    return [m.name for m in pending]


async def migrate(dsn: str, schema: str = "authpool", *, connect_timeout: float = 5.0) -> list[str]:
    """Create or upgrade AuthPool's tables in `schema` at `dsn`; the names of the migrations applied.

    Safe to run from several processes at once: one applies, the others wait
    for it and then find nothing to do.

    Raises:
        StoreUnavailable: the database could not be reached within `connect_timeout`.
        StartupRefused: the DSN is malformed, or the schema is newer than this
            server knows (or was migrated from files that differ from its own).
    """
    target = _Target.parse(dsn)
    _check_schema(schema)
    async with target.guard("migrate"), await target.connect(connect_timeout) as conn:
        return await _migrate(conn, schema)


# -- connecting, and what may be said about it ---------------------------------------


def _check_schema(schema: str) -> None:
    if not SCHEMA_NAME.match(schema):
        raise ValueError(f"schema: {schema!r} is not a lowercase PostgreSQL identifier (a-z, 0-9, _)")


@dataclass(frozen=True, slots=True)
class _Target:
    """A DSN and what may be shown of it: host, port and database, never the DSN or its password."""

    dsn: str = field(repr=False)
    params: dict[str, str] = field(repr=False)  # holds the password, if the DSN has one
    where: str

    @classmethod
    def parse(cls, dsn: str) -> _Target:
        try:
            params = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
        except psycopg.Error:
            # libpq's parse errors quote pieces of the string, which may be the password.
            raise StartupRefused(
                "the PostgreSQL DSN is not a valid libpq connection string "
                "(postgresql://user@host:port/database?option=value, or key=value pairs)"
            ) from None
        host = params.get("host") or params.get("hostaddr") or "local socket"
        where = f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"
        return cls(dsn, params, where)

    def scrub(self, error: BaseException) -> str:
        """`error`'s message on one line, with the DSN and its password blanked out should they appear."""
        text = " ".join(str(error).split()) or type(error).__name__
        for secret in (self.dsn, self.params.get("password", "")):
            if secret:
                text = text.replace(secret, "***")
        return text

    def kwargs(self, connect_timeout: float) -> dict[str, Any]:
        """Connection options: autocommit (transactions are explicit) and timeouts the DSN does not set."""
        options: dict[str, Any] = {"autocommit": True}
        defaults = {
            "application_name": "authpool",
            "connect_timeout": str(max(2, math.ceil(connect_timeout))),  # libpq's floor is 2 s
            # Data sent and not acknowledged within the timeout breaks the connection...
            "tcp_user_timeout": str(max(1, int(connect_timeout * 1000))),
            # ...and so does a peer that stops answering while the connection idles.
            "keepalives": "1",
            "keepalives_idle": str(max(1, round(connect_timeout))),
            "keepalives_interval": "1",
            "keepalives_count": "3",
        }
        options.update({key: value for key, value in defaults.items() if key not in self.params})
        return options

    async def connect(self, seconds: float) -> Connection:
        """One connection outside any pool (for migrations), within `seconds`."""
        async with asyncio.timeout(seconds):
            return await psycopg.AsyncConnection.connect(self.dsn, **self.kwargs(seconds))

    @contextlib.asynccontextmanager
    async def guard(self, what: str, waited: float = 0.0) -> AsyncIterator[None]:
        """Turn what an unreachable or failing server raises into `StoreUnavailable`, told safely."""
        try:
            yield
        except PoolTimeout:
            raise StoreUnavailable(f"{what}: no connection to PostgreSQL at {self.where} within {waited:g} s") from None
        except PoolClosed:
            raise StoreUnavailable(f"{what}: the PostgreSQL store is closed") from None
        except TimeoutError:
            raise StoreUnavailable(f"{what}: PostgreSQL at {self.where} did not answer in time") from None
        except _UNAVAILABLE as error:
            raise StoreUnavailable(f"{what}: PostgreSQL at {self.where}: {self.scrub(error)}") from None


class _Deadline:
    """Shuts a connection's socket down if a call on it outlives `seconds`.

    Cancelling a psycopg call instead would make it ask the server to cancel
    the query and wait for the answer: no good when the server is what hangs.
    With the socket shut, the call fails at once with a lost connection, and
    the pool discards the connection.
    """

    __slots__ = ("_handle", "fired", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, conn: Connection) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.seconds, self._fire, conn)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _fire(self, conn: Connection) -> None:
        self.fired = True
        # Already closed: nothing to shut.
        with contextlib.suppress(Exception), socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


# -- rows ---------------------------------------------------------------------------


def _lease_row(lease: Lease, ended_at: float | None = None) -> tuple[object, ...]:
    return (
        lease.lease_id,
        lease.client_id,
        lease.session_id,
        lease.subscription_id,
        lease.fallback,
        lease.granted_at,
        lease.expires_at,
        lease.fencing_token,
        lease.acked_token,
        lease.last_used_at,
        lease.wanted_type,
        Jsonb(lease.labels),
        Jsonb(lease.history),
        ended_at,
    )


_LEASE_COLUMNS = (
    "lease_id",
    "client_id",
    "session_id",
    "subscription_id",
    "fallback",
    "granted_at",
    "expires_at",
    "fencing_token",
    "acked_token",
    "last_used_at",
    "wanted_type",
    "labels",
    "history",
    "ended_at",
)
# What a lease's later writes may change (as SQLite's upsert).
_LEASE_UPDATES = (
    "subscription_id",
    "fallback",
    "expires_at",
    "fencing_token",
    "acked_token",
    "last_used_at",
    "history",
    "ended_at",
)


def _lease_from_row(row: Sequence[Any]) -> Lease:
    return Lease(
        lease_id=row[0],
        client_id=row[1],
        session_id=row[2],
        subscription_id=row[3],
        fallback=row[4],
        granted_at=row[5],
        expires_at=row[6],
        fencing_token=row[7],
        acked_token=row[8],
        last_used_at=row[9],
        wanted_type=row[10],
        labels=tuple((k, v) for k, v in row[11]),
        history=tuple((t, s) for t, s in row[12]),
    )


_USAGE_COLUMNS = (
    "request_id",
    "lease_id",
    "client_id",
    "subscription_id",
    "fallback",
    "at",
    "cost_micros",
    "input_tokens",
    "output_tokens",
    "model",
    "outcome",
    "provider_remaining_ppm",
    "provider_reset_at",
)


def _usage_row(u: UsageRecord) -> tuple[object, ...]:
    return (
        u.request_id,
        u.lease_id,
        u.client_id,
        u.subscription_id,
        u.fallback,
        u.at,
        u.cost_micros,
        u.input_tokens,
        u.output_tokens,
        u.model,
        u.outcome.value,
        u.provider_remaining_ppm,
        u.provider_reset_at,
    )


def _usage_from_row(row: Sequence[Any]) -> UsageRecord:
    return UsageRecord(*row[:10], Outcome(row[10]), row[11], row[12])


_EVENT_COLUMNS = (
    "sequence",
    "at",
    "type",
    "subscription_id",
    "client_id",
    "lease_id",
    "fencing_token",
    "attributes",
)


def _event_row(e: Event) -> tuple[object, ...]:
    return (
        e.sequence,
        e.at,
        e.type.value,
        e.subscription_id,
        e.client_id,
        e.lease_id,
        e.fencing_token,
        Jsonb(e.attributes),
    )


def _event_from_row(row: Sequence[Any]) -> Event:
    return Event(
        sequence=row[0],
        at=row[1],
        type=EventType(row[2]),
        subscription_id=row[3],
        client_id=row[4],
        lease_id=row[5],
        fencing_token=row[6],
        attributes=tuple((k, v) for k, v in row[7]),
    )


_OUTBOX_COLUMNS = (
    "notification_id",
    "event_sequence",
    "rule",
    "severity",
    "body",
    "state",
    "attempts",
    "next_attempt_at",
    "last_error",
    "updated_at",
)
# A delivery attempt changes only where delivery stands.
_OUTBOX_UPDATES = ("state", "attempts", "next_attempt_at", "last_error", "updated_at")
_FLAGS_COLUMNS = ("subscription_id", "draining", "resumed_at")


class _Statements:
    """Every statement the store runs, qualified with its schema once."""

    def __init__(self, schema: str) -> None:
        def q(text: str, columns: Sequence[str] = (), updates: Sequence[str] = ()) -> bytes:
            return (
                sql.SQL(text)
                .format(
                    s=sql.Identifier(schema),
                    columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
                    values=sql.SQL(", ").join([sql.Placeholder()] * len(columns)),
                    updates=sql.SQL(", ").join(
                        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates
                    ),
                )
                .as_bytes()
            )

        self.claim_writer = q("UPDATE {s}.pool_state SET writer_epoch = writer_epoch + 1 RETURNING writer_epoch")
        # First in every write: the counters never go back, and the write is
        # refused (no row returned) once another server has opened the store.
        self.advance = q(
            "UPDATE {s}.pool_state SET fencing_token = GREATEST(fencing_token, %s),"
            " last_sequence = GREATEST(last_sequence, %s) WHERE writer_epoch = %s RETURNING writer_epoch"
        )
        self.upsert_lease = q(
            "INSERT INTO {s}.leases ({columns}) VALUES ({values}) ON CONFLICT (lease_id) DO UPDATE SET {updates}",
            _LEASE_COLUMNS,
            _LEASE_UPDATES,
        )
        self.insert_usage = q(
            "INSERT INTO {s}.usage ({columns}) VALUES ({values}) ON CONFLICT (request_id) DO NOTHING", _USAGE_COLUMNS
        )
        self.upsert_flags = q(
            "INSERT INTO {s}.subscription_flags ({columns}) VALUES ({values})"
            " ON CONFLICT (subscription_id) DO UPDATE SET {updates}",
            _FLAGS_COLUMNS,
            _FLAGS_COLUMNS[1:],
        )
        self.upsert_outbox = q(
            "INSERT INTO {s}.outbox ({columns}) VALUES ({values})"
            " ON CONFLICT (notification_id) DO UPDATE SET {updates}",
            _OUTBOX_COLUMNS,
            _OUTBOX_UPDATES,
        )
        self.insert_event = q("INSERT INTO {s}.events ({columns}) VALUES ({values})", _EVENT_COLUMNS)
        self.prune = (
            q("DELETE FROM {s}.usage WHERE at < %s"),
            q("DELETE FROM {s}.leases WHERE ended_at IS NOT NULL AND ended_at < %s"),
            q("DELETE FROM {s}.events WHERE at < %s"),
            # Pending notifications stay whatever their age: they are yet to be delivered.
            q("DELETE FROM {s}.outbox WHERE state <> %s AND updated_at < %s"),
        )
        # Loaded in the order they were written, as SQLite gives them back, so
        # that the pool iterates a restored state as it did the original one.
        self.live_leases = q(
            "SELECT {columns} FROM {s}.leases WHERE ended_at IS NULL ORDER BY granted_at, lease_id", _LEASE_COLUMNS
        )
        self.ended_leases = q(
            "SELECT {columns} FROM {s}.leases WHERE ended_at IS NOT NULL ORDER BY granted_at, lease_id", _LEASE_COLUMNS
        )
        self.usage = q("SELECT {columns} FROM {s}.usage ORDER BY at, request_id", _USAGE_COLUMNS)
        self.counters = q(
            "SELECT fencing_token, GREATEST(last_sequence, (SELECT COALESCE(MAX(sequence), 0) FROM {s}.events))"
            " FROM {s}.pool_state"
        )
        self.flags = q("SELECT {columns} FROM {s}.subscription_flags ORDER BY subscription_id", _FLAGS_COLUMNS)
        self.undelivered = q(
            "SELECT {columns} FROM {s}.outbox WHERE state <> %s ORDER BY event_sequence, notification_id",
            _OUTBOX_COLUMNS,
        )
        self.delivered = q("SELECT COUNT(*) FROM {s}.outbox WHERE state = %s")
        self.events_after = q(
            "SELECT {columns} FROM {s}.events WHERE sequence > %s ORDER BY sequence LIMIT %s", _EVENT_COLUMNS
        )
        self.first_sequence = q("SELECT COALESCE(MIN(sequence), 0) FROM {s}.events")


# -- the store ----------------------------------------------------------------------


class PostgresStore:
    """The store on PostgreSQL at `dsn` (a libpq connection string), in `schema`.

    Args:
        dsn: `postgresql://user:password@host:port/database?...` or `key=value` pairs.
            It may hold a password: it is never logged, shown in errors or in `repr`.
        schema: The PostgreSQL schema holding the tables (created if missing).
        pool_min: Connections kept open.
        pool_max: Connections at most (one writes; the others serve replays and pings).
        connect_timeout: Seconds to get a connection before failing with `StoreUnavailable`.
        command_timeout: Seconds a call may then run (default: `connect_timeout`).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "authpool",
        pool_min: int = 1,
        pool_max: int = 4,
        connect_timeout: float = 5.0,
        command_timeout: float | None = None,
    ) -> None:
        _check_schema(schema)
        if not 1 <= pool_min <= pool_max:
            raise ValueError(f"pool sizes: need 1 <= pool_min ({pool_min}) <= pool_max ({pool_max})")
        if connect_timeout <= 0 or (command_timeout is not None and command_timeout <= 0):
            raise ValueError("timeouts must be positive")
        self._target = _Target.parse(dsn)
        self.schema = schema
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout or connect_timeout
        self._sql = _Statements(schema)
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._epoch = 0
        self._used_at: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"PostgresStore({self._target.where!r}, schema={self.schema!r})"

    # -- lifecycle ----------------------------------------------------------------

    async def open(self) -> Snapshot:
        if self._pool is not None:
            raise RuntimeError("the PostgreSQL store is already open")
        async with self._target.guard("open"), await self._target.connect(self._connect_timeout) as conn:
            await _migrate(conn, self.schema)
            cur = await conn.execute(self._sql.claim_writer)
            self._epoch = (await cur.fetchone() or (0,))[0]
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self._target.dsn,
            kwargs=self._target.kwargs(self._connect_timeout),
            min_size=self._pool_min,
            max_size=self._pool_max,
            open=False,
            name=f"authpool[{self.schema}]",
            timeout=self._connect_timeout,
            # Give up on a failing reconnection early so that the next call
            # starts a fresh attempt, rather than waiting out a long backoff
            # after the database is back.
            reconnect_timeout=max(2.0, 2 * self._connect_timeout),
            configure=self._note_used,
            reset=self._note_used,
            check=self._check,
        )
        await pool.open()
        self._pool = pool
        try:
            return await self.load()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- the contract -------------------------------------------------------------

    async def load(self) -> Snapshot:
        s = self._sql
        async with self._connection("load") as conn, conn.transaction():
            # One snapshot of every table, even with a writer at work.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            live = [_lease_from_row(r) for r in await (await conn.execute(s.live_leases)).fetchall()]
            ended = [
                EndedLease(_lease_from_row(r), r[13]) for r in await (await conn.execute(s.ended_leases)).fetchall()
            ]
            usage = [_usage_from_row(r) for r in await (await conn.execute(s.usage)).fetchall()]
            token, last_sequence = await (await conn.execute(s.counters)).fetchone() or (0, 0)
            flags = [SubscriptionFlags(*r) for r in await (await conn.execute(s.flags)).fetchall()]
            delivered_state = (DeliveryState.DELIVERED.value,)
            outbox = [outbox_from_row(r) for r in await (await conn.execute(s.undelivered, delivered_state)).fetchall()]
            delivered = (await (await conn.execute(s.delivered, delivered_state)).fetchone() or (0,))[0]
        return Snapshot(live, ended, usage, last_sequence, token, flags, outbox, delivered)

    async def write(self, batch: WriteBatch) -> None:
        s = self._sql
        last_sequence = batch.events[-1].sequence if batch.events else 0
        async with self._connection("write") as conn, conn.pipeline(), conn.transaction():
            cur = conn.cursor()
            await cur.execute(s.advance, (batch.fencing_token, last_sequence, self._epoch))
            if await cur.fetchone() is None:  # rolls the transaction back
                raise StoreUnavailable(
                    f"write: another AuthPool server opened PostgreSQL schema {self.schema!r} after this one; "
                    "one server per schema writes (until replicas are supported), so this one no longer may"
                )
            if batch.leases:
                await cur.executemany(s.upsert_lease, [_lease_row(lease) for lease in batch.leases])
            if batch.ended:
                await cur.executemany(s.upsert_lease, [_lease_row(e.lease, e.ended_at) for e in batch.ended])
            if batch.usage:
                await cur.executemany(s.insert_usage, [_usage_row(u) for u in batch.usage])
            if batch.flags:
                await cur.executemany(
                    s.upsert_flags, [(f.subscription_id, f.draining, f.resumed_at) for f in batch.flags]
                )
            if batch.outbox:
                await cur.executemany(s.upsert_outbox, [outbox_row(e) for e in batch.outbox])
            if batch.events:
                await cur.executemany(s.insert_event, [_event_row(e) for e in batch.events])
            if batch.prune is not None:
                horizon = batch.prune
                usage, leases, events, outbox = s.prune
                await cur.execute(usage, (horizon.usage_before,))
                await cur.execute(leases, (horizon.ended_leases_before,))
                await cur.execute(events, (horizon.events_before,))
                await cur.execute(outbox, (DeliveryState.PENDING.value, horizon.events_before))

    async def events_after(self, sequence: int, limit: int) -> list[Event]:
        async with self._connection("events_after") as conn:
            rows = await (await conn.execute(self._sql.events_after, (sequence, limit))).fetchall()
        return [_event_from_row(row) for row in rows]

    async def first_sequence(self) -> int:
        async with self._connection("first_sequence") as conn:
            row = await (await conn.execute(self._sql.first_sequence)).fetchone()
        return int(row[0]) if row else 0

    async def ping(self) -> None:
        async with self._connection("ping") as conn:
            await conn.execute("SELECT 1")

    # -- connections --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[Connection]:
        """A pooled connection for one call, bounded in time; failures become `StoreUnavailable`."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable(f"{what}: the PostgreSQL store is not open")
        deadline = _Deadline(self._command_timeout)
        try:
            async with self._target.guard(what, self._connect_timeout), pool.connection() as conn:
                deadline.arm(conn)
                try:
                    yield conn
                finally:
                    deadline.disarm()
        except StoreUnavailable:
            if deadline.fired:
                raise StoreUnavailable(
                    f"{what}: PostgreSQL at {self._target.where} did not answer within {self._command_timeout:g} s"
                ) from None
            raise

    async def _note_used(self, conn: Connection) -> None:
        self._used_at[conn] = monotonic()

    async def _check(self, conn: Connection) -> None:
        """Before a connection is handed out: ping it if it sat idle (the pool replaces it if this raises)."""
        if monotonic() - self._used_at.get(conn, 0.0) < _TRUST_RECENT_SECONDS:
            return
        deadline = _Deadline(self._connect_timeout)
        deadline.arm(conn)
        try:
            await AsyncConnectionPool.check_connection(conn)
        finally:
            deadline.disarm()
