"""The soak over gRPC: lease lifecycles through a real server process, and what the process holds.

`python -m bench.soak_rpc` starts a `bench.server` as deployed (the whole
interceptor chain with a token, access logs, metrics; no trace exporter)
with its admin port, then runs the `bench.load` lifecycle scenario (Allocate,
ReportUsage x3, Release) `--segments` times, each from a new load process on
a new connection. Before the first segment, and after each, it reads the
server's RSS, open file descriptors and threads from /proc and
``/debug/memory`` (asyncio tasks, the pool's sizes). The first segment is the
warm-up; growth is measured from its end.

This covers what `bench.soak` (a million lifecycles through the pool
in-process) does not: the RPC stack, connections coming and going, the
interceptors. Its run is minutes of real time, so the usage records it writes
are all within their 7-day retention and the pool rightly keeps them: RSS
grows with them here, and the figure to read is whether descriptors, threads
and tasks stay flat and RSS per lifecycle stays at what those records cost.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import ServerHandle, open_fds, rss_bytes, run_in_scratch, run_load, serve, thread_count

__all__ = ["main", "run_soak_rpc"]

ROOT = Path(__file__).resolve().parent.parent


def _settled_fds(pid: int) -> int:
    """Open descriptors, the fewest of a few readings: the last load process's connection may still be closing."""
    readings = []
    for _ in range(5):
        readings.append(open_fds(pid))
        time.sleep(0.1)
    return min(readings)


def _sample(server: ServerHandle, token: str, lifecycles: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.admin_port}/debug/memory", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 (a fixed http://127.0.0.1 URL)
        memory = json.loads(reply.read())
    return {
        "lifecycles": lifecycles,
        "rss_bytes": rss_bytes(server.pid),
        "open_fds": _settled_fds(server.pid),
        "threads": thread_count(server.pid),
        "asyncio_tasks": memory["asyncioTasks"],
        "pool": {key: value for key, value in memory["pool"].items() if key != "watcherBacklogs"},
    }


def run_soak_rpc(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    token = secrets.token_hex(24)
    samples: list[dict[str, Any]] = []
    done = 0
    started = time.monotonic()
    with serve(
        work_dir / "data-soak",
        work_dir / "server-soak.stderr",
        subscriptions=20,
        chain="full",
        env={"BENCH_TOKEN": token},
        extra=("--admin-listen", "127.0.0.1:0"),
    ) as server:
        samples.append(_sample(server, token, done))
        for segment in range(max(2, args.segments)):
            result = run_load(
                server,
                "lifecycle",
                work_dir / f"soak-{segment}.json",
                concurrency=args.concurrency,
                warmup=0.0,
                duration=args.seconds,
                prefix=f"k{os.getpid()}s{segment}",
                token=token,
            )
            if any(result["errors"].values()):
                raise RuntimeError(f"lifecycle calls failed during the soak: {result['errors']}")
            done += len(result["latencies_us"].get("lifecycle", []))
            samples.append(_sample(server, token, done))
            last = samples[-1]
            print(
                f"soak over gRPC: {done:,} lifecycles, RSS {last['rss_bytes'] / 2**20:.0f} MiB, "
                f"{last['open_fds']} fds, {last['threads']} threads, {last['asyncio_tasks']} tasks",
                file=sys.stderr,
                flush=True,
            )
    base, end = samples[1], samples[-1]
    measured = end["lifecycles"] - base["lifecycles"]
    usage_added = end["pool"]["usageRecords"] - base["pool"]["usageRecords"]
    return {
        "lifecycles": done,
        "wall_seconds": time.monotonic() - started,
        "samples": samples,
        "growth": {
            "from_lifecycle": base["lifecycles"],
            "rss_growth": end["rss_bytes"] / base["rss_bytes"] - 1,
            "rss_bytes_per_lifecycle": (end["rss_bytes"] - base["rss_bytes"]) / measured if measured else None,
            "usage_records_added": usage_added,
            "rss_bytes_per_usage_record": (end["rss_bytes"] - base["rss_bytes"]) / usage_added if usage_added else None,
            **{f"{key}_growth": end[key] - base[key] for key in ("open_fds", "threads", "asyncio_tasks")},
            "pool_growth": {key: end["pool"][key] - base["pool"][key] for key in base["pool"]},
        },
    }


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_rpc", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=int(_env("BENCH_SOAK_RPC_SEGMENTS", "5")))
    parser.add_argument("--seconds", type=float, default=float(_env("BENCH_SOAK_RPC_SECONDS", "6")))
    parser.add_argument("--concurrency", type=int, default=int(_env("BENCH_CONCURRENCY", "16")))
    parser.add_argument("--work-dir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)
    return run_in_scratch(args.work_dir, "soak-rpc-", args.out, lambda scratch: run_soak_rpc(args, scratch))


if __name__ == "__main__":
    raise SystemExit(main())
