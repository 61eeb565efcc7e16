"""The load test's open-loop arithmetic: when each request is due, and what its latency is measured from."""

from __future__ import annotations

import pytest

from loadtest.schedule import GUIDE_PHASES, Phase, Schedule, arrivals, build_plan, latency_us, phase_starts


def test_plan_scales_the_guides_rates_and_keeps_its_proportions() -> None:
    plan = build_plan(scale=5, open_seconds=160, closed_seconds=20, concurrency=32)
    assert [(p.name, p.seconds, p.rate) for p in plan[:3]] == [
        ("warm-up", 20.0, 50.0),
        ("sustained", 100.0, 250.0),
        ("spike", 40.0, 500.0),
    ]
    assert plan[3] == Phase("closed-loop max", 20, concurrency=32)
    assert not plan[3].open_loop
    assert plan[3].arrivals() == 0
    assert [name for name, _, _ in GUIDE_PHASES] == ["warm-up", "sustained", "spike"]
    assert len(build_plan(scale=1, open_seconds=480, closed_seconds=0, concurrency=1)) == 3


def test_phases_follow_each_other_without_a_gap() -> None:
    plan = [Phase("a", 2, 10), Phase("b", 3, 20), Phase("c", 1.5, concurrency=4)]
    assert phase_starts(plan) == [0.0, 2.0, 5.0]


@pytest.mark.parametrize(("seconds", "rate", "count"), [(1, 10, 10), (0.1, 30, 3), (2.5, 4, 10), (1, 0.5, 0)])
def test_a_phase_sends_rate_times_seconds_evenly_spaced(seconds: float, rate: float, count: int) -> None:
    times = list(arrivals(Phase("p", seconds, rate), start=7.0))
    assert len(times) == count
    assert times == pytest.approx([7.0 + j / rate for j in range(count)])


@pytest.mark.parametrize("processes", [1, 2, 3, 7])
def test_processes_share_the_global_sequence_exactly(processes: int) -> None:
    phase = Phase("p", 2, 50)
    shares = [list(arrivals(phase, 0.0, p, processes)) for p in range(processes)]
    assert sorted(t for share in shares for t in share) == pytest.approx(list(arrivals(phase, 0.0)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="not one of"):
        next(arrivals(phase, 0.0, processes, processes))


def test_the_schedule_spans_the_open_phases_and_skips_closed_ones() -> None:
    plan = [Phase("warm", 1, 4), Phase("max", 2, concurrency=8), Phase("spike", 1, 2)]
    schedule = Schedule(plan, start=100.0)
    assert schedule.due(1e9) == [(0, 100.0), (0, 100.25), (0, 100.5), (0, 100.75), (2, 103.0), (2, 103.5)]
    assert schedule.next_time is None


def test_after_a_stall_every_missed_arrival_comes_with_its_own_intended_time() -> None:
    """No coordinated omission: a stall neither drops arrivals nor moves them later."""
    schedule = Schedule([Phase("p", 1, 10)], start=0.0)
    assert schedule.next_time == 0.0
    assert schedule.due(0.05) == [(0, 0.0)]
    assert schedule.due(0.05) == []
    assert schedule.next_time == pytest.approx(0.1)
    # The generator (or the machine) stalls for half a second: five arrivals fell due meanwhile.
    late = schedule.due(0.55)
    assert [t for _, t in late] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert schedule.next_time == pytest.approx(0.6)


def test_latency_is_measured_from_the_intended_start() -> None:
    # Due at 1.000 s, sent at 1.300 s (queued behind a stall), answered at 1.302 s: 302 ms, not 2 ms.
    intended, finished = 1_000_000_000, 1_302_000_000
    assert latency_us(intended, finished) == 302_000
    # A server serving one call per 200 ms against arrivals every 100 ms: the queue, and so the
    # latency from the intended start, grows by 100 ms per call.
    due = [j * 100_000_000 for j in range(5)]
    done, free = [], 0
    for t in due:
        free = max(free, t) + 200_000_000
        done.append(free)
    assert [latency_us(t, d) // 1000 for t, d in zip(due, done, strict=True)] == [200, 300, 400, 500, 600]
