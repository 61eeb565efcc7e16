"""One load-generator process: `python -m loadtest.generator --target HOST:PORT --plan JSON --out FILE`.

Drives a share of the plan's traffic over one grpc.aio channel, as the
many services of a deployment would: each request is one step in the life
of some client's lease, drawn from `MIX`:

* ``Allocate``: mostly for a client id of this process's population that
  holds no lease (a new lease, or the fallback once the pool is full), the
  rest for a client that holds one (answered sticky);
* ``Renew``: the heartbeat of the lease renewed longest ago, so that every
  lease held is renewed well within its TTL;
* ``ReportUsage``: a provider request's cost on a random lease, heavy-tailed
  around the mean that brings the pool near its budgets over the run;
* ``Release``: a random lease ends;
* ``Status``: an operator's dashboard, with every live lease one time in ten.

No two calls work on one lease at once, and the process holds at most
``--live-cap`` leases: the load is what well-behaved clients send, so any
error is the server's. Every client id maps to one of several principals
(services, each with its own bearer token from ``LOADTEST_TOKENS``, so
per-principal rate limits apply as in production); Status and the watchers
use the operator token ``LOADTEST_OPS_TOKEN``.

Open-loop phases send at their fixed rate (`loadtest.schedule`), each call
timed from its intended start; closed-loop phases run ``concurrency``
workers back to back, timed from the actual start. Process 0 also holds
``--watchers`` WatchEvents streams for the whole run and measures how late
events reach them.

Protocol with `python -m loadtest`: connect and prime, print ``ready``,
read ``go <unix time>`` (the plan's start, the same for every process),
run, write the JSON result to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import zlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from loadtest.schedule import Phase, Schedule, phase_starts

__all__ = ["METHODS", "MIX", "main"]

METHODS = ("Allocate", "Renew", "ReportUsage", "Release", "Status")
ALLOCATE, RENEW, REPORT, RELEASE, STATUS = range(len(METHODS))
# Share of each method in the traffic. Release is below the new Allocates (80% of them), so the
# live leases climb to the cap early in the sustained phase; at the cap, Allocates are sticky
# until a Release makes room, so the count stays there.
MIX = {ALLOCATE: 0.22, RENEW: 0.25, REPORT: 0.40, RELEASE: 0.12, STATUS: 0.01}
STICKY_SHARE = 0.2  # of Allocates, for a client that already holds a lease
SERVER_ERROR_SHARE = 0.002  # of usage reports, the provider failed (counts against health)
MODELS = ("claude-sonnet-4", "claude-opus-4", "claude-haiku-4")
COST_SIGMA = 1.0  # log-normal spread of a request's cost around the mean
CALL_TIMEOUT = 10.0
MAX_IN_FLIGHT = 5_000  # per process; beyond it an arrival is counted as GENERATOR_OVERLOAD
OK = "OK"
_DECISIONS = {value: name.removeprefix("DECISION_KIND_") for name, value in pb.DecisionKind.items()}


# -- the leases this process holds ----------------------------------------------------------


@dataclass(slots=True)
class Held:
    client_id: str
    lease_id: str
    token: int
    renewed_at: float
    metadata: tuple[tuple[str, str], ...]


class Leases:
    """The leases held, each either idle or in use by exactly one call.

    Random picks are O(1) (an array with swap-removal); the renew order is
    kept by an ordered dict, the least recently renewed first.
    """

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self.pending: set[str] = set()  # client ids with an Allocate in flight
        self._idle: list[str] = []
        self._position: dict[str, int] = {}
        self._renew_order: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.held) + len(self.pending)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def add(self, held: Held) -> None:
        self.held[held.client_id] = held
        self._renew_order[held.client_id] = None
        self._release(held.client_id)

    def _release(self, client_id: str) -> None:
        self._position[client_id] = len(self._idle)
        self._idle.append(client_id)

    def _take(self, client_id: str) -> Held:
        index = self._position.pop(client_id)
        last = self._idle.pop()
        if last != client_id:
            self._idle[index] = last
            self._position[last] = index
        return self.held[client_id]

    def take_random(self, rng: random.Random) -> Held | None:
        if not self._idle:
            return None
        return self._take(self._idle[rng.randrange(len(self._idle))])

    def take_oldest(self) -> Held | None:
        """The idle lease renewed longest ago; leases in use are skipped (there are few)."""
        for client_id in self._renew_order:
            if client_id in self._position:
                return self._take(client_id)
        return None

    def put_back(self, held: Held, *, renewed: bool) -> None:
        if renewed:
            self._renew_order.move_to_end(held.client_id)
        self._release(held.client_id)

    def drop(self, held: Held) -> None:
        """Forget a lease in use (released, or found gone)."""
        del self.held[held.client_id]
        del self._renew_order[held.client_id]


# -- one process's run ---------------------------------------------------------------------------


@dataclass
class Run:
    stub: authpool_pb2_grpc.AuthPoolStub
    phases: list[Phase]
    prefix: str
    rng: random.Random
    population: int
    live_cap: int
    ttl: float
    cost_mean_micros: float
    client_metadata: list[tuple[tuple[str, str], ...]]
    ops_metadata: tuple[tuple[str, str], ...]
    t0_ns: int = 0
    leases: Leases = field(default_factory=Leases)
    # One entry per call, in parallel arrays (compact; tens of thousands of calls).
    phase_of: array[int] = field(default_factory=lambda: array("b"))
    method_of: array[int] = field(default_factory=lambda: array("b"))
    code_of: array[int] = field(default_factory=lambda: array("b"))
    intended_ms: array[int] = field(default_factory=lambda: array("q"))  # from t0
    latency: array[int] = field(default_factory=lambda: array("q"))  # µs, from the intended start
    lag: array[int] = field(default_factory=lambda: array("q"))  # µs, intended start -> call sent
    codes: list[str] = field(default_factory=lambda: [OK])
    error_details: dict[str, list[str]] = field(default_factory=dict)
    decisions: list[Counter[str]] = field(default_factory=list)
    moved: Counter[int] = field(default_factory=Counter)
    abandoned: int = 0
    not_released: int = 0
    overload: int = 0
    in_flight: int = 0
    usage_sent: int = 0
    status_calls: int = 0
    clients_seen: set[str] = field(default_factory=set)

    def metadata_for(self, client_id: str) -> tuple[tuple[str, str], ...]:
        return self.client_metadata[zlib.crc32(client_id.encode()) % len(self.client_metadata)]

    def failed(self, error: grpc.aio.AioRpcError) -> int:
        """The code index of a failed call; the first few distinct details of each code are kept."""
        name = error.code().name
        seen = self.error_details.setdefault(name, [])
        details = error.details() or ""
        if len(seen) < 3 and details not in seen:
            seen.append(details)
        return self.code(name)

    def code(self, name: str) -> int:
        try:
            return self.codes.index(name)
        except ValueError:
            self.codes.append(name)
            return len(self.codes) - 1

    def record(self, phase: int, method: int, intended_ns: int, sent_ns: int, code: int) -> None:
        end = time.perf_counter_ns()
        self.phase_of.append(phase)
        self.method_of.append(method)
        self.code_of.append(code)
        self.intended_ms.append((intended_ns - self.t0_ns) // 1_000_000)
        self.latency.append((end - intended_ns) // 1_000)
        self.lag.append((sent_ns - intended_ns) // 1_000)


def _fresh_client(run: Run) -> str | None:
    """A client id of this process's population that holds no lease and has no call in flight."""
    for _ in range(8):
        client_id = f"{run.prefix}-c{run.rng.randrange(run.population)}"
        if client_id not in run.leases.held and client_id not in run.leases.pending:
            return client_id
    return None


def _usable(run: Run, held: Held | None) -> Held | None:
    """`held`, unless it has gone unrenewed so long it may have expired: then forget it (counted)."""
    if held is not None and time.monotonic() - held.renewed_at > 0.8 * run.ttl:
        run.leases.drop(held)
        run.abandoned += 1
        return None
    return held


async def _allocate(run: Run, phase: int, intended: int) -> None:
    leases, rng = run.leases, run.rng
    held = None
    client_id = None
    if leases.idle and (len(leases) >= run.live_cap or rng.random() < STICKY_SHARE):
        held = _usable(run, leases.take_random(rng))
    if held is None:
        client_id = _fresh_client(run)
        if client_id is None:  # the population is nearly all held: re-allocate one instead
            held = _usable(run, leases.take_random(rng))
            if held is None:
                return await _status(run, phase, intended)
    metadata = held.metadata if held is not None else run.metadata_for(client_id or "")
    client_id = held.client_id if held is not None else client_id
    assert client_id is not None
    if held is None:
        leases.pending.add(client_id)
    sent = time.perf_counter_ns()
    try:
        reply = await run.stub.Allocate(
            pb.AllocateRequest(client_id=client_id), timeout=CALL_TIMEOUT, metadata=metadata
        )
    except grpc.aio.AioRpcError as error:
        run.record(phase, ALLOCATE, intended, sent, run.failed(error))
        if held is not None:
            leases.put_back(held, renewed=False)
        else:
            leases.pending.discard(client_id)
        return None
    run.record(phase, ALLOCATE, intended, sent, 0)
    run.decisions[phase][_DECISIONS.get(reply.decision, str(reply.decision))] += 1
    run.clients_seen.add(client_id)
    lease = reply.lease
    if held is not None:
        held.lease_id, held.token = lease.lease_id, lease.fencing_token
        leases.put_back(held, renewed=False)
    else:
        leases.pending.discard(client_id)
        leases.add(Held(client_id, lease.lease_id, lease.fencing_token, time.monotonic(), metadata))
    return None


async def _renew(run: Run, phase: int, intended: int) -> None:
    held = _usable(run, run.leases.take_oldest())
    if held is None:
        return await _allocate(run, phase, intended)
    sent = time.perf_counter_ns()
    try:
        reply = await run.stub.Renew(
            pb.RenewRequest(lease_id=held.lease_id, fencing_token=held.token),
            timeout=CALL_TIMEOUT,
            metadata=held.metadata,
        )
    except grpc.aio.AioRpcError as error:
        run.record(phase, RENEW, intended, sent, run.failed(error))
        _after_error(run, held, error)
        return None
    run.record(phase, RENEW, intended, sent, 0)
    if reply.moved:
        run.moved[phase] += 1
    held.token, held.renewed_at = reply.lease.fencing_token, time.monotonic()
    run.leases.put_back(held, renewed=True)
    return None


def _after_error(run: Run, held: Held, error: grpc.aio.AioRpcError) -> None:
    if error.code() == grpc.StatusCode.NOT_FOUND:
        run.leases.drop(held)
    else:
        run.leases.put_back(held, renewed=False)


async def _report_usage(run: Run, phase: int, intended: int) -> None:
    rng = run.rng
    held = _usable(run, run.leases.take_random(rng))
    if held is None:
        return await _allocate(run, phase, intended)
    run.usage_sent += 1
    cost = run.cost_mean_micros * math.exp(COST_SIGMA * rng.gauss() - COST_SIGMA**2 / 2)
    request = pb.ReportUsageRequest(
        request_id=f"{run.prefix}-u{run.usage_sent}",
        lease_id=held.lease_id,
        fencing_token=held.token,
        cost_micros=max(1, round(cost)),
        input_tokens=rng.randrange(500, 20_000),
        output_tokens=rng.randrange(50, 4_000),
        model=MODELS[rng.randrange(len(MODELS))],
        outcome=pb.USAGE_OUTCOME_SERVER_ERROR if rng.random() < SERVER_ERROR_SHARE else pb.USAGE_OUTCOME_OK,
    )
    sent = time.perf_counter_ns()
    try:
        await run.stub.ReportUsage(request, timeout=CALL_TIMEOUT, metadata=held.metadata)
    except grpc.aio.AioRpcError as error:
        run.record(phase, REPORT, intended, sent, run.failed(error))
        _after_error(run, held, error)
        return None
    run.record(phase, REPORT, intended, sent, 0)
    run.leases.put_back(held, renewed=False)
    return None


async def _release(run: Run, phase: int, intended: int) -> None:
    held = _usable(run, run.leases.take_random(run.rng))
    if held is None:
        return await _allocate(run, phase, intended)
    sent = time.perf_counter_ns()
    try:
        reply = await run.stub.Release(
            pb.ReleaseRequest(lease_id=held.lease_id, fencing_token=held.token),
            timeout=CALL_TIMEOUT,
            metadata=held.metadata,
        )
    except grpc.aio.AioRpcError as error:
        run.record(phase, RELEASE, intended, sent, run.failed(error))
        _after_error(run, held, error)
        return None
    run.record(phase, RELEASE, intended, sent, 0)
    if not reply.released:
        run.not_released += 1
    run.leases.drop(held)
    return None


async def _status(run: Run, phase: int, intended: int) -> None:
    run.status_calls += 1
    request = pb.StatusRequest(include_clients=run.status_calls % 10 == 0)
    sent = time.perf_counter_ns()
    try:
        await run.stub.Status(request, timeout=CALL_TIMEOUT, metadata=run.ops_metadata)
    except grpc.aio.AioRpcError as error:
        run.record(phase, STATUS, intended, sent, run.failed(error))
        return
    run.record(phase, STATUS, intended, sent, 0)


_OPS: tuple[Callable[[Run, int, int], Awaitable[None]], ...] = (_allocate, _renew, _report_usage, _release, _status)
_WEIGHTS = [MIX[i] for i in range(len(METHODS))]


def _pick(run: Run) -> Callable[[Run, int, int], Awaitable[None]]:
    return run.rng.choices(_OPS, _WEIGHTS)[0]


# -- open and closed loops ---------------------------------------------------------------------


async def _open_loop(run: Run, process: int, processes: int) -> None:
    """Start every arrival at its intended time, without waiting for earlier ones to finish."""
    schedule = Schedule(run.phases, 0.0, process, processes)
    tasks: set[asyncio.Task[None]] = set()
    clock = time.perf_counter_ns
    while (next_time := schedule.next_time) is not None:
        delay = run.t0_ns + int(next_time * 1e9) - clock()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        for phase, t in schedule.due((clock() - run.t0_ns) / 1e9):
            intended = run.t0_ns + int(t * 1e9)
            if run.in_flight >= MAX_IN_FLIGHT:
                run.overload += 1
                run.record(phase, ALLOCATE, intended, clock(), run.code("GENERATOR_OVERLOAD"))
                continue
            task = asyncio.create_task(_tracked(run, _pick(run)(run, phase, intended)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)


async def _tracked(run: Run, call: Awaitable[None]) -> None:
    run.in_flight += 1
    try:
        await call
    finally:
        run.in_flight -= 1


async def _closed_loop(run: Run, phase: int, start: float, workers: int) -> None:
    """`workers` callers back to back from `start` for the phase's length; each call timed from its own start."""
    clock = time.perf_counter_ns
    begin = run.t0_ns + int(start * 1e9)
    until = begin + int(run.phases[phase].seconds * 1e9)
    await asyncio.sleep(max(0.0, (begin - clock()) / 1e9))

    async def worker() -> None:
        while (now := clock()) < until:
            await _pick(run)(run, phase, now)

    await asyncio.gather(*(worker() for _ in range(workers)))


# -- watchers ----------------------------------------------------------------------------------


@dataclass
class WatcherStats:
    follow: str
    events: int = 0
    progress: int = 0
    out_of_order: int = 0
    lag_ms: list[float] = field(default_factory=list)
    error: str = ""


async def _watch(run: Run, stats: WatcherStats, request: pb.WatchEventsRequest, until_ns: int) -> None:
    call = run.stub.WatchEvents(request, metadata=run.ops_metadata)
    last = 0
    try:
        async for message in call:
            if message.HasField("event"):
                event = message.event
                stats.events += 1
                if event.sequence <= last:
                    stats.out_of_order += 1
                last = event.sequence
                if time.perf_counter_ns() >= run.t0_ns:
                    stats.lag_ms.append((time.time() - event.time.ToNanoseconds() / 1e9) * 1e3)
            else:
                stats.progress += 1
            if time.perf_counter_ns() >= until_ns:
                break
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.CANCELLED:
            stats.error = f"{error.code().name}: {error.details()}"
    finally:
        call.cancel()


# -- the process --------------------------------------------------------------------------------


async def _prime(run: Run) -> None:
    """Connect and make one call of each kind, so that connection set-up is not measured."""
    request = pb.AllocateRequest(client_id=f"{run.prefix}-prime")
    reply = await run.stub.Allocate(request, timeout=CALL_TIMEOUT, metadata=run.client_metadata[0])
    lease = reply.lease
    await run.stub.Release(
        pb.ReleaseRequest(lease_id=lease.lease_id, fencing_token=lease.fencing_token),
        timeout=CALL_TIMEOUT,
        metadata=run.client_metadata[0],
    )
    await run.stub.Status(pb.StatusRequest(), timeout=CALL_TIMEOUT, metadata=run.ops_metadata)


async def _read_go() -> float:
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    word, _, start = line.strip().partition(" ")
    if word != "go":
        raise SystemExit("loadtest.generator: expected 'go <unix time>' on stdin")
    return float(start)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    phases = [Phase(**each) for each in json.loads(args.plan)]
    tokens = [t for t in os.environ.get("LOADTEST_TOKENS", "").split(",") if t]
    if not tokens or not os.environ.get("LOADTEST_OPS_TOKEN"):
        raise SystemExit("loadtest.generator: LOADTEST_TOKENS and LOADTEST_OPS_TOKEN must be set")
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        run = Run(
            stub=authpool_pb2_grpc.AuthPoolStub(channel),
            phases=phases,
            prefix=args.prefix,
            rng=random.Random(f"{args.seed}-{args.process}"),  # noqa: S311 - traffic, not secrets
            population=args.population,
            live_cap=args.live_cap,
            ttl=args.ttl,
            cost_mean_micros=args.cost_mean_micros,
            client_metadata=[_bearer(t) for t in tokens],
            ops_metadata=_bearer(os.environ["LOADTEST_OPS_TOKEN"]),
            decisions=[Counter() for _ in phases],
        )
        await _prime(run)
        start_unix = await _read_go()
        run.t0_ns = time.perf_counter_ns() + int((start_unix - time.time()) * 1e9)
        end_ns = run.t0_ns + int(sum(p.seconds for p in phases) * 1e9)
        follows = [
            "all" if i % 2 == 0 else f"subscription {args.subscriptions[i % len(args.subscriptions)]}"
            for i in range(args.watchers)
        ]
        watchers = [WatcherStats(follow) for follow in follows]
        watch_tasks = [
            asyncio.create_task(
                _watch(
                    run,
                    stats,
                    pb.WatchEventsRequest(
                        after_sequence=args.after_sequence,
                        subscription_ids=[] if stats.follow == "all" else [stats.follow.split()[-1]],
                    ),
                    end_ns,
                )
            )
            for stats in watchers
        ]
        loops = [asyncio.create_task(_open_loop(run, args.process, args.processes))]
        for index, (phase, start) in enumerate(zip(phases, phase_starts(phases), strict=True)):
            if not phase.open_loop:
                workers = phase.concurrency // args.processes + (
                    1 if args.process < phase.concurrency % args.processes else 0
                )
                loops.append(asyncio.create_task(_closed_loop(run, index, start, workers)))
        await asyncio.gather(*loops)
        await asyncio.sleep(max(0.0, (end_ns - time.perf_counter_ns()) / 1e9))
        for task in watch_tasks:
            task.cancel()
        await asyncio.gather(*watch_tasks, return_exceptions=True)
    return {
        "process": args.process,
        "pid": os.getpid(),
        "codes": run.codes,
        "error_details": run.error_details,
        "phase": run.phase_of.tolist(),
        "method": run.method_of.tolist(),
        "code": run.code_of.tolist(),
        "intended_ms": run.intended_ms.tolist(),
        "latency_us": run.latency.tolist(),
        "lag_us": run.lag.tolist(),
        "decisions": [dict(c) for c in run.decisions],
        "moved": [run.moved[i] for i in range(len(phases))],
        "abandoned_leases": run.abandoned,
        "release_not_live": run.not_released,
        "overload": run.overload,
        "distinct_clients": len(run.clients_seen),
        "leases_held_at_end": len(run.leases.held),
        "watchers": [
            {
                "follow": w.follow,
                "events": w.events,
                "progress": w.progress,
                "out_of_order": w.out_of_order,
                "lag_ms": sorted(w.lag_ms),
                "error": w.error,
            }
            for w in watchers
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.generator")
    parser.add_argument("--target", required=True)
    parser.add_argument("--plan", required=True, help="the phases, as a JSON list of loadtest.schedule.Phase fields")
    parser.add_argument("--process", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--prefix", required=True, help="client and request id prefix, unique per process and run")
    parser.add_argument("--seed", default="loadtest")
    parser.add_argument("--population", type=int, default=5_000, help="distinct client ids of this process")
    parser.add_argument("--live-cap", type=int, default=200, help="most leases this process holds at once")
    parser.add_argument("--ttl", type=float, default=60.0, help="the server's lease TTL")
    parser.add_argument("--cost-mean-micros", type=float, default=20_000.0)
    parser.add_argument("--watchers", type=int, default=0)
    parser.add_argument("--subscriptions", nargs="*", default=[], help="subscription ids for filtered watchers")
    parser.add_argument("--after-sequence", type=int, default=0, help="where the watchers start in the event log")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.watchers and not args.subscriptions:
        parser.error("--watchers needs --subscriptions")
    result = asyncio.run(_run(args))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
