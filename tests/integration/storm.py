"""A storm of clients against several AuthPool replicas, and the invariants it must leave intact.

Each simulated client loops: Allocate on a random replica, report usage a
few times (each on a random replica, now and then resending a report to
another replica), Renew, and Release half the time, as real callers do. A
call that fails with UNAVAILABLE (the store is away) is retried with the same
arguments, as the client library's retry policy does; a report counts as
acknowledged only once a replica answered it. Any other failure is kept for
the test to look at.

`check_invariants` then reads the database itself: the design notes'
invariants must hold for the whole deployment, not per replica.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import psycopg
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from psycopg import sql

_Reply = TypeVar("_Reply")


@dataclass
class StormResult:
    acknowledged: dict[str, int] = field(default_factory=dict)  # request id -> cost, once answered
    duplicates_seen: int = 0  # resent reports a replica recognised
    calls: Counter[str] = field(default_factory=Counter)
    unavailable: int = 0  # UNAVAILABLE answers, each retried
    failures: list[str] = field(default_factory=list)  # anything else: the test decides


async def _call(result: StormResult, name: str, call: Callable[[], Awaitable[_Reply]], until: float) -> _Reply:
    """`call`, retried while the store is away (UNAVAILABLE), as the client library does."""
    while True:
        try:
            reply = await call()
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() < until:
                result.unavailable += 1
                await asyncio.sleep(0.1)
                continue
            raise
        result.calls[name] += 1
        return reply


async def storm(ports: list[int], *, clients: int, seconds: float, retry_for: float = 30.0) -> StormResult:
    """Drive `clients` concurrent clients against the replicas on `ports` for `seconds`."""
    result = StormResult()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
    stubs = [authpool_pb2_grpc.AuthPoolStub(channel) for channel in channels]
    end = time.monotonic() + seconds

    async def client(index: int) -> None:
        rng = random.Random(index)
        client_id = f"client-{index}"
        reports = 0
        while time.monotonic() < end:
            until = time.monotonic() + retry_for
            try:
                stub = rng.choice(stubs)
                lease = (
                    await _call(
                        result,
                        "Allocate",
                        lambda s=stub: s.Allocate(pb.AllocateRequest(client_id=client_id), timeout=10),
                        until,
                    )
                ).lease
                for _ in range(rng.randint(1, 3)):
                    reports += 1
                    request = pb.ReportUsageRequest(
                        request_id=f"{client_id}-{reports}",
                        lease_id=lease.lease_id,
                        fencing_token=lease.fencing_token,
                        cost_micros=rng.randint(1, 5_000),
                        model="claude-sonnet",
                    )
                    stub = rng.choice(stubs)
                    await _call(result, "ReportUsage", lambda s=stub, r=request: s.ReportUsage(r, timeout=10), until)
                    result.acknowledged[request.request_id] = request.cost_micros
                    if rng.random() < 0.2:
                        # A caller's retry that reaches another replica: counted once.
                        stub = rng.choice(stubs)
                        again = await _call(
                            result, "ReportUsage", lambda s=stub, r=request: s.ReportUsage(r, timeout=10), until
                        )
                        if not again.duplicate:
                            result.failures.append(f"resent {request.request_id} was not recognised as a duplicate")
                        result.duplicates_seen += 1
                stub = rng.choice(stubs)
                renewed = await _call(
                    result,
                    "Renew",
                    lambda s=stub, lease=lease: s.Renew(
                        pb.RenewRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token), timeout=10
                    ),
                    until,
                )
                if rng.random() < 0.5:
                    stub = rng.choice(stubs)
                    await _call(
                        result,
                        "Release",
                        lambda s=stub, lease=renewed.lease: s.Release(
                            pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token),
                            timeout=10,
                        ),
                        until,
                    )
            except grpc.aio.AioRpcError as error:
                result.failures.append(f"{client_id}: {error.code().name}: {error.details()}")
                await asyncio.sleep(0.05)

    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        for channel in channels:
            await channel.close()
    return result


async def database_facts(dsn: str, schema: str) -> dict[str, Any]:
    """What the database holds, read in one snapshot."""
    s = sql.Identifier(schema)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

        async def rows(query: str) -> list[tuple[Any, ...]]:
            return await (await conn.execute(sql.SQL(query).format(s=s))).fetchall()

        return {
            "clients_with_two_leases": await rows(
                "SELECT client_id FROM {s}.leases WHERE ended_at IS NULL GROUP BY client_id HAVING count(*) > 1"
            ),
            "live_per_subscription": dict(
                await rows(
                    "SELECT subscription_id, count(*) FROM {s}.leases"
                    " WHERE ended_at IS NULL AND NOT fallback GROUP BY subscription_id"
                )
            ),
            "usage": dict(await rows("SELECT request_id, cost_micros FROM {s}.usage")),
            "sequences": [row[0] for row in await rows("SELECT sequence FROM {s}.events ORDER BY sequence")],
            "last_sequence": (await rows("SELECT last_sequence FROM {s}.pool_state"))[0][0],
        }


def invariant_violations(facts: dict[str, Any], *, max_clients: int, acknowledged: dict[str, int]) -> list[str]:
    """The design notes' invariants, checked on what the database holds; an empty list when they hold."""
    problems = []
    if facts["clients_with_two_leases"]:
        problems.append(f"clients with two live leases: {facts['clients_with_two_leases']}")
    over = {sub: n for sub, n in facts["live_per_subscription"].items() if n > max_clients}
    if over:
        problems.append(f"subscriptions over their limit of {max_clients}: {over}")
    missing = set(acknowledged) - set(facts["usage"])
    if missing:
        problems.append(f"acknowledged usage reports lost: {sorted(missing)[:5]} ({len(missing)} in all)")
    if sum(facts["usage"].values()) != sum(acknowledged.values()):
        problems.append(f"usage totals {sum(facts['usage'].values())} != acknowledged {sum(acknowledged.values())}")
    if facts["sequences"] != list(range(1, facts["last_sequence"] + 1)):
        problems.append("event sequences are not gapless from 1 to the pool row's last sequence")
    return problems
