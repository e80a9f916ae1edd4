"""Small statistics over measurements: percentiles, medians, paired ratios."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was really measured, never interpolated."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return float(ordered[int(rank) - 1])


def latency_summary(latencies_ms: Sequence[int]) -> dict[str, float | int]:
    if not latencies_ms:
        return {"samples": 0}
    return {
        "samples": len(latencies_ms),
        "p50_ms": percentile(latencies_ms, 0.50),
        "p99_ms": percentile(latencies_ms, 0.99),
        "max_ms": float(max(latencies_ms)),
    }


def paired_ratio(measured: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of measured / reference, each pair taken back to back.

    A noisy machine slows both sides of a pair alike, so the ratio of a pair is
    steadier than the ratio of two medians taken minutes apart.
    """
    return statistics.median(m / r for m, r in zip(measured, reference, strict=True))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
