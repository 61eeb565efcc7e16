"""A PostgreSQL replica's start summarises the older usage in a few round trips, however many subscriptions.

What the summary says is held to `usage.summarize` by the store contract;
this is about how it is asked. Each question in turn cost a round trip, about
nine a subscription: with the database a millisecond away, seconds of a
restart with a thousand subscriptions. libpq's protocol trace counts what the
client sent: a Sync or a Flush is where it waits for the server.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg import pq, sql

from authpool_server.store.postgres import migrate
from authpool_server.store.postgres_usage import UsageStatements, early_usage
from authpool_server.store.usage import EarlyUsage, UsagePlan

NOW = 1_800_000_000.0
DAY = 86_400.0
COLUMNS = (
    "request_id, lease_id, client_id, subscription_id, fallback, at, cost_micros, input_tokens, output_tokens,"
    " model, outcome, provider_remaining_ppm, provider_reset_at"
)


def sent_by_client(trace: Path) -> list[str]:
    """The names of the messages the client sent, from a libpq protocol trace."""
    lines = trace.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.split("\t")[2].strip() for line in lines if line.startswith("F\t")]


@pytest.fixture
async def usage_schema(postgres_dsn: str, pg_schema: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """`pg_schema` migrated, with three days of usage of every kind on 40 subscriptions."""
    await migrate(postgres_dsn, pg_schema)
    rng = random.Random(7)
    outcomes = ("ok",) * 8 + ("rate_limited", "auth_failed")
    rows = [
        (
            f"req-{n}",
            "lease",
            "client",
            f"sub-{n % 40}",
            n % 50 == 0,  # some on the fallback
            NOW - rng.random() * 3 * DAY,
            rng.randrange(1, 1000),
            10,
            10,
            "model",
            rng.choice(outcomes),
            rng.choice((None, None, None, 400_000)),
            NOW + DAY if n % 97 == 0 else 0.0,  # an announced reset, now and then
        )
        for n in range(4_000)
    ]
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        insert = sql.SQL("COPY {}.usage ({}) FROM STDIN").format(sql.Identifier(pg_schema), sql.SQL(COLUMNS))
        async with conn.cursor() as cursor, cursor.copy(insert) as copy:
            for row in rows:
                await copy.write_row(row)
        yield conn


async def summarise(
    conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str, subscriptions: int
) -> tuple[EarlyUsage, list[str]]:
    """The summary of the first `subscriptions` subscriptions' older usage, and what the client sent for it."""
    starts = (NOW - 2 * DAY, NOW - DAY)  # the budget window, and an extra one
    plan = UsagePlan(now=NOW, recent_since=NOW - 6 * 3600, starts={f"sub-{n}": starts for n in range(subscriptions)})
    fd, path = tempfile.mkstemp(suffix=".trace")
    conn.pgconn.trace(fd)
    try:
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        early = await early_usage(conn, UsageStatements(schema), plan)
    finally:
        conn.pgconn.untrace()  # before the file goes: libpq writes to it until told to stop
        os.close(fd)
    try:
        return early, sent_by_client(Path(path))
    finally:
        os.unlink(path)


def waits(sent: list[str]) -> int:
    """How many times the client waited for the server: at each Sync or Flush it sent."""
    return sum(message in ("Sync", "Flush") for message in sent)


async def test_the_summary_takes_as_many_round_trips_for_forty_subscriptions_as_for_two(
    usage_schema: psycopg.AsyncConnection[tuple[object, ...]], pg_schema: str
) -> None:
    early, sent = await summarise(usage_schema, pg_schema, 40)
    assert len(early.subscriptions) == 40
    assert sum(spend.spend[0] for spend in early.subscriptions.values()) > 0, "the windows hold usage"
    assert any(spend.auth_failures for spend in early.subscriptions.values()), "there are follow-ups to ask"
    assert sent.count("Execute") >= 40 * 6, "every subscription was asked its questions"
    _, sent_for_two = await summarise(usage_schema, pg_schema, 2)
    assert waits(sent) == waits(sent_for_two) <= 6, "asked in turn, not together"
