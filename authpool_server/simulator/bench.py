"""How fast the simulator drives the balancer: the `make bench` figure `simulator_decisions_per_s`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from authpool_server.simulator.engine import POLICIES, simulate
from authpool_server.simulator.trace import read_trace

__all__ = ["measure"]


def measure(paths: Sequence[str | Path], *, repeat: int = 3, policies: Sequence[str] = POLICIES) -> dict[str, Any]:
    """Replay every trace under every policy `repeat` times; decisions per second of the fastest runs.

    A decision is a call of `decide_allocation`, `decide_renewal` or `plan_rebalance`,
    and the time is the replay loop's alone (reading the trace is not counted).
    Taking each replay's fastest of `repeat` runs keeps other load on a shared
    machine out of the figure as far as it can be; the CPU-time figure is there
    for the same reason.
    """
    if not paths:
        raise ValueError("no traces to measure")
    traces = [read_trace(path) for path in paths]
    decisions: dict[str, int] = dict.fromkeys(policies, 0)
    seconds: dict[str, float] = dict.fromkeys(policies, 0.0)
    cpu: dict[str, float] = dict.fromkeys(policies, 0.0)
    for trace in traces:
        for policy in policies:
            runs = [simulate(trace, policy) for _ in range(max(1, repeat))]
            decisions[policy] += runs[0].decisions
            seconds[policy] += min(run.seconds for run in runs)
            cpu[policy] += min(run.cpu_seconds for run in runs)
    total_decisions, total_seconds, total_cpu = sum(decisions.values()), sum(seconds.values()), sum(cpu.values())
    return {
        "simulator_decisions_per_s": total_decisions / total_seconds,
        "simulator_decisions_per_cpu_s": total_decisions / total_cpu if total_cpu else None,
        "simulator_decisions_per_s_by_policy": {
            policy: decisions[policy] / seconds[policy] for policy in policies if seconds[policy]
        },
        "simulator_decisions": total_decisions,
        "simulator_traces": [trace.name for trace in traces],
    }
