"""Scale: 1,000 subscriptions, 15,000 live leases and a million usage records.

`python -m bench.scale` writes that state straight through `SQLiteStore.write`
(big `WriteBatch`es: seconds, where 15,000 Allocates and a million
ReportUsage calls over gRPC would take most of an hour) into a fresh data
directory under ``var/bench``, then:

* **recovery**: starts a `bench.server` on it `--restarts` times (each a
  graceful stop and a cold process start) and times each from spawning the
  process to its first SERVING health check (``recovery_s``, the median);
  `Server.start()` alone (store open, state rebuilt, gRPC up) is
  ``recovery_start_s``;
* **Allocate at scale**: against the last of those servers and a fresh
  three-subscription one (both without interceptors, so the pool's share of
  each call is as large as it gets), runs the `bench.load` Allocate scenario
  (half new clients, half sticky) `--rounds` times each, alternating, and
  reports the pooled p50 of the big pool over the small one
  (``scale_p50_ratio``), with server CPU per Allocate beside it.

The usage records are spread over the six days before now, so all of them
are within the retention and count at start (the last six hours' loaded
whole, the rest summarised in SQL: see `authpool_server/store/usage.py`);
their costs are small enough that no budget is ever near its limit. One JSON document goes to stdout or
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from authpool_server.domain import Event, EventType, Lease, Outcome, UsageRecord
from authpool_server.store import DATABASE_FILE
from authpool_server.store.base import WriteBatch
from authpool_server.store.sqlite import SQLiteStore
from bench.procs import rss_bytes, run_in_scratch, run_load, serve
from bench.stats import summarize

__all__ = ["build_state", "main", "run_scale"]

ROOT = Path(__file__).resolve().parent.parent
_BATCH = 50_000
_USAGE_SPAN = 6 * 86_400.0
_LEASE_LIFETIME = 4 * 3600.0  # far beyond the run: none expires while it is measured


def _subscription(index: int) -> str:
    return f"bench-sub{index + 1}"  # as `bench.server.bench_spec` names them


async def build_state(path: Path, *, subscriptions: int, leases: int, usage: int, now: float) -> dict[str, Any]:
    """Write `leases` live leases and `usage` usage records (with a grant event per lease) into a new store."""
    started = time.perf_counter()
    store = SQLiteStore(path)
    await store.open()
    try:
        batch = WriteBatch()
        for i in range(leases):
            sub, lease_id, client_id = _subscription(i % subscriptions), f"scale-lease-{i:08d}", f"scale-client-{i}"
            batch.leases.append(
                Lease(lease_id, client_id, "", sub, False, now - 60, now + _LEASE_LIFETIME, i + 1, i + 1, now - 60)
            )
            batch.events.append(Event(i + 1, now - 60, EventType.LEASE_GRANTED, sub, client_id, lease_id, i + 1))
        batch.fencing_token = leases
        await store.write(batch)
        for first in range(0, usage, _BATCH):
            batch = WriteBatch()
            for j in range(first, min(usage, first + _BATCH)):
                lease = j % max(1, leases)
                batch.usage.append(
                    UsageRecord(
                        request_id=f"scale-req-{j:08d}",
                        lease_id=f"scale-lease-{lease:08d}",
                        client_id=f"scale-client-{lease}",
                        subscription_id=_subscription(lease % subscriptions),
                        fallback=False,
                        at=now - _USAGE_SPAN + _USAGE_SPAN * j / usage,
                        cost_micros=1_000 + j % 100,
                        input_tokens=1_000,
                        output_tokens=200,
                        model="claude-sonnet-4",
                        outcome=Outcome.OK,
                    )
                )
            await store.write(batch)
    finally:
        await store.close()
    size = path.stat().st_size  # noqa: ASYNC240 (the store is closed: nothing else runs)
    return {
        "subscriptions": subscriptions,
        "live_leases": leases,
        "usage_records": usage,
        "build_seconds": time.perf_counter() - started,
        "database_bytes": size,
    }


def _pooled(runs: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    latencies = [value for run in runs for value in run["latencies_us"].get("allocate", [])]
    figures = summarize(latencies, duration * len(runs))
    server_cpu = [run["cpu"]["server_cpu_seconds"] for run in runs]
    calls = figures["count"]
    figures["server_cpu_us_per_rpc"] = (
        sum(server_cpu) / calls * 1e6 if calls and None not in server_cpu else None  # type: ignore[arg-type]
    )
    figures["errors"] = sum(sum(run["errors"].values()) for run in runs)
    figures["unexpected"] = sum(sum(run["unexpected"].values()) for run in runs)
    figures["p50_ms_per_run"] = [summarize(run["latencies_us"].get("allocate", []), duration)["p50_ms"] for run in runs]
    return figures


def run_scale(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    data_dir = work_dir / "data-scale"
    data_dir.mkdir(parents=True)
    print(
        f"scale: writing {args.leases:,} leases and {args.usage:,} usage records on {args.subscriptions:,} "
        "subscriptions ...",
        file=sys.stderr,
        flush=True,
    )
    state = asyncio.run(
        build_state(
            data_dir / DATABASE_FILE,
            subscriptions=args.subscriptions,
            leases=args.leases,
            usage=args.usage,
            now=time.time(),
        )
    )
    restarts: list[dict[str, float]] = []
    runs: dict[str, list[dict[str, Any]]] = {"small": [], "scale": []}
    for index in range(max(1, args.restarts)):
        last = index == max(1, args.restarts) - 1
        with serve(
            data_dir,
            work_dir / f"server-scale-{index}.stderr",
            subscriptions=args.subscriptions,
            max_clients=args.max_clients,
        ) as server:
            restarts.append(
                {
                    "seconds_to_serving": server.seconds_to_serving,
                    "server_start_seconds": server.start_seconds,
                    "rss_bytes": rss_bytes(server.pid),
                }
            )
            print(
                f"scale: restart {index + 1}: SERVING {server.seconds_to_serving:.2f}s after spawning "
                f"(Server.start() {server.start_seconds:.2f}s), RSS {restarts[-1]['rss_bytes'] / 2**20:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
            if not last:
                continue
            with serve(work_dir / "data-small", work_dir / "server-small.stderr", subscriptions=3) as small:
                for round_ in range(max(1, args.rounds)):
                    order = [("small", small), ("scale", server)][:: 1 if round_ % 2 == 0 else -1]
                    for name, target in order:
                        print(f"scale: Allocate on the {name} pool, round {round_ + 1}", file=sys.stderr, flush=True)
                        runs[name].append(
                            run_load(
                                target,
                                "allocate",
                                work_dir / f"{round_}-{name}.json",
                                concurrency=args.concurrency,
                                warmup=args.warmup,
                                duration=args.duration,
                                prefix=f"s{os.getpid()}r{round_}{name}",
                            )
                        )
    small_figures, scale_figures = _pooled(runs["small"], args.duration), _pooled(runs["scale"], args.duration)
    recovery = [run["seconds_to_serving"] for run in restarts]
    start_only = [run["server_start_seconds"] for run in restarts]

    def ratio(key: str) -> float | None:
        a, b = scale_figures.get(key), small_figures.get(key)
        return a / b if a is not None and b else None

    return {
        "scale_p50_ratio": ratio("p50_ms"),
        "scale_p99_ratio": ratio("p99_ms"),
        "scale_cpu_ratio": ratio("server_cpu_us_per_rpc"),
        "recovery_s": statistics.median(recovery),
        "recovery_start_s": statistics.median(start_only),
        "state": state,
        "restarts": restarts,
        "allocate_small": small_figures,
        "allocate_scale": scale_figures,
        "settings": {
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "warmup_seconds": args.warmup,
            "duration_seconds": args.duration,
            "max_clients_per_subscription": args.max_clients,
            "chain": "off (no interceptors)",
        },
    }


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--subscriptions", type=int, default=int(_env("BENCH_SCALE_SUBSCRIPTIONS", "1000")))
    parser.add_argument("--leases", type=int, default=int(_env("BENCH_SCALE_LEASES", "15000")))
    parser.add_argument("--usage", type=int, default=int(_env("BENCH_SCALE_USAGE", "1000000")))
    parser.add_argument("--max-clients", type=int, default=100, help="per subscription of the big pool")
    parser.add_argument("--restarts", type=int, default=int(_env("BENCH_SCALE_RESTARTS", "3")))
    parser.add_argument("--rounds", type=int, default=int(_env("BENCH_ROUNDS", "2")))
    parser.add_argument("--concurrency", type=int, default=int(_env("BENCH_CONCURRENCY", "16")))
    parser.add_argument("--warmup", type=float, default=float(_env("BENCH_WARMUP", "1.5")))
    parser.add_argument("--duration", type=float, default=float(_env("BENCH_DURATION", "5")))
    parser.add_argument("--work-dir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_in_scratch(args.work_dir, "scale-", args.out, lambda scratch: run_scale(args, scratch))


if __name__ == "__main__":
    raise SystemExit(main())
