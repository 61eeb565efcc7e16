"""The soak: a million lease lifecycles in one process, and what it holds afterwards.

`python -m bench.soak --lifecycles 1000000` drives the real `Pool` on the real
`SQLiteStore` (WAL, synchronous=FULL, in a fresh directory under
``var/bench``) in this process, with a clock the driver moves: each
lifecycle is Allocate -> ReportUsage -> Release, and one in ten abandons its
lease instead, which the reaper expires once its time to live has passed.
Simulated time runs `--weeks` (default 3) weeks over the run, so leases
expire, budget windows roll every week and the pruning (every 600 s of pool
time) drops usage records older than the retention (7 days, as shipped)
and ended leases older than an hour: the pool's state fills up during the
first retention period (the warm-up) and must stay flat after it.

Why in-process rather than over gRPC: a lifecycle over gRPC costs five RPCs
(about 360 lifecycles/s on the bench machine), so a million would take
about 50 minutes; the pool and its store are what keeps state, and they
run here exactly as in the server, only without the RPC stack in front.
`bench.soak_rpc` soaks the RPC stack itself for a shorter run.

At checkpoints (after a full garbage collection) it samples the process's
RSS, its open file descriptors, threads, asyncio tasks, the live objects of
every `authpool_server` type (by `gc.get_objects()`), and `Pool.memory()`.
It prints one JSON document: the checkpoints and the growth of each figure
from the end of the warm-up to the end (``soak_rss_growth`` is RSS's).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from authpool_server.domain import Outcome, PoolSpec
from authpool_server.pool import Pool, UsageReport
from authpool_server.store.sqlite import SQLiteStore
from bench.procs import run_in_scratch
from bench.server import bench_spec

__all__ = ["main", "run_soak"]

ROOT = Path(__file__).resolve().parent.parent
_PAGE = os.sysconf("SC_PAGE_SIZE")
_WEEK = 7 * 86_400.0
_START = 1_764_000_000.0  # a Tuesday, mid-window
_REAP_EVERY = 5.0  # pool seconds, as the server's reaper (min(5, ttl / 4))
_ABANDON_EVERY = 10  # one lifecycle in ten lets its lease expire instead of releasing it
_CLIENTS = 100_000  # distinct client ids, reused round-robin


class SimClock:
    """The pool's clock, moved by the driver."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def own_objects(prefix: str = "authpool_server") -> Counter[str]:
    """Live objects of the server's own types, by qualified type name (after a full collection)."""
    gc.collect()
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = kind.__module__
        if isinstance(module, str) and module.startswith(prefix):
            counts[f"{module}.{kind.__qualname__}"] += 1
    return counts


def sample(pool: Pool, done: int, clock: SimClock, started: float) -> dict[str, Any]:
    objects = own_objects()
    memory = pool.memory()
    return {
        "lifecycles": done,
        "pool_days": round((clock.now - _START) / 86_400, 3),
        "wall_seconds": round(time.monotonic() - started, 1),
        "rss_bytes": rss_bytes(),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "open_fds": open_fds(),
        "threads": threading.active_count(),
        "asyncio_tasks": len(asyncio.all_tasks()),
        "gc_objects": len(gc.get_objects()),
        "own_objects_total": sum(objects.values()),
        "own_objects": dict(sorted(objects.items())),
        "pool": {key: value for key, value in memory.items() if key != "watcher_backlogs"},
    }


def soak_spec(subscriptions: int) -> PoolSpec:
    """The bench pool (room and budget for everyone) with the shipped TTL and retention."""
    return bench_spec(subscriptions, max_clients=100_000, ttl_seconds=60.0)


async def _lifecycle(pool: Pool, n: int) -> None:
    allocation = await pool.allocate(f"client-{n % _CLIENTS}")
    lease = allocation.lease
    await pool.report_usage(
        UsageReport(
            request_id=f"req-{n}",
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
            cost_micros=25_000 + n % 1000,
            input_tokens=1200,
            output_tokens=300,
            model="claude-sonnet-4",
            outcome=Outcome.OK,
        )
    )
    if n % _ABANDON_EVERY:
        await pool.release(lease.lease_id, lease.fencing_token)


async def run_soak(
    lifecycles: int,
    *,
    data_dir: Path,
    concurrency: int = 64,
    subscriptions: int = 20,
    weeks: float = 3.0,
    checkpoints: int = 20,
    progress: bool = True,
) -> dict[str, Any]:
    """Drive `lifecycles` lifecycles through a pool on a SQLite store in `data_dir`; the samples and growth."""
    spec = soak_spec(subscriptions)
    clock = SimClock(_START)
    pool = Pool(spec, SQLiteStore(data_dir / "authpool.sqlite3"), clock=clock)
    await pool.start(background=False)  # the driver reaps on the pool's clock, as the reaper would
    # Each round runs `concurrency` lifecycles at once, then time moves on by their share of the run.
    step = weeks * _WEEK / lifecycles
    warmup_until = _START + spec.usage_retention_seconds + 3600.0  # a retention period and an hour
    every = max(concurrency, lifecycles // checkpoints)
    started = time.monotonic()
    samples = [sample(pool, 0, clock, started)]
    warmup_index: int | None = None
    last_reap = clock.now
    done = 0
    try:
        while done < lifecycles:
            batch = min(concurrency, lifecycles - done)
            await asyncio.gather(*(_lifecycle(pool, done + i) for i in range(batch)))
            done += batch
            clock.now += batch * step
            if clock.now - last_reap >= _REAP_EVERY:
                last_reap = clock.now
                await pool.reap()
            if done % every < batch or done == lifecycles:
                samples.append(sample(pool, done, clock, started))
                if warmup_index is None and clock.now >= warmup_until:
                    warmup_index = len(samples) - 1
                if progress:
                    last = samples[-1]
                    print(
                        f"soak: {done:,} lifecycles, day {last['pool_days']:.1f}, RSS "
                        f"{last['rss_bytes'] / 2**20:.0f} MiB, {last['own_objects_total']:,} own objects, "
                        f"{last['pool']['usage_records']:,} usage records, {done / (time.monotonic() - started):,.0f}"
                        " lifecycles/s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        await pool.close()
    wall = time.monotonic() - started
    return {
        "lifecycles": lifecycles,
        "wall_seconds": wall,
        "lifecycles_per_s": lifecycles / wall,
        "pool_days": (clock.now - _START) / 86_400,
        "warmup_days": (warmup_until - _START) / 86_400,
        "samples": samples,
        "growth": growth(samples, warmup_index),
    }


def growth(samples: list[dict[str, Any]], warmup_index: int | None) -> dict[str, Any]:
    """How each figure changed from the end of the warm-up to the end, and its peak after the warm-up."""
    if warmup_index is None or warmup_index >= len(samples) - 1:
        return {"measured": False}
    after = samples[warmup_index:]
    base, end = after[0], after[-1]
    out: dict[str, Any] = {
        "measured": True,
        "from_lifecycle": base["lifecycles"],
        "rss_growth": end["rss_bytes"] / base["rss_bytes"] - 1,
        "rss_peak_growth": max(s["rss_bytes"] for s in after) / base["rss_bytes"] - 1,
    }
    for key in ("open_fds", "threads", "asyncio_tasks", "own_objects_total", "gc_objects"):
        out[f"{key}_growth"] = end[key] - base[key]
        out[f"{key}_peak"] = max(s[key] for s in after)
    out["pool_growth"] = {key: end["pool"][key] - base["pool"][key] for key in base["pool"]}
    kinds = set(base["own_objects"]) | set(end["own_objects"])
    out["own_objects_growth"] = {
        kind: end["own_objects"].get(kind, 0) - base["own_objects"].get(kind, 0)
        for kind in sorted(kinds)
        if end["own_objects"].get(kind, 0) != base["own_objects"].get(kind, 0)
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lifecycles", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--subscriptions", type=int, default=20)
    parser.add_argument("--weeks", type=float, default=3.0, help="pool time the run spans")
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)

    def run(scratch: Path) -> dict[str, Any]:
        return asyncio.run(
            run_soak(
                args.lifecycles,
                data_dir=scratch,
                concurrency=args.concurrency,
                subscriptions=args.subscriptions,
                weeks=args.weeks,
                checkpoints=args.checkpoints,
            )
        )

    return run_in_scratch(args.work_dir, "soak-", args.out, run)


if __name__ == "__main__":
    raise SystemExit(main())
