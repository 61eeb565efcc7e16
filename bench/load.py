"""The load generator, as its own process: `python -m bench.load --target HOST:PORT --scenario NAME`.

N closed-loop workers share one grpc.aio channel. The process connects and
warms the channel, prints ``ready``, waits for a line on stdin (so several
load processes start together), then runs `warmup` seconds unmeasured and
`duration` seconds measured. A call is measured when it starts inside the
measured window; its latency is taken around the awaited call, on the client.

Scenarios:

``noop``
    grpc.health.v1.Health/Check: the server stack with no application work.
``allocate``
    Allocate, about half for client ids never seen (NEW: a grant, one durable
    commit) and half re-allocating an id this worker already holds a lease
    for (STICKY: answered from memory). Nothing is released, so the number
    of live leases grows with the run; the bench pool has room for all of
    them, so no call is turned to the fallback (checked: the decisions are
    counted).
``lifecycle``
    Allocate (NEW) -> ReportUsage x3 -> Release, back to back; the latency is
    the whole lifecycle's, and each RPC's is recorded too.

The result is written as JSON to ``--out``: latencies in microseconds per
series, error counts by status code, decision counts, and CPU time used in
the measured window by this process, by the server process and by the
whole machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["SCENARIOS", "main"]

SCENARIOS = ("noop", "allocate", "lifecycle")
_CALL_TIMEOUT = 10.0
_NS_PER_US = 1_000
_DECISION_NAMES = {value: name for name, value in pb.DecisionKind.items()}


@dataclass
class Run:
    """Shared state of one load process's workers."""

    stub: authpool_pb2_grpc.AuthPoolStub
    health: health_pb2_grpc.HealthStub
    prefix: str
    sticky_fraction: float
    metadata: tuple[tuple[str, str], ...] = ()
    measure_from: int = 0  # perf_counter_ns
    measure_until: int = 0
    latencies: dict[str, list[int]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)

    def series(self, name: str) -> list[int]:
        return self.latencies.setdefault(name, [])


# -- workers ------------------------------------------------------------------


async def _noop(run: Run, worker: int) -> None:
    check = run.health.Check
    request = health_pb2.HealthCheckRequest(service="")
    out = run.series("noop")
    clock, measure_from, until = time.perf_counter_ns, run.measure_from, run.measure_until
    while (start := clock()) < until:
        try:
            await check(request, timeout=_CALL_TIMEOUT, metadata=run.metadata)
        except grpc.aio.AioRpcError as error:
            run.errors[error.code().name] += 1
            continue
        if start >= measure_from:
            out.append((clock() - start) // _NS_PER_US)


async def _allocate(run: Run, worker: int) -> None:
    allocate = run.stub.Allocate
    rng = random.Random(f"{run.prefix}-{worker}")
    held: list[str] = []
    fresh = 0
    every, new, sticky = run.series("allocate"), run.series("allocate_new"), run.series("allocate_sticky")
    clock, measure_from, until = time.perf_counter_ns, run.measure_from, run.measure_until
    while True:
        if held and rng.random() < run.sticky_fraction:
            client_id, expected, kind = held[rng.randrange(len(held))], pb.DECISION_KIND_STICKY, sticky
        else:
            fresh += 1
            client_id, expected, kind = f"{run.prefix}-a{worker}-{fresh}", pb.DECISION_KIND_NEW, new
        request = pb.AllocateRequest(client_id=client_id)
        if (start := clock()) >= until:
            return
        try:
            reply = await allocate(request, timeout=_CALL_TIMEOUT, metadata=run.metadata)
        except grpc.aio.AioRpcError as error:
            run.errors[error.code().name] += 1
            continue
        end = clock()
        if expected == pb.DECISION_KIND_NEW:
            held.append(client_id)
        if start >= measure_from:
            every.append((end - start) // _NS_PER_US)
            kind.append((end - start) // _NS_PER_US)
            run.decisions[_DECISION_NAMES[reply.decision]] += 1
            if reply.decision != expected:
                run.unexpected[f"{_DECISION_NAMES[expected]}->{_DECISION_NAMES[reply.decision]}"] += 1


async def _lifecycle(run: Run, worker: int) -> None:
    stub = run.stub
    whole, alloc, report, release = (
        run.series("lifecycle"),
        run.series("lifecycle_allocate"),
        run.series("lifecycle_report_usage"),
        run.series("lifecycle_release"),
    )
    clock, measure_from, until = time.perf_counter_ns, run.measure_from, run.measure_until
    n = 0
    while (start := clock()) < until:
        n += 1
        measured = start >= measure_from
        try:
            request = pb.AllocateRequest(client_id=f"{run.prefix}-l{worker}-{n}")
            reply = await stub.Allocate(request, timeout=_CALL_TIMEOUT, metadata=run.metadata)
            t1 = clock()
            lease = reply.lease
            if measured:
                alloc.append((t1 - start) // _NS_PER_US)
                run.decisions[_DECISION_NAMES[reply.decision]] += 1
            for i in range(3):
                t0 = clock()
                await stub.ReportUsage(
                    pb.ReportUsageRequest(
                        request_id=f"{run.prefix}-l{worker}-{n}-{i}",
                        lease_id=lease.lease_id,
                        fencing_token=lease.fencing_token,
                        cost_micros=1_000,
                        input_tokens=1_200,
                        output_tokens=300,
                        model="claude-sonnet-4",
                        outcome=pb.USAGE_OUTCOME_OK,
                    ),
                    timeout=_CALL_TIMEOUT,
                    metadata=run.metadata,
                )
                if measured:
                    report.append((clock() - t0) // _NS_PER_US)
            t0 = clock()
            released = await stub.Release(
                pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token),
                timeout=_CALL_TIMEOUT,
                metadata=run.metadata,
            )
            end = clock()
        except grpc.aio.AioRpcError as error:
            run.errors[error.code().name] += 1
            continue
        if measured:
            release.append((end - t0) // _NS_PER_US)
            whole.append((end - start) // _NS_PER_US)
            if not released.released:
                run.unexpected["release->not released"] += 1


_WORKERS: dict[str, Callable[[Run, int], Awaitable[None]]] = {
    "noop": _noop,
    "allocate": _allocate,
    "lifecycle": _lifecycle,
}


# -- CPU accounting -------------------------------------------------------------


def _process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of another process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / ticks, total / ticks


@dataclass
class CpuSnapshot:
    wall: float
    client: float
    server: float | None
    machine: tuple[float, float] | None

    @classmethod
    def take(cls, server_pid: int | None) -> CpuSnapshot:
        return cls(
            wall=time.monotonic(),
            client=time.process_time(),
            server=_process_cpu_seconds(server_pid) if server_pid else None,
            machine=_machine_cpu(),
        )


def _cpu_usage(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float | None]:
    wall = after.wall - before.wall
    server = None if before.server is None or after.server is None else after.server - before.server
    machine = None
    if before.machine is not None and after.machine is not None:
        busy = after.machine[0] - before.machine[0]
        total = after.machine[1] - before.machine[1]
        machine = busy / total if total > 0 else None
    return {
        "wall_seconds": wall,
        "client_cpu_seconds": after.client - before.client,
        "server_cpu_seconds": server,
        "machine_busy_fraction": machine,
        "machine_cpus": os.cpu_count(),
    }


async def _cpu_window(run: Run, server_pid: int | None) -> dict[str, float | None]:
    await asyncio.sleep(max(0.0, (run.measure_from - time.perf_counter_ns()) / 1e9))
    before = CpuSnapshot.take(server_pid)
    await asyncio.sleep(max(0.0, (run.measure_until - time.perf_counter_ns()) / 1e9))
    return _cpu_usage(before, CpuSnapshot.take(server_pid))


# -- the process ------------------------------------------------------------------


async def _prime(run: Run) -> None:
    """Connect and run each RPC once, so connection set-up is not measured."""
    await run.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=_CALL_TIMEOUT)
    reply = await run.stub.Allocate(
        pb.AllocateRequest(client_id=f"{run.prefix}-prime"), timeout=_CALL_TIMEOUT, metadata=run.metadata
    )
    lease = reply.lease
    await run.stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id=f"{run.prefix}-prime", lease_id=lease.lease_id, fencing_token=lease.fencing_token
        ),
        timeout=_CALL_TIMEOUT,
        metadata=run.metadata,
    )
    await run.stub.Release(
        pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token),
        timeout=_CALL_TIMEOUT,
        metadata=run.metadata,
    )


async def _wait_for_go() -> None:
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("bench.load: expected 'go' on stdin")


async def _run(args: argparse.Namespace) -> dict[str, object]:
    async with grpc.aio.insecure_channel(args.target) as channel:
        run = Run(
            stub=authpool_pb2_grpc.AuthPoolStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
            prefix=args.prefix,
            sticky_fraction=args.sticky_fraction,
            # A server with auth on gets BENCH_TOKEN, set by `python -m bench` (never in argv).
            metadata=(("authorization", f"Bearer {token}"),) if (token := os.environ.get("BENCH_TOKEN")) else (),
        )
        await _prime(run)
        await _wait_for_go()
        start = time.perf_counter_ns()
        run.measure_from = start + int(args.warmup * 1e9)
        run.measure_until = run.measure_from + int(args.duration * 1e9)
        worker = _WORKERS[args.scenario]
        cpu = asyncio.create_task(_cpu_window(run, args.server_pid))
        await asyncio.gather(*(worker(run, i) for i in range(args.concurrency)))
        cpu_usage = await cpu
    return {
        "scenario": args.scenario,
        "concurrency": args.concurrency,
        "warmup_seconds": args.warmup,
        "duration_seconds": args.duration,
        "latencies_us": run.latencies,
        "errors": dict(run.errors),
        "decisions": dict(run.decisions),
        "unexpected": dict(run.unexpected),
        "cpu": cpu_usage,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("--target", required=True, help="host:port of the server")
    parser.add_argument("--scenario", required=True, choices=SCENARIOS)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--sticky-fraction", type=float, default=0.5)
    parser.add_argument("--prefix", default=f"b{os.getpid()}", help="client and request id prefix, unique per run")
    parser.add_argument("--server-pid", type=int, default=0, help="to account the server's CPU time")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    result = asyncio.run(_run(args))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
