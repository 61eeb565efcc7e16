"""One contract, every store: what a `WriteBatch` writes, `load()` gives back, on SQLite, in memory and on PostgreSQL.

Everything goes through the public `Store` methods. The contract tests run
against each store; the PostgreSQL tests after them are about what only a
server can do: migrations raced by several tasks and processes, a database
that cannot be reached or stops answering, a DSN's password, and what
replicas sharing a schema rely on (the pool lock, the change log, the
background-work lock). Each PostgreSQL test has a schema of its own,
dropped afterwards. (They skip when no server is reachable, unless `CI` is
set: see `postgres_dsn` in conftest.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from authpool_server.domain import (
    DeliveryState,
    EndedLease,
    Event,
    EventType,
    Lease,
    OutboxEntry,
    Outcome,
    Severity,
    UsageRecord,
)
from authpool_server.errors import StartupRefused, StoreUnavailable
from authpool_server.ledger import SubscriptionFlags
from authpool_server.store.base import PruneHorizon, Snapshot, Store, WriteBatch
from authpool_server.store.memory import MemoryStore
from authpool_server.store.postgres import PostgresStore, lock_key, migrate, migrations
from authpool_server.store.replication import CatchUp, ReplicaBehind
from authpool_server.store.sqlite import SQLiteStore
from authpool_server.store.usage import UsagePlan, UsagePlanner, everything, summarize
from tests.conftest import secret

T0 = 1_764_000_000.123456  # a time with every digit a float8 must keep
PASSWORD = secret("pg-password-5d1e9b7c3a")


# -- the stores ----------------------------------------------------------------------


@dataclass
class Backend:
    """One kind of store; `make` gives a new store over the same durable state (a restart)."""

    name: str
    make: Callable[[], Store]
    closed: list[Store] = field(default_factory=list)

    @property
    def durable(self) -> bool:
        """Whether a store can be closed and another opened over the same state."""
        return self.name != "memory"


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", lambda: SQLiteStore(tmp_path / "authpool.sqlite3"))
    if request.param == "memory":
        memory = MemoryStore()
        return Backend("memory", lambda: memory)
    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("pg_schema")
    return Backend("postgres", lambda: PostgresStore(dsn, schema=schema, connect_timeout=3))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    store = backend.make()
    await store.open()
    try:
        yield store
    finally:
        if store not in backend.closed:
            await store.close()


async def reopened(backend: Backend, store: Store, plan: UsagePlanner = everything) -> Snapshot:
    """Close `store`, open a new one over the same state (as a restart does) and return what it loads."""
    if not backend.durable:
        return await store.load(plan)
    await store.close()
    backend.closed.append(store)
    again = backend.make()
    try:
        return await again.open(plan)
    finally:
        await again.close()


# -- values --------------------------------------------------------------------------


def lease(n: int, **changes: Any) -> Lease:
    base = Lease(
        lease_id=f"lease-{n}",
        client_id=f"client-{n}",
        session_id=f"session-{n}",
        subscription_id="sub1",
        fallback=False,
        granted_at=T0 + n,
        expires_at=T0 + n + 60.5,
        fencing_token=n,
        acked_token=n,
        last_used_at=T0 + n + 0.25,
    )
    return replace(base, **changes)


def usage(request_id: str, at: float = T0, **changes: Any) -> UsageRecord:
    base = UsageRecord(
        request_id=request_id,
        lease_id="lease-1",
        client_id="client-1",
        subscription_id="sub1",
        fallback=False,
        at=at,
        cost_micros=2_500_001,
        input_tokens=1200,
        output_tokens=340,
        model="claude-sonnet-4",
        outcome=Outcome.OK,
    )
    return replace(base, **changes)


def event(sequence: int, at: float = T0, **changes: Any) -> Event:
    base = Event(
        sequence=sequence,
        at=at,
        type=EventType.LEASE_GRANTED,
        subscription_id="sub1",
        client_id=f"client-{sequence}",
        lease_id=f"lease-{sequence}",
        fencing_token=sequence,
        attributes=(("decision", "new"), ("reason", "least loaded: 1/2 clients")),
    )
    return replace(base, **changes)


def notification(n: int, state: DeliveryState = DeliveryState.PENDING, **changes: Any) -> OutboxEntry:
    base = OutboxEntry(
        notification_id=f"evt-{n}-0",
        event_sequence=n,
        rule="usage_threshold",
        severity=Severity.INFO,
        body='{"type":"usage_threshold","data":{"subscription_id":"sub1","ppm":850000}}',
        state=state,
        attempts=0,
        next_attempt_at=T0 + n,
        last_error="",
        updated_at=T0 + n,
    )
    return replace(base, **changes)


def normal(snapshot: Snapshot) -> Snapshot:
    """`snapshot` with its lists in a fixed order (stores return rows in any order)."""
    return replace(
        snapshot,
        live_leases=sorted(snapshot.live_leases, key=lambda x: x.lease_id),
        ended_leases=sorted(snapshot.ended_leases, key=lambda x: x.lease.lease_id),
        usage=sorted(snapshot.usage, key=lambda x: x.request_id),
        flags=sorted(snapshot.flags, key=lambda x: x.subscription_id),
        outbox=sorted(snapshot.outbox, key=lambda x: x.notification_id),
    )


async def all_events(store: Store, page: int = 4) -> list[Event]:
    found: list[Event] = []
    while batch := await store.events_after(found[-1].sequence if found else 0, page):
        found.extend(batch)
    return found


# -- the contract --------------------------------------------------------------------


async def test_a_new_store_is_empty(store: Store) -> None:
    assert await store.load() == Snapshot([], [], [], 0, 0, [], [], 0)
    assert await store.first_sequence() == 0
    assert await store.events_after(0, 10) == []
    await store.ping()


async def test_every_field_of_a_batch_comes_back_and_survives_a_restart(backend: Backend, store: Store) -> None:
    live = lease(
        1,
        fallback=True,
        subscription_id="fallback",
        wanted_type="claude-max",
        labels=(("team", "search"), ("env", "prod"), ("team", "again")),
        history=((1, "sub2"), (3, "sub1")),
        fencing_token=4,
        acked_token=3,
    )
    ended = EndedLease(lease(2, labels=(("a", "b"),)), T0 + 99.75)
    records = [
        usage("req-1"),
        usage("req-2", at=T0 + 1, fallback=True, subscription_id="fallback", outcome=Outcome.RATE_LIMITED),
        usage("req-3", provider_remaining_ppm=123_456, provider_reset_at=T0 + 7 * 86_400),
        usage("req-4", provider_remaining_ppm=0, outcome=Outcome.AUTH_FAILED, cost_micros=0),
    ]
    events = [
        event(1),
        event(2, type=EventType.SUBSCRIPTION_STATUS_CHANGED, client_id="", lease_id="", fencing_token=0),
        event(3, attributes=()),
    ]
    flags = [SubscriptionFlags("sub1", draining=True), SubscriptionFlags("sub2", resumed_at=T0 + 5)]
    outbox = [
        notification(1),
        notification(2, DeliveryState.DEAD, attempts=8, last_error="HTTP 500 from the receiver"),
        notification(3, DeliveryState.DELIVERED, attempts=1),
    ]
    await store.write(
        WriteBatch(
            leases=[live], ended=[ended], usage=records, events=events, flags=flags, outbox=outbox, fencing_token=4
        )
    )
    expected = Snapshot(
        live_leases=[live],
        ended_leases=[ended],
        usage=records,
        last_sequence=3,
        fencing_token=4,
        flags=flags,
        outbox=outbox[:2],  # the delivered one is only counted
        delivered_notifications=1,
        version=1 if backend.name == "postgres" else 0,  # writes committed: a shared store counts them
    )
    assert normal(await store.load()) == expected
    assert await store.events_after(0, 10) == events
    assert normal(await reopened(backend, store)) == expected


async def test_later_writes_update_what_earlier_ones_wrote(store: Store) -> None:
    granted = lease(1)
    await store.write(
        WriteBatch(
            leases=[granted],
            flags=[SubscriptionFlags("sub1", draining=True)],
            outbox=[notification(1), notification(2)],
            fencing_token=1,
        )
    )
    moved = replace(
        granted,
        subscription_id="sub2",
        fencing_token=2,
        expires_at=T0 + 500,
        last_used_at=T0 + 400,
        history=((1, "sub1"),),
    )
    await store.write(
        WriteBatch(
            leases=[moved],
            flags=[SubscriptionFlags("sub1", draining=False, resumed_at=T0 + 9)],
            outbox=[
                notification(1, DeliveryState.DELIVERED, attempts=1, updated_at=T0 + 50),
                notification(2, attempts=1, next_attempt_at=T0 + 60, last_error="timed out", updated_at=T0 + 50),
            ],
            fencing_token=2,
        )
    )
    snapshot = await store.load()
    assert snapshot.live_leases == [moved]
    assert snapshot.flags == [SubscriptionFlags("sub1", draining=False, resumed_at=T0 + 9)]
    assert snapshot.outbox == [
        notification(2, attempts=1, next_attempt_at=T0 + 60, last_error="timed out", updated_at=T0 + 50)
    ]
    assert snapshot.delivered_notifications == 1
    assert snapshot.fencing_token == 2

    await store.write(WriteBatch(ended=[EndedLease(moved, T0 + 600)]))
    snapshot = await store.load()
    assert snapshot.live_leases == []
    assert snapshot.ended_leases == [EndedLease(moved, T0 + 600)]
    assert snapshot.fencing_token == 2  # a batch without a token leaves it alone


async def test_a_lease_granted_and_ended_in_one_group_commit_is_ended(store: Store) -> None:
    # Group commit merges decisions: the grant's upsert comes first, then the release's.
    granted = lease(1)
    await store.write(
        WriteBatch(leases=[granted, replace(granted, expires_at=T0 + 90)], ended=[EndedLease(granted, T0 + 5)])
    )
    snapshot = await store.load()
    assert snapshot.live_leases == []
    assert snapshot.ended_leases == [EndedLease(granted, T0 + 5)]


async def test_usage_is_recorded_once_per_request_id(backend: Backend, store: Store) -> None:
    first = usage("req-1", cost_micros=1_000)
    await store.write(WriteBatch(usage=[first, usage("req-1", cost_micros=2_000)]))
    await store.write(WriteBatch(usage=[usage("req-1", cost_micros=3_000), usage("req-2")]))
    assert normal(await store.load()).usage == [first, usage("req-2")]
    assert normal(await reopened(backend, store)).usage == [first, usage("req-2")]


def usage_history() -> list[UsageRecord]:
    """Records of every kind the ledgers summarise, in the order written (request ids sort the same way)."""
    kinds: list[dict[str, Any]] = [
        {},
        {"provider_remaining_ppm": 400_000},
        {"outcome": Outcome.RATE_LIMITED},
        {"provider_reset_at": T0 + 9_000, "outcome": Outcome.RATE_LIMITED},
        {"outcome": Outcome.AUTH_FAILED},
        {"outcome": Outcome.SERVER_ERROR},
        {"outcome": Outcome.AUTH_FAILED},
        {"fallback": True, "subscription_id": "fallback"},
        {"subscription_id": "gone"},  # not in the plan
        {"subscription_id": "sub2", "provider_remaining_ppm": 900_000},
    ]
    records = []
    for n in range(60):
        # Every fifth record shares its time with the one before: the store's order breaks the tie, as written.
        at = T0 + 100 * (n - n % 5 // 4)
        records.append(usage(f"req-{n:03d}", at=at, cost_micros=1_000 + n, **kinds[n * 7 % len(kinds)]))
    return records


async def test_a_usage_plan_gives_the_recent_records_and_summarises_the_rest(backend: Backend, store: Store) -> None:
    records = usage_history()
    for first in range(0, len(records), 7):  # several batches, as group commit makes them
        await store.write(WriteBatch(usage=records[first : first + 7]))
    await store.write(WriteBatch(events=[event(1, at=T0 + 4_000)]))
    asked: list[float | None] = []

    def plan(newest_event_at: float | None) -> UsagePlan:
        asked.append(newest_event_at)
        # Window starts between two records, on one, and before all; every record from 3,850 s on comes back whole.
        return UsagePlan(T0 + 4_000, T0 + 3_850, {"sub1": (T0 + 950, T0 + 2_000, T0 - 1), "sub2": (T0 + 3_000,)})

    recent, early = summarize(records, plan(T0 + 4_000))
    # The history has a case of each thing the summary keeps.
    assert 5 < len(recent) < len(records)
    assert early.fallback
    sub1 = early.subscriptions["sub1"]
    assert all((sub1.auth_failures, sub1.provider_remaining_ppm, sub1.provider_reset_at, sub1.rate_limited_at))
    ids = summarize(records, plan(T0 + 4_000), request_ids=True)[1].request_ids
    assert ids
    asked.clear()
    for snapshot in (await store.load(plan), await reopened(backend, store, plan)):
        # A store gives the old records' request ids, or answers for them with `charged`. Replicas
        # must give them: they hold them, as asking would cost each usage report a round trip.
        assert snapshot.early.request_ids in ((ids,) if backend.name == "postgres" else (None, ids))
        assert (snapshot.usage, replace(snapshot.early, request_ids=None)) == (recent, early)
    assert asked == [T0 + 4_000, T0 + 4_000]


async def test_a_summary_counts_every_auth_failure_when_no_success_is_older(backend: Backend, store: Store) -> None:
    # sub1 never succeeded; sub2's success shares its time with the failures around it, so only order decides.
    records = [
        usage("req-01", at=T0, outcome=Outcome.AUTH_FAILED),
        usage("req-02", at=T0 + 10, outcome=Outcome.AUTH_FAILED),
        usage("req-03", at=T0 + 10, subscription_id="sub2", outcome=Outcome.AUTH_FAILED),
        usage("req-04", at=T0 + 10, subscription_id="sub2"),
        usage("req-05", at=T0 + 10, subscription_id="sub2", outcome=Outcome.AUTH_FAILED),
        usage("req-06", at=T0 + 500, outcome=Outcome.AUTH_FAILED),  # recent: replayed, not summarised
    ]
    await store.write(WriteBatch(usage=records))

    def plan(newest_event_at: float | None) -> UsagePlan:
        return UsagePlan(T0 + 600, T0 + 100, {"sub1": (T0 - 1,), "sub2": (T0 - 1,)})

    recent, early = summarize(records, plan(None), request_ids=True)
    assert early.subscriptions["sub1"].auth_failures == (T0, T0 + 10)
    assert early.subscriptions["sub2"].auth_failures == (T0 + 10,)
    given = (early.request_ids,) if backend.name == "postgres" else (None, early.request_ids)
    for snapshot in (await store.load(plan), await reopened(backend, store, plan)):
        assert snapshot.early.request_ids in given
        assert (snapshot.usage, replace(snapshot.early, request_ids=early.request_ids)) == (recent, early)


async def test_a_record_is_found_by_its_request_id(backend: Backend, store: Store) -> None:
    await store.write(WriteBatch(usage=[usage("req-1", subscription_id="sub2"), usage("req-2")]))
    assert [await store.charged(r) for r in ("req-1", "req-2", "req-3")] == ["sub2", "sub1", None]
    await store.write(WriteBatch(prune=PruneHorizon(T0 + 1, T0 + 1, T0 + 1)))
    assert await store.charged("req-1") is None


async def test_spend_before_sums_each_window_up_to_the_horizon(store: Store) -> None:
    records = usage_history()
    await store.write(WriteBatch(usage=records))
    starts = {"sub1": (T0 - 1, T0 + 950, T0 + 5_000), "sub2": (T0,), "sub3": (T0,)}
    expected = {
        sid: tuple(
            sum(
                r.cost_micros for r in records if r.subscription_id == sid and not r.fallback and s <= r.at < T0 + 3_000
            )
            for s in sub_starts
        )
        for sid, sub_starts in starts.items()
    }
    assert expected["sub1"][0] > expected["sub1"][1] > 0 == expected["sub1"][2]
    assert await store.spend_before(T0 + 3_000, starts) == expected


async def test_events_come_back_in_order_a_page_at_a_time(store: Store) -> None:
    sequence = 0
    for size in (1, 7, 3, 14):  # batches of several sizes, as group commit makes them
        batch = [event(sequence + i, at=T0 + sequence + i) for i in range(1, size + 1)]
        sequence += size
        await store.write(WriteBatch(events=batch))
    assert [e.sequence for e in await store.events_after(0, 10)] == list(range(1, 11))
    assert [e.sequence for e in await store.events_after(7, 3)] == [8, 9, 10]
    assert [e.sequence for e in await store.events_after(20, 100)] == [21, 22, 23, 24, 25]
    assert await store.events_after(25, 10) == []
    assert await all_events(store) == [event(n, at=T0 + n) for n in range(1, 26)]
    assert await store.first_sequence() == 1
    assert (await store.load()).last_sequence == 25


async def test_pruning_removes_only_what_is_older_than_its_horizon(backend: Backend, store: Store) -> None:
    old, new = T0, T0 + 1000
    await store.write(
        WriteBatch(
            leases=[lease(1, granted_at=old, expires_at=old, last_used_at=old)],  # live: never pruned
            ended=[EndedLease(lease(2), old), EndedLease(lease(3), new)],
            usage=[usage("req-old", at=old), usage("req-new", at=new)],
            events=[event(1, at=old), event(2, at=old), event(3, at=new), event(4, at=new)],
            outbox=[
                notification(1, updated_at=old),  # pending: kept whatever its age
                notification(2, DeliveryState.DELIVERED, updated_at=old),
                notification(3, DeliveryState.DEAD, updated_at=old),
                notification(4, DeliveryState.DELIVERED, updated_at=new),
                notification(5, DeliveryState.DEAD, updated_at=new),
            ],
            fencing_token=3,
        )
    )
    horizon = PruneHorizon(usage_before=new - 1, ended_leases_before=new - 1, events_before=new - 1)
    await store.write(WriteBatch(prune=horizon))
    expected_outbox = [notification(1, updated_at=old), notification(5, DeliveryState.DEAD, updated_at=new)]
    for snapshot in (await store.load(), await reopened(backend, store)):
        snapshot = normal(snapshot)
        assert [x.lease_id for x in snapshot.live_leases] == ["lease-1"]
        assert snapshot.ended_leases == [EndedLease(lease(3), new)]
        assert [u.request_id for u in snapshot.usage] == ["req-new"]
        assert snapshot.outbox == expected_outbox
        assert snapshot.delivered_notifications == 1
        assert (snapshot.last_sequence, snapshot.fencing_token) == (4, 3)


async def test_the_counters_survive_pruning_every_row(backend: Backend, store: Store) -> None:
    await store.write(WriteBatch(events=[event(1), event(2), event(3)], fencing_token=7))
    await store.write(WriteBatch(events=[event(4, at=T0 + 10)], prune=PruneHorizon(T0 + 5, T0 + 5, T0 + 5)))
    assert await store.first_sequence() == 4
    assert [e.sequence for e in await store.events_after(0, 10)] == [4]
    everything = PruneHorizon(T0 + 100, T0 + 100, T0 + 100)
    await store.write(WriteBatch(prune=everything))
    assert await store.first_sequence() == 0
    assert await store.events_after(0, 10) == []
    # Nothing left to count from, and still no sequence number or token can be handed out twice.
    snapshot = await reopened(backend, store)
    assert (snapshot.last_sequence, snapshot.fencing_token) == (4, 7)


async def test_a_failed_write_leaves_nothing_behind(backend: Backend, store: Store) -> None:
    if backend.name == "memory":
        pytest.skip("the memory store has no transactions: it only fails when told to")
    await store.write(WriteBatch(leases=[lease(1)], events=[event(1)], fencing_token=1))
    before = await store.load()
    # Everything in this batch is fine except its last event, which repeats a sequence number.
    doomed = WriteBatch(
        leases=[lease(2)],
        ended=[EndedLease(lease(1), T0 + 9)],
        usage=[usage("req-1")],
        flags=[SubscriptionFlags("sub1", draining=True)],
        outbox=[notification(2)],
        events=[event(2), event(1)],
        fencing_token=2,
    )
    with pytest.raises(Exception):  # noqa: B017, PT011 - each store has its own integrity error
        await store.write(doomed)
    assert normal(await store.load()) == normal(before)
    assert await store.events_after(0, 10) == [event(1)]
    await store.write(WriteBatch(events=[event(2)]))  # and the store goes on
    assert (await store.load()).last_sequence == 2


# -- PostgreSQL: migrations ----------------------------------------------------------


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=3)


async def applied(dsn: str, schema: str) -> list[tuple[int, str]]:
    async with await connect(dsn) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT version, name FROM {}.schema_migrations ORDER BY version").format(sql.Identifier(schema))
        )
        return [(version, name) for version, name in await cur.fetchall()]


KNOWN = [(m.version, m.name) for m in migrations()]


async def test_migrations_are_numbered_files_shipped_with_the_package() -> None:
    assert KNOWN[0] == (1, "0001_initial")
    assert [version for version, _ in KNOWN] == list(range(1, len(KNOWN) + 1))


@contextlib.asynccontextmanager
async def migration_lock_held(dsn: str, schema: str, waiters: int) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Hold the migration lock; `wait()` returns once `waiters` others queue for it. Released on exit."""
    async with await connect(dsn) as conn, conn.transaction():
        key = lock_key("migrate", schema)
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))

        async def wait() -> None:
            async with asyncio.timeout(15), await connect(dsn) as probe:
                while True:
                    cur = await probe.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                        " AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = %s",
                        (key,),
                    )
                    if (await cur.fetchone() or (0,))[0] >= waiters:
                        return
                    await asyncio.sleep(0.02)

        yield wait


async def test_tasks_racing_to_migrate_apply_each_migration_once(postgres_dsn: str, pg_schema: str) -> None:
    async with migration_lock_held(postgres_dsn, pg_schema, waiters=6) as everyone_waits:
        racers = [asyncio.create_task(migrate(postgres_dsn, pg_schema)) for _ in range(6)]
        await everyone_waits()  # all six are queued on the lock: released, they race
    results = await asyncio.gather(*racers)
    assert sorted(results) == [[]] * 5 + [[name for _, name in KNOWN]]
    assert await applied(postgres_dsn, pg_schema) == KNOWN
    assert await migrate(postgres_dsn, pg_schema) == []


@pytest.mark.slow
async def test_processes_racing_to_migrate_apply_each_migration_once(postgres_dsn: str, pg_schema: str) -> None:
    script = (
        "import asyncio, json, os\n"
        "from authpool_server.store.postgres import migrate\n"
        "print(json.dumps(asyncio.run(migrate(os.environ['DSN'], os.environ['SCHEMA']))))\n"
    )
    env = {**os.environ, "DSN": postgres_dsn, "SCHEMA": pg_schema}
    async with migration_lock_held(postgres_dsn, pg_schema, waiters=4) as everyone_waits:
        processes = [
            await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env, stdout=asyncio.subprocess.PIPE)
            for _ in range(4)
        ]
        await everyone_waits()
    outputs = [await asyncio.wait_for(p.communicate(), 30) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4
    results = sorted(json.loads(out) for out, _ in outputs)
    assert results == [[]] * 3 + [[name for _, name in KNOWN]]
    assert await applied(postgres_dsn, pg_schema) == KNOWN


async def test_open_migrates_and_a_reopen_finds_nothing_to_do(postgres_dsn: str, pg_schema: str) -> None:
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    await store.close()
    assert await applied(postgres_dsn, pg_schema) == KNOWN
    assert await migrate(postgres_dsn, pg_schema) == []


async def test_a_schema_newer_than_the_server_is_refused(postgres_dsn: str, pg_schema: str) -> None:
    await migrate(postgres_dsn, pg_schema)
    async with await connect(postgres_dsn) as conn:
        await conn.execute(
            sql.SQL("INSERT INTO {}.schema_migrations (version, name, checksum) VALUES (%s, %s, '')").format(
                sql.Identifier(pg_schema)
            ),
            (len(KNOWN) + 1, "9999_from_the_future"),
        )
    with pytest.raises(StartupRefused, match="newer than this server knows"):
        await migrate(postgres_dsn, pg_schema)
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    with pytest.raises(StartupRefused, match="9999_from_the_future"):
        await store.open()
    await store.close()


async def test_a_migration_edited_after_it_was_applied_is_refused(postgres_dsn: str, pg_schema: str) -> None:
    await migrate(postgres_dsn, pg_schema)
    async with await connect(postgres_dsn) as conn:
        await conn.execute(
            sql.SQL("UPDATE {}.schema_migrations SET checksum = 'edited' WHERE version = 1").format(
                sql.Identifier(pg_schema)
            )
        )
    with pytest.raises(StartupRefused, match="0001_initial was applied from a different file"):
        await migrate(postgres_dsn, pg_schema)


# -- PostgreSQL: replicas sharing a schema -------------------------------------------


def appended(seen: CatchUp, *types: EventType, **rows: Any) -> WriteBatch:
    """A decision on what `seen` says: events numbered on from the pool row's sequence, as the pool does."""
    events = [event(seen.last_sequence + i, type=t) for i, t in enumerate(types, start=1)]
    return WriteBatch(events=events, fencing_token=seen.fencing_token + 1, **rows)


async def test_each_replica_catches_up_on_the_others_writes(postgres_dsn: str, pg_schema: str) -> None:
    a = PostgresStore(postgres_dsn, schema=pg_schema)
    b = PostgresStore(postgres_dsn, schema=pg_schema)
    await a.open()
    await b.open()
    try:
        granted = lease(1)
        version = await a.exchange(0, 0, lambda seen: appended(seen, EventType.LEASE_GRANTED, leases=[granted]))
        assert version == 1
        seen_by_b: list[CatchUp] = []

        def decide_on_b(seen: CatchUp) -> WriteBatch:
            seen_by_b.append(seen)
            return appended(seen, EventType.LEASE_RELEASED, ended=[EndedLease(granted, T0 + 9)])

        assert await b.exchange(0, 0, decide_on_b) == 2
        (seen,) = seen_by_b
        # B decided on A's write: its rows, its events, and the counters after it.
        assert (seen.version, seen.last_sequence, seen.fencing_token) == (1, 1, 1)
        assert [c.leases for c in seen.changes] == [[granted]]
        assert [e.type for e in seen.events] == [EventType.LEASE_GRANTED]
        # And A, between its own writes, catches up on B's without the lock.
        later = await a.catch_up(1, 1)
        assert (later.version, [c.ended for c in later.changes]) == (2, [[EndedLease(granted, T0 + 9)]])
        assert [e.sequence for e in later.events] == [2]
        assert (await a.load()).version == 2
    finally:
        await a.close()
        await b.close()


async def test_decisions_of_racing_replicas_are_serialised_and_gapless(postgres_dsn: str, pg_schema: str) -> None:
    stores = [PostgresStore(postgres_dsn, schema=pg_schema, pool_max=2) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        # Each replica knows only its own writes; the lock makes each decision see all of them.
        known = dict.fromkeys(range(3), (0, 0))
        deciding = 0

        async def replica(index: int) -> None:
            nonlocal deciding
            for _ in range(20):

                def decide(seen: CatchUp) -> WriteBatch:
                    nonlocal deciding
                    deciding += 1
                    assert deciding == 1, "two replicas decided at once"
                    deciding -= 1
                    known[index] = (seen.version + 1, seen.last_sequence + 2)
                    return appended(seen, EventType.LEASE_GRANTED, EventType.LEASE_RELEASED)

                await stores[index].exchange(*known[index], decide)

        await asyncio.gather(*(replica(i) for i in range(3)))
        sequences = [e.sequence for e in await all_events(stores[0], page=500)]
        assert sequences == list(range(1, 121))
        snapshot = await stores[1].load()
        assert (snapshot.version, snapshot.last_sequence, snapshot.fencing_token) == (60, 120, 60)
    finally:
        for store in stores:
            await store.close()


@contextlib.asynccontextmanager
async def three_writes(dsn: str, schema: str) -> AsyncIterator[PostgresStore]:
    """An open store at version 3 (sequence 3), closed afterwards."""
    store = PostgresStore(dsn, schema=schema)
    await store.open()
    try:
        for n in range(1, 4):
            await store.write(WriteBatch(events=[event(n)], fencing_token=n))
        yield store
    finally:
        await store.close()


async def test_a_replica_whose_change_records_were_pruned_must_reload(postgres_dsn: str, pg_schema: str) -> None:
    async with three_writes(postgres_dsn, pg_schema) as store:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            await conn.execute(sql.SQL("DELETE FROM {}.changes WHERE version < 3").format(sql.Identifier(pg_schema)))
        assert (await store.catch_up(2, 2)).version == 3  # what it needs is still there
        with pytest.raises(ReplicaBehind):
            await store.catch_up(1, 1)
        with pytest.raises(ReplicaBehind):
            await store.exchange(0, 0, lambda seen: pytest.fail("decided without the records"))


class Followers:
    """Replicas' `follow()` loops as tasks, with what each was told: whether it leads, which versions."""

    def __init__(self, stores: list[PostgresStore]) -> None:
        self.stores = stores
        self.leading = [False] * len(stores)
        self.versions: list[list[int]] = [[] for _ in stores]
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._told = asyncio.Event()

    def start(self, index: int) -> None:
        def lead(now: bool) -> None:
            self.leading[index] = now
            self._told.set()

        def changed(version: int) -> None:
            self.versions[index].append(version)
            self._told.set()

        self.tasks[index] = asyncio.create_task(self.stores[index].follow(changed, lead))

    async def until(self, condition: Callable[[], bool], seconds: float = 5.0) -> None:
        async with asyncio.timeout(seconds):
            while not condition():
                self._told.clear()
                await self._told.wait()

    async def stop(self, index: int) -> None:
        """The replica dies, its connection with it."""
        task = self.tasks.pop(index)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def close(self) -> None:
        for index in list(self.tasks):
            await self.stop(index)
        for store in self.stores:
            await store.close()


async def test_one_replica_leads_and_another_takes_over_when_it_dies(postgres_dsn: str, pg_schema: str) -> None:
    stores = [PostgresStore(postgres_dsn, schema=pg_schema) for _ in range(2)]
    for store in stores:
        await store.open()
    followers = Followers(stores)
    leading, versions = followers.leading, followers.versions
    followers.start(0)
    followers.start(1)
    try:
        await followers.until(lambda: any(leading))
        await asyncio.sleep(1.5)  # a poll or more: the other must not take it too
        assert leading.count(True) == 1
        first = leading.index(True)
        # A write on either replica reaches both as a notification, well before a poll.
        await stores[first].write(WriteBatch(events=[event(1)], fencing_token=1))
        await followers.until(lambda: 1 in versions[0] and 1 in versions[1], seconds=0.9)
        await followers.stop(first)  # the leader dies: the other takes over within a poll or two
        await followers.until(lambda: leading[1 - first], seconds=3.0)
    finally:
        await followers.close()


# -- PostgreSQL: an unreachable database, and the DSN's password ------------------------


def dsn_at(port: int, password: str = PASSWORD) -> str:
    return f"postgresql://postgres:{password}@127.0.0.1:{port}/test"


@contextlib.contextmanager
def takes_at_most(seconds: float) -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < seconds


async def test_an_unreachable_database_fails_open_and_migrate_quickly(closed_port: int) -> None:
    store = PostgresStore(dsn_at(closed_port), connect_timeout=1)
    with takes_at_most(2.5), pytest.raises(StoreUnavailable) as raised:
        await store.open()
    assert f"127.0.0.1:{closed_port}/test" in str(raised.value)
    assert PASSWORD not in str(raised.value)
    with takes_at_most(2.5), pytest.raises(StoreUnavailable):
        await migrate(dsn_at(closed_port), "authpool", connect_timeout=1)
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.write(WriteBatch())
    await store.close()


async def test_a_server_that_never_answers_fails_open_within_the_connect_timeout() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # accepts, and never says a word

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        store = PostgresStore(dsn_at(port), connect_timeout=1)
        with takes_at_most(2.5), pytest.raises(StoreUnavailable, match="did not answer in time"):
            await store.open()
        await store.close()
    finally:
        server.close()
        for writer in connections:
            writer.close()
        await server.wait_closed()


def test_the_dsn_and_its_password_stay_out_of_errors_and_repr(closed_port: int) -> None:
    store = PostgresStore(dsn_at(closed_port), schema="authpool")
    assert PASSWORD not in repr(store)
    assert PASSWORD not in repr(vars(store))  # nor in the repr of anything it holds
    assert repr(store) == f"PostgresStore('127.0.0.1:{closed_port}/test', schema='authpool')"
    # libpq's own parse errors quote the string, password and all.
    with pytest.raises(StartupRefused) as raised:
        PostgresStore(f"host=127.0.0.1 password={PASSWORD} oops", schema="authpool")
    assert PASSWORD not in str(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__
    with pytest.raises(ValueError, match="schema"):
        PostgresStore(dsn_at(closed_port), schema="Robert'); DROP TABLE students;--")


class Proxy:
    """A TCP proxy in front of PostgreSQL that a test can cut (refuse and reset) or stall (lose every byte).

    A stalled proxy keeps its connections open and drops what is sent either
    way, closes included, as a network that has silently gone away does: the
    server keeps a session whose client gave up until its own limits end it. (Holding the bytes
    back instead would let a write the store gave up on reach the server
    later and commit: a real possibility with any networked database, and
    why a failed write makes the pool reload its state, but not this test's
    subject.)
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if self.flowing.is_set():
                    sink.write(data)
                    await sink.drain()
        if self.flowing.is_set():  # a silent network does not deliver the goodbye either
            sink.close()

    async def cut(self) -> None:
        """Stop listening and reset every connection: the database is gone."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def close(self) -> None:
        self.flowing.set()
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxy(postgres_dsn: str) -> AsyncIterator[Proxy]:
    port = int(psycopg.conninfo.conninfo_to_dict(postgres_dsn).get("port") or 5432)
    proxy = Proxy(port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def via(proxy: Proxy, dsn: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port), password=PASSWORD)


async def eventually_writes(store: Store, batch: WriteBatch, within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            try:
                await store.write(batch)
            except StoreUnavailable:
                await asyncio.sleep(0.1)
            else:
                return


async def test_a_lost_database_fails_every_call_cleanly_then_recovers(
    proxy: Proxy, postgres_dsn: str, pg_schema: str
) -> None:
    store = PostgresStore(via(proxy, postgres_dsn), schema=pg_schema, connect_timeout=0.5)
    await store.open()
    try:
        await store.write(WriteBatch(leases=[lease(1)], events=[event(1)], fencing_token=1))
        before = await store.load()

        await proxy.cut()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.write(WriteBatch(leases=[lease(2)], events=[event(2)], fencing_token=2)),
            store.load,
            lambda: store.events_after(0, 10),
            store.first_sequence,
            store.ping,
        ]
        for call in calls:
            with takes_at_most(1.5), pytest.raises(StoreUnavailable) as raised:
                await call()
            assert PASSWORD not in str(raised.value)

        await proxy.start()  # the database is back, at the same address
        await eventually_writes(store, WriteBatch(events=[event(2)]), within=5)
        snapshot = await store.load()
        assert snapshot.live_leases == before.live_leases  # the write that failed left nothing
        assert [e.sequence for e in await store.events_after(0, 10)] == [1, 2]
    finally:
        await store.close()


async def test_a_database_that_stops_answering_fails_calls_within_the_timeout(
    proxy: Proxy, postgres_dsn: str, pg_schema: str
) -> None:
    store = PostgresStore(via(proxy, postgres_dsn), schema=pg_schema, connect_timeout=0.5)
    await store.open()
    try:
        await store.write(WriteBatch(events=[event(1)], fencing_token=1))
        proxy.flowing.clear()  # connections stay open; nothing comes back
        with takes_at_most(1.5), pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5 s"):
            await store.write(WriteBatch(leases=[lease(2)], events=[event(2)], fencing_token=2))
        with takes_at_most(1.5), pytest.raises(StoreUnavailable):
            await store.ping()

        proxy.flowing.set()
        await eventually_writes(store, WriteBatch(events=[event(2)]), within=5)
        snapshot = await store.load()
        assert (snapshot.live_leases, snapshot.last_sequence) == ([], 2)
    finally:
        await store.close()


async def test_a_closed_store_refuses_calls(postgres_dsn: str, pg_schema: str) -> None:
    store = PostgresStore(postgres_dsn, schema=pg_schema)
    await store.open()
    await store.close()
    await store.close()  # twice is fine
    for call in (store.load, store.ping, store.first_sequence, lambda: store.write(WriteBatch())):
        with pytest.raises(StoreUnavailable, match="not open"):
            await call()


# -- PostgreSQL: replicas the network loses ----------------------------------------------


async def test_a_replica_cut_off_while_holding_the_pool_lock_stops_the_others_only_briefly(
    postgres_dsn: str, pg_schema: str, proxy: Proxy
) -> None:
    cut_off = PostgresStore(via(proxy, postgres_dsn), schema=pg_schema, connect_timeout=1)
    other = PostgresStore(postgres_dsn, schema=pg_schema, connect_timeout=1)
    await cut_off.open()
    await other.open()
    try:

        def lose_the_network(seen: CatchUp) -> WriteBatch:
            proxy.flowing.clear()  # with the pool row locked
            return appended(seen, EventType.REBALANCE_COMPLETED)  # a kind only this write makes

        with pytest.raises(StoreUnavailable):
            await cut_off.exchange(0, 0, lose_the_network)
        # The server ends the orphaned transaction (idle in it for twice the timeout), and the lock with it.
        started = time.monotonic()
        version = 0
        while not version:
            try:
                version = await other.exchange(0, 0, lambda seen: appended(seen, EventType.LEASE_GRANTED))
            except StoreUnavailable:
                assert time.monotonic() - started < 8, "the orphaned session still holds the pool row lock"
        # Nothing of the cut-off write was committed. (The other's retries may have committed more
        # than once: a write whose COMMIT was acknowledged just after its deadline fails yet stands.)
        assert version >= 1
        assert EventType.REBALANCE_COMPLETED not in {e.type for e in await all_events(other, page=100)}
    finally:
        proxy.flowing.set()
        await cut_off.close()
        await other.close()


async def test_a_leader_the_network_loses_hands_the_lead_to_another_replica(
    postgres_dsn: str, pg_schema: str, proxy: Proxy
) -> None:
    stores = [
        PostgresStore(via(proxy, postgres_dsn), schema=pg_schema, connect_timeout=1),
        PostgresStore(postgres_dsn, schema=pg_schema, connect_timeout=1),
    ]
    for store in stores:
        await store.open()
    followers = Followers(stores)
    leading = followers.leading
    followers.start(0)
    try:
        await followers.until(lambda: leading[0])
        followers.start(1)
        await asyncio.sleep(1.5)
        assert leading == [True, False]
        proxy.flowing.clear()  # the leader's process lives on, its network does not
        # It stops leading at its next poll; the server ends its silent session, freeing the lock.
        await followers.until(lambda: leading == [False, True], 12)
    finally:
        proxy.flowing.set()
        await followers.close()


async def test_a_store_that_went_back_makes_a_replica_reload(postgres_dsn: str, pg_schema: str) -> None:
    async with three_writes(postgres_dsn, pg_schema) as store:
        # Restored from an older backup (or failed over to a standby that lagged): version 1 again.
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            s = sql.Identifier(pg_schema)
            for statement in (
                "DELETE FROM {s}.changes WHERE version > 1",
                "DELETE FROM {s}.events WHERE sequence > 1",
                "UPDATE {s}.pool_state SET version = 1, last_sequence = 1",
            ):
                await conn.execute(sql.SQL(statement).format(s=s))
        with pytest.raises(ReplicaBehind, match="the store went back"):
            await store.catch_up(3, 3)
        with pytest.raises(ReplicaBehind, match="the store went back"):
            await store.exchange(3, 3, lambda seen: pytest.fail("decided on a store behind it"))
        assert (await store.catch_up(1, 1)).version == 1  # from where the store is, all is well
