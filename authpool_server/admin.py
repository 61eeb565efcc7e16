"""The admin HTTP port: /metrics for Prometheus, /debug/auth-pool and /debug/memory for people.

- `/metrics` is open, even with authentication on: Prometheus scrapers rarely
  carry tokens, and what it serves is counts, gauges and latencies keyed by
  subscription id and RPC method, never an email, a token, a client id or a
  credential. Keep the admin port inside the cluster network. It is the
  Prometheus text format of every metric in `telemetry.metrics`, plus the
  Python process collector's (`process_*`, `python_*`).
- `/debug/auth-pool` is the data of `Status` as JSON in the shape the guide's
  `jq` recipes use: `.status[] | select(.status == "limited")` lists the
  limited subscriptions; `[.status[].assignedClients | length] | add` counts
  every live client, because the pay-as-you-go fallback is the last entry of
  `.status` (`"fallback": true`) while the pool may use it.
- `/debug/memory` is what to look at when memory grows: RSS, the pool's live
  and ended leases, usage records, watchers and their backlogs, the commit
  queue, asyncio tasks.

Both debug pages need an operator (or admin) bearer token, like the `Status`
RPC (401 without a known token, 403 for a client), unless the server runs
with --insecure-no-auth. Emails are masked.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from authpool_server.domain import MICROS_PER_UNIT, SubscriptionStatus
from authpool_server.pool import Pool
from authpool_server.security.roles import Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.service import mask_email
from authpool_server.telemetry.metrics import Metrics, resident_memory_bytes
from authpool_server.telemetry.recorder import CallRecorder

__all__ = ["AdminServer", "memory_document", "status_document"]

log = logging.getLogger(__name__)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _units(micros: int) -> float:
    return micros / MICROS_PER_UNIT


def status_document(pool: Pool) -> dict[str, Any]:
    """The pool's status as JSON for people and `jq`: camelCase, money in currency units."""
    status = pool.status(include_clients=True)
    clients: dict[str, list[str]] = {}
    for lease in status.leases:
        clients.setdefault(lease.subscription_id, []).append(lease.client_id)
    entries: list[dict[str, Any]] = [
        {
            "id": view.spec.id,
            "type": view.spec.type,
            "fallback": False,
            "email": mask_email(view.spec.email),
            "status": str(view.status),
            "healthScore": view.health,
            "assignedClients": sorted(clients.get(view.spec.id, [])),
            "maxClients": view.spec.max_clients,
            "weeklyUsage": _units(view.window_usage_micros),
            "weeklyBudget": _units(view.spec.weekly_budget_micros),
            "utilization": view.window_usage_micros / view.spec.weekly_budget_micros,
            "projectedUsage": _units(view.forecast.projected_window_spend_micros),
            "spendRatePerHour": _units(view.forecast.spend_rate_micros_per_hour),
            "secondsToThreshold": view.forecast.seconds_to_threshold,
            "recentErrorRate": view.error_rate,
            "windowStart": _iso(view.window_start),
            "windowEnd": _iso(view.window_end),
        }
        for view in status.subscriptions
    ]
    fallback = pool.spec.fallback
    fallback_clients = sorted(clients.get(fallback.id, []))
    if pool.spec.fallback_when_exhausted or fallback_clients:
        # In `.status` so that the guide's session count includes its clients.
        in_use = SubscriptionStatus.ACTIVE if pool.spec.fallback_when_exhausted else SubscriptionStatus.DISABLED
        entries.append(
            {
                "id": fallback.id,
                "type": fallback.type,
                "fallback": True,
                "status": str(in_use),
                "assignedClients": fallback_clients,
                "usage": _units(status.fallback_usage_micros),  # pay-as-you-go: within usage retention
            }
        )
    views = status.subscriptions
    return {
        "asOf": _iso(status.as_of),
        "status": entries,
        "totals": {  # as in the Status RPC's totals
            "subscriptions": len(views),
            "activeSubscriptions": sum(1 for view in views if view.status is SubscriptionStatus.ACTIVE),
            "liveClients": sum(view.live_clients for view in views),
            "fallbackClients": status.fallback_clients,
            "weeklyUsage": _units(sum(view.window_usage_micros for view in views)),
            "weeklyBudget": _units(sum(view.spec.weekly_budget_micros for view in views)),
            "fallbackUsage": _units(status.fallback_usage_micros),
            "averageHealth": sum(view.health for view in views) / len(views) if views else 0.0,
            "lastSequence": status.last_sequence,
        },
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def memory_document(pool: Pool) -> dict[str, Any]:
    """What holds memory, camelCase like the rest of the admin pages."""
    held = {_camel(key): value for key, value in pool.memory().items()}
    held["watchers"] = len(held["watcherBacklogs"])
    return {
        "rssBytes": resident_memory_bytes(),
        "pool": held,
        "asyncioTasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "gcCounts": list(gc.get_count()),
    }


class AdminServer:
    """Serves the admin pages on `listen` (host:port; port 0 picks a free one) in the server's loop."""

    def __init__(
        self,
        pool: Pool,
        metrics: Metrics | None,
        registry: CollectorRegistry,
        security: SecuritySettings,
        listen: str,
        recorder: CallRecorder | None = None,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._recorder = recorder  # calls that ended but are not measured yet: counted before a scrape
        self._registry = registry
        self._security = security
        self._listen = listen
        self._runner: web.AppRunner | None = None
        self._scraping = asyncio.Lock()
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/debug/auth-pool", self._status_page)
        app.router.add_get("/debug/memory", self._memory_page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self._listen.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("admin HTTP serving", extra={"context": {"listen": self._listen, "port": self.port}})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _refused(self, request: web.Request) -> web.Response | None:
        """401/403 unless the request carries an operator token (or auth is off)."""
        if not self._security.auth_required:
            return None
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        principal = self._security.tokens.principal(token.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            return web.json_response(
                {"error": "an operator bearer token is required (Authorization: Bearer <token>)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="authpool"'},
            )
        if principal.role < Role.OPERATOR:
            return web.json_response(
                {"error": f"needs the operator role; this caller has {principal.role}"}, status=403
            )
        return None

    async def _metrics_page(self, request: web.Request) -> web.Response:
        # One scrape at a time (two Prometheus replicas scrape the same target): the
        # OpenTelemetry reader queues each collection and drains the queue when it
        # renders, so overlapping scrapes could render one collection twice.
        async with self._scraping:
            if self._recorder is not None:
                self._recorder.flush()
            if self._metrics is not None:
                self._metrics.refresh()
            # generate_latest runs the collectors, the OpenTelemetry reader among them (a few ms).
            body = await asyncio.to_thread(generate_latest, self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status_page(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        return web.json_response(status_document(self._pool))

    async def _memory_page(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        return web.json_response(memory_document(self._pool))
