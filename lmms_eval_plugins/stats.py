"""Paired uncertainty of a difference between two runs on the same documents.

Pure functions over per-document records: ``statistic`` is any function of a list of records
(a task's own lmms-eval aggregation), so the interval is for exactly the number a table shows.
The resampling and the exact test are scipy's (``scipy.stats.bootstrap``, ``scipy.stats.binomtest``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0


def _objects(records: Sequence) -> np.ndarray:
    # a 1-D object array, so scipy resamples records (dicts, lists) without converting them
    out = np.empty(len(records), dtype=object)
    out[:] = list(records)
    return out


def paired_interval(
    statistic: Callable[[list], float],
    base: Sequence,
    other: Sequence,
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(other) - statistic(base)``; ``base[i]`` and ``other[i]`` are
    the same document, and documents are resampled together (the pairing removes the
    between-document variance both runs share)."""
    if len(base) != len(other):
        raise ValueError(f"paired records differ in number: {len(base)} vs {len(other)}")
    res = stats.bootstrap(
        (_objects(base), _objects(other)),
        lambda b, o: statistic(list(o)) - statistic(list(b)),
        paired=True,
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=confidence,
        # percentile, not BCa: BCa's jackknife acceleration is undefined (nan) when most paired
        # per-document differences are 0, the usual case for two runs on yes/no answers
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mcnemar_p(base_correct: Sequence[bool], other_correct: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value: only the discordant documents count (b: base right and
    other wrong, c: the reverse); under "no difference" b ~ Binomial(b + c, 1/2)."""
    if len(base_correct) != len(other_correct):
        raise ValueError("paired outcomes differ in number")
    b = sum(bool(x) and not bool(y) for x, y in zip(base_correct, other_correct))
    c = sum(bool(y) and not bool(x) for x, y in zip(base_correct, other_correct))
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def excludes_zero(low: float, high: float) -> int:
    """+1 when the interval lies above 0, -1 below, 0 when it contains 0."""
    return 1 if low > 0 else -1 if high < 0 else 0


def verdict(direction: int, low: float, high: float) -> str:
    """A technique's delta against the paper's claim. ``direction``: the paper's direction for the
    metric, +1 when higher is better, -1 when lower is better; (low, high): the delta's interval."""
    if direction not in (1, -1):
        raise ValueError("direction is +1 or -1")
    side = excludes_zero(low, high)
    if side == 0:
        return f"no effect detected (+-{(high - low) / 2:.3g})"
    return "reproduced" if side == direction else "opposite"
