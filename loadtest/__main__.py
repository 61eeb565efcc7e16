"""`python -m loadtest` (`make loadtest`): the production guide's load-testing plan, against a real server.

The guide's Artillery plan (warm-up, sustained, spike at 10, 50 and 100
arrivals per second over 60, 300 and 120 s), with the rates times
``--scale`` and the three phases together ``--duration`` seconds in the
guide's proportions, then a closed-loop phase that finds the maximum. One
run:

1. write a config in the guide's format (`loadtest.server`) and start
   `authpool serve` with it, on the embedded store or on a fresh
   PostgreSQL schema (dropped afterwards);
2. bring every subscription near its budget through the API
   (`loadtest.seed`);
3. start ``--processes`` generator processes (`loadtest.generator`), each
   primed and connected, and give them one start time;
4. sample the server's RSS and CPU, the generators' CPU and the pool's
   state every half second while they run (`loadtest.server.Sampler`);
5. stop the server gracefully, and write the figures against the guide's
   success criteria to ``var/loadtest/<store>.md`` (a markdown report),
   ``<store>.png`` (the plot) and ``<store>.json`` (every figure).

The exit code is 0 whether or not the criteria are met; non-zero only when
the load test itself failed. Settings come from flags, or from the
environment for `make loadtest`: LOADTEST_STORE (sqlite, postgres or both),
LOADTEST_SCALE, LOADTEST_DURATION, LOADTEST_CLOSED_SECONDS,
LOADTEST_PROCESSES, LOADTEST_QUICK=1, LOADTEST_DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from authpool_server.simulator.report import json_safe
from bench.__main__ import _git, _machine, _postgres_schema
from bench.procs import readline_within
from loadtest import report
from loadtest.generator import MIX, REPORT
from loadtest.schedule import Phase, build_plan
from loadtest.seed import seed_budgets
from loadtest.server import PoolShape, Sampler, Tokens, serve, write_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "var" / "loadtest"
_READY_TIMEOUT = 60.0
_CLOSED_RPS_GUESS = 1_200.0  # what the closed-loop phase reaches here, to size the usage costs
STORE_LABELS = {
    "sqlite": "embedded SQLite store (WAL, synchronous=FULL)",
    "postgres": "PostgreSQL store (fresh schema)",
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgres", "both"), default=_env("LOADTEST_STORE", "sqlite"))
    parser.add_argument(
        "--quick", action="store_true", default=_env("LOADTEST_QUICK", "") == "1", help="a 30-second run"
    )
    parser.add_argument(
        "--scale", type=float, default=float(_env("LOADTEST_SCALE", "5")), help="times the guide's arrival rates"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of the three open-loop phases together (default 160, quick 24; $LOADTEST_DURATION)",
    )
    parser.add_argument(
        "--closed-seconds", type=float, default=None, help="the closed-loop phase (default 20, quick 6; 0: none)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop callers, all processes together")
    parser.add_argument("--processes", type=int, default=int(_env("LOADTEST_PROCESSES", "2")))
    parser.add_argument("--subscriptions", type=int, default=20)
    parser.add_argument("--max-clients", type=int, default=25, help="per subscription")
    parser.add_argument("--budget", type=float, default=456.0, help="weekly budget of each subscription (USD)")
    parser.add_argument("--live", type=int, default=0, help="most live leases (default 70%% of the pool's room)")
    parser.add_argument("--population", type=int, default=20_000, help="distinct client ids, all processes")
    parser.add_argument("--services", type=int, default=8, help="client principals (tokens, rate-limit buckets)")
    parser.add_argument("--watchers", type=int, default=4, help="WatchEvents streams held open through the run")
    parser.add_argument("--seed-low", type=float, default=0.55, help="least spent subscription at the start")
    parser.add_argument("--seed-high", type=float, default=0.84, help="most spent (the threshold is 0.85)")
    parser.add_argument("--spend", type=float, default=0.18, help="share of the pool's budget the load spends")
    parser.add_argument("--out", type=Path, default=Path(_env("LOADTEST_OUT", str(DEFAULT_OUT))))
    parser.add_argument("--keep-data", action="store_true", help="keep the run directory (config, log, data)")
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = float(_env("LOADTEST_DURATION", "24" if args.quick else "160"))
    if args.closed_seconds is None:
        args.closed_seconds = float(_env("LOADTEST_CLOSED_SECONDS", "6" if args.quick else "20"))
    if args.processes < 1 or args.concurrency < args.processes:
        parser.error("need 1 <= --processes <= --concurrency")
    args.live = args.live or int(0.7 * args.subscriptions * args.max_clients)
    args.out = args.out.resolve()  # the config's credentialsRoot and dataDir are under it: absolute
    return args


def _plan(args: argparse.Namespace) -> tuple[Phase, ...]:
    return build_plan(
        scale=args.scale,
        open_seconds=args.duration,
        closed_seconds=args.closed_seconds,
        concurrency=args.concurrency,
    )


def _cost_mean_micros(args: argparse.Namespace, plan: Sequence[Phase], budget_micros: int) -> float:
    """The mean cost per usage report that spends `--spend` of the pool's budget over the plan."""
    calls = sum(p.arrivals() for p in plan) + sum(p.seconds * _CLOSED_RPS_GUESS for p in plan if not p.open_loop)
    reports = max(1.0, calls * MIX[REPORT])
    return args.spend * budget_micros / reports


@contextlib.contextmanager
def _store(kind: str) -> Iterator[tuple[dict[str, str], str | None]]:
    """(server environment, PostgreSQL schema or None): a fresh schema, dropped afterwards, for postgres."""
    if kind != "postgres":
        yield {}, None
        return
    if url := os.environ.get("LOADTEST_DATABASE_URL"):
        os.environ["BENCH_DATABASE_URL"] = url  # what `_postgres_schema` reads
    with _postgres_schema() as (env, extra):
        yield {"AUTHPOOL_DATABASE_URL": env["BENCH_DATABASE_URL"]}, extra[extra.index("--schema") + 1]


def _generators(
    args: argparse.Namespace,
    plan: Sequence[Phase],
    target: str,
    tokens: Tokens,
    work_dir: Path,
    cost_mean_micros: float,
    after_sequence: int,
    subscriptions: list[str],
) -> list[tuple[subprocess.Popen[str], Path]]:
    plan_json = json.dumps([asdict(p) for p in plan])
    run_id = f"lt{os.getpid()}"
    processes = []
    for index in range(args.processes):
        out = work_dir / f"generator-{index}.json"
        command = [
            *(sys.executable, "-m", "loadtest.generator", "--target", target, "--plan", plan_json),
            *("--process", str(index), "--processes", str(args.processes), "--prefix", f"{run_id}-p{index}"),
            *("--population", str(args.population // args.processes), "--live-cap", str(args.live // args.processes)),
            *("--cost-mean-micros", f"{cost_mean_micros:.1f}", "--after-sequence", str(after_sequence)),
            *("--watchers", str(args.watchers if index == 0 else 0), "--subscriptions", *subscriptions),
            *("--out", str(out)),
        ]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **tokens.generator_env()},  # tokens in the environment, never in argv
        )
        processes.append((process, out))
    return processes


def run_one(args: argparse.Namespace, store: str) -> dict[str, Any]:
    machine = _machine()
    started = time.monotonic()
    plan = _plan(args)
    shape = PoolShape(args.subscriptions, args.budget, args.max_clients, services=args.services)
    tokens = Tokens.fresh(shape.services)
    args.out.mkdir(parents=True, exist_ok=True)
    # On the real disk next to the report, not a tmpfs: fsync costs what it costs.
    work_dir = Path(tempfile.mkdtemp(prefix=f"run-{store}-", dir=args.out))
    try:
        with _store(store) as (store_env, schema):
            config = work_dir / "auth-pool.json"
            write_config(config, shape, tokens, schema=schema)
            with serve(config, {**tokens.server_env(), **store_env}, ROOT) as server:
                print(f"{store}: server pid {server.pid} on {server.target}; run in {work_dir}", file=sys.stderr)
                seeded = asyncio.run(
                    seed_budgets(
                        server.target,
                        next(iter(tokens.clients.values())),
                        tokens.ops[1],
                        low=args.seed_low,
                        high=args.seed_high,
                        seed=f"{store}-seed",
                    )
                )
                cost = _cost_mean_micros(args, plan, seeded.budget_micros)
                generators = _generators(
                    args,
                    plan,
                    server.target,
                    tokens,
                    work_dir,
                    cost,
                    seeded.last_sequence,
                    shape.subscription_ids(),
                )
                sampler = Sampler(
                    server.pid,
                    server.target,
                    tokens.ops[1],
                    admin_port=server.admin_port,
                    generator_pids=[p.pid for p, _ in generators],
                )
                try:
                    for process, _ in generators:
                        if readline_within(process.stdout, _READY_TIMEOUT).strip() != "ready":
                            raise RuntimeError(f"a generator did not get ready:\n{server.log_tail()}")
                    sampler.t0 = time.time() + 0.5
                    sampler.start()
                    for process, _ in generators:
                        assert process.stdin is not None
                        process.stdin.write(f"go {sampler.t0!r}\n")
                        process.stdin.flush()
                    total = sum(p.seconds for p in plan)
                    _progress(plan, sampler.t0, store)
                    for process, _ in generators:
                        if process.wait(timeout=total + 120) != 0:
                            raise RuntimeError(f"a generator failed (exit {process.returncode})")
                    if server.process.poll() is not None:
                        raise RuntimeError(f"the server exited during the run:\n{server.log_tail()}")
                    time.sleep(0.6)  # one more sample after the end
                finally:
                    sampler.stop()
                    for process, _ in generators:
                        if process.poll() is None:
                            process.kill()
                            process.wait()
                results = [json.loads(out.read_text()) for _, out in generators]
                pool_at_end = next((s["pool"] for s in reversed(sampler.samples) if "pool" in s), None)
            server_exit = server.process.returncode
            server_log_problems = server.log_problems()
    finally:
        if not args.keep_data:
            shutil.rmtree(work_dir, ignore_errors=True)
    machine["loadavg_after"] = list(os.getloadavg())
    base = args.out / store
    figures = report.figures(plan, results, sampler.samples)
    return {
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": _git(),
        "machine": machine,
        "figures": figures,
        "seeded_utilization": seeded.utilization,
        "pool_at_end": pool_at_end,
        "server_exit_code": server_exit,
        "server_log_problems": server_log_problems,
        "settings": {
            "store": store,
            "store_label": STORE_LABELS[store],
            "plan": [asdict(p) for p in plan],
            "scale": args.scale,
            "processes": args.processes,
            "concurrency": args.concurrency,
            "subscriptions": args.subscriptions,
            "max_clients": args.max_clients,
            "budget": args.budget,
            "live": args.live,
            "population": args.population,
            "services": args.services,
            "watchers": args.watchers,
            "seed_low": args.seed_low,
            "seed_high": args.seed_high,
            "spend": args.spend,
            "cost_mean_micros": cost,
            "mix": {name: MIX[i] for i, name in enumerate(report.METHODS)},
            "wall_seconds": time.monotonic() - started,
            "plot": str(base.with_suffix(".png")),
        },
    }


def _progress(plan: Sequence[Phase], t0: float, store: str) -> None:
    """Say each phase as it starts, from a daemon thread (the waits above block this one)."""
    import threading

    def tell() -> None:
        at = t0
        for phase in plan:
            time.sleep(max(0.0, at - time.time()))
            what = f"{phase.rate:g}/s" if phase.open_loop else f"{phase.concurrency} callers"
            print(f"{store}: {phase.name}, {phase.seconds:.0f} s at {what}", file=sys.stderr, flush=True)
            at += phase.seconds

    threading.Thread(target=tell, daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    for store in stores:
        result = run_one(args, store)
        base = args.out / store
        report.plot(result, base.with_suffix(".png"))
        text = report.markdown(result)
        base.with_suffix(".md").write_text(text)
        base.with_suffix(".json").write_text(json.dumps(json_safe(result), indent=1) + "\n")
        print(text)
        print(f"written: {base}.md, {base}.png, {base}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
