"""What a set of replays shows: the markdown table, the checks, the JSON figures and the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authpool_server.domain import MICROS_PER_UNIT
from authpool_server.simulator.engine import BASELINES, OURS, RunResult

__all__ = ["Check", "checks", "figures", "markdown", "plot"]

# The acceptance bars, from the issue.
BOUND_FACTOR = 1.05  # fallback spend <= 1.05 x the lower bound ...
BOUND_SLACK = 0.01  # ... + 1% of the total demand
NEAR_KIND = "near"  # the trace on which ours must beat round-robin outright


@dataclass(frozen=True, slots=True)
class Check:
    """One acceptance property on one trace; `passed` is None where it does not apply."""

    trace: str
    name: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None, so the JSON is standard (no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _units(micros: int | float) -> str:
    return f"{micros / MICROS_PER_UNIT:,.2f}"


def checks(results: Sequence[RunResult], kinds: dict[str, str] | None = None) -> list[Check]:
    """The issue's "must show" properties for our policy, trace by trace.

    `kinds` maps a trace name to its generator kind ("below", "near", "above");
    the outright win over round-robin is required on the "near" trace.
    """
    kinds = kinds or {}
    out: list[Check] = []
    by_trace: dict[str, dict[str, RunResult]] = {}
    for result in results:
        by_trace.setdefault(result.trace, {})[result.policy] = result
    for trace, runs in by_trace.items():
        ours = runs.get(OURS)
        if ours is None:
            continue
        bound = BOUND_FACTOR * ours.lower_bound_micros + BOUND_SLACK * ours.demand_micros
        out.append(
            Check(
                trace,
                "fallback <= 1.05 x lower bound + 1% of demand",
                ours.fallback_micros <= bound,
                f"{_units(ours.fallback_micros)} vs {_units(bound)}",
            )
        )
        out.append(Check(trace, "zero budget overrun", ours.overrun_micros == 0, _units(ours.overrun_micros)))
        gap = f"{_units(ours.cost_gap_micros)} vs costGapThreshold {_units(ours.cost_gap_threshold_micros)}"
        if ours.limited_at_end:
            out.append(
                Check(
                    trace,
                    "end-of-window cost gap <= costGapThreshold",
                    None,
                    f"{gap}; capacity does not allow: {ours.limited_at_end} of {ours.subscriptions} "
                    "subscriptions ended past their threshold, where their sticky clients' spend is beyond steering",
                )
            )
        else:
            out.append(
                Check(
                    trace,
                    "end-of-window cost gap <= costGapThreshold",
                    ours.cost_gap_micros <= ours.cost_gap_threshold_micros,
                    gap,
                )
            )
        baselines = [runs[name] for name in BASELINES if name in runs]
        if baselines:
            worse = [b.policy for b in baselines if ours.fallback_micros > b.fallback_micros]
            best = min(baselines, key=lambda b: b.fallback_micros)
            out.append(
                Check(
                    trace,
                    "fallback no worse than every baseline",
                    not worse,
                    f"ours {_units(ours.fallback_micros)}, best baseline {best.policy} {_units(best.fallback_micros)}"
                    + (f"; worse than {', '.join(worse)}" if worse else ""),
                )
            )
        if kinds.get(trace) == NEAR_KIND and "round-robin" in runs:
            rr = runs["round-robin"]
            out.append(
                Check(
                    trace,
                    "fallback strictly below round-robin (near capacity)",
                    ours.fallback_micros < rr.fallback_micros,
                    f"ours {_units(ours.fallback_micros)}, round-robin {_units(rr.fallback_micros)}",
                )
            )
    return out


def figures(results: Sequence[RunResult], found: Sequence[Check]) -> dict[str, Any]:
    """Everything as JSON values."""
    decisions = sum(r.decisions for r in results)
    seconds = sum(r.seconds for r in results)
    cpu = sum(r.cpu_seconds for r in results)
    return {
        "runs": [r.figures() for r in results],
        "checks": [{"trace": c.trace, "check": c.name, "passed": c.passed, "detail": c.detail} for c in found],
        "decisions": decisions,
        "seconds": seconds,
        "decisions_per_second": decisions / seconds if seconds else None,
        "decisions_per_cpu_second": decisions / cpu if cpu else None,
    }


_COLUMNS = (
    "trace",
    "policy",
    "demand",
    "fallback",
    "lower bound",
    "fallback / bound",
    "overrun",
    "overshoot",
    "end gap",
    "past threshold",
    "moved",
    "failovers",
    "back from fallback",
    "success",
    "rate-limited",
    "decisions/s",
)


def markdown(results: Sequence[RunResult], found: Sequence[Check]) -> str:
    """The table (one row per trace x policy) and the checks, as markdown. Money in units (USD)."""
    rows = ["| " + " | ".join(_COLUMNS) + " |", "|---|---|" + "---:|" * (len(_COLUMNS) - 2)]
    for r in results:
        ratio = r.fallback_ratio
        cells = (
            r.trace,
            f"**{r.policy}**" if r.policy == OURS else r.policy,
            _units(r.demand_micros),
            f"{_units(r.fallback_micros)} ({r.fallback_micros / r.demand_micros:.1%})" if r.demand_micros else "0",
            _units(r.lower_bound_micros),
            "-" if ratio is None else f"{ratio:.3f}",
            _units(r.overrun_micros),
            _units(r.overshoot_micros),
            _units(r.cost_gap_micros),
            f"{r.limited_at_end}/{r.subscriptions}",
            str(r.clients_moved),
            str(r.failovers),
            str(r.returns),
            f"{r.success_rate:.2%}",
            str(r.rate_limited),
            _rate(r.decisions_per_second),
        )
        rows.append("| " + " | ".join(cells) + " |")
    lines = [*rows, ""]
    if found:
        lines.append("| trace | check | verdict | detail |")
        lines.append("|---|---|---|---|")
        lines.extend(f"| {c.trace} | {c.name} | {c.verdict} | {c.detail} |" for c in found)
        lines.append("")
    total = figures(results, ())
    lines.append(
        f"{total['decisions']:,} balancer decisions in {total['seconds']:.2f} s of replay: "
        f"{_rate(total['decisions_per_second'])} decisions/s "
        f"({_rate(total['decisions_per_cpu_second'])} per CPU second)"
    )
    return "\n".join(lines) + "\n"


def _rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def plot(results: Sequence[RunResult], path: Path, *, title: str = "", marks: Sequence[tuple[float, str]] = ()) -> Path:
    """A PNG for one trace: our policy's window spend per subscription over the week, stacked
    (the guide's "weekly usage per subscription" panel), and every policy's fallback spend.
    `marks` are vertical lines at trace times, such as when an incident starts.

    Needs matplotlib (``pip install matplotlib``); raises ImportError without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = next(r for r in results if r.policy == OURS)
    series = ours.series
    days = [t / 86_400 for t in series.t]
    per_sub = [[u[i] / MICROS_PER_UNIT for u in series.usage] for i in range(len(series.subscription_ids))]
    fallback = [f / MICROS_PER_UNIT for f in series.fallback]

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}, layout="constrained"
    )
    top.stackplot(days, *per_sub, labels=series.subscription_ids, alpha=0.85)
    stacked = [sum(values) for values in zip(*per_sub, strict=True)]
    top.fill_between(
        days,
        stacked,
        [s + f for s, f in zip(stacked, fallback, strict=True)],
        facecolor="none",
        edgecolor="dimgray",
        hatch="///",
        linewidth=0.0,
        label="fallback (pay-as-you-go)",
    )
    capacity = ours.capacity_micros / MICROS_PER_UNIT
    budget = ours.budget_micros / MICROS_PER_UNIT
    top.axhline(capacity, color="black", linestyle="--", linewidth=1, label="Σ threshold x budget")
    top.axhline(budget, color="black", linestyle=":", linewidth=1, label="Σ weekly budget")
    for t, label in marks:  # incidents and the like, at trace seconds
        for axes in (top, bottom):
            axes.axvline(t / 86_400, color="firebrick", linestyle="-.", linewidth=1)
        top.annotate(
            label,
            (t / 86_400, 0.6),
            xycoords=("data", "axes fraction"),
            fontsize="small",
            color="firebrick",
            ha="left",
            va="top",
            xytext=(4, 0),
            textcoords="offset points",
        )
    top.set_ylabel("spend this window")
    top.set_title(title or f"{ours.trace}: weekly usage per subscription, our policy")
    top.legend(loc="upper left", fontsize="small", ncols=2)
    top.grid(alpha=0.3)

    for result in results:
        values = [f / MICROS_PER_UNIT for f in result.series.fallback]
        style = {"linewidth": 2.2, "color": "black"} if result.policy == OURS else {"linewidth": 1.2}
        bottom.plot([t / 86_400 for t in result.series.t], values, label=result.policy, **style)  # type: ignore[arg-type]
    if ours.lower_bound_micros:
        bottom.axhline(
            ours.lower_bound_micros / MICROS_PER_UNIT, color="gray", linestyle="--", linewidth=1, label="lower bound"
        )
    bottom.set_ylim(0, max(1.0, *(f / MICROS_PER_UNIT for r in results for f in r.series.fallback)) * 1.08)
    bottom.set_ylabel("fallback spend")
    bottom.set_xlabel("days since the trace's start")
    bottom.legend(loc="upper left", fontsize="small", ncols=3)
    bottom.grid(alpha=0.3)

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path
