"""`python -m bench` (`make bench`): run the server, drive it, report against the baseline.

One run on one machine: start `bench.server` (the real Server with its
durable SQLite store) in a fresh data directory under ``var/bench``, wait for
health SERVING, then run the scenarios, each from its own `bench.load`
process(es): the noop baseline first, then `rounds` times allocate (against
each server), lifecycle, noop. Interleaving the rounds lets every scenario
see the same share of whatever else the (shared, noisy) machine is doing,
and the baseline that the ratios divide by is pooled over all its runs. The
two scenarios of each ratio target (`allocate` and `allocate_bare` for
`interceptor_overhead`, the watched twins for `watchers_ratio`) run back to
back in each round, twice each as a block A B B A (B A A B in the next), so
that a ratio compares runs that saw the same machine and a drift in its
speed weighs on both alike; each pair's ratio is reported too, and their
spread says how far the pooled figure can be trusted. Each scenario's
figures pool its runs; each run's throughput is recorded too.
The servers compared in a ratio serve the same calls: the lifecycle, which
leaves usage records behind (an Allocate costs more as they pile up), runs
on a server of its own, configured as deployed.

`allocate_watched` is `allocate_untraced` (same server, same load) while a
`bench.watchers` process holds 100 live WatchEvents streams, each on its own
connection and each following one subscription (five per subscription of
the 20: every event about one reaches five streams), as operators' tools or
sidecars would; `watchers_ratio` is its throughput over its twin's, the two
run as a block like the chain's pair (above). The watchers count
what they receive and check it against the log afterwards (`watchers_*`
figures): a ratio measured with a dead or lagging watcher is not reported.
Their process runs at a lower CPU priority (`WATCHERS_NICE`): they stand for
consumers on other machines, not for load on the server's two cores; each
message's lag (arrival minus its newest event's commit) shows that they kept
up, and a ratio measured while their p99 lag exceeded `WATCHERS_MAX_P99_LAG_MS`
is not reported either.
`allocate_watched_all` (not in the default schedule; see BENCH_SCENARIOS)
does the same with 100 unfiltered streams, each event to every one.
`allocate_watched_bare` runs in the same block as the watched twins (A B C
C B A) with 100 streams of `bench.bare_writes` open on the same server
process instead: streams that only write a fixed message every
BENCH_WATCH_BARE_PERIOD_MS (default 120, about the rate `allocate_watched`'s
watchers get here). `watchers_bare_ratio` is what gRPC's writes alone cost,
the ceiling of `watchers_ratio` at that message rate.

Then, each in a process of its own and after the servers have stopped, the
long phases: `bench.soak` (a million lease lifecycles through the pool on
its SQLite store in one process, with a simulated clock over three weeks:
``soak_rss_growth`` and what else grew after the warm-up), `bench.soak_rpc`
(lifecycles over gRPC through a server as deployed: descriptors, threads,
tasks) and `bench.scale` (1,000 subscriptions, 15,000 live leases and a
million usage records: ``recovery_s`` and ``scale_p50_ratio``).

Prints a markdown table and the targets (PASS or MISSED), and writes every
figure to ``var/bench/latest.json``. The exit code is 0 whether or not the
targets are met; it is non-zero only when the benchmark itself failed.

Settings come from flags, or from the environment for `make bench`:
BENCH_DURATION (measured seconds per run, default 5), BENCH_WARMUP (default
1.5), BENCH_ROUNDS (default 2), BENCH_CONCURRENCY (default 16),
BENCH_CLIENTS (load processes sharing the concurrency, default 1),
BENCH_SCENARIOS (an explicit comma-separated schedule instead of the rounds;
the phases soak, soak_rpc and scale may be named in it too, and only those
named then run), BENCH_SOAK_LIFECYCLES (default 1,000,000),
BENCH_SOAK_RPC_SEGMENTS and BENCH_SOAK_RPC_SECONDS (default 5 of 6 s),
BENCH_SCALE_SUBSCRIPTIONS, BENCH_SCALE_LEASES, BENCH_SCALE_USAGE (default
1,000, 15,000 and 1,000,000), BENCH_SCALE_RESTARTS (default 3), BENCH_OUT
(default var/bench/latest.json), and for the watchers BENCH_WATCH_MAX_BATCH
and BENCH_WATCH_WINDOW_MS (default 100 and 100; see bench.watchers) and
BENCH_WATCH_BARE_PERIOD_MS.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authpool_server.simulator.report import json_safe
from bench.deployed import deployed_telemetry
from bench.load import SCENARIOS as LOAD_SCENARIOS
from bench.otlp_sink import OtlpSink
from bench.procs import readline_within, tail
from bench.stats import summarize

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "var" / "bench" / "latest.json"
LIFECYCLE_RPCS = 5  # Allocate, ReportUsage x3, Release
# Every scenario runs against the server as deployed (the whole interceptor chain, with a token,
# access logs, and spans exported as the Kubernetes deployment samples them), except
# `allocate_all_spans` (the same, with a span exported for every call), `allocate_untraced` (the
# same chain, with no trace exporter configured, so no spans), `allocate_bare` (no interceptors at
# all), and the watched scenarios (`allocate_untraced`'s server, while `bench.watchers` holds
# streams open).
SCENARIOS = (
    *LOAD_SCENARIOS,
    "allocate_all_spans",
    "allocate_untraced",
    "allocate_bare",
    "allocate_pg",
    "allocate_pg2",
    "allocate_watched",
    "allocate_watched_all",
    "allocate_watched_bare",
)
LOAD = {
    **{name: name for name in LOAD_SCENARIOS},
    "allocate_all_spans": "allocate",
    "allocate_untraced": "allocate",
    "allocate_bare": "allocate",
    "allocate_pg": "allocate",
    "allocate_pg2": "allocate",
    "allocate_watched": "allocate",
    "allocate_watched_all": "allocate",
    "allocate_watched_bare": "allocate",
}
# The long phases, each a process of its own run after the servers above have stopped.
PHASES = ("soak", "soak_rpc", "scale")
# Scenarios run against the untraced server while `bench.watchers` holds streams open: what they follow.
WATCHED = {"allocate_watched": "subscription", "allocate_watched_all": "all", "allocate_watched_bare": "bare"}
WATCHERS = 100
WATCHERS_NICE = 10
# A watcher that keeps up gets each batch its window (100 ms) after the batch's first event, plus
# scheduling; one that falls behind lags by more and more. Ten windows is clearly the latter.
WATCHERS_MAX_P99_LAG_MS = 1000.0
_SERVER_START_TIMEOUT = 30.0
_LOAD_READY_TIMEOUT = 30.0
_DRIFT_WARNING = 0.15
_NOISE_WARNING_CORES = 0.25

# (name, figure, comparison, bound, figure the bound is a multiple of)
TARGETS: tuple[tuple[str, str, str, float, str | None], ...] = (
    ("allocate_ratio >= 0.7", "allocate_ratio", ">=", 0.7, None),
    ("allocate_p99_ms <= 2 x noop_p99_ms", "allocate_p99_ms", "<=", 2.0, "noop_p99_ms"),
    ("lifecycle_rps >= 1000", "lifecycle_rps", ">=", 1000.0, None),
    ("simulator_decisions_per_s >= 200000", "simulator_decisions_per_s", ">=", 200_000.0, None),
    ("interceptor_overhead <= 0.15", "interceptor_overhead", "<=", 0.15, None),
    ("pg1_ratio >= 0.4", "pg1_ratio", ">=", 0.4, None),
    ("watchers_ratio >= 0.9", "watchers_ratio", ">=", 0.9, None),
    ("soak_rss_growth <= 0.05", "soak_rss_growth", "<=", 0.05, None),
    ("scale_p50_ratio <= 1.5", "scale_p50_ratio", "<=", 1.5, None),
    ("recovery_s <= 2.0", "recovery_s", "<=", 2.0, None),
)


# -- settings -----------------------------------------------------------------------


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=float(_env("BENCH_DURATION", "5")))
    parser.add_argument("--warmup", type=float, default=float(_env("BENCH_WARMUP", "1.5")))
    parser.add_argument("--rounds", type=int, default=int(_env("BENCH_ROUNDS", "2")))
    parser.add_argument("--concurrency", type=int, default=int(_env("BENCH_CONCURRENCY", "16")))
    parser.add_argument(
        "--clients",
        type=int,
        default=int(_env("BENCH_CLIENTS", "1")),
        help="load-generator processes; the concurrency is split among them",
    )
    parser.add_argument(
        "--scenarios",
        default=_env("BENCH_SCENARIOS", ""),
        help=f"an explicit comma-separated schedule from {', '.join(SCENARIOS)}, instead of the rounds; "
        f"with any of the phases {', '.join(PHASES)}, only the phases named run",
    )
    parser.add_argument(
        "--soak-lifecycles", type=int, default=int(_env("BENCH_SOAK_LIFECYCLES", "1000000")), help="bench.soak"
    )
    parser.add_argument("--subscriptions", type=int, default=20)
    parser.add_argument("--sticky-fraction", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path(_env("BENCH_OUT", str(DEFAULT_OUT))))
    parser.add_argument("--keep-data", action="store_true", help="keep the server's data directory")
    args = parser.parse_args(argv)
    args.phases = list(PHASES)
    if args.scenarios:
        named = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        args.schedule = [s for s in named if s not in PHASES]
        args.phases = [s for s in PHASES if s in named]
    else:
        rounds: list[str] = []
        for index in range(max(1, args.rounds)):
            # The two scenarios of each ratio target as a block A B B A (B A A B in the next round),
            # so that the runs a ratio compares saw the same machine and a drift in its speed
            # during the block weighs on both alike.
            order = 1 if index % 2 == 0 else -1
            chained = ["allocate", "allocate_bare"][::order]
            # With the streams that only write beside the watched twin: the transport's own share of its cost.
            twins = ["allocate_untraced", "allocate_watched", "allocate_watched_bare"][::order]
            rounds += [
                *chained,
                *chained[::-1],
                *twins,
                *twins[::-1],
                "allocate_all_spans",
                "allocate_pg",
                "allocate_pg2",
                "lifecycle",
                "noop",
            ]
        args.schedule = ["noop", *rounds]
    unknown = [s for s in args.schedule if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if not 1 <= args.clients <= args.concurrency:
        parser.error("need 1 <= --clients <= --concurrency")
    return args


# -- the server process -------------------------------------------------------------


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    pid: int
    data_dir: Path
    stderr_path: Path
    bare_port: int | None = None  # bench.bare_writes, when the server was started with --bare-writes

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr_tail(self, lines: int = 20) -> str:
        return tail(self.stderr_path, lines)


@contextlib.contextmanager
def _postgres_schema() -> Iterator[tuple[dict[str, str], list[str]]]:
    """A schema of its own on the benchmark's PostgreSQL (BENCH_DATABASE_URL, else the local `test`), dropped after."""
    import psycopg
    from psycopg import sql

    dsn = _env("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"authpool_bench_{secrets.token_hex(4)}"
    try:
        yield {"BENCH_DATABASE_URL": dsn}, ["--store", "postgres", "--schema", schema]
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextlib.contextmanager
def _server(
    work_dir: Path,
    subscriptions: int,
    chain: str,
    env: dict[str, str],
    name: str = "",
    extra: Sequence[str] = (),
    code: Path = ROOT,
) -> Iterator[ServerProcess]:
    """A `bench.server` with `chain`, run from the tree at `code` (another commit's worktree, for an A/B)."""
    name = name or chain
    data_dir = work_dir / f"data-{name}"
    stderr_path = work_dir / f"server-{name}.stderr"
    command = [sys.executable, "-m", "bench.server", "--data-dir", str(data_dir), "--subscriptions", str(subscriptions)]
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [*command, "--chain", chain, *extra],
            cwd=code,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **env},
        )
    try:
        line = readline_within(process.stdout, _SERVER_START_TIMEOUT)
        if not line:
            raise RuntimeError(f"the server did not start:\n{stderr_path.read_text(errors='replace')[-2000:]}")
        info = json.loads(line)
        bare_port = int(info["bare_port"]) if "bare_port" in info else None
        server = ServerProcess(process, int(info["port"]), int(info["pid"]), data_dir, stderr_path, bare_port)
        _wait_serving(server.target)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_serving(target: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + _SERVER_START_TIMEOUT
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="authpool.v1.AuthPool"), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} did not become SERVING within {_SERVER_START_TIMEOUT:.0f}s")
            time.sleep(0.1)


# -- one run of a scenario -------------------------------------------------------------


def _spawn(command: list[str], token: str) -> subprocess.Popen[str]:
    """A client process of the benchmark, talking over stdin/stdout; the token in its environment, never argv."""
    return subprocess.Popen(
        command,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "BENCH_TOKEN": token} if token else None,
    )


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _run_scenario(
    args: argparse.Namespace, servers: list[ServerProcess], scenario: str, index: int, work_dir: Path, token: str
) -> list[dict[str, Any]]:
    """Run `scenario` once from `args.clients` load processes started together; their raw results.

    With several servers (replicas), the load processes take turns at them;
    server CPU is accounted for the first one only.
    """
    processes: list[tuple[subprocess.Popen[str], Path]] = []
    server = servers[0]
    try:
        # At least one load process per server, sharing the same total concurrency.
        for client, concurrency in enumerate(_split(args.concurrency, max(args.clients, len(servers)))):
            target = servers[client % len(servers)].target
            out = work_dir / f"{index:02d}-{scenario}-{client}.json"
            command = [
                *(sys.executable, "-m", "bench.load", "--target", target, "--scenario", LOAD[scenario]),
                *("--concurrency", str(concurrency), "--warmup", str(args.warmup), "--duration", str(args.duration)),
                *("--sticky-fraction", str(args.sticky_fraction), "--prefix", f"r{os.getpid()}s{index}c{client}"),
                *("--server-pid", str(server.pid), "--out", str(out)),
            ]
            processes.append((_spawn(command, token), out))
        for process, _ in processes:
            if readline_within(process.stdout, _LOAD_READY_TIMEOUT).strip() != "ready":
                raise RuntimeError(f"a {scenario} load process did not get ready:\n{server.stderr_tail()}")
        for process, _ in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        for process, _ in processes:
            if process.wait(timeout=args.warmup + args.duration + 60) != 0:
                raise RuntimeError(f"a {scenario} load process failed (exit {process.returncode})")
        for each in servers:
            if each.process.poll() is not None:
                raise RuntimeError(f"the server exited during {scenario}:\n{each.stderr_tail()}")
        return [json.loads(out.read_text()) for _, out in processes]
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@contextlib.contextmanager
def _watchers(
    server: ServerProcess, follow: str, subscriptions: int, index: int, work_dir: Path, token: str
) -> Iterator[dict[str, Any]]:
    """`bench.watchers` holding its streams open (ready before this yields); its result once it has stopped."""
    out = work_dir / f"{index:02d}-watchers.json"
    command = [
        *(sys.executable, "-m", "bench.watchers", "--target", server.target, "--watchers", str(WATCHERS)),
        *("--follow", follow, "--subscriptions", str(subscriptions), "--out", str(out)),
        *("--nice", str(WATCHERS_NICE)),
    ]
    if follow == "bare":
        command += ["--bare-target", f"127.0.0.1:{server.bare_port}"]
    process = _spawn(command, token)
    try:
        if readline_within(process.stdout, _LOAD_READY_TIMEOUT).strip() != "ready":
            raise RuntimeError(f"the watchers did not get ready:\n{server.stderr_tail()}")
        result: dict[str, Any] = {}
        yield result
        assert process.stdin is not None
        process.stdin.write("stop\n")
        process.stdin.flush()
        if process.wait(timeout=120) != 0:
            raise RuntimeError(f"the watchers process failed (exit {process.returncode})")
        result.update(json.loads(out.read_text()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _watcher_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the watchers of one scenario received over its runs: the proof that they were live."""
    received = [count for run in runs for count in run["received"]]
    lags = sorted(lag for run in runs for lag in run["lags_ms"])
    return {
        "watchers": runs[0]["watchers"],
        "follow": runs[0]["follow"],
        "runs": len(runs),
        "events_in_log": sum(run["events_in_log"] for run in runs),
        "events_received": sum(received),
        "events_expected": sum(sum(run["expected"]) for run in runs),
        "events_missed": sum(run["missed"] for run in runs),
        "min_events_per_watcher_run": min(received) if received else 0,
        "event_messages": sum(run["event_messages"] for run in runs),
        "max_batch_events": runs[0]["max_batch_events"],
        "batch_window_ms": runs[0]["batch_window_ms"],
        "progress_messages": sum(run["progress_messages"] for run in runs),
        "out_of_order": sum(run["out_of_order"] for run in runs),
        "lag_p50_ms": _quantile(lags, 0.5),
        "lag_p99_ms": _quantile(lags, 0.99),
        "lag_max_ms": lags[-1] if lags else None,
        "errors": [error for run in runs for error in run["errors"]],
        "client_cpu_seconds": sum(run["client_cpu_seconds"] for run in runs),
    }


def _bare_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the streams of bench.bare_writes received over the runs of `allocate_watched_bare`."""
    received = [count for run in runs for count in run["messages"]]
    return {
        "watchers": runs[0]["watchers"],
        "follow": "bare",
        "runs": len(runs),
        "period_ms": runs[0]["bare_period_ms"],
        "messages": sum(received),
        "messages_per_s": _ratio(sum(received), sum(run["seconds"] for run in runs)),
        "min_messages_per_watcher_run": min(received) if received else 0,
        "client_cpu_seconds": sum(run["client_cpu_seconds"] for run in runs),
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _watchers_live(figures: dict[str, Any]) -> bool:
    return (
        figures["min_events_per_watcher_run"] > 0
        and figures["events_missed"] == 0
        and figures["out_of_order"] == 0
        and not figures["errors"]
        and figures["lag_p99_ms"] is not None
        and figures["lag_p99_ms"] <= WATCHERS_MAX_P99_LAG_MS
    )


# -- figures ------------------------------------------------------------------------------


def _merge(runs: list[list[dict[str, Any]]], duration: float) -> dict[str, Any]:
    """One scenario's figures, pooled over its runs and each run's load processes."""
    series: dict[str, list[int]] = {}
    errors: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    client_cpu = server_cpu = busy_cores = 0.0
    server_known = busy_known = True
    for run in runs:
        for result in run:
            for name, values in result["latencies_us"].items():
                series.setdefault(name, []).extend(values)
            errors.update(result["errors"])
            decisions.update(result["decisions"])
            unexpected.update(result["unexpected"])
            client_cpu += result["cpu"]["client_cpu_seconds"]
        # All load processes of one run watch the same server and machine over the same window.
        cpu = run[0]["cpu"]
        server_known = server_known and cpu["server_cpu_seconds"] is not None
        busy_known = busy_known and cpu["machine_busy_fraction"] is not None
        server_cpu += cpu["server_cpu_seconds"] or 0.0
        busy_cores += (cpu["machine_busy_fraction"] or 0.0) * cpu["machine_cpus"] * cpu["wall_seconds"]
    seconds = duration * len(runs)
    scenario = runs[0][0]["scenario"]
    summaries = {name: summarize(values, seconds) for name, values in sorted(series.items())}
    main = summaries.get(scenario, summarize([], seconds))
    rpcs = main["count"] * (LIFECYCLE_RPCS if scenario == "lifecycle" else 1)
    return {
        **main,
        "series": summaries,
        "runs": len(runs),
        "measured_seconds": seconds,
        "errors": dict(errors),
        "decisions": dict(decisions),
        "unexpected_answers": dict(unexpected),
        "cpu": {
            "client_cpu_us_per_rpc": client_cpu / rpcs * 1e6 if rpcs else None,
            "server_cpu_us_per_rpc": server_cpu / rpcs * 1e6 if rpcs and server_known else None,
            "client_cores": client_cpu / seconds,
            "server_cores": server_cpu / seconds if server_known else None,
            "machine_busy_cores": busy_cores / seconds if busy_known else None,
            # CPU the machine spent on anything but this benchmark: other users of a shared machine.
            "other_cores": (busy_cores - client_cpu - server_cpu) / seconds if busy_known and server_known else None,
        },
    }


def _scenario_figures(runs: list[list[dict[str, Any]]], duration: float) -> dict[str, Any]:
    pooled = _merge(runs, duration)
    pooled["per_run"] = []
    for run in runs:
        one = _merge([run], duration)
        pooled["per_run"].append(
            {key: one[key] for key in ("rps", "p50_ms", "p99_ms")}
            | {key: one["cpu"][key] for key in ("server_cpu_us_per_rpc", "client_cpu_us_per_rpc", "other_cores")}
        )
    return pooled


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(numerator + denominator):
        return None
    return numerator / denominator


def _per_pair(numerator: dict[str, Any], denominator: dict[str, Any]) -> list[float | None]:
    """The throughput ratio of two scenarios for each pair of their runs, paired in schedule order.

    In the default schedule each pair ran back to back. How far these spread
    says how much one pair's ratio can be trusted; the target is the ratio
    of the pooled runs. Empty when the two did not run equally often (an
    explicit BENCH_SCENARIOS schedule).
    """
    ours, theirs = numerator["per_run"], denominator["per_run"]
    if len(ours) != len(theirs):
        return []
    return [_ratio(one["rps"], other["rps"]) for one, other in zip(ours, theirs, strict=True)]


def _flat(scenarios: dict[str, dict[str, Any]]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, figures in scenarios.items():
        flat[f"{name}_rps"] = figures["rps"]
        flat[f"{name}_p50_ms"] = figures["p50_ms"]
        flat[f"{name}_p99_ms"] = figures["p99_ms"]
        flat[f"{name}_server_cpu_us_per_rpc"] = figures["cpu"]["server_cpu_us_per_rpc"]
    if "lifecycle" in scenarios:
        flat["lifecycle_rpc_rps"] = scenarios["lifecycle"]["rps"] * LIFECYCLE_RPCS
    if "allocate_pg" in scenarios and "allocate_bare" in scenarios:
        # The same Allocate load on PostgreSQL and on the embedded store, both without interceptors.
        flat["pg1_ratio"] = _ratio(scenarios["allocate_pg"]["rps"], scenarios["allocate_bare"]["rps"])
    if "allocate_pg2" in scenarios and "allocate_bare" in scenarios:
        # Two replicas on one PostgreSQL schema, the load split between them: what a second replica buys.
        flat["pg2_ratio"] = _ratio(scenarios["allocate_pg2"]["rps"], scenarios["allocate_bare"]["rps"])
    if "allocate" in scenarios and "allocate_bare" in scenarios:
        # The share of Allocate throughput the interceptor chain costs (0.15: 15 % fewer calls per second).
        kept = _ratio(scenarios["allocate"]["rps"], scenarios["allocate_bare"]["rps"])
        flat["interceptor_overhead"] = None if kept is None else 1.0 - kept
        flat["interceptor_overhead_per_pair"] = [
            None if pair is None else 1.0 - pair
            for pair in _per_pair(scenarios["allocate"], scenarios["allocate_bare"])
        ]
        bare_cpu = scenarios["allocate_bare"]["cpu"]["server_cpu_us_per_rpc"]
        # Server CPU per Allocate with the chain / without: steadier than throughput on a noisy machine.
        flat["interceptor_cpu_ratio"] = _ratio(scenarios["allocate"]["cpu"]["server_cpu_us_per_rpc"], bare_cpu)
        if "allocate_all_spans" in scenarios:
            # No target: what exporting a span for every call would cost (see bench.deployed).
            kept = _ratio(scenarios["allocate_all_spans"]["rps"], scenarios["allocate_bare"]["rps"])
            flat["interceptor_overhead_all_spans"] = None if kept is None else 1.0 - kept
            flat["interceptor_all_spans_cpu_ratio"] = _ratio(
                scenarios["allocate_all_spans"]["cpu"]["server_cpu_us_per_rpc"], bare_cpu
            )
        if "allocate_untraced" in scenarios:
            kept = _ratio(scenarios["allocate_untraced"]["rps"], scenarios["allocate_bare"]["rps"])
            flat["interceptor_overhead_untraced"] = None if kept is None else 1.0 - kept
            flat["interceptor_untraced_cpu_ratio"] = _ratio(
                scenarios["allocate_untraced"]["cpu"]["server_cpu_us_per_rpc"], bare_cpu
            )
    untraced = scenarios.get("allocate_untraced")
    bare = scenarios.get("allocate_watched_bare")
    if bare is not None and untraced is not None:
        # Streams that only write: what gRPC's writes alone cost at that rate, with no AuthPool work per message.
        flat["watchers_bare_ratio"] = _ratio(bare["rps"], untraced["rps"])
        flat["watchers_bare_ratio_per_pair"] = _per_pair(bare, untraced)
        flat["watchers_bare_cpu_ratio"] = _ratio(
            untraced["cpu"]["server_cpu_us_per_rpc"], bare["cpu"]["server_cpu_us_per_rpc"]
        )
        rate = bare["watchers"]["messages_per_s"]
        with_cpu, without_cpu = bare["cpu"]["server_cpu_us_per_rpc"], untraced["cpu"]["server_cpu_us_per_rpc"]
        if None not in (with_cpu, without_cpu) and rate:
            # The extra CPU per Allocate, times the Allocates per second, over the messages per second.
            flat["watchers_bare_server_us_per_message"] = (with_cpu - without_cpu) * bare["rps"] / rate
    for name, key in (("allocate_watched", "watchers"), ("allocate_watched_all", "watchers_all")):
        if name not in scenarios or untraced is None:
            continue
        watched = scenarios[name]
        ratio = _ratio(watched["rps"], untraced["rps"])
        # A ratio measured with a dead or lagging watcher is no measure of live watchers.
        flat[f"{key}_ratio"] = ratio if _watchers_live(watched["watchers"]) else None
        flat[f"{key}_ratio_unchecked"] = ratio
        flat[f"{key}_ratio_per_pair"] = _per_pair(watched, untraced)
        # Server CPU per Allocate without watchers / with: steadier than throughput on a noisy machine.
        flat[f"{key}_cpu_ratio"] = _ratio(
            untraced["cpu"]["server_cpu_us_per_rpc"], watched["cpu"]["server_cpu_us_per_rpc"]
        )
        flat[f"{key}_events_received"] = watched["watchers"]["events_received"]
        flat[f"{key}_events_missed"] = watched["watchers"]["events_missed"]
        # What one message to one watcher costs the server: the extra CPU per Allocate over the
        # messages each Allocate caused (a NEW one writes an event, which goes to every watcher of
        # it; a batched stream carries several in one message).
        decisions = watched["decisions"]
        events_per_call = _ratio(decisions.get("DECISION_KIND_NEW", 0), sum(decisions.values()))
        fan_out = _ratio(watched["watchers"]["events_expected"], watched["watchers"]["events_in_log"])
        per_message = _ratio(watched["watchers"]["events_received"], watched["watchers"]["event_messages"])
        flat[f"{key}_events_per_message"] = per_message
        with_cpu, without_cpu = watched["cpu"]["server_cpu_us_per_rpc"], untraced["cpu"]["server_cpu_us_per_rpc"]
        if None not in (events_per_call, fan_out, per_message, with_cpu, without_cpu) and per_message:
            deliveries_per_call = events_per_call * fan_out  # type: ignore[operator]
            messages_per_call = deliveries_per_call / per_message  # type: ignore[operator]
            flat[f"{key}_deliveries_per_allocate"] = deliveries_per_call
            flat[f"{key}_messages_per_allocate"] = messages_per_call
            flat[f"{key}_messages_per_s"] = messages_per_call * watched["rps"]
            flat[f"{key}_server_us_per_message"] = _ratio(with_cpu - without_cpu, messages_per_call)  # type: ignore[operator]
    if "noop" in scenarios:
        noop = scenarios["noop"]
        if "allocate" in scenarios:
            flat["allocate_ratio"] = _ratio(flat["allocate_rps"], noop["rps"])
            flat["allocate_p99_ratio"] = _ratio(flat["allocate_p99_ms"], noop["p99_ms"])
            # Server CPU of a no-op over that of an Allocate: what allocate_ratio tends to when the
            # server is CPU-bound, and far steadier than throughput on a shared machine.
            flat["allocate_cpu_ratio"] = _ratio(
                noop["cpu"]["server_cpu_us_per_rpc"], scenarios["allocate"]["cpu"]["server_cpu_us_per_rpc"]
            )
        if "lifecycle" in scenarios:
            # Per RPC, like with like: 1.0 would mean each of the five calls costs what a no-op does.
            flat["lifecycle_ratio"] = _ratio(flat["lifecycle_rpc_rps"], noop["rps"])
            # What five no-op calls back to back would reach on this stack and machine: a ceiling
            # that no change to AuthPool's own code can lift the lifecycle above.
            flat["lifecycle_noop_ceiling_rps"] = noop["rps"] / LIFECYCLE_RPCS
            flat["lifecycle_p99_ratio"] = _ratio(flat["lifecycle_p99_ms"], noop["p99_ms"])
    return flat


def _targets(flat: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, key, op, bound, multiple_of in TARGETS:
        value = flat.get(key)
        limit: float | None = bound
        if multiple_of is not None:
            base = flat.get(multiple_of)
            limit = None if base is None else bound * base
        met = None
        if value is not None and limit is not None and not math.isnan(value):
            met = value >= limit if op == ">=" else value <= limit
        out.append({"target": name, "figure": key, "value": value, "limit": limit, "met": met})
    return out


def _problems(scenarios: dict[str, dict[str, Any]], flat: dict[str, Any], store: dict[str, int] | None) -> list[str]:
    problems = []
    for name, figures in scenarios.items():
        if figures["errors"]:
            problems.append(f"{name}: calls failed: {figures['errors']}")
        if figures["unexpected_answers"]:
            problems.append(f"{name}: unexpected answers: {figures['unexpected_answers']}")
        if figures["count"] == 0:
            problems.append(f"{name}: no call completed in the measured window")
        rates = [run["rps"] for run in figures["per_run"]]
        if len(rates) > 1 and min(rates) > 0 and max(rates) / min(rates) - 1 > _DRIFT_WARNING:
            problems.append(
                f"{name}: its runs differ by more than {_DRIFT_WARNING:.0%} "
                f"({', '.join(f'{r:,.0f}' for r in rates)} rps): the machine is noisy, read the ratios with care"
            )
    others = [figures["cpu"]["other_cores"] for figures in scenarios.values()]
    if others and None not in others and max(others) > _NOISE_WARNING_CORES:
        problems.append(
            f"other processes used up to {max(others):.2f} cores during the run: the machine was not quiet, so the "
            "throughput ratios are unreliable (a busy machine slows the CPU-bound noop more than the "
            "latency-bound scenarios); allocate_cpu_ratio is the steadier guide"
        )
    for name, figures in scenarios.items():
        watched = figures.get("watchers")
        if watched is not None and watched["follow"] == "bare":
            if not watched["min_messages_per_watcher_run"]:
                problems.append(f"{name}: a stream of bench.bare_writes received nothing in a run")
        elif watched is not None and not _watchers_live(watched):
            problems.append(
                f"{name}: the watchers were not all live, complete and keeping up (fewest events one received "
                f"in a run {watched['min_events_per_watcher_run']}, missed {watched['events_missed']}, out of "
                f"order {watched['out_of_order']}, p99 lag {watched['lag_p99_ms']} ms of at most "
                f"{WATCHERS_MAX_P99_LAG_MS:.0f}, errors {watched['errors'][:3]}): its ratio is not reported"
            )
    ceiling = flat.get("lifecycle_noop_ceiling_rps")
    for name, key, _, bound, multiple_of in TARGETS:
        if key == "lifecycle_rps" and multiple_of is None and ceiling is not None and ceiling < bound:
            problems.append(
                f"{name} is above what five no-op calls reach on this stack here ({ceiling:,.0f}/s): "
                "no change to AuthPool's own code can meet it on this machine"
            )
    if store is not None and "lifecycle" in scenarios:
        reported = scenarios["lifecycle"]["series"].get("lifecycle_report_usage", {}).get("count", 0)
        if store["usage"] < reported:
            problems.append(f"only {store['usage']} usage rows on disk for {reported} acknowledged reports")
    return problems


# -- context ---------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import grpc
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf_version,
        "protobuf_backend": api_implementation.Type(),
        "loadavg_before": list(os.getloadavg()),
    }


def _git() -> dict[str, Any]:
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _store_counts(data_dir: Path) -> dict[str, int] | None:
    """Rows the server left on disk after its graceful stop: the writes it acknowledged are there."""
    path = data_dir / "authpool.sqlite3"
    if not path.exists():
        return None
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {
            "leases": connection.execute("SELECT COUNT(*) FROM leases").fetchone()[0],
            "usage": connection.execute("SELECT COUNT(*) FROM usage").fetchone()[0],
            "events": connection.execute("SELECT COUNT(*) FROM events").fetchone()[0],
        }
    finally:
        connection.close()


# -- the report -----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _table(scenarios: dict[str, dict[str, Any]]) -> str:
    noop = scenarios.get("noop")
    header = (
        "| scenario | calls | rps | p50 ms | p99 ms | rps / noop | p99 / noop "
        "| server CPU µs/RPC | client CPU µs/RPC | other load (cores) |"
    )
    rows = [header, "|---|" + "---:|" * (header.count("|") - 2)]

    def row(label: str, figures: dict[str, Any], cpu: dict[str, Any], rpc_factor: int = 1) -> None:
        ratio = p99_ratio = None
        if noop is not None:
            ratio = _ratio(figures["rps"] * rpc_factor, noop["rps"])
            p99_ratio = _ratio(figures["p99_ms"], noop["p99_ms"])
        rows.append(
            f"| {label} | {figures['count']:,} | {_fmt(figures['rps'], 0)} | {_fmt(figures['p50_ms'])} "
            f"| {_fmt(figures['p99_ms'])} | {_fmt(ratio)} | {_fmt(p99_ratio)} "
            f"| {_fmt(cpu.get('server_cpu_us_per_rpc'), 0)} | {_fmt(cpu.get('client_cpu_us_per_rpc'), 0)} "
            f"| {_fmt(cpu.get('other_cores'))} |"
        )

    labels = {
        "noop": "noop (baseline)",
        "allocate": "allocate",
        "allocate_all_spans": "allocate, a span exported for every call",
        "allocate_untraced": "allocate, chain without spans",
        "allocate_bare": "allocate, no interceptors",
        "allocate_pg": "allocate on PostgreSQL, no interceptors",
        "allocate_pg2": "allocate on 2 replicas sharing PostgreSQL, no interceptors",
        "allocate_watched": f"allocate, chain without spans, {WATCHERS} watchers (one subscription each)",
        "allocate_watched_all": f"allocate, chain without spans, {WATCHERS} unfiltered watchers",
        "allocate_watched_bare": f"allocate, chain without spans, {WATCHERS} streams that only write",
        "lifecycle": "lifecycle (rps / noop per RPC)",
    }
    for name, label in labels.items():
        if name in scenarios:
            figures = scenarios[name]
            row(label, figures, figures["cpu"], LIFECYCLE_RPCS if name == "lifecycle" else 1)
            for sub, sub_figures in figures["series"].items():
                if sub != name:
                    row(f"  {sub.removeprefix(name + '_')}", sub_figures, {})
    return "\n".join(rows)


def _phase_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    soak = result.get("soak")
    if soak is not None and soak["growth"]["measured"]:
        growth, last = soak["growth"], soak["samples"][-1]
        lines.append(
            f"soak: {soak['lifecycles']:,} lifecycles through the pool in one process "
            f"({soak['lifecycles_per_s']:,.0f}/s, {soak['pool_days']:.0f} days of pool time); after the warm-up "
            f"(day {soak['warmup_days']:.1f}, lifecycle {growth['from_lifecycle']:,}) RSS "
            f"{_fmt(100 * growth['rss_growth'])} % (peak {_fmt(100 * growth['rss_peak_growth'])} %, "
            f"{last['rss_bytes'] / 2**20:.0f} MiB), fds {growth['open_fds_growth']:+d}, threads "
            f"{growth['threads_growth']:+d}, asyncio tasks {growth['asyncio_tasks_growth']:+d}, live authpool_server "
            f"objects {growth['own_objects_total_growth']:+,} of {last['own_objects_total']:,} "
            f"({last['pool']['usage_records']:,} usage records kept)"
        )
    soak_rpc = result.get("soak_rpc")
    if soak_rpc is not None:
        growth = soak_rpc["growth"]
        lines.append(
            f"soak over gRPC: {soak_rpc['lifecycles']:,} lifecycles through a server as deployed; after the first "
            f"segment fds {growth['open_fds_growth']:+d}, threads {growth['threads_growth']:+d}, asyncio tasks "
            f"{growth['asyncio_tasks_growth']:+d}, RSS {_fmt(100 * growth['rss_growth'])} % "
            f"({_fmt(growth['rss_bytes_per_usage_record'], 0)} bytes per usage record kept, all within retention)"
        )
    scale = result.get("scale")
    if scale is not None:
        small, big, state = scale["allocate_small"], scale["allocate_scale"], scale["state"]
        lines.append(
            f"scale: {state['subscriptions']:,} subscriptions, {state['live_leases']:,} live leases, "
            f"{state['usage_records']:,} usage records: SERVING "
            f"{', '.join(format(r['seconds_to_serving'], '.2f') for r in scale['restarts'])} s after spawning "
            f"(Server.start() {_fmt(scale['recovery_start_s'])} s, RSS "
            f"{scale['restarts'][-1]['rss_bytes'] / 2**20:.0f} MiB); Allocate p50 {_fmt(big['p50_ms'])} ms vs "
            f"{_fmt(small['p50_ms'])} ms on 3 subscriptions, server CPU {_fmt(big['server_cpu_us_per_rpc'], 0)} vs "
            f"{_fmt(small['server_cpu_us_per_rpc'], 0)} µs per Allocate (ratio {_fmt(scale['scale_cpu_ratio'])})"
        )
    return lines


def _report(result: dict[str, Any]) -> str:
    scenarios = result["scenarios"]
    lines = [_table(scenarios), ""] if scenarios else []
    for name, figures in scenarios.items():
        rates = ", ".join(f"{run['rps']:,.0f}" for run in figures["per_run"])
        lines.append(f"{name} rps per run, in order: {rates}")
    for key in (
        "interceptor_overhead_per_pair",
        "watchers_ratio_per_pair",
        "watchers_all_ratio_per_pair",
        "watchers_bare_ratio_per_pair",
    ):
        if result.get(key):
            figures = ", ".join(_fmt(value) for value in result[key])
            lines.append(f"{key.removesuffix('_per_pair')} of each pair of runs, in order: {figures}")
    if result.get("allocate_cpu_ratio") is not None:
        lines.append(
            f"allocate_cpu_ratio {_fmt(result['allocate_cpu_ratio'])}: server CPU per no-op / per Allocate, "
            "what allocate_ratio tends to while the server is CPU-bound (steadier on a noisy machine)"
        )
    for name in WATCHED:
        watched = scenarios.get(name, {}).get("watchers")
        if watched is not None and watched["follow"] == "bare":
            lines.append(
                f"{name}: {watched['watchers']} streams of bench.bare_writes, one message every "
                f"{watched['period_ms']} ms each ({_fmt(watched['messages_per_s'], 0)} messages/s), fewest in a run "
                f"{watched['min_messages_per_watcher_run']:,}; throughput / twin "
                f"{_fmt(result.get('watchers_bare_ratio'))}, "
                f"server CPU per Allocate twin / bare {_fmt(result.get('watchers_bare_cpu_ratio'))}, "
                f"{_fmt(result.get('watchers_bare_server_us_per_message'), 0)} µs server CPU per message"
            )
        elif watched is not None:
            key = "watchers" if name == "allocate_watched" else "watchers_all"
            lines.append(
                f"{name}: {watched['watchers']} watchers following {watched['follow']}, batches of up to "
                f"{watched['max_batch_events']} events, window {watched['batch_window_ms']} ms; received "
                f"{watched['events_received']:,} of {watched['events_expected']:,} events due "
                f"({watched['events_in_log']:,} in the log), missed {watched['events_missed']}, fewest in a run "
                f"{watched['min_events_per_watcher_run']:,}, lag p50/p99/max {_fmt(watched['lag_p50_ms'], 0)}/"
                f"{_fmt(watched['lag_p99_ms'], 0)}/{_fmt(watched['lag_max_ms'], 0)} ms (process at nice "
                f"{WATCHERS_NICE}); throughput / twin "
                f"{_fmt(result.get(key + '_ratio_unchecked'))}, server CPU per Allocate twin / watched "
                f"{_fmt(result.get(key + '_cpu_ratio'))}; {_fmt(result.get(key + '_deliveries_per_allocate'))} "
                f"events to watchers per Allocate in {_fmt(result.get(key + '_messages_per_allocate'))} messages "
                f"({_fmt(result.get(key + '_events_per_message'))} events each; "
                f"{_fmt(result.get(key + '_messages_per_s'), 0)} messages/s under load), "
                f"{_fmt(result.get(key + '_server_us_per_message'), 0)} µs server CPU per message"
            )
    lines.extend(_phase_lines(result))
    lines.append("")
    for target in result["targets"]:
        verdict = {True: "PASS", False: "MISSED", None: "NOT MEASURED"}[target["met"]]
        lines.append(f"{verdict:>12}  {target['target']}: {_fmt(target['value'])} (limit {_fmt(target['limit'])})")
    lines.extend(f"     WARNING  {problem}" for problem in result["problems"])
    machine = result["machine"]
    lines.append(
        f"\n{machine['nproc']} CPUs ({machine['cpu_model']}), Python {machine['python']}, grpcio {machine['grpcio']}, "
        f"protobuf {machine['protobuf']} ({machine['protobuf_backend']}); load average "
        f"{machine['loadavg_before'][0]:.2f} before, {machine['loadavg_after'][0]:.2f} after"
    )
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------


def _simulator_figures() -> dict[str, Any]:
    """How fast the simulator drives the balancer over the shipped traces, in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", "authpool_server.simulator", "bench", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def _run_phases(args: argparse.Namespace) -> dict[str, Any]:
    """The long phases (soak, soak_rpc, scale), one after the other, each in a process of its own."""
    commands = {
        "soak": ["-m", "bench.soak", "--lifecycles", str(args.soak_lifecycles)],
        "soak_rpc": ["-m", "bench.soak_rpc"],
        "scale": ["-m", "bench.scale"],
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="phases-", dir=args.out.parent) as phase_dir:
        for phase in args.phases:
            print(f"{phase} ...", file=sys.stderr, flush=True)
            out = Path(phase_dir) / f"{phase}.json"
            command = [sys.executable, *commands[phase], "--work-dir", str(args.out.parent), "--out", str(out)]
            subprocess.run(command, cwd=ROOT, check=True)
            results[phase] = json.loads(out.read_text())
    return results


def _phase_figures(phases: dict[str, Any]) -> dict[str, Any]:
    """The phases' headline figures, flat beside the others."""
    flat: dict[str, Any] = {}
    soak = phases.get("soak")
    if soak is not None:
        growth = soak["growth"]
        flat["soak_lifecycles"] = soak["lifecycles"]
        flat["soak_lifecycles_per_s"] = soak["lifecycles_per_s"]
        if growth["measured"]:
            flat["soak_rss_growth"] = growth["rss_growth"]
            flat["soak_rss_peak_growth"] = growth["rss_peak_growth"]
            for key in ("open_fds", "threads", "asyncio_tasks", "own_objects_total"):
                flat[f"soak_{key}_growth"] = growth[f"{key}_growth"]
            flat["soak_rss_mib_after_warmup"] = soak["samples"][-1]["rss_bytes"] / 2**20
    soak_rpc = phases.get("soak_rpc")
    if soak_rpc is not None:
        growth = soak_rpc["growth"]
        flat["soak_rpc_lifecycles"] = soak_rpc["lifecycles"]
        for key in ("open_fds", "threads", "asyncio_tasks"):
            flat[f"soak_rpc_{key}_growth"] = growth[f"{key}_growth"]
        flat["soak_rpc_rss_bytes_per_usage_record"] = growth["rss_bytes_per_usage_record"]
    scale = phases.get("scale")
    if scale is not None:
        for key in ("scale_p50_ratio", "scale_p99_ratio", "scale_cpu_ratio", "recovery_s", "recovery_start_s"):
            flat[key] = scale[key]
        flat["scale_rss_mib_after_restart"] = scale["restarts"][-1]["rss_bytes"] / 2**20
    return flat


def _phase_problems(phases: dict[str, Any]) -> list[str]:
    problems = []
    soak = phases.get("soak")
    if soak is not None:
        growth = soak["growth"]
        if not growth["measured"]:
            problems.append("soak: the run ended before its warm-up did; no growth measured")
        else:
            for key in ("open_fds", "threads", "asyncio_tasks"):
                if growth[f"{key}_growth"] > 0:
                    problems.append(f"soak: {key} grew by {growth[f'{key}_growth']} after the warm-up")
            base = soak["samples"][-1]["own_objects_total"] - growth["own_objects_total_growth"]
            if growth["own_objects_total_growth"] > 0.01 * base + 100:
                problems.append(
                    f"soak: live objects of authpool_server types grew by {growth['own_objects_total_growth']:,} "
                    f"after the warm-up: {growth['own_objects_growth']}"
                )
    soak_rpc = phases.get("soak_rpc")
    if soak_rpc is not None:
        for key in ("open_fds", "threads", "asyncio_tasks"):
            if soak_rpc["growth"][f"{key}_growth"] > 0:
                problems.append(f"soak_rpc: the server's {key} grew by {soak_rpc['growth'][f'{key}_growth']}")
    scale = phases.get("scale")
    if scale is not None:
        for name in ("allocate_small", "allocate_scale"):
            figures = scale[name]
            if figures["errors"] or figures["unexpected"]:
                problems.append(
                    f"scale: {name}: {figures['errors']} calls failed, {figures['unexpected']} unexpected answers"
                )
    return problems


def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = _machine()
    started = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # On the real disk next to the report, not in a tmpfs, so that fsync costs what it costs.
    work_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.out.parent))
    raw: dict[str, list[list[dict[str, Any]]]] = {}
    watched_raw: dict[str, list[dict[str, Any]]] = {}
    token = secrets.token_hex(24)
    spans_exported, store = 0, None
    try:
        if args.schedule:  # else only the phases run
            with contextlib.ExitStack() as stack:
                sink = stack.enter_context(OtlpSink())
                traced_env = {"BENCH_TOKEN": token, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
                full_env = traced_env | deployed_telemetry()
                full = stack.enter_context(_server(work_dir, args.subscriptions, "full", full_env))
                # Lifecycles leave usage records behind, and an Allocate costs more as they pile up
                # (see scale_p50_ratio): they get a server of their own, so that `full` and `bare`,
                # compared in interceptor_overhead, have served the same calls.
                lifecycle: list[ServerProcess] = []
                if "lifecycle" in args.schedule:
                    own = _server(work_dir, args.subscriptions, "full", full_env, "lifecycle")
                    lifecycle.append(stack.enter_context(own))
                all_spans_env = traced_env | {"OTEL_TRACES_SAMPLER": "always_on"}
                all_spans = stack.enter_context(
                    _server(work_dir, args.subscriptions, "full", all_spans_env, "all-spans")
                )
                bare_writes = ["--bare-writes"] if "allocate_watched_bare" in args.schedule else []
                untraced = stack.enter_context(
                    _server(work_dir, args.subscriptions, "full", {"BENCH_TOKEN": token}, "untraced", bare_writes)
                )
                bare = stack.enter_context(_server(work_dir, args.subscriptions, "off", {}))
                servers = [full, *lifecycle, all_spans, untraced, bare]
                pg: list[ServerProcess] = []
                if "allocate_pg" in args.schedule:
                    pg_env, pg_extra = stack.enter_context(_postgres_schema())
                    pg.append(stack.enter_context(_server(work_dir, args.subscriptions, "off", pg_env, "pg", pg_extra)))
                pg2: list[ServerProcess] = []
                if "allocate_pg2" in args.schedule:
                    pg_env, pg_extra = stack.enter_context(_postgres_schema())
                    for name in ("pg2a", "pg2b"):
                        replica = _server(work_dir, args.subscriptions, "off", pg_env, name, pg_extra)
                        pg2.append(stack.enter_context(replica))
                servers += pg + pg2
                for server in servers:
                    print(f"server pid {server.pid} on {server.target}; data in {server.data_dir}", file=sys.stderr)
                for index, scenario in enumerate(args.schedule):
                    print(f"[{index + 1}/{len(args.schedule)}] {scenario} ...", file=sys.stderr, flush=True)
                    targets, server_token = {
                        "allocate_bare": ([bare], ""),
                        "lifecycle": (lifecycle, token),
                        "allocate_pg": (pg, ""),
                        "allocate_pg2": (pg2, ""),
                        "allocate_all_spans": ([all_spans], token),
                        "allocate_untraced": ([untraced], token),
                        "allocate_watched": ([untraced], token),
                        "allocate_watched_all": ([untraced], token),
                        "allocate_watched_bare": ([untraced], token),
                    }.get(scenario, ([full], token))
                    server = targets[0]
                    follow = WATCHED.get(scenario)
                    with (
                        _watchers(server, follow, args.subscriptions, index, work_dir, server_token)
                        if follow is not None
                        else contextlib.nullcontext({})
                    ) as watched:
                        raw.setdefault(scenario, []).append(
                            _run_scenario(args, targets, scenario, index, work_dir, server_token)
                        )
                    if follow is not None:
                        watched_raw.setdefault(scenario, []).append(watched)
            spans_exported = sink.spans
            store = _store_counts(work_dir / "data-lifecycle")
    finally:
        if not args.keep_data:
            shutil.rmtree(work_dir, ignore_errors=True)
    simulator: dict[str, Any] = {}
    if args.schedule:
        print("simulator: replaying the shipped traces ...", file=sys.stderr, flush=True)
        simulator = _simulator_figures()  # after the server has stopped: the two would share the CPUs
    phases = _run_phases(args)
    machine["loadavg_after"] = list(os.getloadavg())

    scenarios = {name: _scenario_figures(raw[name], args.duration) for name in SCENARIOS if name in raw}
    for name, runs in watched_raw.items():
        scenarios[name]["watchers"] = _bare_figures(runs) if WATCHED[name] == "bare" else _watcher_figures(runs)
    flat = {**_flat(scenarios), **simulator, **_phase_figures(phases)}
    targets = _targets(flat)
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": _git(),
        **flat,
        "targets": targets,
        "all_targets_met": all(target["met"] for target in targets),
        "problems": _problems(scenarios, flat, store) + _phase_problems(phases),
        "scenarios": scenarios,
        **phases,
        "store_rows_after_run": store,
        "spans_exported": spans_exported,
        "machine": machine,
        "settings": {
            "schedule": args.schedule,
            "phases": args.phases,
            "soak_lifecycles": args.soak_lifecycles,
            "concurrency": args.concurrency,
            "client_processes": args.clients,
            "warmup_seconds": args.warmup,
            "duration_seconds": args.duration,
            "subscriptions": args.subscriptions,
            "sticky_fraction": args.sticky_fraction,
            "store": "SQLite WAL, synchronous=FULL, group commit: every acknowledged change is fsynced",
            "wall_seconds": round(time.monotonic() - started, 1),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    result = run(args)
    print(_report(result))
    args.out.write_text(json.dumps(json_safe(result), indent=2) + "\n")
    print(f"\nfigures written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
