"""`python -m bench.ab` (`make bench-ab`): an A/B of server variants, for a change smaller than `make bench` can see.

`make bench` compares its scenarios once or twice per run, and a change of a
few microseconds per Allocate is lost in the machine's drift between them.
This runs Allocate (concurrency 16, half new and half sticky clients, as
`make bench`) against several servers in many short rounds, each round in a
new random order, and reports each variant's throughput and server CPU per
Allocate, and its throughput against the first variant's, pooled and per
round: a difference that the rounds agree on is real.

Each variant is ``NAME:SETTING,SETTING...`` (or just ``NAME``), a
`bench.server` of its own:

``chain=full`` (the default) or ``chain=off``
    the whole interceptor chain, without spans, or no interceptors at all;
``traced``
    with the trace and metric settings of the shipped Deployment, spans
    exported over OTLP to a sink in this process (`make bench`'s `allocate`);
``ref=GIT-REF``
    that commit's code, checked out in a git worktree under ``var/ab``,
    with this tree's benchmark and virtualenv (its dependencies must match);
``watched``
    while `bench.watchers` holds 100 WatchEvents streams open, as in
    `make bench`'s `allocate_watched`.

For example, what a change to the chain saves, against the commit before
it, with the bare server as the yardstick::

    python -m bench.ab off:chain=off before:ref=HEAD~1,traced after:traced --rounds 8

Settings: ``--rounds`` (default 6), ``--duration`` (measured seconds per run,
default 5), ``--warmup`` (1.5); `make bench-ab` passes ``AB`` and ``AB_ROUNDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.__main__ import (
    ROOT,
    WATCHERS,
    ServerProcess,
    _run_scenario,
    _server,
    _watcher_figures,
    _watchers,
    _watchers_live,
)
from bench.deployed import deployed_telemetry
from bench.otlp_sink import OtlpSink

__all__ = ["Variant", "main", "parse_variant"]

_SETTINGS = ("chain", "traced", "ref", "watched")


@dataclass
class Variant:
    name: str
    chain: str = "full"
    traced: bool = False
    ref: str = ""
    watched: bool = False
    runs: list[tuple[float, float | None]] = field(default_factory=list)  # (rps, server CPU µs per Allocate)


def parse_variant(text: str) -> Variant:
    """``NAME:chain=off,traced,ref=HEAD~1,watched`` (every setting optional)."""
    name, _, settings = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{text!r}: a variant starts with a name (letters, digits, - and _)")
    variant = Variant(name)
    for setting in filter(None, settings.split(",")):
        key, has_value, value = setting.partition("=")
        if key not in _SETTINGS:
            raise ValueError(f"{text!r}: unknown setting {key!r}; choose from {', '.join(_SETTINGS)}")
        if key == "chain":
            if value not in ("full", "off"):
                raise ValueError(f"{text!r}: chain is full or off, not {value!r}")
            variant.chain = value
        elif key == "ref":
            if not value:
                raise ValueError(f"{text!r}: ref needs a git revision (ref=HEAD~1)")
            variant.ref = value
        elif has_value:
            raise ValueError(f"{text!r}: {key} takes no value")
        else:
            setattr(variant, key, True)
    if variant.chain == "off" and variant.traced:
        raise ValueError(f"{text!r}: a server without interceptors makes no spans; drop traced")
    return variant


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=parse_variant, metavar="NAME[:SETTING,...]")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--subscriptions", type=int, default=20)
    args = parser.parse_args(argv)
    names = [variant.name for variant in args.variants]
    if len(set(names)) != len(names):
        parser.error(f"variant names repeat: {names}")
    if len(names) < 2:
        parser.error("an A/B needs at least two variants")
    # What `bench.__main__._run_scenario` reads: one load process at concurrency 16, as `make bench`.
    args.clients, args.concurrency, args.sticky_fraction = 1, 16, 0.5
    return args


@contextlib.contextmanager
def _worktree(ref: str, work_dir: Path) -> Iterator[Path]:
    """`ref` checked out (detached) in a worktree of this repository, removed afterwards."""
    path = work_dir / f"tree-{secrets.token_hex(3)}"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), ref], cwd=ROOT, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)


def _figures(result: dict[str, Any], duration: float) -> tuple[float, float | None]:
    """A `bench.load` run's Allocates per second and server CPU µs per Allocate (None: not measured)."""
    calls = len(result["latencies_us"].get("allocate", ()))
    seconds = result["cpu"]["server_cpu_seconds"]
    return calls / duration, None if seconds is None or not calls else seconds / calls * 1e6


def run(args: argparse.Namespace) -> list[Variant]:
    base = ROOT / "var" / "ab"
    base.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    token = secrets.token_hex(24)
    try:
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(OtlpSink())
            servers: dict[str, ServerProcess] = {}
            for variant in args.variants:
                code = stack.enter_context(_worktree(variant.ref, work_dir)) if variant.ref else ROOT
                env = {"BENCH_TOKEN": token}
                if variant.traced:
                    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint} | deployed_telemetry()
                server = _server(work_dir, args.subscriptions, variant.chain, env, variant.name, code=code)
                servers[variant.name] = stack.enter_context(server)
            index = 0
            for round_ in range(args.rounds):
                order = list(args.variants)
                random.shuffle(order)
                for variant in order:
                    server = servers[variant.name]
                    print(f"round {round_ + 1}/{args.rounds}: {variant.name} ...", file=sys.stderr, flush=True)
                    with contextlib.ExitStack() as watching:
                        watched = None
                        if variant.watched:
                            follow = _watchers(server, "subscription", args.subscriptions, index, work_dir, token)
                            watched = watching.enter_context(follow)
                        [result] = _run_scenario(args, [server], "allocate", index, work_dir, token)
                    if watched is not None and not _watchers_live(_watcher_figures([watched])):
                        raise RuntimeError(f"{variant.name}: the watchers did not all keep up: {watched['errors'][:3]}")
                    index += 1
                    variant.runs.append(_figures(result, args.duration))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return args.variants


def report(variants: list[Variant]) -> str:
    first = variants[0]
    lines = [
        f"| variant | rps (mean) | server CPU µs per Allocate (median) | rps / {first.name} | per round |",
        "|---|---:|---:|---:|---|",
    ]
    for variant in variants:
        rates = [rps for rps, _ in variant.runs]
        cpus = [cpu for _, cpu in variant.runs if cpu is not None]
        kept = statistics.fmean(rates) / statistics.fmean(rps for rps, _ in first.runs)
        rounds = ", ".join(
            f"{ours / theirs:.2f}" for (ours, _), (theirs, _) in zip(variant.runs, first.runs, strict=True)
        )
        cpu = f"{statistics.median(cpus):,.0f}" if cpus else "-"
        lines.append(f"| {variant.name} | {statistics.fmean(rates):,.0f} | {cpu} | {kept:.3f} | {rounds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(report(run(args)))
    print(f"\n{args.rounds} rounds of {args.duration:g} s per variant, {WATCHERS} watchers where watched.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
