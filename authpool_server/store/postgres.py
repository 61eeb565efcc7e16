"""The PostgreSQL store: the same contract as the embedded SQLite store, on a server, for several replicas.

Each write is one transaction in pipeline mode, in two round trips. The
first locks the pool row (`pool_state ... FOR UPDATE`: decisions of all
replicas are serialised here) and reads what other replicas committed since
this one's last write: their change records and events (see
`replication.py`). The pool applies them, decides, and hands back the batch;
the second round trip writes it with its change record, advances the pool
row (version, fencing token, last sequence: assigned under the lock, so
gapless and in commit order), notifies the other replicas (`NOTIFY`,
delivered at commit) and commits. It returns once PostgreSQL has committed,
which with the default `synchronous_commit = on` means the WAL is flushed.
The pool's group commit merges the decisions that queue up meanwhile into
the next write, one lock for many decisions.

The schema lives in its own PostgreSQL schema (`authpool` unless told
otherwise) and is created and upgraded by the numbered SQL files in
`migrations/postgres/`, applied in order, each once, under an advisory lock
(so several processes starting together apply them once), and recorded with
their checksums in `schema_migrations`. `open()` migrates; so does
`migrate()`, for `authpool db migrate`.

`follow()` runs each replica's one dedicated connection: it LISTENs for
other replicas' commits (so the pool catches up, and its watchers see every
replica's events, within milliseconds) and holds a session advisory lock
while this replica leads the background work (reaper, rebalancer, webhook
delivery); when the leader's connection dies, PostgreSQL releases the lock
and another replica takes it at its next poll. See docs/postgres.md.

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
import logging
import math
import os
import re
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from time import monotonic
from typing import Any

import psycopg
from psycopg import AsyncPipeline, sql
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
from authpool_server.store.base import Snapshot, WriteBatch, outbox_from_row, outbox_row, usage_row
from authpool_server.store.postgres_usage import UsageStatements, early_usage
from authpool_server.store.replication import CatchUp, ReplicaBehind, decode_change, encode_change
from authpool_server.store.usage import UsagePlanner, everything

__all__ = ["Migration", "PostgresStore", "lock_key", "migrate", "migrations"]

log = logging.getLogger(__name__)

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
# Change records are kept this long (a replica further behind reloads
# everything), and pruned by whichever replica writes at most this often.
CHANGE_RETENTION_SECONDS = 120.0
_CHANGE_PRUNE_EVERY_SECONDS = 5.0
# How often a replica that does not lead tries to take the lead, and the
# leader proves its session (and so its lock) is still alive; a missed
# notification is caught up within the same interval.
FOLLOW_POLL_SECONDS = 1.0
# The server ends a follower session that has said nothing for this long (its lock with it).
_SILENT_LEADER_SECONDS = 5 * FOLLOW_POLL_SECONDS


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
        """Connection options: autocommit (transactions are explicit) and timeouts the DSN does not set.

        The server gets limits of its own too (`options`): a session that
        stops sending inside a transaction is ended after twice the timeout,
        and its TCP keepalives find a peer that vanished. Without them, a
        replica cut off by the network while holding the pool row lock (or
        the background-work lock) would keep it for the server's default of
        two hours, stopping every other replica.
        """
        options: dict[str, Any] = {"autocommit": True}
        seconds = max(1, round(connect_timeout))
        server_side = (
            f"-c idle_in_transaction_session_timeout={max(1000, int(2000 * connect_timeout))}"
            f" -c tcp_keepalives_idle={seconds} -c tcp_keepalives_interval=1 -c tcp_keepalives_count=3"
        )
        options["options"] = f"{self.params['options']} {server_side}" if self.params.get("options") else server_side
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

        self.fence_single_writers = q("UPDATE {s}.pool_state SET writer_epoch = writer_epoch + 1")
        # First in every write: every replica's decisions queue up here.
        self.lock = q("SELECT version, fencing_token, last_sequence FROM {s}.pool_state FOR UPDATE")
        self.head = q("SELECT version, fencing_token, last_sequence FROM {s}.pool_state")
        self.changes_after = q("SELECT version, body FROM {s}.changes WHERE version > %s ORDER BY version")
        self.events_all_after = q(
            "SELECT {columns} FROM {s}.events WHERE sequence > %s ORDER BY sequence", _EVENT_COLUMNS
        )
        # Last in every write; the counters never go back.
        self.advance = q(
            "UPDATE {s}.pool_state SET version = %s, fencing_token = GREATEST(fencing_token, %s),"
            " last_sequence = GREATEST(last_sequence, %s)"
        )
        self.insert_change = q("INSERT INTO {s}.changes (version, at, body) VALUES (%s, %s, %s)")
        self.prune_changes = q("DELETE FROM {s}.changes WHERE at < %s")
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
        # In the order `usage.summarize` takes records in: ties in time broken by request id.
        self.usage = q("SELECT {columns} FROM {s}.usage ORDER BY at, request_id", _USAGE_COLUMNS)
        self.usage_since = q("SELECT {columns} FROM {s}.usage WHERE at >= %s ORDER BY at, request_id", _USAGE_COLUMNS)
        self.event_at = q("SELECT at FROM {s}.events WHERE sequence = %s")
        self.charged = q("SELECT subscription_id FROM {s}.usage WHERE request_id = %s")
        self.counters = q(
            "SELECT fencing_token, GREATEST(last_sequence, (SELECT COALESCE(MAX(sequence), 0) FROM {s}.events)),"
            " version FROM {s}.pool_state"
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
        self._usage_sql = UsageStatements(schema)
        self._pool: AsyncConnectionPool[Connection] | None = None
        # NOTIFY channels are identifiers (at most 63 bytes): a long schema's
        # name is cut, and a shared prefix only costs a spurious wake-up.
        self.channel = f"authpool_{schema}"[:63]
        self._changes_pruned_at = 0.0
        self._used_at: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"PostgresStore({self._target.where!r}, schema={self.schema!r})"

    # -- lifecycle ----------------------------------------------------------------

    async def open(self, plan: UsagePlanner = everything) -> Snapshot:
        if self._pool is not None:
            raise RuntimeError("the PostgreSQL store is already open")
        async with self._target.guard("open"), await self._target.connect(self._connect_timeout) as conn:
            await _migrate(conn, self.schema)
            # A server of the release before replicas checks `writer_epoch` in every write:
            # bumping it fences such a server out during a rolling upgrade, instead of letting
            # it write beside us without change records. (This release never reads it.)
            await conn.execute(self._sql.fence_single_writers)
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
            return await self.load(plan)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- the contract -------------------------------------------------------------

    async def load(self, plan: UsagePlanner = everything) -> Snapshot:
        s = self._sql
        async with self._connection("load") as conn, conn.transaction():
            # One snapshot of every table, even with a writer at work.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            live = [_lease_from_row(r) for r in await (await conn.execute(s.live_leases)).fetchall()]
            ended = [
                EndedLease(_lease_from_row(r), r[13]) for r in await (await conn.execute(s.ended_leases)).fetchall()
            ]
            token, last_sequence, version = await (await conn.execute(s.counters)).fetchone() or (0, 0, 0)
            newest = await (await conn.execute(s.event_at, (last_sequence,))).fetchone()
            usage_plan = plan(None if newest is None else newest[0])
            # The records the ledgers replay come back whole; the older ones summarised where they are.
            since = usage_plan.recent_since
            cur = await (conn.execute(s.usage_since, (since,)) if since > -math.inf else conn.execute(s.usage))
            recent = [_usage_from_row(r) for r in await cur.fetchall()]
            early = await early_usage(conn, self._usage_sql, usage_plan)
            flags = [SubscriptionFlags(*r) for r in await (await conn.execute(s.flags)).fetchall()]
            delivered_state = (DeliveryState.DELIVERED.value,)
            outbox = [outbox_from_row(r) for r in await (await conn.execute(s.undelivered, delivered_state)).fetchall()]
            delivered = (await (await conn.execute(s.delivered, delivered_state)).fetchone() or (0,))[0]
        return Snapshot(live, ended, recent, last_sequence, token, flags, outbox, delivered, version, early)

    async def charged(self, request_id: str) -> str | None:
        async with self._connection("charged") as conn:
            row = await (await conn.execute(self._sql.charged, (request_id,))).fetchone()
        return None if row is None else str(row[0])

    async def spend_before(self, before: float, starts: Mapping[str, Sequence[float]]) -> dict[str, tuple[int, ...]]:
        async with self._connection("spend_before") as conn:
            spend = {}
            for sid, sub_starts in starts.items():
                sums = []
                for start in sub_starts:
                    row = await (await conn.execute(self._usage_sql.spend, (sid, start, before))).fetchone()
                    sums.append(int(row[0]) if row else 0)
                spend[sid] = tuple(sums)
        return spend

    async def write(self, batch: WriteBatch) -> None:
        """Write a batch decided without looking at other replicas' writes (the plain store contract)."""
        await self._locked(lambda _: batch, catch_up=None)

    async def exchange(self, version: int, sequence: int, decide: Callable[[CatchUp], WriteBatch]) -> int:
        return await self._locked(decide, catch_up=(version, sequence))

    async def catch_up(self, version: int, sequence: int) -> CatchUp:
        async with self._connection("catch_up") as conn, conn.pipeline() as pipeline, conn.transaction():
            # One snapshot: the records and events agree with the pool row read.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return await self._read_since(conn, pipeline, self._sql.head, version, sequence)

    async def follow(self, on_change: Callable[[int], None], on_leadership: Callable[[bool], None]) -> None:
        """This replica's link to the others, until cancelled; see the module's docstring.

        `on_change(version)` is called for every commit another replica (or
        this one) makes, and once per poll with the newest version known, so
        a notification lost with a connection costs one poll at most.
        `on_leadership(True)` once this replica holds the background-work
        lock, `on_leadership(False)` as soon as it may no longer hold it.
        """
        key = lock_key("leader", self.schema)
        leading = False
        while True:
            try:
                async with await self._target.connect(self._connect_timeout) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    # This session speaks every poll; one silent for several polls belongs to a replica
                    # the network lost, and ending it frees the lead (PostgreSQL 14+; older: keepalives).
                    with contextlib.suppress(psycopg.errors.UndefinedObject):
                        await conn.execute(f"SET idle_session_timeout = {int(_SILENT_LEADER_SECONDS * 1000)}")
                    while True:
                        async with asyncio.timeout(self._command_timeout):
                            if leading:
                                cur = await conn.execute(self._sql.head)  # proves the session, so the lock, lives
                            else:
                                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                                leading = bool((await cur.fetchone() or (False,))[0])
                                if leading:
                                    log.info("this replica now runs the background work")
                                    on_leadership(True)
                                cur = await conn.execute(self._sql.head)
                            row = await cur.fetchone()
                        if row is not None:
                            on_change(int(row[0]))
                        async for notice in conn.notifies(timeout=FOLLOW_POLL_SECONDS):
                            version, _, schema = notice.payload.partition(" ")
                            if schema == self.schema:
                                on_change(int(version))
            except Exception as error:
                # The session is gone, and with it the lock: stop leading at once.
                if leading:
                    leading = False
                    on_leadership(False)
                log.warning(
                    "lost the PostgreSQL connection that follows other replicas; reconnecting",
                    extra={"context": {"error": self._target.scrub(error)}},
                )
                await asyncio.sleep(FOLLOW_POLL_SECONDS)

    async def _read_since(
        self, conn: Connection, pipeline: AsyncPipeline, head_query: bytes, version: int, sequence: int
    ) -> CatchUp:
        """The pool row (read with `head_query`) and what was committed after `version` and `sequence`."""
        s = self._sql
        head = await conn.execute(head_query)
        changes = await conn.execute(s.changes_after, (version,))
        events = await conn.execute(s.events_all_after, (sequence,))
        # A Sync, not just a flush: the server then counts the session as idle in its transaction
        # while we decide, so `idle_in_transaction_session_timeout` ends it if we never come back.
        await pipeline.sync()
        current, token, last_sequence = await head.fetchone() or (0, 0, 0)
        records = [decode_change(v, body) for v, body in await changes.fetchall()]
        if current < version or last_sequence < sequence:
            # Restored from a backup, or failed over to a standby that had not caught up: the
            # database is the truth, and this replica's memory is ahead of it.
            raise ReplicaBehind(
                f"the store went back: it is at version {current} (sequence {last_sequence}), this replica at "
                f"{version} ({sequence})"
            )
        # Versions are assigned under the lock, one per commit: a gap means pruned records.
        if [c.version for c in records] != list(range(version + 1, current + 1)):
            raise ReplicaBehind(
                f"this replica is at version {version}, the store at {current}, and the change records between "
                "are not all there"
            )
        return CatchUp(current, token, last_sequence, records, [_event_from_row(r) for r in await events.fetchall()])

    async def _locked(self, decide: Callable[[CatchUp], WriteBatch], *, catch_up: tuple[int, int] | None) -> int:
        """One write under the pool lock, and the version it made current.

        With `catch_up` (version, sequence), `decide` sees what the others
        committed after them.
        """
        s = self._sql
        async with self._connection("write") as conn, conn.pipeline() as pipeline, conn.transaction():
            if catch_up is None:
                cur = await conn.execute(s.lock)
                await pipeline.sync()  # as in `_read_since`
                current, token, last_sequence = await cur.fetchone() or (0, 0, 0)
                seen = CatchUp(current, token, last_sequence, [], [])
            else:
                seen = await self._read_since(conn, pipeline, s.lock, *catch_up)
            batch = decide(seen)
            if not (
                batch.leases or batch.ended or batch.usage or batch.events or batch.flags or batch.outbox or batch.prune
            ):
                return seen.version  # nothing to write: the commit just lets go of the lock
            version = seen.version + 1
            now = time.time()
            last_sequence = batch.events[-1].sequence if batch.events else 0
            cur = conn.cursor()
            if batch.leases:
                await cur.executemany(s.upsert_lease, [_lease_row(lease) for lease in batch.leases])
            if batch.ended:
                await cur.executemany(s.upsert_lease, [_lease_row(e.lease, e.ended_at) for e in batch.ended])
            if batch.usage:
                await cur.executemany(s.insert_usage, [usage_row(u) for u in batch.usage])
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
            await cur.execute(s.insert_change, (version, now, encode_change(batch)))
            if now - self._changes_pruned_at >= _CHANGE_PRUNE_EVERY_SECONDS:
                self._changes_pruned_at = now
                await cur.execute(s.prune_changes, (now - CHANGE_RETENTION_SECONDS,))
            await cur.execute(s.advance, (version, batch.fencing_token, last_sequence))
            # Delivered at commit, in commit order: the version now committed, and whose (a long
            # schema name's channel may be shared).
            await cur.execute("SELECT pg_notify(%s, %s)", (self.channel, f"{version} {self.schema}"))
        return version

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
