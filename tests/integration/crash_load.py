"""Load that keeps running through SIGKILLs, the ledger of what it was told, and what the store holds.

`CrashLoad` drives concurrent clients over real gRPC channels against
whichever servers are up (`Targets`: a restarted server has a new port, and
clients move to it). Each client loops as a real caller does: Allocate (the
same client id every time, so a client holding a lease must get it back),
report usage a few times under request ids of its own, Renew, and Release
about half the time. A call that fails with UNAVAILABLE (the server died, or
is not there yet) is sent again with the same arguments, to whichever server
is up, as the client library's retry policy does.

`Ledger` keeps what the servers acknowledged (an answer arrived) apart from
what was in flight or interrupted: a call whose server died before it
answered may or may not have been applied, either is allowed, but never
half of it. `Facts` is what the store itself holds, read straight from the
SQLite file or from PostgreSQL, and `violations` holds it against the
ledger and the design notes' invariants.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from psycopg import sql

_Reply = TypeVar("_Reply")

_ENDS = {"lease_released", "lease_expired"}  # the event types that end a lease


@dataclass
class LedgerView:
    """A copy of the ledger at one moment."""

    granted: dict[str, str]
    released: set[str]
    usage: dict[str, int]
    allocating: set[str]
    releasing: set[str]
    reporting: dict[str, int]


@dataclass
class Ledger:
    granted: dict[str, str] = field(default_factory=dict)  # lease id -> client id, for every lease an Allocate answered
    released: set[str] = field(default_factory=set)  # leases a Release answered for
    usage: dict[str, int] = field(default_factory=dict)  # request id -> cost, answered
    # Sent, not (yet) answered: in flight, or interrupted by a kill and waiting to be sent again.
    allocating: set[str] = field(default_factory=set)  # client ids
    releasing: set[str] = field(default_factory=set)  # lease ids
    reporting: dict[str, int] = field(default_factory=dict)  # request id -> cost
    calls: Counter[str] = field(default_factory=Counter)  # answered calls by method
    served_by: Counter[str] = field(default_factory=Counter)  # answered calls by server name
    resent: Counter[str] = field(default_factory=Counter)  # UNAVAILABLE answers, each sent again
    sticky: int = 0  # Allocates that gave a client back the lease it held
    duplicates: int = 0  # resent reports the server recognised
    stale_after_resend: int = 0  # resent Renews refused as stale (see `_client`)
    failures: list[str] = field(default_factory=list)  # anything a caller would call wrong

    def unanswered(self) -> dict[str, object]:
        """Calls sent and not answered (yet); empty once every interrupted call was sent again and answered."""
        pending = {"Allocate": self.allocating, "Release": self.releasing, "ReportUsage": self.reporting}
        return {method: calls for method, calls in pending.items() if calls}

    def view(self) -> LedgerView:
        return LedgerView(
            dict(self.granted),
            set(self.released),
            dict(self.usage),
            set(self.allocating),
            set(self.releasing),
            dict(self.reporting),
        )


class Targets:
    """The servers that are up, by name, each with a channel to its current port."""

    def __init__(self) -> None:
        self._stubs: dict[str, authpool_pb2_grpc.AuthPoolStub] = {}
        self._channels: list[grpc.aio.Channel] = []  # every channel ever opened, closed at the end
        self._any = asyncio.Event()

    def up(self, name: str, port: int) -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self._channels.append(channel)
        self._stubs[name] = authpool_pb2_grpc.AuthPoolStub(channel)
        self._any.set()

    def down(self, name: str) -> None:
        # The old channel stays open: calls still on it fail as UNAVAILABLE, as they would for a real client.
        del self._stubs[name]
        if not self._stubs:
            self._any.clear()

    async def pick(self, rng: random.Random) -> tuple[str, authpool_pb2_grpc.AuthPoolStub]:
        while not self._stubs:
            await self._any.wait()
        name = rng.choice(sorted(self._stubs))
        return name, self._stubs[name]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class CrashLoad:
    def __init__(self, targets: Targets, *, clients: int, seed: int, give_up_after: float = 30.0) -> None:
        self.targets = targets
        self.ledger = Ledger()
        self.stop = asyncio.Event()
        self._clients = clients
        self._seed = seed
        self._give_up_after = give_up_after
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self._clients)]

    async def finish(self) -> None:
        """Let every client complete the cycle it is in (retrying what was interrupted), then stop."""
        self.stop.set()
        await asyncio.gather(*self._tasks)

    async def _call(
        self, rng: random.Random, method: str, send: Callable[[authpool_pb2_grpc.AuthPoolStub], Awaitable[_Reply]]
    ) -> tuple[_Reply, bool]:
        """The reply, and whether an earlier attempt was interrupted (its outcome unknown)."""
        interrupted = False
        give_up = time.monotonic() + self._give_up_after
        while True:
            name, stub = await self.targets.pick(rng)
            try:
                reply = await send(stub)
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() < give_up:
                    interrupted = True
                    self.ledger.resent[method] += 1
                    await asyncio.sleep(0.05)
                    continue
                error.method = f"{method} on {name}{' (sent again)' if interrupted else ''}"  # type: ignore[attr-defined]
                error.interrupted = interrupted  # type: ignore[attr-defined]
                raise
            self.ledger.calls[method] += 1
            self.ledger.served_by[name] += 1
            return reply, interrupted

    async def _client(self, index: int) -> None:
        rng = random.Random(self._seed * 1_000 + index)
        ledger = self.ledger
        client_id = f"crash-{index}"
        held: pb.Lease | None = None  # the lease this client was granted and has not released
        reports = 0
        while not self.stop.is_set():
            try:
                ledger.allocating.add(client_id)
                allocated, _ = await self._call(
                    rng, "Allocate", lambda s: s.Allocate(pb.AllocateRequest(client_id=client_id), timeout=5)
                )
                lease = allocated.lease
                ledger.allocating.discard(client_id)
                if lease.lease_id in ledger.released:
                    ledger.failures.append(f"{client_id}: Allocate gave back released lease {lease.lease_id}")
                if held is not None:
                    if lease.lease_id != held.lease_id:
                        ledger.failures.append(
                            f"{client_id}: held lease {held.lease_id}, but Allocate granted {lease.lease_id}"
                        )
                    else:
                        ledger.sticky += 1
                ledger.granted[lease.lease_id] = client_id
                held = lease

                for _ in range(rng.randint(1, 3)):
                    reports += 1
                    request = pb.ReportUsageRequest(
                        request_id=f"{client_id}-{reports}",
                        lease_id=lease.lease_id,
                        fencing_token=lease.fencing_token,
                        cost_micros=rng.randint(1, 5_000),
                        model="claude-sonnet",
                    )
                    ledger.reporting[request.request_id] = request.cost_micros
                    ack, interrupted = await self._call(
                        rng, "ReportUsage", lambda s, r=request: s.ReportUsage(r, timeout=5)
                    )
                    del ledger.reporting[request.request_id]
                    ledger.usage[request.request_id] = request.cost_micros
                    if ack.duplicate:
                        ledger.duplicates += 1
                        if not interrupted:
                            ledger.failures.append(f"{client_id}: first report {request.request_id} was a duplicate")

                try:
                    renewed, _ = await self._call(
                        rng,
                        "Renew",
                        lambda s, held=lease: s.Renew(
                            pb.RenewRequest(lease_id=held.lease_id, fencing_token=held.fencing_token), timeout=5
                        ),
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() is not grpc.StatusCode.ABORTED or not getattr(error, "interrupted", False):
                        raise
                    # A Renew that moved the lease commits the new token as the one the holder
                    # was told, so resending it after its answer was lost is refused as stale
                    # (the old token "succeeds once"). A caller gets its lease back, at the
                    # new token, by allocating again: the lease is sticky.
                    ledger.stale_after_resend += 1
                    renewed, _ = await self._call(
                        rng, "Allocate", lambda s: s.Allocate(pb.AllocateRequest(client_id=client_id), timeout=5)
                    )
                if renewed.lease.lease_id != lease.lease_id:
                    ledger.failures.append(f"{client_id}: renewed {lease.lease_id}, got {renewed.lease.lease_id}")
                lease = held = renewed.lease

                if rng.random() < 0.5:
                    ledger.releasing.add(lease.lease_id)
                    released, interrupted = await self._call(
                        rng,
                        "Release",
                        lambda s, held=lease: s.Release(
                            pb.ReleaseRequest(lease_id=held.lease_id, fencing_token=held.fencing_token), timeout=5
                        ),
                    )
                    ledger.releasing.discard(lease.lease_id)
                    ledger.released.add(lease.lease_id)
                    held = None
                    if not released.released and not interrupted:
                        # Only a resent Release may find its lease already ended (by the first attempt).
                        ledger.failures.append(f"{client_id}: Release of held lease {lease.lease_id} found none")
            except grpc.aio.AioRpcError as error:
                method = getattr(error, "method", "?")
                ledger.failures.append(f"{client_id}: {method}: {error.code().name}: {error.details()}")
                await asyncio.sleep(0.05)


@dataclass
class Facts:
    """What the store holds, read in one snapshot."""

    live: dict[str, tuple[str, str, bool]]  # lease id -> (client id, subscription id, fallback)
    ended: set[str]
    usage: dict[str, tuple[str, int]]  # request id -> (lease id, cost)
    events: list[tuple[int, str, str, dict[str, str]]]  # (sequence, type, lease id, attributes)
    last_sequence: int


def sqlite_facts(path: Path) -> Facts:
    """Read the embedded store's file directly (read-only; WAL makes it one consistent snapshot)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.execute("BEGIN")
        leases = conn.execute("SELECT lease_id, client_id, subscription_id, fallback, ended_at FROM leases").fetchall()
        usage = conn.execute("SELECT request_id, lease_id, cost_micros FROM usage").fetchall()
        events = []
        for sequence, payload in conn.execute("SELECT sequence, payload FROM events ORDER BY sequence"):
            data = json.loads(payload)
            events.append((sequence, data["type"], data["lease_id"], dict(data["attributes"])))
        meta = conn.execute("SELECT value FROM meta WHERE key = 'last_sequence'").fetchone()
        conn.execute("COMMIT")
    finally:
        conn.close()
    return Facts(
        live={lease: (client, sub, bool(fallback)) for lease, client, sub, fallback, ended in leases if ended is None},
        ended={lease for lease, *_, ended in leases if ended is not None},
        usage={request: (lease, cost) for request, lease, cost in usage},
        events=events,
        last_sequence=max(int(meta[0]) if meta else 0, events[-1][0] if events else 0),
    )


async def postgres_facts(dsn: str, schema: str) -> Facts:
    """Read the PostgreSQL store's schema directly, in one REPEATABLE READ snapshot."""
    s = sql.Identifier(schema)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn, conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

        async def rows(query: str) -> list[tuple[Any, ...]]:
            return await (await conn.execute(sql.SQL(query).format(s=s))).fetchall()

        leases = await rows("SELECT lease_id, client_id, subscription_id, fallback, ended_at FROM {s}.leases")
        usage = await rows("SELECT request_id, lease_id, cost_micros FROM {s}.usage")
        events = await rows("SELECT sequence, type, lease_id, attributes FROM {s}.events ORDER BY sequence")
        last_sequence = (await rows("SELECT last_sequence FROM {s}.pool_state"))[0][0]
    return Facts(
        live={lease: (client, sub, fallback) for lease, client, sub, fallback, ended in leases if ended is None},
        ended={lease for lease, *_, ended in leases if ended is not None},
        usage={request: (lease, cost) for request, lease, cost in usage},
        events=[(sequence, kind, lease, dict(attributes)) for sequence, kind, lease, attributes in events],
        last_sequence=max(last_sequence, events[-1][0] if events else 0),
    )


def violations(facts: Facts, before: LedgerView, after: LedgerView, *, max_clients: int) -> list[str]:
    """The invariants, and the ledger, held against what the store holds; an empty list when all hold.

    `before` is the ledger as it was just before the store was read, `after`
    just after: whatever was acknowledged before must be there, and whatever
    is there must have been sent by then (acknowledged, or still unanswered).
    """
    problems = []
    # Invariant 1: a client holds at most one live lease.
    holders = Counter(client for client, _, _ in facts.live.values())
    if twice := sorted(client for client, n in holders.items() if n > 1):
        problems.append(f"clients with two live leases: {twice}")
    # Invariant 2: no subscription over its client limit.
    per_sub = Counter(sub for _, sub, fallback in facts.live.values() if not fallback)
    if over := {sub: n for sub, n in per_sub.items() if n > max_clients}:
        problems.append(f"subscriptions over their limit of {max_clients}: {over}")
    # Invariant 3: nothing acknowledged is lost.
    if lost := sorted(set(before.granted) - set(facts.live) - facts.ended):
        problems.append(f"acknowledged leases lost: {lost[:5]} ({len(lost)} in all)")
    if revived := sorted(before.released & set(facts.live)):
        problems.append(f"acknowledged releases lost (lease live again): {revived[:5]} ({len(revived)} in all)")
    unsure = after.released | after.releasing
    if ended := sorted(set(before.granted) - unsure - set(facts.live)):
        problems.append(f"held leases no longer live (never released): {ended[:5]} ({len(ended)} in all)")
    if missing := sorted(set(before.usage) - set(facts.usage)):
        problems.append(f"acknowledged usage reports lost: {missing[:5]} ({len(missing)} in all)")
    # Invariant 4 (and nothing made up): each record is one the clients sent, once, at the cost they sent.
    sent = {**after.reporting, **after.usage}
    if wrong := sorted(r for r, (_, cost) in facts.usage.items() if sent.get(r) != cost):
        problems.append(f"usage records never sent or at another cost: {wrong[:5]} ({len(wrong)} in all)")
    # Invariant 5's ground: the event log has no gaps.
    if [event[0] for event in facts.events] != list(range(1, facts.last_sequence + 1)):
        problems.append(f"event sequences are not gapless from 1 to {facts.last_sequence}")
    # Never half-applied: each row was written with its event, in one transaction.
    granted_events = Counter(lease for _, kind, lease, _ in facts.events if kind == "lease_granted")
    leases = set(facts.live) | facts.ended
    if odd := sorted(lease for lease in leases | set(granted_events) if granted_events[lease] != 1):
        problems.append(f"leases without exactly one grant event (or events without a lease): {odd[:5]}")
    end_events = Counter(lease for _, kind, lease, _ in facts.events if kind in _ENDS)
    if odd := sorted(lease for lease in leases | set(end_events) if end_events[lease] != (lease in facts.ended)):
        problems.append(f"leases whose end and end events disagree: {odd[:5]}")
    usage_events = Counter(
        (lease, int(attrs["cost_micros"])) for _, kind, lease, attrs in facts.events if kind == "usage_recorded"
    )
    if usage_events != Counter(facts.usage.values()):
        problems.append(
            f"usage records and usage events disagree: {len(facts.usage)} records, {usage_events.total()} events"
        )
    return problems


async def status(port: int, *, last_sequence: int = 0) -> pb.StatusResponse:
    """The server's Status with its live leases, once it has caught up to `last_sequence` (a replica follows)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, asyncio.timeout(10):
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        while True:
            reply = await stub.Status(pb.StatusRequest(include_clients=True), timeout=10)
            if reply.totals.last_sequence >= last_sequence:
                return reply
            await asyncio.sleep(0.05)


def recovery_violations(reply: pb.StatusResponse, facts: Facts) -> list[str]:
    """What a server reports after a restart against what its store held: the same leases and the same spend."""
    problems = []
    live = {lease.lease_id for lease in reply.clients}
    if live != set(facts.live):
        problems.append(
            f"live leases after restart differ from the store's: {len(live - set(facts.live))} more, "
            f"{len(set(facts.live) - live)} missing"
        )
    spent = sum(s.weekly_usage_micros for s in reply.subscriptions) + reply.totals.fallback_usage_micros
    stored = sum(cost for _, cost in facts.usage.values())
    if spent != stored:
        problems.append(f"spend after restart {spent} != the store's {stored} (counted twice, or not at all)")
    if reply.totals.last_sequence < facts.last_sequence:
        problems.append(f"last sequence after restart {reply.totals.last_sequence} < the store's {facts.last_sequence}")
    return problems
