"""The simulator: a week of traffic replayed through the real balancer, in seconds.

`generate` makes synthetic traces, `read_trace` and `write_trace` handle the
JSONL format (`trace`), `simulate` replays one trace under one placement
policy (ours, the real `balancer`, or a baseline) and measures it (`engine`),
and `report` turns results into the acceptance checks, a markdown table, JSON
figures and plots. The command line is ``python -m authpool_server.simulator``
(`cli`); ``docs/simulator.md`` has the format, the metrics and the latest
figures.
"""

from authpool_server.simulator.engine import (
    BASELINES,
    OURS,
    POLICIES,
    RunResult,
    capacity_micros,
    lower_bound_micros,
    simulate,
)
from authpool_server.simulator.generate import KINDS, generate
from authpool_server.simulator.report import Check, checks
from authpool_server.simulator.trace import Incident, Trace, TraceError, TraceEvent, read_trace, write_trace

__all__ = [
    "BASELINES",
    "KINDS",
    "OURS",
    "POLICIES",
    "Check",
    "Incident",
    "RunResult",
    "Trace",
    "TraceError",
    "TraceEvent",
    "capacity_micros",
    "checks",
    "generate",
    "lower_bound_micros",
    "read_trace",
    "simulate",
    "write_trace",
]
