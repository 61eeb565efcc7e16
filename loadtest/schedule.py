"""The load plan and the open-loop arithmetic: when each request is meant to start.

Pure: no clocks, no I/O, so the arithmetic is tested on its own
(`tests/unit/test_loadtest_schedule.py`).

Open loop means the requests arrive at a fixed rate whatever the server
does: arrival ``j`` of a phase is due at ``phase start + j / rate``, and
its latency is measured from that intended moment, not from when the
generator got round to sending it. A server (or generator) that stalls
for a second therefore shows a second of latency on every request that
was due during the stall, instead of quietly sending fewer requests: the
coordinated omission of closed-loop tools is avoided.

Several generator processes share a phase's rate without coordinating at
run time: process ``p`` of ``P`` takes the arrivals ``j`` with
``j % P == p``, so together they send exactly the global sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "GUIDE_PHASES",
    "Phase",
    "Schedule",
    "arrivals",
    "build_plan",
    "latency_us",
    "phase_starts",
]

# The production guide's Artillery plan: (name, seconds, arrivals per second).
GUIDE_PHASES: tuple[tuple[str, float, float], ...] = (
    ("warm-up", 60.0, 10.0),
    ("sustained", 300.0, 50.0),
    ("spike", 120.0, 100.0),
)


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase of the plan: open loop at `rate` arrivals per second, or closed loop with `concurrency` workers.

    Rates and concurrency are for all generator processes together.
    """

    name: str
    seconds: float
    rate: float = 0.0
    concurrency: int = 0

    @property
    def open_loop(self) -> bool:
        return self.concurrency == 0

    def arrivals(self) -> int:
        """How many requests an open-loop phase sends (none for a closed-loop one)."""
        if not self.open_loop or self.rate <= 0:
            return 0
        # The epsilon keeps 0.1 s x 30/s at 3 arrivals despite binary floating point.
        return math.floor(self.seconds * self.rate + 1e-9)


def build_plan(*, scale: float, open_seconds: float, closed_seconds: float, concurrency: int) -> tuple[Phase, ...]:
    """The guide's phases with their rates times `scale` and their lengths in the guide's proportions.

    `open_seconds` is the length of the three open-loop phases together
    (the guide's 480 s); a closed-loop phase of `closed_seconds` follows,
    unless that is 0.
    """
    total = sum(seconds for _, seconds, _ in GUIDE_PHASES)
    phases = [Phase(name, open_seconds * seconds / total, rate * scale) for name, seconds, rate in GUIDE_PHASES]
    if closed_seconds > 0:
        phases.append(Phase("closed-loop max", closed_seconds, concurrency=concurrency))
    return tuple(phases)


def phase_starts(phases: Sequence[Phase]) -> list[float]:
    """Each phase's start, in seconds from the start of the run: they follow each other without a gap."""
    starts, at = [], 0.0
    for phase in phases:
        starts.append(at)
        at += phase.seconds
    return starts


def arrivals(phase: Phase, start: float, process: int = 0, processes: int = 1) -> Iterator[float]:
    """Intended start times of process `process`'s share of an open-loop phase beginning at `start`."""
    if not 0 <= process < processes:
        raise ValueError(f"process {process} is not one of {processes}")
    for j in range(process, phase.arrivals(), processes):
        yield start + j / phase.rate


def latency_us(intended_ns: int, finished_ns: int) -> int:
    """Latency in microseconds from the intended start (queueing in the generator and server included)."""
    return (finished_ns - intended_ns) // 1_000


class Schedule:
    """A process's arrivals over every open-loop phase of a plan, in order, on a clock starting at `start`.

    `due(now)` hands out every arrival whose time has come, each with its
    own intended time: after a stall they all come at once, none is
    dropped or moved later.
    """

    def __init__(self, phases: Sequence[Phase], start: float, process: int = 0, processes: int = 1) -> None:
        self._iterator = (
            (index, t)
            for index, (phase, offset) in enumerate(zip(phases, phase_starts(phases), strict=True))
            if phase.open_loop
            for t in arrivals(phase, start + offset, process, processes)
        )
        self._next = next(self._iterator, None)

    @property
    def next_time(self) -> float | None:
        """When the next arrival is due; None once all have been handed out."""
        return None if self._next is None else self._next[1]

    def due(self, now: float) -> list[tuple[int, float]]:
        """(phase index, intended time) of every arrival due at `now` not handed out before."""
        out = []
        while self._next is not None and self._next[1] <= now:
            out.append(self._next)
            self._next = next(self._iterator, None)
        return out
