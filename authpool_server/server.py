"""Wiring, start and shutdown: the one module that assembles the server.

`Server.start()` opens the store, rebuilds the pool's state, then starts the
gRPC server (TLS when configured) with the interceptor chain, the AuthPool
service, the health service and reflection, and the admin HTTP port; health
turns SERVING only once the state is loaded. `Server.stop()` is the
graceful path: health NOT_SERVING, no new calls, in-flight calls finish
within the grace period, then everything acknowledged is flushed and the
store closed, and the last spans and metrics are exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from authpool_server.admin import AdminServer
from authpool_server.api import authpool_pb2
from authpool_server.config import Settings, WebhookSettings
from authpool_server.delivery import WebhookDispatcher
from authpool_server.domain import PoolSpec
from authpool_server.errors import StartupRefused
from authpool_server.interceptors import ChainedRegistration, TracingStep, build_chain
from authpool_server.pool import Pool
from authpool_server.reload import DEFAULT_POLL_SECONDS, ConfigReloader, ReloadResult
from authpool_server.security.settings import SecuritySettings
from authpool_server.service import AuthPoolService, add_to_server
from authpool_server.store import DATABASE_FILE, Store
from authpool_server.store.sqlite import SQLiteStore
from authpool_server.telemetry.metrics import Metrics
from authpool_server.telemetry.providers import Telemetry, telemetry_from_env
from authpool_server.telemetry.recorder import CallRecorder
from authpool_server.webhooks.sender import WebhookSender

__all__ = ["DATABASE_FILE", "SERVICE_NAME", "Server", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = authpool_pb2.DESCRIPTOR.services_by_name["AuthPool"].full_name
# Below Kubernetes' default 30 s termination grace, so a pod finishes its
# calls and flushes before it is killed.
DEFAULT_GRACE_SECONDS = 10.0
METRICS_SAMPLE_SECONDS = 5.0
READINESS_CHECK_SECONDS = 1.0
# Health service names: Kubernetes probes liveness and readiness separately.
LIVENESS = ("", "liveness")
READINESS = (SERVICE_NAME, "readiness")


class Server:
    """An AuthPool server on `listen` (host:port; port 0 picks a free one).

    Args:
        spec: The pool.
        data_dir: Where the embedded store lives.
        security: Tokens, TLS and limits (`SecuritySettings().without_auth()`
            for local development and tests that are not about auth).
        listen: The gRPC address.
        admin_listen: The admin HTTP address (/metrics, /debug/*); None: no admin port.
        telemetry: OpenTelemetry providers; None builds them from the `OTEL_*` environment.
        intercept: False serves without the interceptor chain (no auth, logs,
            metrics or spans): only for `make bench` to measure the chain's cost.
        webhooks: The webhook channel (with `spec.webhooks_enabled`); None: no delivery.
        store: Where the state lives; None: the embedded SQLite store in `data_dir`.
        config: The settings the server was started from; with their source
            file, the file is watched and a change applied (hot reload).
        config_poll_seconds: How often the config file is checked for
            changes; 0: only on `reload_config()` (SIGHUP).
    """

    def __init__(
        self,
        spec: PoolSpec,
        *,
        data_dir: Path,
        security: SecuritySettings,
        listen: str = "127.0.0.1:50051",
        admin_listen: str | None = None,
        telemetry: Telemetry | None = None,
        intercept: bool = True,
        webhooks: WebhookSettings | None = None,
        store: Store | None = None,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        background: bool = True,
        clock: Callable[[], float] = time.time,
        config: Settings | None = None,
        config_poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> None:
        self.pool = Pool(spec, store if store is not None else SQLiteStore(data_dir / DATABASE_FILE), clock=clock)
        self._clock = clock
        self.health = health_aio.HealthServicer()
        self.security = security
        self.telemetry = telemetry if telemetry is not None else telemetry_from_env(os.environ)
        self.metrics = Metrics(self.telemetry.meter_provider, self.pool) if intercept else None
        provider = self.telemetry.tracer_provider
        self._tracing = TracingStep(provider) if intercept and provider is not None else None
        self.recorder = CallRecorder(self.metrics, self._tracing) if intercept else None
        self._listen = listen
        self._admin = (
            AdminServer(self.pool, self.metrics, self.telemetry.registry, security, admin_listen, self.recorder)
            if admin_listen is not None
            else None
        )
        self._grace = grace_seconds
        self._background = background
        self._server: grpc.aio.Server | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._readiness: asyncio.Task[None] | None = None
        self._webhooks = webhooks
        self._dispatcher: WebhookDispatcher | None = None
        self._config = config
        self._config_poll_seconds = config_poll_seconds
        self.reloader: ConfigReloader | None = None
        self.port = 0

    @property
    def admin_port(self) -> int:
        return self._admin.port if self._admin is not None else 0

    def _bind(self, server: grpc.aio.Server) -> int:
        tls = self.security.tls
        if tls is None:
            return server.add_insecure_port(self._listen)
        credentials = grpc.ssl_server_credentials(
            [(tls.private_key, tls.cert_chain)],
            root_certificates=tls.client_ca,
            require_client_auth=tls.require_client_cert,
        )
        return server.add_secure_port(self._listen, credentials)

    async def start(self) -> None:
        """Serve; if anything fails on the way, release what was started and re-raise."""
        try:
            await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self._teardown(grace=0)
            raise

    async def _start(self) -> None:
        if not self.security.auth_required:
            log.warning(
                "AUTHENTICATION IS OFF: every caller is an admin. For local development only; "
                "never run like this where anyone else can connect."
            )
        elif not self.security.has_credentials:
            raise StartupRefused(
                "authentication is on but no principal has a token: set AUTHPOOL_ADMIN_TOKEN (or another "
                "AUTHPOOL_<ROLE>_TOKEN, or security.auth.principals in the config); for local development "
                "only, start with --insecure-no-auth"
            )
        if self._webhooks is not None and self._webhooks.secret is None:
            raise StartupRefused(
                "notification rules send to the webhook but no signing secret is set: set "
                "AUTHPOOL_WEBHOOK_SECRET (or AUTHPOOL_WEBHOOK_SECRET_FILE) to a Standard Webhooks secret, "
                'e.g. "whsec_$(openssl rand -base64 32)"'
            )
        server = grpc.aio.server(options=[*self.security.grpc_options(), ("grpc.so_reuseport", 0)])
        services: grpc.aio.Server | ChainedRegistration = server
        if self.recorder is not None:
            chain = build_chain(self.security, self.recorder, self._tracing)
            services = ChainedRegistration(server, chain)
        add_to_server(AuthPoolService(self.pool), services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        # What reflection.enable_server_reflection does for a grpc.aio server, through the chain.
        reflection_names = (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(reflection_names), services
        )
        for service in (*LIVENESS, *READINESS):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._bind(server)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await server.start()
        self._server = server
        await self.pool.start(background=self._background)
        if self._webhooks is not None and self._webhooks.secret is not None:
            sender = WebhookSender(
                self._webhooks.url,
                self._webhooks.secret,
                timeout_seconds=self._webhooks.policy.timeout_seconds,
                ca_file=self._webhooks.ca_file,
                allow_insecure_loopback=self._webhooks.allow_insecure_loopback,
            )
            self._dispatcher = WebhookDispatcher(self.pool, sender, self._webhooks.policy, clock=self._clock)
            self._dispatcher.start()
        if self.metrics is not None:
            self.metrics.refresh()
            if self._background:
                self._sampler = asyncio.create_task(self._sample_forever(), name="authpool-metrics")
        if self._admin is not None:
            await self._admin.start()
        if self._config is not None and self._config.source is not None:
            self.reloader = ConfigReloader(
                self._config.source,
                self._config,
                self.pool,
                poll_seconds=self._config_poll_seconds,
                on_result=self._reloaded,
            )
            self.reloader.start()
        for service in (*LIVENESS, *READINESS):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._readiness = asyncio.create_task(self._watch_readiness(), name="authpool-readiness")
        log.info(
            "serving",
            extra={
                "context": {
                    "listen": self._listen,
                    "port": self.port,
                    "tls": self.security.tls is not None,
                    "admin_port": self.admin_port,
                    "pid": os.getpid(),
                }
            },
        )

    def reload_config(self) -> None:
        """Reload the config file now (what SIGHUP does); a no-op without one."""
        if self.reloader is not None:
            self.reloader.request()

    def _reloaded(self, result: ReloadResult) -> None:
        if self.metrics is not None:
            self.metrics.config_reloaded(result.result)

    async def _watch_readiness(self) -> None:
        """Readiness follows the store; liveness stays SERVING (a store outage is no reason to restart).

        Kubernetes stops routing to a pod whose readiness fails and restarts
        one whose liveness fails; a database outage must do the first only,
        and the pool recovers by itself when the store returns.
        """
        serving = True
        while True:
            await asyncio.sleep(READINESS_CHECK_SECONDS)
            ready = await self.pool.check_ready()
            if ready != serving:
                serving = ready
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                for service in READINESS:
                    await self.health.set(service, status)
                log.warning("ready again" if ready else "not ready: the store is unavailable")

    async def _sample_forever(self) -> None:
        # Gauges are read by exporters on their own threads; they see this snapshot.
        while True:
            await asyncio.sleep(METRICS_SAMPLE_SECONDS)
            try:
                self.metrics.refresh()  # type: ignore[union-attr]
            except Exception:
                log.exception("metrics snapshot failed; the gauges keep the previous one")

    async def stop(self) -> None:
        """Drain and stop: in-flight calls finish, acknowledged state is flushed, telemetry is flushed."""
        await self._teardown(self._grace)

    async def _teardown(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        # Event streams never end by themselves: end them now (each is told where to resume)
        # rather than have them hold the shutdown for the whole grace period.
        self.pool.events.close()
        try:
            if self._server is not None:
                await self._server.stop(grace)
        finally:
            if self.recorder is not None:
                self.recorder.close()  # the last calls' access lines and measurements, and any later call's at once
        if self.reloader is not None:
            await self.reloader.close()
        for task in (self._sampler, self._readiness):
            if task is not None:
                task.cancel()
        if self._admin is not None:
            await self._admin.stop()
        if self._dispatcher is not None:
            await self._dispatcher.close()
        await self.pool.close()
        await asyncio.to_thread(self.telemetry.shutdown)
        log.info("stopped")


async def serve(
    spec: PoolSpec,
    *,
    data_dir: Path,
    listen: str,
    security: SecuritySettings,
    admin_listen: str | None,
    webhooks: WebhookSettings | None,
    store: Store,
    config: Settings | None = None,
    config_poll_seconds: float = DEFAULT_POLL_SECONDS,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the config file."""
    server = Server(
        spec,
        data_dir=data_dir,
        listen=listen,
        security=security,
        admin_listen=admin_listen,
        webhooks=webhooks,
        store=store,
        config=config,
        config_poll_seconds=config_poll_seconds,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_config)
    await server.start()
    # The state just loaded lives as long as the process: keep it out of every later cyclic
    # collection, each of which would otherwise walk it all (a third of a second per million
    # usage records). Done here, for the process `authpool serve` owns, not in the library.
    gc.freeze()
    try:
        await stop.wait()
        log.info("shutdown requested; finishing in-flight calls")
    finally:
        await server.stop()
