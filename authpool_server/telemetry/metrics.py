"""The service's metrics: one instrument per row of the guide's Key Metrics table, and then some.

Instruments are named the OpenTelemetry way (`authpool.allocations`); the
Prometheus names below are what /metrics serves (dots become underscores,
the unit becomes a suffix, counters end in `_total`, histograms come as
`_bucket`, `_count` and `_sum`). Every series also carries `otel_scope_*` labels.

| Guide's key metric      | Prometheus (PromQL sketch)                                                    |
|-------------------------|-------------------------------------------------------------------------------|
| Allocation success rate | `authpool_allocations_total` by `decision` (new, sticky, failover, fallback,  |
|                         | refused): 1 - `{decision="refused"}` / all; refused is any Allocate that      |
|                         | reached the pool and got no lease (calls refused by auth or a rate limit      |
|                         | are not counted here; they are in `rpc_server_duration_seconds_count`)        |
| Average health score    | `authpool_pool_health`; per subscription `authpool_subscription_health`       |
| Rebalancing frequency   | `rate(authpool_rebalance_runs_total[1h])` by `trigger` (periodic, operator);  |
|                         | `authpool_rebalance_moves_total`, `authpool_rebalance_duration_seconds`       |
| Failover rate           | `authpool_allocations_total{decision=~"failover|fallback"}` / all             |
| Response time (p95)     | `histogram_quantile(0.95, rpc_server_duration_seconds_bucket)` by             |
|                         | `rpc_method`                                                                  |
| Memory usage            | `authpool_process_memory_bytes` (resident set size)                           |
| Error rate              | `rpc_server_duration_seconds_count{rpc_grpc_status_code!="0"}` / all, by      |
|                         | `rpc_method`; provider errors: `authpool_usage_reports_total` by `outcome`    |
|                         | (ok, rate_limited, auth_failed, server_error)                                 |

The guide's dashboard panels, per subscription (label `subscription_id`):
`authpool_subscription_usage` (spend in the current weekly window),
`authpool_subscription_budget`, `authpool_subscription_utilization` (spend /
budget), `authpool_subscription_projected_usage` (at window end),
`authpool_subscription_live_clients`, and `authpool_subscription_status`
(label `status`: 1 for the current one, 0 for the others). For the pool:
`authpool_fallback_clients`, `authpool_fallback_usage`, `authpool_leases_live`
and `authpool_watchers` (open WatchEvents streams). Webhook deliveries:
`authpool_webhook_attempts_total` by `result` (delivered, retry, dead),
`authpool_webhook_pending` and `authpool_webhook_dead_lettered` (the guide's
"webhook delivery failures" alert). Config hot reload:
`authpool_config_reloads_total` by `result` (applied, rejected, failed). With replicas on PostgreSQL,
`authpool_replica_leader` is 1 on the one replica running the background
work (reaper, rebalancer, webhook delivery) and 0 on the others; a lone
server always leads. CPU is the Python process collector's
`process_cpu_seconds_total`.

Money is in currency units (the config's), as floats: for dashboards, not
accounting. Gauges read a snapshot that `refresh` takes on the event loop
(every few seconds, and before each scrape), because the pool is not
thread-safe and the OTLP exporter collects from its own thread. Until the
first snapshot (the server has not loaded its state) gauges report nothing
rather than zeros, so a starting server (or one that never started) does not
show a false dip or a second, empty copy of the series.
"""

from __future__ import annotations

import os
import resource
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider

from authpool_server.domain import MICROS_PER_UNIT, DeliveryState, OutboxEntry, SubscriptionStatus
from authpool_server.grpc_paths import method_name, service_of
from authpool_server.pool import Pool, PoolStatus, RebalanceOutcome, SubscriptionView
from authpool_server.telemetry.call import Call

__all__ = ["Metrics", "resident_memory_bytes"]

_Key = TypeVar("_Key")
_ALLOCATE = "/authpool.v1.AuthPool/Allocate"
_REPORT_USAGE = "/authpool.v1.AuthPool/ReportUsage"

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory_bytes() -> int:
    """This process's resident set size now (Linux), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class CounterDict(Counter[_Key]):
    """Counts by one label value; increments are atomic enough under the GIL for metrics."""

    def observations(self, label: str) -> list[Observation]:
        return [Observation(count, {label: value}) for value, count in list(self.items())]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    status: PoolStatus
    live_leases: int
    watchers: int


def _units(micros: int) -> float:
    return micros / MICROS_PER_UNIT


class Metrics:
    """Records RPCs and pool work; reads gauges from the last snapshot of the pool."""

    def __init__(self, provider: MeterProvider, pool: Pool) -> None:
        self._pool = pool
        self._rpc_attributes: dict[tuple[str, grpc.StatusCode], dict[str, object]] = {}
        self._snapshot: _Snapshot | None = None
        meter = provider.get_meter("authpool")
        self._rpc_duration = meter.create_histogram(
            "rpc.server.duration", unit="s", description="Time to handle an RPC, by method and status code"
        )
        # Per-call counters are plain dict increments read by observable counters at
        # collection: a synchronous OpenTelemetry counter costs ~5 µs per add, and
        # the histogram above is the one SDK call an RPC can afford.
        self._allocations: CounterDict[str] = CounterDict()
        self._usage_reports: CounterDict[str] = CounterDict()
        meter.create_observable_counter(
            "authpool.allocations",
            callbacks=[lambda _: self._allocations.observations("decision")],
            description="Allocate calls by decision: new, sticky, failover, fallback, or refused (no lease)",
        )
        meter.create_observable_counter(
            "authpool.usage.reports",
            callbacks=[lambda _: self._usage_reports.observations("outcome")],
            description="ReportUsage calls accepted, by the provider call's outcome",
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
        self._webhook_attempts: CounterDict[str] = CounterDict()
        meter.create_observable_counter(
            "authpool.webhook.attempts",
            callbacks=[lambda _: self._webhook_attempts.observations("result")],
            description="Webhook delivery attempts by result: delivered, retry (failed, tried again), dead",
        )
        # Both results exported from the start at 0, so that the first reload is an increase.
        self._config_reloads: CounterDict[str] = CounterDict({"applied": 0, "rejected": 0, "failed": 0})
        meter.create_observable_counter(
            "authpool.config.reloads",
            callbacks=[lambda _: self._config_reloads.observations("result")],
            description="Config reloads by result: applied, rejected (invalid file: old config runs), failed (retried)",
        )
        self._gauges(meter)
        pool.observe(self)

    # -- events --------------------------------------------------------------

    def rpc_finished(
        self, call: Call, code: grpc.StatusCode, seconds: float, context: otel_context.Context | None = None
    ) -> None:
        """Measure an ended call; `context`, the one it ran in (its span), when recorded after it."""
        attributes = self._rpc_attributes.get((call.method, code))
        if attributes is None:
            attributes = self._rpc_attributes[(call.method, code)] = {
                "rpc.service": service_of(call.method),
                "rpc.method": method_name(call.method),
                "rpc.grpc.status_code": code.value[0],
            }
        self._rpc_duration.record(seconds, attributes, context)
        if call.method == _ALLOCATE and call.admitted:
            # Calls refused by auth or a rate limit never asked the pool: not part of its success rate.
            self._allocations[call.decision or "refused"] += 1
        elif call.method == _REPORT_USAGE and code is grpc.StatusCode.OK and call.outcome:
            self._usage_reports[call.outcome] += 1

    def rebalanced(self, outcome: RebalanceOutcome, trigger: str) -> None:
        if outcome.dry_run:
            return
        self._rebalance_runs.add(1, {"trigger": trigger})
        self._rebalance_moves.add(len(outcome.moves), {"trigger": trigger})
        self._rebalance_duration.record(outcome.seconds, {"trigger": trigger})

    def webhook_attempted(self, entry: OutboxEntry) -> None:
        result = {DeliveryState.DELIVERED: "delivered", DeliveryState.DEAD: "dead"}.get(entry.state, "retry")
        self._webhook_attempts[result] += 1

    def config_reloaded(self, result: str) -> None:
        """`result`: applied, rejected (an invalid file) or failed (valid, not applied now; retried)."""
        self._config_reloads[result] += 1

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
        # name: (description, unit, callback); "1" is dimensionless (no Prometheus suffix).
        per_subscription = {
            "authpool.subscription.health": ("Health score 0-100 (see balancer.health_score)", "", self._health),
            "authpool.subscription.usage": ("Spend in the current weekly window, currency units", "", self._usage),
            "authpool.subscription.budget": ("Weekly budget, currency units", "", self._budget),
            "authpool.subscription.utilization": ("Weekly spend / budget (1 is all of it)", "1", self._utilization),
            "authpool.subscription.projected_usage": ("Projected spend at window end", "", self._projected),
            "authpool.subscription.live_clients": ("Clients holding a lease", "", self._clients),
            "authpool.subscription.status": ("1 for the subscription's current status, else 0", "", self._status),
        }
        for name, (description, unit, callback) in per_subscription.items():
            meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)
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
            "authpool.webhook.pending", callbacks=[self._webhook_pending], description="Webhook notifications waiting"
        )
        meter.create_observable_gauge(
            "authpool.webhook.dead_lettered",
            callbacks=[self._webhook_dead],
            description="Webhook notifications given up, within the event retention",
        )
        meter.create_observable_gauge(
            "authpool.watchers", callbacks=[self._watchers], description="Open WatchEvents streams"
        )
        meter.create_observable_gauge(
            "authpool.process.memory", unit="By", callbacks=[self._memory], description="Resident set size"
        )
        meter.create_observable_gauge(
            "authpool.replica.leader",
            callbacks=[self._leader],
            description="1 while this replica runs the background work (reaper, rebalancer, webhooks), else 0",
        )

    def _views(self) -> Sequence[SubscriptionView]:
        return self._snapshot.status.subscriptions if self._snapshot is not None else ()

    def _pool_status(self) -> PoolStatus | None:
        return self._snapshot.status if self._snapshot is not None else None

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
        status = self._pool_status()
        return [Observation(status.fallback_clients)] if status is not None else []

    def _fallback_usage(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self._pool_status()
        return [Observation(_units(status.fallback_usage_micros))] if status is not None else []

    def _webhook_pending(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self._pool_status()
        return [Observation(status.webhooks.pending)] if status is not None and status.webhooks.enabled else []

    def _webhook_dead(self, _: CallbackOptions) -> Iterable[Observation]:
        status = self._pool_status()
        return [Observation(status.webhooks.dead_lettered)] if status is not None and status.webhooks.enabled else []

    def _live_leases(self, _: CallbackOptions) -> Iterable[Observation]:
        snapshot = self._snapshot
        return [Observation(snapshot.live_leases)] if snapshot is not None else []

    def _leader(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(int(self._pool.is_leader))]

    def _watchers(self, _: CallbackOptions) -> Iterable[Observation]:
        snapshot = self._snapshot
        return [Observation(snapshot.watchers)] if snapshot is not None else []

    def _memory(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(resident_memory_bytes())] if self._snapshot is not None else []
