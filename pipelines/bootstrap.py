"""The percentile bootstrap every report and gate of the project uses: one resampling stream, one interval.

A resample draws ``n_units`` units with replacement; :func:`resample_counts` says how often each unit was
drawn (a unit drawn twice counts twice). A unit is a row (AutoFAS's AUC intervals) or a cluster of rows, e.g.
a query with all its pairs (TaoSR1's paired differences: all rows of a drawn query come along). Paired
comparisons score both models on the same resamples. The interval is the percentile one: the ``(1 - level) / 2``
and ``(1 + level) / 2`` quantiles of the resampled statistic, ignoring resamples where it is undefined (NaN).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def resample_counts(n_units: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """For each of ``n_boot`` resamples, how many times each of ``n_units`` units was drawn (int64, length
    ``n_units``, summing to ``n_units``), one resample at a time. Deterministic given ``seed``."""
    if n_units < 1 or n_boot < 1:
        raise ValueError(f"the bootstrap needs at least one unit and one resample, got {n_units} and {n_boot}")
    rng = np.random.default_rng([seed, 13])
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap ``samples`` (NaNs ignored; NaN when every sample is NaN)."""
    samples = np.asarray(samples, dtype=np.float64)
    if np.isnan(samples).all():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(samples, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)
