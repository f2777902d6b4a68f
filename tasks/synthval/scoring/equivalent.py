"""The real-image equivalent: how many real images a real-only model needs to reach a given mAP, with a
bootstrap interval. The headline number of the leaderboard.

The real-only learning curve (mAP at each real budget, with standard errors) is interpolated linearly
in log(1 + images), where learning curves are close to straight. The interval comes from a parametric
bootstrap: each replicate draws every curve point and the result from normals around their means,
makes the curve non-decreasing (more real images never hurt on average), and reads the equivalent again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from synthval.errors import ConfigError

BOOTSTRAP_REPLICATES = 2000
CONFIDENCE = 0.95


def standard_error(values: Sequence[float], num_gt: int | None) -> float:
    """Standard error of a curve point's mean mAP: spread of repeats, floored by the binomial error."""
    mean = float(np.mean(values))
    binomial = math.sqrt(max(mean * (1.0 - mean), 0.0) / num_gt) if num_gt else 0.0
    spread = float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return max(binomial, spread)


def _equivalents(ramp: np.ndarray, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Images at which one curve reaches each target: `ramp` is its mAP at log1p budgets `x`, strictly
    increasing. At or below the first point: the first budget; above the last: infinity; between two
    points: linear in log(1 + images)."""
    out = np.expm1(np.interp(targets, ramp, x))
    out[targets > ramp[-1]] = math.inf
    return out


def _ramp(curves: np.ndarray) -> np.ndarray:
    # Strictly increasing, as interpolation needs; 1e-12 is far below any mAP difference that matters.
    return curves + np.arange(curves.shape[-1]) * 1e-12


def real_image_equivalents(curve: Sequence[Mapping[str, Any]], target_maps: Sequence[float],
                           target_sigmas: Sequence[float], replicates: int = BOOTSTRAP_REPLICATES,
                           seed: int = 0) -> list[dict[str, Any]]:
    """`real_image_equivalent` of several results on one curve at once, with the same bootstrap draws
    (each result's interval is the one it gets alone)."""
    if len(curve) < 2:
        raise ConfigError("real-image equivalent: the real-only curve needs at least one measured budget")
    budgets = np.array([p["budget"] for p in curve], dtype=float)
    x = np.log1p(budgets)
    means = np.maximum.accumulate(np.array([p["mAP"] for p in curve], dtype=float))
    sigmas = np.array([p["sigma"] for p in curve], dtype=float)
    maps, spreads = np.asarray(target_maps, dtype=float), np.asarray(target_sigmas, dtype=float)
    values = _equivalents(_ramp(means), x, maps)
    rng = np.random.default_rng(seed)
    draws = _ramp(np.maximum.accumulate(means + sigmas * rng.standard_normal((replicates, len(curve))), axis=1))
    noise = rng.standard_normal(replicates)
    alpha = (1.0 - CONFIDENCE) / 2
    # np.quantile(..., method="lower") picks these order statistics; partitioning finds just those two.
    ranks = [math.floor(alpha * (replicates - 1)), math.floor((1.0 - alpha) * (replicates - 1))]
    bounds = np.empty((2, len(maps)))
    for start in range(0, len(maps), 2048):  # replicates x 2048 results at a time: 32 MB
        chunk = slice(start, start + 2048)
        targets = maps[None, chunk] + noise[:, None] * spreads[None, chunk]
        replicated = np.empty((targets.shape[1], replicates))  # one row per result: partitioned in place
        for r in range(replicates):
            replicated[:, r] = _equivalents(draws[r], x, targets[r])
        replicated.partition(ranks, axis=1)
        bounds[:, chunk] = replicated[:, ranks].T
    return [{"value": float(v), "low": float(lo), "high": float(hi), "max_budget": int(budgets[-1])}
            for v, lo, hi in zip(values, bounds[0], bounds[1], strict=True)]


def real_image_equivalent(curve: Sequence[Mapping[str, Any]], target_map: float, target_sigma: float = 0.0,
                          replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict[str, Any]:
    """{"value", "low", "high", "max_budget"}: real images matching `target_map`, with a bootstrap interval.

    `value` and `high` are infinite when the result beats the largest real budget measured.
    """
    return real_image_equivalents(curve, [target_map], [target_sigma], replicates, seed)[0]

