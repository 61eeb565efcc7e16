"""The server under test, as its own process: `python -m bench.server --data-dir DIR`.

Builds a pool large enough that the load never runs out of room or budget
(every Allocate is NEW or STICKY, never FALLBACK), starts the real `Server`
with its SQLite store on an ephemeral port (with the whole interceptor chain,
or with none: `--chain`), prints one JSON line
``{"port": ..., "pid": ..., "admin_port": ..., "start_seconds": ...}`` once it
is SERVING (`start_seconds`: how long `Server.start()` took, store load
included), and shuts down gracefully on SIGTERM or SIGINT. With
``--bare-writes`` it also serves `bench.bare_writes` in the same process and
event loop, on the port it adds to that line as ``bare_port``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from authpool_server.domain import MICROS_PER_UNIT, PoolSpec, RebalancePolicy, SubscriptionSpec
from authpool_server.logs import configure_logging
from authpool_server.security.ratelimit import Bucket
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import RateLimits, SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from bench.bare_writes import serve_bare_writes

NO_AUTH = SecuritySettings().without_auth()

__all__ = ["bench_spec", "main"]


def bench_spec(subscriptions: int, max_clients: int, ttl_seconds: float) -> PoolSpec:
    """A pool that stays ACTIVE for the whole run: huge budgets, room for every client."""
    return PoolSpec(
        subscriptions=tuple(
            SubscriptionSpec(
                id=f"bench-sub{i}",
                email=f"team+bench-sub{i}@company.com",
                type="claude-pro",
                credential_ref=f"/creds/.claude-bench-sub{i}",
                weekly_budget_micros=10**9 * MICROS_PER_UNIT,
                max_clients=max_clients,
            )
            for i in range(1, subscriptions + 1)
        ),
        threshold_ppm=850_000,
        fallback_when_exhausted=True,
        lease_ttl_seconds=ttl_seconds,
        # Defaults as shipped: the reaper runs, rebalancing every 300 s (never within a run).
        rebalancing=RebalancePolicy(),
    )


def full_chain_security(token: str) -> SecuritySettings:
    """Auth on (one admin token), rate limits on but far above the load: every check runs, none refuses."""
    return SecuritySettings(
        tokens=TokenDirectory([(token, Principal("bench", Role.ADMIN))]),
        open_services=frozenset({"grpc.health.v1.Health"}),
        rate_limits=RateLimits(default=Bucket(rate=1e9, burst=10**9), principals={}),
    )


async def _serve(args: argparse.Namespace) -> None:
    spec = bench_spec(args.subscriptions, args.max_clients, args.ttl)
    if args.chain == "full":
        # The token comes from the environment, as in production.
        security, intercept = full_chain_security(os.environ["BENCH_TOKEN"]), True
    else:
        security, intercept = NO_AUTH, False
    store = None
    if args.store == "postgres":
        from authpool_server.store.postgres import PostgresStore

        store = PostgresStore(os.environ["BENCH_DATABASE_URL"], schema=args.schema)
    server = Server(
        spec,
        data_dir=Path(args.data_dir),
        security=security,
        intercept=intercept,
        listen=args.listen,
        admin_listen=args.admin_listen,
        grace_seconds=2.0,
        store=store,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    started = time.perf_counter()
    await server.start()
    gc.freeze()  # as `authpool serve` does (authpool_server.server.serve)
    start_seconds = time.perf_counter() - started
    info = {"port": server.port, "pid": os.getpid(), "admin_port": server.admin_port, "start_seconds": start_seconds}
    bare = None
    if args.bare_writes:
        bare, info["bare_port"] = await serve_bare_writes()
    print(json.dumps(info), flush=True)
    try:
        await stop.wait()
    finally:
        if bare is not None:
            await bare.stop(0)
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--admin-listen", help="the admin HTTP address (/debug/memory), e.g. 127.0.0.1:0; default none")
    parser.add_argument("--subscriptions", type=int, default=20)
    parser.add_argument("--max-clients", type=int, default=100_000)
    parser.add_argument("--ttl", type=float, default=600.0)
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--schema", default="authpool_bench", help="PostgreSQL schema (DSN: $BENCH_DATABASE_URL)")
    parser.add_argument(
        "--chain",
        choices=("full", "off"),
        default="full",
        help="full: the interceptor chain as deployed (auth, rate limits, JSON access log at INFO, metrics, "
        "and spans when OTEL_EXPORTER_OTLP_ENDPOINT is set); off: no interceptors at all",
    )
    parser.add_argument(
        "--bare-writes",
        action="store_true",
        help="also serve bench.bare_writes (streams that only write) on a port of its own, in this process",
    )
    args = parser.parse_args(argv)
    if args.chain == "full":
        configure_logging("info", "json")  # one access-log line per call, as in production
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
