"""Paired differences over seeds with a 95% Student-t interval (no scipy: the quantiles are tabulated)."""
from __future__ import annotations

import math

# two-sided 95% quantiles of Student's t, degrees of freedom 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired(a: list[float], b: list[float]) -> dict:
    """b - a per pair (same seed): mean, 95% half-width (nan with one pair), n and the differences."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"mean": mean, "half_width": float("nan"), "n": n, "diffs": d}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return {"mean": mean, "half_width": t975(n - 1) * sd / math.sqrt(n), "n": n, "diffs": d}
