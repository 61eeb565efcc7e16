"""Figures from the generators' calls and the sampler's readings; the markdown report and the plot.

Percentiles are nearest-rank (`bench.stats.percentile`) over successful
calls; errors are counted apart, by status code. Open-loop latencies are
from each call's intended start; closed-loop ones from its actual start.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stats import percentile
from loadtest.generator import ALLOCATE, METHODS
from loadtest.schedule import Phase, phase_starts

__all__ = ["CRITERIA", "figures", "markdown", "plot"]

# The production guide's success criteria (load testing), with the limit each is checked against.
P95_LIMIT_MS = 1_000.0
ERROR_RATE_LIMIT = 0.001
ALLOCATION_SUCCESS_LIMIT = 0.95
RSS_GROWTH_LIMIT = 0.05
FALLBACK_WARNING = 0.10  # the guide's troubleshooting line: "High Failover Rate (>10%)"
CRITERIA = (
    "p95 < 1 s (every method, every open-loop phase)",
    "error rate < 0.1%",
    "allocation success > 95%",
    "no memory growth (RSS over the second half of the sustained phase < +5%)",
)


def _latencies(ordered: Sequence[int]) -> dict[str, float]:
    return {
        "p50_ms": percentile(ordered, 0.50) / 1e3,
        "p95_ms": percentile(ordered, 0.95) / 1e3,
        "p99_ms": percentile(ordered, 0.99) / 1e3,
        "max_ms": (ordered[-1] / 1e3) if ordered else math.nan,
    }


def _series(calls: list[tuple[int, int, int, int, int, str]], seconds: float) -> dict[str, Any]:
    ok = sorted(latency for _, _, _, latency, _, code in calls if code == "OK")
    errors = Counter(code for *_, code in calls if code != "OK")
    return {
        "calls": len(calls),
        "rps": len(calls) / seconds if seconds > 0 else math.nan,
        "errors": dict(errors),
        "error_rate": sum(errors.values()) / len(calls) if calls else 0.0,
        **_latencies(ok),
    }


def _cpu_between(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Cores used by the server, the generators and the machine between two moments, from the samples."""
    inside = [s for s in samples if start <= s["t"] <= end]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    wall = last["t"] - first["t"]
    if wall <= 0:
        return {}
    out: dict[str, Any] = {"wall_s": wall}
    if first["server_cpu_s"] is not None and last["server_cpu_s"] is not None:
        out["server_cores"] = (last["server_cpu_s"] - first["server_cpu_s"]) / wall
    gens = [
        (b - a) / wall
        for a, b in zip(first["generator_cpu_s"], last["generator_cpu_s"], strict=True)
        if a is not None and b is not None
    ]
    if gens:
        out["generator_cores"] = sum(gens)
        out["generator_cores_max_process"] = max(gens)
    if first["machine_cpu_s"] and last["machine_cpu_s"]:
        busy = last["machine_cpu_s"][0] - first["machine_cpu_s"][0]
        total = last["machine_cpu_s"][1] - first["machine_cpu_s"][1]
        cpus = total / wall if wall else math.nan
        out["machine_cores_busy"] = busy / wall
        out["machine_cores"] = cpus
        out["other_cores"] = max(0.0, busy / wall - out.get("server_cores", 0.0) - out.get("generator_cores", 0.0))
    for resource in ("cpu", "io"):
        a, b = first.get("pressure_s", {}).get(resource), last.get("pressure_s", {}).get(resource)
        if a is not None and b is not None:
            out[f"{resource}_pressure"] = (b - a) / wall  # share of the time some task waited for it
    rss = [s["rss_bytes"] for s in inside if s["rss_bytes"] is not None]
    if rss:
        out["rss_start_mb"], out["rss_end_mb"], out["rss_max_mb"] = rss[0] / 2**20, rss[-1] / 2**20, max(rss) / 2**20
    return out


def figures(phases: Sequence[Phase], results: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Every figure of a run: per phase, per method, the criteria, the time series for the plot."""
    starts = phase_starts(phases)
    calls: list[tuple[int, int, int, int, int, str]] = []  # phase, method, intended ms, latency µs, lag µs, code
    for result in results:
        codes = result["codes"]
        calls.extend(
            zip(
                result["phase"],
                result["method"],
                result["intended_ms"],
                result["latency_us"],
                result["lag_us"],
                (codes[c] for c in result["code"]),
                strict=True,
            )
        )
    by_phase: list[list[tuple[int, int, int, int, int, str]]] = [[] for _ in phases]
    for call in calls:
        by_phase[call[0]].append(call)

    out_phases = []
    for index, (phase, start) in enumerate(zip(phases, starts, strict=True)):
        mine = by_phase[index]
        decisions: Counter[str] = Counter()
        for result in results:
            decisions.update(result["decisions"][index])
        allocations = [c for c in mine if c[1] == ALLOCATE]
        granted = sum(1 for c in allocations if c[5] == "OK")
        lags = sorted(c[4] for c in mine)
        out_phases.append(
            {
                "name": phase.name,
                "mode": "open" if phase.open_loop else "closed",
                "seconds": phase.seconds,
                "target_rps": phase.rate if phase.open_loop else None,
                "concurrency": phase.concurrency or None,
                **_series(mine, phase.seconds),
                "methods": {
                    METHODS[m]: _series([c for c in mine if c[1] == m], phase.seconds)
                    for m in range(len(METHODS))
                    if any(c[1] == m for c in mine)
                },
                "allocations": len(allocations),
                "allocation_success": granted / len(allocations) if allocations else math.nan,
                "decisions": dict(decisions),
                "fallback_share": decisions.get("FALLBACK", 0) / granted if granted else math.nan,
                "moved_on_renew": sum(r["moved"][index] for r in results),
                "send_lag_p50_ms": percentile(lags, 0.5) / 1e3,
                "send_lag_p99_ms": percentile(lags, 0.99) / 1e3,
                "cpu": _cpu_between(samples, start, start + phase.seconds),
            }
        )

    total_calls = len(calls)
    total_errors = sum(1 for c in calls if c[5] != "OK")
    allocations = [c for c in calls if c[1] == ALLOCATE]
    granted = sum(1 for c in allocations if c[5] == "OK")
    fallback = sum(p["decisions"].get("FALLBACK", 0) for p in out_phases)
    open_p95 = [
        (p["name"], method, m["p95_ms"])
        for p in out_phases
        if p["mode"] == "open"
        for method, m in p["methods"].items()
        if not math.isnan(m["p95_ms"])
    ]
    worst = max(open_p95, key=lambda x: x[2], default=("-", "-", math.nan))
    memory = _rss_growth(phases, starts, samples)
    criteria = [
        {
            "criterion": CRITERIA[0],
            "measured": f"worst {worst[2]:,.1f} ms ({worst[1]}, {worst[0]})",
            "met": worst[2] < P95_LIMIT_MS,
        },
        {
            "criterion": CRITERIA[1],
            "measured": f"{total_errors / total_calls:.4%} ({total_errors:,} of {total_calls:,} calls)"
            if total_calls
            else "no calls",
            "met": bool(total_calls) and total_errors / total_calls < ERROR_RATE_LIMIT,
        },
        {
            "criterion": CRITERIA[2],
            "measured": f"{granted / len(allocations):.3%} ({granted:,} of {len(allocations):,}; "
            f"{fallback / granted if granted else 0:.1%} of them on the fallback)"
            if allocations
            else "no allocations",
            "met": bool(allocations) and granted / len(allocations) > ALLOCATION_SUCCESS_LIMIT,
        },
        {
            "criterion": CRITERIA[3],
            "measured": (
                f"{memory['growth']:+.1%} ({memory['from_mb']:.1f} -> {memory['to_mb']:.1f} MB; "
                f"whole run {memory['run_min_mb']:.1f}-{memory['run_max_mb']:.1f} MB)"
            )
            if memory
            else "not measured",
            "met": bool(memory) and memory["growth"] < RSS_GROWTH_LIMIT,
        },
    ]
    watchers = [w for r in results for w in r["watchers"]]
    lag = sorted(x for w in watchers for x in w["lag_ms"])
    return {
        "phases": out_phases,
        "total_calls": total_calls,
        "total_errors": total_errors,
        "error_rate": total_errors / total_calls if total_calls else math.nan,
        "allocation_success": granted / len(allocations) if allocations else math.nan,
        "criteria": criteria,
        "all_met": all(c["met"] for c in criteria),
        "memory": memory,
        "distinct_clients": sum(r["distinct_clients"] for r in results),
        "abandoned_leases": sum(r["abandoned_leases"] for r in results),
        "release_not_live": sum(r["release_not_live"] for r in results),
        "generator_overload": sum(r["overload"] for r in results),
        "error_details": _error_details(results),
        "watchers": {
            "streams": len(watchers),
            "events": [w["events"] for w in watchers],
            "follow": [w["follow"] for w in watchers],
            "out_of_order": sum(w["out_of_order"] for w in watchers),
            "errors": [w["error"] for w in watchers if w["error"]],
            "delivery_lag_p50_ms": percentile(lag, 0.5),
            "delivery_lag_p99_ms": percentile(lag, 0.99),
        },
        "timeline": _timeline(calls, samples),
    }


def _error_details(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for result in results:
        for code, details in result.get("error_details", {}).items():
            seen = merged.setdefault(code, [])
            seen.extend(d for d in details if d not in seen and len(seen) < 3)
    return merged


def _rss_growth(phases: Sequence[Phase], starts: list[float], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS over the second half of the sustained phase: constant rate, the live leases at their cap."""
    rss = [(s["t"], s["rss_bytes"]) for s in samples if s["rss_bytes"] is not None]
    names = [p.name for p in phases]
    if "sustained" not in names or not rss:
        return {}
    index = names.index("sustained")
    middle, end = starts[index] + phases[index].seconds / 2, starts[index] + phases[index].seconds
    window = [b for t, b in rss if middle <= t <= end]
    if len(window) < 2:
        return {}
    # Medians of the first and last few readings, so that one GC pause is not a trend.
    k = max(1, len(window) // 8)
    before, after = sorted(window[:k])[k // 2], sorted(window[-k:])[k // 2]
    run = [b for t, b in rss if t >= 0]
    out: dict[str, Any] = {
        "from_mb": before / 2**20,
        "to_mb": after / 2**20,
        "growth": after / before - 1,
        "run_min_mb": min(run) / 2**20,
        "run_max_mb": max(run) / 2**20,
    }
    # What the server holds by design over the same window: the growth a leak would not explain.
    pages = [(s["t"], s["memory"]) for s in samples if s.get("memory") and middle <= s["t"] <= end]
    if len(pages) >= 2:
        first, last = pages[0][1], pages[-1][1]
        held = {key: (first["pool"][key], last["pool"][key]) for key in _HELD}
        # Request ids index the usage records: the same reports, not more of them.
        added = sum(b - a for key, (a, b) in held.items() if key != "usageRequestIds")
        rss_added = last["rssBytes"] - first["rssBytes"]
        out.update(
            held=held,
            asyncio_tasks=(first["asyncioTasks"], last["asyncioTasks"]),
            bytes_per_record_added=rss_added / added if added > 0 else None,
        )
    return out


_HELD = ("liveLeases", "endedLeases", "usageRecords", "usageRequestIds")


def _timeline(calls: list[tuple[int, int, int, int, int, str]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per second of intended start: calls, errors, latency percentiles; and the samples, for the plot."""
    buckets: dict[int, list[int]] = {}
    errors: Counter[int] = Counter()
    for _, _, intended_ms, latency, _, code in calls:
        second = intended_ms // 1000
        if code == "OK":
            buckets.setdefault(second, []).append(latency)
        else:
            errors[second] += 1
    seconds = sorted(set(buckets) | set(errors))
    rows = []
    for second in seconds:
        ordered = sorted(buckets.get(second, []))
        rows.append(
            {
                "t": second,
                "calls": len(ordered) + errors[second],
                "errors": errors[second],
                "p50_ms": percentile(ordered, 0.5) / 1e3,
                "p95_ms": percentile(ordered, 0.95) / 1e3,
                "p99_ms": percentile(ordered, 0.99) / 1e3,
            }
        )
    return {"per_second": rows, "samples": samples}


# -- markdown ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    f = result["figures"]
    s = result["settings"]
    lines = [
        f"# Load test: {s['store_label']}",
        "",
        f"{result['generated_at']}, commit {str(result['git'].get('commit'))[:10]}"
        f"{' (dirty)' if result['git'].get('dirty') else ''}; {result['machine']['nproc']} CPUs "
        f"({result['machine']['cpu_model']}), Python {result['machine']['python']}, grpcio "
        f"{result['machine']['grpcio']}; load average {result['machine']['loadavg_before'][0]:.2f} before.",
        "",
        f"Pool: {s['subscriptions']} subscriptions x {s['max_clients']} clients, weekly budget "
        f"{s['budget']:g} each, seeded at {s['seed_low']:.0%}-{s['seed_high']:.0%} of it; the load spends about "
        f"{s['spend']:.0%} of the pool's budget more. {s['processes']} generator processes, {s['services']} "
        f"client principals, up to {s['live']:,} live leases, {s['population']:,} client ids; "
        f"{s['watchers']} WatchEvents streams.",
        "",
        "## Against the guide's success criteria",
        "",
        "| criterion | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {c['criterion']} | {c['measured']} | {'PASS' if c['met'] else 'FAIL'} |" for c in f["criteria"]]
    lines += [
        "",
        "## Phases",
        "",
        "Open loop: latency from each call's intended start (queueing included). Closed loop: "
        f"{s['concurrency']} callers back to back, latency from each call's start.",
        "",
        "| phase | mode | s | target rps | achieved rps | calls | errors | p50 ms | p95 ms | p99 ms | max ms "
        "| alloc success | fallback | send lag p99 ms | server cores | generator cores | other load cores "
        "| RSS end MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in f["phases"]:
        cpu = p["cpu"]
        lines.append(
            f"| {p['name']} | {p['mode']} | {p['seconds']:.0f} | {_fmt(p['target_rps'], 0)} | {_fmt(p['rps'], 0)} "
            f"| {p['calls']:,} | {sum(p['errors'].values()):,} | {_fmt(p['p50_ms'])} | {_fmt(p['p95_ms'])} "
            f"| {_fmt(p['p99_ms'])} | {_fmt(p['max_ms'])} | {_fmt(p['allocation_success'] * 100, 2)}% "
            f"| {_fmt(p['fallback_share'] * 100)}% | {_fmt(p['send_lag_p99_ms'], 2)} "
            f"| {_fmt(cpu.get('server_cores'), 2)} | {_fmt(cpu.get('generator_cores'), 2)} "
            f"| {_fmt(cpu.get('other_cores'), 2)} | {_fmt(cpu.get('rss_end_mb'))} |"
        )
    lines += [
        "",
        "## Per method",
        "",
        "| phase | method | calls | errors | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in f["phases"]:
        for name, m in p["methods"].items():
            errors = ", ".join(f"{code} {n}" for code, n in m["errors"].items()) or "0"
            lines.append(
                f"| {p['name']} | {name} | {m['calls']:,} | {errors} | {_fmt(m['p50_ms'])} | {_fmt(m['p95_ms'])} "
                f"| {_fmt(m['p99_ms'])} | {_fmt(m['max_ms'])} |"
            )
    w = f["watchers"]
    pool = result.get("pool_at_end") or {}
    lines += [
        "",
        "## Also",
        "",
        f"- Distinct clients: {f['distinct_clients']:,}; decisions: "
        + "; ".join(f"{p['name']} {p['decisions']}" for p in f["phases"])
        + f"; leases moved (learnt on Renew): {sum(p['moved_on_renew'] for p in f['phases'])}.",
        f"- Pool at the end: {pool.get('statuses', {})}, {pool.get('live_clients', '-')} live leases "
        f"({pool.get('fallback_clients', '-')} on the fallback), "
        f"{_fmt((pool.get('usage_fraction') or math.nan) * 100)}% of the pool's weekly budget spent.",
        f"- Watchers: {w['streams']} streams received {w['events']} events ({', '.join(w['follow'])}); "
        f"out of order {w['out_of_order']}, errors {w['errors'] or 'none'}; delivery lag (event time to receipt) "
        f"p50 {_fmt(w['delivery_lag_p50_ms'])} ms, p99 {_fmt(w['delivery_lag_p99_ms'])} ms.",
        "- The generator: send lag (intended start to call sent) p99 per phase "
        + ", ".join(f"{p['name']} {_fmt(p['send_lag_p99_ms'], 2)} ms" for p in f["phases"])
        + "; most busy process "
        + ", ".join(f"{_fmt(p['cpu'].get('generator_cores_max_process'), 2)}" for p in f["phases"])
        + " cores per phase; the machine's pressure (PSI, share of the time some task waited) for CPU "
        + ", ".join(f"{_fmt(p['cpu'].get('cpu_pressure', math.nan) * 100, 0)}%" for p in f["phases"])
        + " and for I/O "
        + ", ".join(f"{_fmt(p['cpu'].get('io_pressure', math.nan) * 100, 0)}%" for p in f["phases"])
        + f"; abandoned leases {f['abandoned_leases']}, arrivals over the in-flight limit "
        f"{f['generator_overload']}.",
        _memory_line(f["memory"]),
        "- Errors: "
        + ("; ".join(f"{code}: {' | '.join(details)}" for code, details in f["error_details"].items()) or "none")
        + f". Server exit code {result.get('server_exit_code')}; warnings and errors in its log (notifications "
        + "aside): "
        + ("below" if result.get("server_log_problems") else "none")
        + ".",
        "",
        f"Run time {s['wall_seconds']:.0f} s. Plot: `{Path(s['plot']).name}`.",
    ]
    if problems := result.get("server_log_problems"):
        lines += ["", "## The server's warnings and errors (first lines)", "", "```", *problems[:12], "```"]
    return "\n".join(lines) + "\n"


def _memory_line(memory: dict[str, Any]) -> str:
    line = f"- Memory: server RSS {_fmt(memory.get('run_min_mb'))}-{_fmt(memory.get('run_max_mb'))} MB over the run."
    if "held" in memory:
        held = ", ".join(f"{key} {a:,} -> {b:,}" for key, (a, b) in memory["held"].items())
        tasks = memory["asyncio_tasks"]
        per = memory["bytes_per_record_added"]
        line += (
            f" Over the second half of the sustained phase the server's own account (/debug/memory) went {held}; "
            f"asyncio tasks {tasks[0]} -> {tasks[1]}; RSS grew {_fmt(per, 0)} bytes per lease or usage record "
            "added. Usage records of the current weekly window and recently ended leases are kept by design "
            "(pruned by retention): growth with them is state, not a leak; the soak test is the long check."
        )
    return line


# -- the plot ------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    """Four panels over time: request rate, latency, server RSS and live leases, CPU; phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = result["figures"]
    rows = f["timeline"]["per_second"]
    samples = f["timeline"]["samples"]
    phases = f["phases"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True)
    t = [r["t"] + 0.5 for r in rows]

    ax = axes[0]
    ax.plot(t, [r["calls"] for r in rows], label="calls started / s", color="tab:blue")
    ax.plot(t, [r["errors"] for r in rows], label="errors / s", color="tab:red")
    at = 0.0
    for p in phases:
        if p["target_rps"]:
            ax.hlines(p["target_rps"], at, at + p["seconds"], colors="grey", linestyles="dashed")
        at += p["seconds"]
    ax.set_ylabel("requests / s")
    ax.legend(loc="upper left")
    ax.set_title(f"Load test: {result['settings']['store_label']} (dashed: target arrival rate)", pad=16)

    ax = axes[1]
    for key, color in (("p50_ms", "tab:green"), ("p95_ms", "tab:orange"), ("p99_ms", "tab:red")):
        ax.plot(t, [r[key] for r in rows], label=key.removesuffix("_ms"), color=color)
    ax.axhline(P95_LIMIT_MS, color="black", linestyle=":", label="p95 limit (1 s)")
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (log)")
    ax.legend(loc="upper left")

    ax = axes[2]
    st = [s["t"] for s in samples]
    ax.plot(st, [(s["rss_bytes"] or 0) / 2**20 for s in samples], color="tab:purple", label="server RSS MB")
    ax.set_ylabel("RSS MB")
    ax.legend(loc="upper left")
    twin = ax.twinx()
    pooled = [(s["t"], s["pool"]) for s in samples if "pool" in s]
    twin.plot([x for x, _ in pooled], [p["live_clients"] for _, p in pooled], color="tab:gray", label="live leases")
    twin.plot(
        [x for x, _ in pooled],
        [p["statuses"].get("LIMITED", 0) + p["statuses"].get("EXHAUSTED", 0) for _, p in pooled],
        color="tab:brown",
        label="subscriptions limited or exhausted",
    )
    twin.set_ylabel("count")
    twin.legend(loc="lower right")

    ax = axes[3]
    for key, label, color in (
        ("server_cpu_s", "server", "tab:blue"),
        ("generator_cpu_s", "generators", "tab:orange"),
        ("machine_cpu_s", "whole machine", "tab:gray"),
    ):
        xs, ys = [], []
        for a, b in itertools.pairwise(samples):
            wall = b["t"] - a["t"]
            va, vb = a[key], b[key]
            if key == "generator_cpu_s":
                if None in va or None in vb:  # a generator has exited: its counter is gone
                    continue
                va, vb = sum(va), sum(vb)
            elif key == "machine_cpu_s":
                va, vb = (va or (0, 0))[0], (vb or (0, 0))[0]
            if va is None or vb is None or wall <= 0:
                continue
            xs.append(b["t"])
            ys.append((vb - va) / wall)
        ax.plot(xs, ys, label=label, color=color)
    ax.set_ylabel("CPU cores")
    ax.set_xlabel("seconds from the start of the plan")
    ax.legend(loc="upper left")
    twin = ax.twinx()
    for resource, color in (("io", "tab:red"), ("cpu", "tab:green")):
        xs, ys = [], []
        for a, b in itertools.pairwise(samples):
            va, vb = a.get("pressure_s", {}).get(resource), b.get("pressure_s", {}).get(resource)
            if va is not None and vb is not None and b["t"] > a["t"]:
                xs.append(b["t"])
                ys.append(100 * (vb - va) / (b["t"] - a["t"]))
        twin.plot(xs, ys, color=color, linestyle=":", label=f"{resource} pressure (PSI some) %")
    twin.set_ylabel("% of time waiting")
    twin.set_ylim(0, 100)
    twin.legend(loc="upper right")

    for ax in axes:
        at = 0.0
        for i, p in enumerate(phases):
            if i % 2 == 0:
                ax.axvspan(at, at + p["seconds"], color="grey", alpha=0.08)
            at += p["seconds"]
    at = 0.0
    for p in phases:  # phase names just above the top panel, in axis coordinates vertically
        axes[0].text(at + 0.5, 1.01, p["name"], fontsize=8, transform=axes[0].get_xaxis_transform())
        at += p["seconds"]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
