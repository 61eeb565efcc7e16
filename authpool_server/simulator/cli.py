"""The simulator's command line: ``generate``, ``run`` and ``bench``.

    python -m authpool_server.simulator generate --kind near --seed 1 --out tests/data/traces/near.jsonl.gz
    python -m authpool_server.simulator run tests/data/traces/*.jsonl.gz --out var/sim
    python -m authpool_server.simulator bench --json

``run`` prints the markdown table and the acceptance checks, and writes
``report.md``, ``report.json`` and one ``<trace>.png`` per trace to ``--out``.
It exits 0 even when a check fails (the tests enforce them), unless
``--strict`` is given; 2 when a trace cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from authpool_server.simulator.engine import POLICIES, RunResult, simulate
from authpool_server.simulator.generate import KINDS, generate
from authpool_server.simulator.report import checks, figures, json_safe, markdown, plot
from authpool_server.simulator.trace import Trace, TraceError, read_trace, write_trace

__all__ = ["DEFAULT_TRACES", "build_parser", "main"]

DEFAULT_TRACES = Path("tests/data/traces")
DEFAULT_OUT = Path("var/sim")


def _default_traces() -> list[Path]:
    return sorted(DEFAULT_TRACES.glob("*.jsonl.gz")) + sorted(DEFAULT_TRACES.glob("*.jsonl"))


def _generate(args: argparse.Namespace) -> int:
    kinds = list(KINDS) if args.kind == "all" else [args.kind]
    out = Path(args.out)
    for kind in kinds:
        path = out / f"{kind}.jsonl.gz" if args.kind == "all" else out
        trace = generate(kind, args.seed)
        write_trace(path, trace)
        print(
            f"{path}: {trace.requests:,} requests from {len(trace.clients)} clients, "
            f"demand {trace.demand_micros / 1e6:,.2f}, {path.stat().st_size:,} bytes"
        )
    return 0


def _read_all(paths: Sequence[str | Path]) -> list[Trace]:
    if not paths:
        raise SystemExit(f"authpool simulate: no traces given and none in {DEFAULT_TRACES}/")
    traces = []
    for path in paths:
        try:
            traces.append(read_trace(path))
        except TraceError as error:
            print(f"authpool simulate: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    return traces


def _run(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise SystemExit(f"authpool simulate: unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    began = time.perf_counter()
    traces = _read_all(args.traces or _default_traces())
    read_seconds = time.perf_counter() - began
    if not args.traces:  # the shipped ones, in order of demand
        order = list(KINDS)
        traces.sort(key=lambda t: (order.index(t.name) if t.name in order else len(order), t.name))
    results: list[RunResult] = []
    for trace in traces:
        results.extend(simulate(trace, policy, seed=args.seed) for policy in policies)
    kinds = {trace.name: str(trace.generator.get("kind", "")) for trace in traces}
    found = checks(results, kinds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[str] = []
    if not args.no_plot and "ours" in policies:
        try:
            for trace in traces:
                runs = [r for r in results if r.trace == trace.name]
                marks = [(i.start, f"{i.subscription_id}: {i.share:.0%} {i.outcome.value}") for i in trace.incidents]
                plots.append(str(plot(runs, out / f"{trace.name}.png", marks=marks)))
        except ImportError:
            print("authpool simulate: matplotlib is not installed; no plots (pip install matplotlib)", file=sys.stderr)
    table = markdown(results, found)
    if plots:
        table += "\nPlots: " + ", ".join(f"`{p}`" for p in plots) + "\n"
    (out / "report.md").write_text(table)
    document: dict[str, Any] = {**figures(results, found), "plots": plots, "read_seconds": read_seconds}
    (out / "report.json").write_text(json.dumps(json_safe(document), indent=2) + "\n")
    if args.json:
        print(json.dumps(json_safe(document), indent=2))
    else:
        print(table, end="")
        print(f"\nwritten to {out / 'report.md'} and {out / 'report.json'}")
    failed = [c for c in found if c.passed is False]
    return 1 if args.strict and failed else 0


def _bench(args: argparse.Namespace) -> int:
    from authpool_server.simulator.bench import measure

    paths = args.traces or _default_traces()
    _read_all(paths)  # a clear error before timing anything
    result = measure(paths, repeat=args.repeat)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:,.0f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The simulator's argument parser (on `parser`, for `authpool simulate`, if given)."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m authpool_server.simulator", description="Replay traffic traces through the real balancer."
    )
    commands = parser.add_subparsers(dest="simulator_command", required=True)

    gen = commands.add_parser("generate", help="write a synthetic trace")
    gen.add_argument("--kind", required=True, choices=[*KINDS, "all"], help="demand below, near or above capacity")
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--out", required=True, help="the trace file (.jsonl or .jsonl.gz); a directory for --kind all")
    gen.set_defaults(run=_generate)

    run = commands.add_parser("run", help="replay traces under every policy and report")
    run.add_argument("traces", nargs="*", help=f"trace files (default: {DEFAULT_TRACES}/*.jsonl.gz)")
    run.add_argument("--out", default=str(DEFAULT_OUT), help=f"where the report goes (default: {DEFAULT_OUT})")
    run.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    run.add_argument("--seed", type=int, default=1, help="the random baseline's seed")
    run.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    run.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    run.add_argument("--strict", action="store_true", help="exit 1 when an acceptance check fails")
    run.set_defaults(run=_run)

    bench = commands.add_parser("bench", help="measure balancer decisions per second")
    bench.add_argument("traces", nargs="*", help=f"trace files (default: {DEFAULT_TRACES}/*.jsonl.gz)")
    bench.add_argument("--repeat", type=int, default=3, help="runs per replay; the fastest counts")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
