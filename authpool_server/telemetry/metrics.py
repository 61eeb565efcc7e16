"""The service's metrics: one instrument per row of the guide's Key Metrics table, and then some.

Names are OpenTelemetry's; in Prometheus format (/metrics) dots become
underscores, units become suffixes and counters end in `_total`:

| Guide's key metric        | Instrument (Prometheus name)                                            |
|---------------------------|-------------------------------------------------------------------------|
| Allocation success rate   | `authpool.allocations` by `decision` (`authpool_allocations_total`);     |
|                           | `refused` when no lease was granted                                     |
| Average health score      | `authpool.subscription.health` per subscription, `authpool.pool.health` |
| Rebalancing frequency     | `authpool.rebalance.runs` by `trigger` (`..._runs_total`),              |
|                           | `authpool.rebalance.moves`, `authpool.rebalance.duration` (seconds)     |
| Failover rate             | `authpool_allocations_total{decision=~"failover|fallback"}` / all       |
| Response time (p95)       | `rpc.server.duration` by method and code (`rpc_server_duration_seconds`)|
| Memory usage              | `authpool.process.memory` (`authpool_process_memory_bytes`)              |
| Error rate                | `rpc.server.duration` count by `rpc_grpc_status_code`;                  |
|                           | `authpool.usage.reports` by provider `outcome`                          |
| Fallback usage            | `authpool.fallback.clients`, `authpool.fallback.usage`                  |
| Weekly usage, projection  | `authpool.subscription.usage`, `.budget`, `.utilization`,               |
|                           | `.projected_usage`, `.live_clients`, `.status` (1 for the current one)  |

Money is in currency units (the config's), as floats: for dashboards, not
accounting. Gauges read a snapshot that `refresh` takes on the event loop
(every few seconds, and before each scrape), because the pool is not
thread-safe and the OTLP exporter collects from its own thread.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider

from authpool_server.domain import MICROS_PER_UNIT, SubscriptionStatus
from authpool_server.grpc_paths import method_name, service_of
from authpool_server.pool import Pool, PoolStatus, RebalanceOutcome

__all__ = ["Metrics", "resident_memory_bytes"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory_bytes() -> int:
    """This process's resident set size now (Linux), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True, slots=True)
class _Snapshot:
    status: PoolStatus | None = None
    live_leases: int = 0
    watchers: int = 0


def _units(micros: int) -> float:
    return micros / MICROS_PER_UNIT


class Metrics:
    """Records RPCs and pool work; reads gauges from the last snapshot of the pool."""

    def __init__(self, provider: MeterProvider, pool: Pool) -> None:
        self._pool = pool
        self._snapshot = _Snapshot()
        meter = provider.get_meter("authpool")
        self._rpc_duration = meter.create_histogram(
            "rpc.server.duration", unit="s", description="Time to handle an RPC, by method and status code"
        )
        self._allocations = meter.create_counter(
            "authpool.allocations",
            description="Allocate calls by decision: new, sticky, failover, fallback, or refused (no lease)",
        )
        self._usage_reports = meter.create_counter(
            "authpool.usage.reports", description="ReportUsage calls accepted, by the provider call's outcome"
        )
        self._rebalance_runs = meter.create_counter(
            "authpool.rebalance.runs", description="Rebalancing cycles, by trigger (periodic or operator)"
        )
        self._rebalance_moves = meter.create_counter(
            "authpool.rebalance.moves", description="Clients moved by rebalancing"
        )
        self._rebalance_duration = meter.create_histogram(
            "authpool.rebalance.duration", unit="s", description="Time to plan and apply a rebalancing cycle"
        )
        self._gauges(meter)
        pool.observe(self)

    # -- events --------------------------------------------------------------

    def rpc_finished(
        self, method: str, code: grpc.StatusCode, seconds: float, *, decision: str = "", outcome: str = ""
    ) -> None:
        name = method_name(method)
        self._rpc_duration.record(
            seconds,
            {"rpc.service": service_of(method), "rpc.method": name, "rpc.grpc.status_code": code.value[0]},
        )
        if name == "Allocate" and service_of(method) == "authpool.v1.AuthPool":
            self._allocations.add(1, {"decision": decision or "refused"})
        elif name == "ReportUsage" and code is grpc.StatusCode.OK and outcome:
            self._usage_reports.add(1, {"outcome": outcome})

    def rebalanced(self, outcome: RebalanceOutcome, trigger: str) -> None:
        if outcome.dry_run:
            return
        self._rebalance_runs.add(1, {"trigger": trigger})
        self._rebalance_moves.add(len(outcome.moves), {"trigger": trigger})
        self._rebalance_duration.record(outcome.seconds, {"trigger": trigger})

    def refresh(self) -> None:
        """Take the snapshot the gauges report. Call on the event loop that owns the pool."""
        memory = self._pool.memory()
        backlogs = memory["watcher_backlogs"]
        self._snapshot = _Snapshot(
            status=self._pool.status(),
            live_leases=int(memory["live_leases"]),  # type: ignore[call-overload]
            watchers=len(backlogs),  # type: ignore[arg-type]
        )

    # -- gauges --------------------------------------------------------------

    def _gauges(self, meter: Meter) -> None:
        per_subscription = {
            "authpool.subscription.health": ("Health score 0-100 (see balancer.health_score)", self._health),
            "authpool.subscription.usage": ("Spend in the current weekly window, currency units", self._usage),
            "authpool.subscription.budget": ("Weekly budget, currency units", self._budget),
            "authpool.subscription.utilization": ("Weekly spend / budget", self._utilization),
            "authpool.subscription.projected_usage": ("Projected spend at window end", self._projected),
            "authpool.subscription.live_clients": ("Clients holding a lease", self._clients),
            "authpool.subscription.status": ("1 for the subscription's current status, else 0", self._status),
        }
        for name, (description, callback) in per_subscription.items():
            meter.create_observable_gauge(name, callbacks=[callback], description=description)
        meter.create_observable_gauge(
            "authpool.pool.health", callbacks=[self._average_health], description="Average subscription health"
        )
        meter.create_observable_gauge(
            "authpool.fallback.clients", callbacks=[self._fallback_clients], description="Leases on the fallback"
        )
        meter.create_observable_gauge(
            "authpool.fallback.usage",
            callbacks=[self._fallback_usage],
            description="Spend on the pay-as-you-go fallback within retention, currency units",
        )
        meter.create_observable_gauge("authpool.leases.live", callbacks=[self._live_leases], description="Live leases")
        meter.create_observable_gauge(
            "authpool.watchers", callbacks=[self._watchers], description="Open WatchEvents streams"
        )
        meter.create_observable_gauge(
            "authpool.process.memory", unit="By", callbacks=[self._memory], description="Resident set size"
        )

    def _views(self) -> Sequence:
        status = self._snapshot.status
        return status.subscriptions if status is not None else ()

    def _health(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v.health, {"subscription_id": v.spec.id}) for v in self._views()]

    def _usage(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(_units(v.window_usage_micros), {"subscription_id": v.spec.id}) for v in self._views()]

    def _budget(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(_units(v.spec.weekly_budget_micros), {"subscription_id": v.spec.id}) for v in self._views()]

    def _utilization(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(v.window_usage_micros / v.spec.weekly_budget_micros, {"subscription_id": v.spec.id})
            for v in self._views()
        ]

    def _projected(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(_units(v.forecast.projected_window_spend_micros), {"subscription_id": v.spec.id})
            for v in self._views()
        ]

    def _clients(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(v.live_clients, {"subscription_id": v.spec.id}) for v in self._views()]

    def _status(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(v.status is status), {"subscription_id": v.spec.id, "status": str(status)})
            for v in self._views()
            for status in SubscriptionStatus
        ]

    def _average_health(self, _: CallbackOptions) -> Iterable[Observation]:
        views = self._views()
        return [Observation(sum(v.health for v in views) / len(views))] if views else []

    def _fallback_clients(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self._snapshot.status
        return [Observation(status.fallback_clients)] if status is not None else []

    def _fallback_usage(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self._snapshot.status
        return [Observation(_units(status.fallback_usage_micros))] if status is not None else []

    def _live_leases(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._snapshot.live_leases)]

    def _watchers(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._snapshot.watchers)]

    def _memory(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(resident_memory_bytes())]
