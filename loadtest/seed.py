"""Bring the pool near its budgets before the load starts, through the API as any client would.

A fresh pool places one new client on each subscription in turn (ties go
to the fewest clients), so allocating one client per subscription gives a
lease on each; one usage report on each lease then sets that
subscription's weekly spend to its target share of the budget, spread
evenly between `low` and `high` (below the 0.85 threshold: all start
ACTIVE), and the leases are released. The load's own usage reports then
push the most spent ones over the threshold during the run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

__all__ = ["Seeded", "seed_budgets"]


@dataclass(frozen=True)
class Seeded:
    utilization: dict[str, float]  # subscription id -> weekly spend / budget at the start
    budget_micros: int  # all subscriptions together
    last_sequence: int  # the event log's end after seeding: where the watchers start


async def seed_budgets(target: str, client_token: str, ops_token: str, *, low: float, high: float, seed: str) -> Seeded:
    client = (("authorization", f"Bearer {client_token}"),)
    ops = (("authorization", f"Bearer {ops_token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        status = await stub.Status(pb.StatusRequest(), timeout=10, metadata=ops)
        budgets = {s.subscription_id: s.weekly_budget_micros for s in status.subscriptions}
        ids = sorted(budgets)
        steps = max(1, len(ids) - 1)
        shares = [low + (high - low) * i / steps for i in range(len(ids))]
        random.Random(seed).shuffle(shares)  # noqa: S311 - which subscription gets which share
        targets = dict(zip(ids, shares, strict=True))
        leases: dict[str, pb.Lease] = {}
        extra: list[pb.Lease] = []
        for i in range(10 * len(ids)):
            if len(leases) == len(ids):
                break
            reply = await stub.Allocate(pb.AllocateRequest(client_id=f"seed-{i}"), timeout=10, metadata=client)
            lease = reply.lease
            if lease.subscription_id in budgets and lease.subscription_id not in leases:
                leases[lease.subscription_id] = lease
            else:
                extra.append(lease)
        for sub, lease in leases.items():
            await stub.ReportUsage(
                pb.ReportUsageRequest(
                    request_id=f"seed-{sub}",
                    lease_id=lease.lease_id,
                    fencing_token=lease.fencing_token,
                    cost_micros=round(targets[sub] * budgets[sub]),
                    model="claude-sonnet-4",
                    outcome=pb.USAGE_OUTCOME_OK,
                ),
                timeout=10,
                metadata=client,
            )
        for lease in [*leases.values(), *extra]:
            request = pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token)
            await stub.Release(request, timeout=10, metadata=client)
        status = await stub.Status(pb.StatusRequest(), timeout=10, metadata=ops)
    return Seeded(
        utilization={s.subscription_id: s.utilization for s in status.subscriptions},
        budget_micros=sum(budgets.values()),
        last_sequence=status.totals.last_sequence,
    )
