"""Convergence statistics of metric-vs-step curves (pure numpy): speed-ups, AUC, gaps, bootstrap CIs.

Iterations to a threshold, normalised area under the curve, final gaps, and bootstrap confidence
intervals over seeds.

The paper's "2x" is an iterations-to-threshold ratio (CAMEO reaches at 80k the PSNR the baseline
reaches at 160k). A single threshold can mislead (alignment losses often help early and plateau
later), so speed-ups are computed for several thresholds placed between the baseline's first and
final value. Curves are only known at evaluation steps; the crossing step is interpolated linearly
between the two evaluations that bracket the threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# `key` fragments of metrics where smaller is better; everything else (PSNR, SSIM, PCK, mass) is larger-is-better.
LOWER_IS_BETTER = ("lpips", "epe", "loss", "consistency")
DEFAULT_FRACTIONS = (0.5, 0.75, 0.9, 1.0)


def higher_is_better(key: str) -> bool:
    return not any(fragment in key for fragment in LOWER_IS_BETTER)


def crossing_steps(steps: np.ndarray, values: np.ndarray, thresholds: np.ndarray, higher: bool = True) -> np.ndarray:
    """First step at which each curve reaches its threshold, NaN where it never does.

    `values [..., T]` on the common `steps [T]`, `thresholds [...]`. Before the first evaluation that
    reaches the threshold the curve is taken to be the straight line between the two evaluations that
    bracket it; a curve already past the threshold at its first evaluation crosses at `steps[0]`.
    """
    steps = np.asarray(steps, dtype=float)  # [T]
    values = np.asarray(values, dtype=float)  # [..., T]
    thresholds = np.asarray(thresholds, dtype=float)[..., None]  # [..., 1]
    sign = 1.0 if higher else -1.0
    values = np.broadcast_to(values, np.broadcast_shapes(values.shape, thresholds.shape))  # [..., T]
    reached = sign * (values - thresholds) >= 0  # [..., T]
    first = np.argmax(reached, axis=-1)  # [...]: index of the first True (0 when none)
    hit = reached.any(axis=-1)
    prev = np.maximum(first - 1, 0)
    v0 = np.take_along_axis(values, prev[..., None], -1)[..., 0]
    v1 = np.take_along_axis(values, first[..., None], -1)[..., 0]
    s0, s1 = steps[prev], steps[first]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(first > 0, (thresholds[..., 0] - v0) / (v1 - v0), 0.0)
    return np.where(hit, s0 + frac * (s1 - s0), np.nan)


def first_crossing(steps, values, threshold: float, higher: bool = True) -> float | None:
    """`crossing_steps` for one curve: the interpolated step, or None if it never reaches `threshold`."""
    step = float(crossing_steps(steps, values, np.float64(threshold), higher))
    return None if math.isnan(step) else step


def normalised_auc(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Trapezoid area over the step range divided by its length: the curve's mean level, so runs
    of different lengths and metrics of different scales stay comparable. `values [..., T]`."""
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    if steps.size == 1:
        return values[..., 0]
    widths = np.diff(steps)  # [T-1]
    return ((values[..., 1:] + values[..., :-1]) / 2 * widths).sum(-1) / (steps[-1] - steps[0])


def align(curves: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Put curves on one step grid: the union of their evaluation steps inside the range that every
    curve covers (never extrapolate a run past its last evaluation). Returns `steps [T]`, `values [R, T]`."""
    if not curves or any(len(c) == 0 for c in curves):
        raise ValueError("align() needs at least one curve and no empty curve")
    arrays = [np.asarray(sorted(c), dtype=float) for c in curves]  # each [T_r, 2]
    start = max(a[0, 0] for a in arrays)
    stop = min(a[-1, 0] for a in arrays)
    if start > stop:
        raise ValueError(f"curves share no step range (latest start {start:g} > earliest end {stop:g})")
    grid = np.unique(np.concatenate([a[:, 0] for a in arrays]))
    grid = grid[(grid >= start) & (grid <= stop)]  # [T]
    return grid, np.stack([np.interp(grid, a[:, 0], a[:, 1]) for a in arrays])  # [R, T]


def thresholds_between(first: np.ndarray, last: np.ndarray, fractions) -> np.ndarray:
    """Thresholds a fraction of the way from a curve's first to its final value: `[..., F]`."""
    fractions = np.asarray(fractions, dtype=float)
    # written as a weighted mean so that fraction 1 gives exactly `last` (the baseline must reach its own final value)
    return first[..., None] * (1 - fractions) + last[..., None] * fractions


@dataclass
class Comparison:
    """One variant against its baseline on one metric. Speed-ups are `iterations(baseline) /
    iterations(variant)` at each threshold; 0.0 means the variant never reached it (NaN: undefined,
    the baseline did not improve). CIs are percentile bootstrap intervals over seeds."""

    metric: str
    higher: bool
    fractions: tuple[float, ...]
    steps: np.ndarray  # the common step grid [T]
    thresholds: np.ndarray  # [F], from the baseline's mean curve
    base_iters: np.ndarray  # [F]
    variant_iters: np.ndarray  # [F], NaN = not reached
    speedup: np.ndarray  # [F]
    speedup_ci: np.ndarray  # [F, 2]
    not_reached_share: np.ndarray  # [F]: share of resamples in which the variant never reached the threshold
    auc: tuple[float, float]  # (baseline, variant), normalised
    auc_diff_ci: tuple[float, float]
    final_gap: float  # variant - baseline at the last common step
    final_gap_ci: tuple[float, float]
    n_seeds: tuple[int, int]
    paired: bool
    extra: dict = field(default_factory=dict)


def _statistics(steps, base, var, higher: bool, fractions) -> np.ndarray:
    """Speed-ups [N, F], AUC of both arms and the final gap from mean curves `base, var [N, T]`."""
    sign = 1.0 if higher else -1.0
    tau = thresholds_between(base[:, 0], base[:, -1], fractions)  # [N, F]
    t_base = crossing_steps(steps, base[:, None, :], tau, higher)  # [N, F]
    t_var = crossing_steps(steps, var[:, None, :], tau, higher)  # [N, F]
    improved = (sign * (base[:, -1] - base[:, 0]) > 0)[:, None]  # [N, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        speed = np.where(np.isnan(t_var), 0.0, t_base / t_var)
    speed = np.where(improved, speed, np.nan)
    auc_b, auc_v = normalised_auc(steps, base), normalised_auc(steps, var)  # [N]
    gap = var[:, -1] - base[:, -1]
    return np.concatenate([speed, auc_b[:, None], auc_v[:, None], gap[:, None]], axis=1)  # [N, F+3]


def _percentiles(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval without interpolation, so that infinite or 0 (not reached) samples stay exact."""
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    return (float(np.quantile(samples, alpha, method="lower")), float(np.quantile(samples, 1 - alpha, method="higher")))


def compare(base_curves, variant_curves, *, metric: str, base_seeds=None, variant_seeds=None,
            fractions=DEFAULT_FRACTIONS, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Comparison:
    """Iterations-to-threshold speed-ups, normalised AUC and the final gap of the seed-mean curves,
    with percentile bootstrap CIs.

    Each resample draws seeds with replacement and recomputes everything from the resampled mean
    curves, thresholds included (so the baseline always reaches its own final value). When both arms
    ran the same seeds the resampling is paired: a seed shares the initialisation and data order across
    arms, and pairing keeps that correlation out of the interval.
    """
    fractions = tuple(float(f) for f in fractions)
    higher = higher_is_better(metric)
    steps, values = align(list(base_curves) + list(variant_curves))  # [T], [Rb+Rv, T]
    base, var = values[:len(base_curves)], values[len(base_curves):]  # [Rb, T], [Rv, T]
    nb, nv = len(base), len(var)
    point = _statistics(steps, base.mean(0, keepdims=True), var.mean(0, keepdims=True), higher, fractions)[0]
    base_seeds = list(base_seeds) if base_seeds is not None else list(range(nb))
    variant_seeds = list(variant_seeds) if variant_seeds is not None else list(range(nv))
    paired = (sorted(base_seeds) == sorted(variant_seeds) and len(set(base_seeds)) == nb)
    rng = np.random.default_rng(seed)
    if min(nb, nv) >= 2 and n_boot > 0:
        if paired:
            pick = rng.integers(0, nb, size=(n_boot, nb))  # [N, R] seed positions
            order = [variant_seeds.index(s) for s in base_seeds]
            ib, iv = pick, np.asarray(order)[pick]
        else:
            ib, iv = rng.integers(0, nb, size=(n_boot, nb)), rng.integers(0, nv, size=(n_boot, nv))
        boot = _statistics(steps, base[ib].mean(1), var[iv].mean(1), higher, fractions)  # [N, F+3]
        cis = [_percentiles(boot[:, i], level) for i in range(boot.shape[1])]
        auc_diff_ci = _percentiles(boot[:, -2] - boot[:, -3], level)
        not_reached = (boot[:, :len(fractions)] == 0).mean(0)
    else:  # one seed in an arm: no spread to resample
        cis = [(math.nan, math.nan)] * point.size
        auc_diff_ci = (math.nan, math.nan)
        not_reached = np.full(len(fractions), math.nan)
    F = len(fractions)
    tau = thresholds_between(base.mean(0)[0], base.mean(0)[-1], fractions)
    return Comparison(
        metric=metric, higher=higher, fractions=fractions, steps=steps, thresholds=tau,
        base_iters=crossing_steps(steps, base.mean(0), tau, higher),
        variant_iters=crossing_steps(steps, var.mean(0), tau, higher),
        speedup=point[:F], speedup_ci=np.asarray(cis[:F]), not_reached_share=not_reached,
        auc=(float(point[F]), float(point[F + 1])), auc_diff_ci=auc_diff_ci,
        final_gap=float(point[F + 2]), final_gap_ci=cis[F + 2], n_seeds=(nb, nv), paired=paired)
