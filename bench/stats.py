"""Latency summaries: nearest-rank percentiles over microsecond samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "summarize"]


def percentile(ordered: Sequence[int], q: float) -> float:
    """The nearest-rank `q` quantile (0 < q <= 1) of sorted samples; NaN when empty."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return float(ordered[rank - 1])


def summarize(samples_us: Sequence[int], seconds: float) -> dict[str, float]:
    """Count, rate and latency percentiles in milliseconds of one series."""
    ordered = sorted(samples_us)
    return {
        "count": len(ordered),
        "rps": len(ordered) / seconds if seconds > 0 else math.nan,
        "mean_ms": (sum(ordered) / len(ordered) / 1e3) if ordered else math.nan,
        "p50_ms": percentile(ordered, 0.50) / 1e3,
        "p90_ms": percentile(ordered, 0.90) / 1e3,
        "p99_ms": percentile(ordered, 0.99) / 1e3,
        "max_ms": (ordered[-1] / 1e3) if ordered else math.nan,
    }
