"""Small statistics over measurements: percentiles, medians, paired ratios."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence


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


def histogram_summary(counts: Mapping[int, int]) -> dict[str, float | int]:
    """`latency_summary` of values kept as {value: how many times}: a long run's
    millions of latencies in a few thousand entries, with the same nearest ranks."""
    samples = sum(counts.values())
    if not samples:
        return {"samples": 0}
    ordered = sorted(counts.items())

    def rank_value(fraction: float) -> float:
        rank, seen = max(1, -(-samples * fraction // 1)), 0
        for value, count in ordered:
            seen += count
            if seen >= rank:
                return float(value)
        return float(ordered[-1][0])

    return {"samples": samples, "p50_ms": rank_value(0.50), "p99_ms": rank_value(0.99), "max_ms": float(ordered[-1][0])}


def paired_ratio(measured: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of measured / reference, each pair taken back to back.

    A noisy machine slows both sides of a pair alike, so the ratio of a pair is
    steadier than the ratio of two medians taken minutes apart.
    """
    return statistics.median(m / r for m, r in zip(measured, reference, strict=True))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
